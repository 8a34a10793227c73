"""Pieces shared by the built-in meta-algorithms."""

from __future__ import annotations

from typing import Callable

import torch

from autometa.components import Backbone
from autometa.errors import ProtocolError
from autometa.types import Task, TrainingPool

EMBED_BATCH = 1024


def embed(backbone: Backbone, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Embed many rows in slices so a large support set does not exhaust memory."""
    n = next(iter(inputs.values())).shape[0]
    return torch.cat(
        [backbone({m: t[i: i + EMBED_BATCH] for m, t in inputs.items()}) for i in range(0, n, EMBED_BATCH)]
    )


def every_training_row(backbone: Backbone, pool: TrainingPool, rng) -> tuple[torch.Tensor, torch.Tensor]:
    """Every training row's fixed features and label, in a seeded order: what a learner that fits
    once on the backbone's output (gbm, linear) fits on."""
    inputs, y = pool.rows_batch(len(pool.rows), rng)
    with torch.no_grad():
        return embed(backbone, inputs), y


def through_training_classes(task: Task, logits: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """``[n_query, n_way]`` logits of ``task`` from a classifier of the training classes
    (``logits`` of inputs), for learners fitted once on every training row (gbm, linear).

    A task of the training classes gets the classifier's logits. A task with its own labels (a
    held-out group, or ``autometa predict --support``) is answered through its class
    probabilities: each task class's prototype is the mean probability vector of its support
    rows, and a query's logit for it is the log of the dot product with its own probabilities
    (the log-probability of the training class, when a task class is one).
    """
    query = logits(task.query_inputs())
    if task.same_classes_as_training:
        return query
    support = torch.softmax(logits(task.support_inputs()), dim=-1)
    prototypes = torch.zeros(task.n_way, support.shape[1], dtype=support.dtype, device=support.device)
    prototypes.index_add_(0, task.support_y, support)
    prototypes /= torch.bincount(task.support_y, minlength=task.n_way).clamp_min(1).unsqueeze(1).to(support.dtype)
    agreement = torch.softmax(query, dim=-1) @ prototypes.T
    return torch.log(agreement.clamp_min(torch.finfo(agreement.dtype).tiny))


def placement(backbone: Backbone, device: torch.device) -> dict:
    """Device and dtype for new tensors: the backbone's, or torch's default for a parameterless one
    (``embedding_placement`` finds a parameterless backbone's real output dtype)."""
    first = next(backbone.parameters(), None)
    return {"device": device, "dtype": first.dtype if first is not None else torch.get_default_dtype()}


def step(optimizer: torch.optim.Optimizer | None, loss: torch.Tensor) -> None:
    """One optimiser step; a model with nothing to train (e.g. identity ▶ concat) skips it."""
    if optimizer is not None and loss.requires_grad:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def make_optimizer(params, **kwargs) -> torch.optim.Optimizer | None:
    params = [p for p in params if p.requires_grad]
    return torch.optim.Adam(params, **kwargs) if params else None


def first_task(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {m: t[0] for m, t in inputs.items()}


def embedding_placement(backbone: Backbone, pool: TrainingPool) -> dict:
    """Device and dtype of the backbone's embeddings, for heads built on top of them.

    A parameterless backbone (identity ▶ concat) passes its inputs' dtype through, which
    ``placement`` cannot know, so one training row is embedded to find out. A pool without
    rows (a saved model rebuilt from ``PoolInfo``) gets ``placement``'s default dtype.
    """
    if next(backbone.parameters(), None) is not None or getattr(pool, "features", None) is None:
        return placement(backbone, pool.device)
    with torch.no_grad():
        probe = backbone(pool.features.take(torch.as_tensor(pool.rows[:1], device=pool.device)))
    return {"device": probe.device, "dtype": probe.dtype}


def training_shape(
    pool: TrainingPool, shape: tuple[int, int, int], ways: int | None = None, shots: int | None = None
) -> tuple[int, int, int]:
    """The episode shape to train on: the protocol's ``shape`` with ``ways``/``shots`` overriding.

    Ways and queries shrink to what the pool can supply (``pool.episode_shape``). Shots asked
    above the protocol's fall back towards the protocol's; at or below it, a shape the pool
    cannot supply is the protocol's error to report, as it would be without the override.
    """
    protocol_ways, protocol_shots, queries = shape
    ways = protocol_ways if ways is None else ways
    wanted = protocol_shots if shots is None else shots
    floor = min(wanted, protocol_shots)
    for n_shots in range(wanted, floor - 1, -1):
        try:
            return pool.episode_shape(ways, n_shots, queries)
        except ProtocolError:
            if n_shots == floor:
                raise
    raise AssertionError("unreachable")  # pragma: no cover
