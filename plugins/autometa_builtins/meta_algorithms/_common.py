"""Pieces shared by the built-in meta-algorithms."""

from __future__ import annotations

import torch

from autometa.components import Backbone

EMBED_BATCH = 1024


def embed(backbone: Backbone, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Embed many rows in slices so a large support set does not exhaust memory."""
    n = next(iter(inputs.values())).shape[0]
    return torch.cat(
        [backbone({m: t[i: i + EMBED_BATCH] for m, t in inputs.items()}) for i in range(0, n, EMBED_BATCH)]
    )


def placement(backbone: Backbone, device: torch.device) -> dict:
    """Device and dtype for new tensors: the backbone's, or the data's for a parameterless one."""
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
