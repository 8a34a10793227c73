"""Metric-based meta-learners: classify queries by comparing embeddings with the support set.

Each learner is split in two: ``prepare`` summarises a task's support embeddings once
(class prototypes, normalised rows and their labels) and ``score`` compares query embeddings
with that summary. ``predict`` scores the queries in chunks, because the standard protocol's
single task has every training row as its support and all held-out rows as its queries.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch import nn

from autometa.components import Backbone, MetaAlgorithm
from autometa.types import Task, TaskSize, TrainingPool
from autometa_builtins.meta_algorithms._common import (
    embed,
    embedding_placement,
    first_task,
    make_optimizer,
    step,
    training_shape,
)

# Elements of the largest intermediate tensor while scoring one chunk of queries (64 MiB in float32).
CHUNK_ELEMENTS = 2**24
# Initial temperature of cosine logits: cosines lie in [-1, 1], and a softmax over values that
# close together stays nearly uniform, so cross-entropy would barely reward confident answers.
COSINE_SCALE = 10.0
NORM_EPS = 1e-8


def class_means(support: torch.Tensor, support_y: torch.Tensor, n_way: int) -> torch.Tensor:
    """``[n_way, dim]`` mean support embedding of each class (zero for a class without rows)."""
    sums = torch.zeros(n_way, support.shape[-1], dtype=support.dtype, device=support.device)
    sums = sums.index_add(0, support_y, support)
    # index_add rather than bincount for the counts: it has a vmap batching rule (MAML's heads).
    counts = torch.zeros(n_way, dtype=support.dtype, device=support.device)
    counts = counts.index_add(0, support_y, torch.ones_like(support_y, dtype=support.dtype))
    return sums / counts.clamp_min(1).unsqueeze(-1)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[len(a), len(b)]`` cosine similarities of the rows of ``a`` and ``b``."""
    return F.normalize(a, dim=-1, eps=NORM_EPS) @ F.normalize(b, dim=-1, eps=NORM_EPS).T


def squared_distance_logits(query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    return -((query.unsqueeze(-2) - prototypes) ** 2).sum(-1)


def prototype_logits(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int) -> torch.Tensor:
    """Negative squared euclidean distance from each query to each class mean of the support."""
    return squared_distance_logits(query, class_means(support, support_y, n_way))


class LearnableScale(nn.Module):
    """Multiplies by a positive learned scalar, stored as its log so no step can flip its sign."""

    def __init__(self, initial: float):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(initial)))

    @property
    def value(self) -> torch.Tensor:
        return self.log_scale.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value * x


class _MetricLearner(MetaAlgorithm):
    """Episodic training of a backbone (and an optional head) through a support/query comparison.

    Subclasses supply ``prepare`` (support summary), ``score`` (query logits against it),
    ``query_cost`` (elements ``score`` allocates per query) and optionally ``_make_head`` and
    ``loss``. ``train_ways``/``train_shots`` (None: the protocol's) set the training episodes;
    Snell et al. found training with more ways than tested helps.
    """

    head: nn.Module | None = None
    uses_auxiliary_loss = True

    def __init__(
        self,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        train_ways: int | None = None,
        train_shots: int | None = None,
    ):
        if train_ways is not None and train_ways < 2:
            raise ValueError(f"train_ways must be at least 2 (or None for the protocol's), got {train_ways}")
        if train_shots is not None and train_shots < 1:
            raise ValueError(f"train_shots must be at least 1 (or None for the protocol's), got {train_shots}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.train_ways = train_ways
        self.train_shots = train_shots

    # -- what subclasses define ------------------------------------------------------------
    def _make_head(self, dim: int) -> nn.Module | None:
        return None

    def prepare(self, support: torch.Tensor, support_y: torch.Tensor, n_way: int) -> Any:  # pragma: no cover
        raise NotImplementedError

    def score(self, context: Any, query: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def query_cost(self, context: Any) -> int:  # pragma: no cover
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, query_y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, query_y)

    # -- the MetaAlgorithm protocol --------------------------------------------------------
    def setup(self, backbone: Backbone, pool: TrainingPool, shape: tuple[int, int, int]) -> None:
        self.backbone = backbone
        self.shape = training_shape(pool, shape, self.train_ways, self.train_shots)
        self.head = self._make_head(backbone.out_dim)
        params = list(backbone.parameters())
        if self.head is not None:
            self.head.to(**embedding_placement(backbone, pool))
            params += list(self.head.parameters())
        self.optimizer = make_optimizer(params, lr=self.lr, weight_decay=self.weight_decay)

    def modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, **({"head": self.head} if self.head is not None else {})}

    def logits(self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int) -> torch.Tensor:
        """``[n_query, n_way]`` logits of ``query`` embeddings given labelled ``support`` ones."""
        context = self.prepare(support, support_y, n_way)
        size = max(1, CHUNK_ELEMENTS // max(1, self.query_cost(context)))
        return torch.cat([self.score(context, chunk) for chunk in query.split(size)])

    def train_step(self, pool: TrainingPool, rng: np.random.Generator) -> float:
        task = pool.episodes(1, *self.shape, rng)
        support, support_aux = self.backbone.embed_with_aux(first_task(task.support_inputs()))
        query, query_aux = self.backbone.embed_with_aux(first_task(task.query_inputs()))
        loss = self.loss(self.score(self.prepare(support, task.support_y[0], task.n_way), query), task.query_y[0])
        loss = loss + (support_aux + query_aux) / 2
        step(self.optimizer, loss)
        return loss.item()

    @torch.no_grad()
    def predict(self, task: Task) -> torch.Tensor:
        support = embed(self.backbone, task.support_inputs())
        query = embed(self.backbone, task.query_inputs())
        return self.logits(support, task.support_y, query, task.n_way)


_TRAINING = {
    "lr": FloatDistribution(1e-4, 1e-2, log=True),
    "weight_decay": FloatDistribution(1e-7, 1e-3, log=True),
    # None trains on the protocol's shape; larger ways are cheap for metric learners and are
    # clamped to the training classes a pool has.
    "train_ways": CategoricalDistribution([None, 5, 10, 20]),
    "train_shots": CategoricalDistribution([None, 1, 5]),
}


class ProtoNet(_MetricLearner):
    """Prototypical Networks (Snell et al. 2017): classify queries by the nearest class mean.

    ``distance="euclidean"``: logits are negative squared euclidean distances (the paper's).
    ``distance="cosine"``: logits are cosine similarities to the class means times a *learned*
    temperature (initially ``COSINE_SCALE``, trained with the backbone), as in TADAM's metric
    scaling (Oreshkin et al. 2018); without it cosine logits are too flat to train on.
    """

    name = "protonet"
    search_space = {**_TRAINING, "distance": CategoricalDistribution(["euclidean", "cosine"])}
    distances = ("euclidean", "cosine")

    def __init__(
        self,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        distance: str = "euclidean",
        train_ways: int | None = None,
        train_shots: int | None = None,
    ):
        if distance not in self.distances:
            raise ValueError(f"distance must be one of {', '.join(self.distances)}; got {distance!r}")
        super().__init__(lr=lr, weight_decay=weight_decay, train_ways=train_ways, train_shots=train_shots)
        self.distance = distance

    def _make_head(self, dim: int) -> nn.Module | None:
        return LearnableScale(COSINE_SCALE) if self.distance == "cosine" else None

    def prepare(self, support, support_y, n_way):
        return class_means(support, support_y, n_way)

    def score(self, prototypes, query):
        if self.distance == "euclidean":
            return squared_distance_logits(query, prototypes)
        return self.head(cosine_matrix(query, prototypes))

    def query_cost(self, prototypes):
        return prototypes.numel()


class RelationNet(_MetricLearner):
    """Relation Networks (Sung et al. 2018) on vector embeddings.

    A relation module (linear ▶ ReLU ▶ linear to one unit, of width ``hidden``) reads
    concat(query embedding, class prototype); the sigmoid of its output is the relation score
    in [0, 1], trained, as in the paper, by mean squared error against the one-hot label.
    Prototypes are class means (the paper sums the K shots' feature maps; a mean keeps the
    module's input scale the same for any shot count, which grouped and standard tasks vary).
    ``predict`` returns the module's pre-sigmoid outputs: sigmoid of a logit is the relation score.
    """

    name = "relationnet"
    search_space = {**_TRAINING, "hidden": IntDistribution(8, 256, log=True)}

    def __init__(
        self,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        hidden: int = 64,
        train_ways: int | None = None,
        train_shots: int | None = None,
    ):
        super().__init__(lr=lr, weight_decay=weight_decay, train_ways=train_ways, train_shots=train_shots)
        self.hidden = hidden

    # Sung et al. train 5- and 20-way episodes. Beyond that the MSE against one-hot targets is
    # dominated by the negatives and every relation score sinks towards 0: at 71 ways a trial
    # ran 680 s to 0.8 % validation accuracy, below chance (issue 15).
    max_ways = 20

    @classmethod
    def fits_task(cls, size: TaskSize) -> str | None:
        if size.ways > cls.max_ways:
            return (f"its relation scores, trained by squared error against one-hot targets, collapse towards 0 "
                    f"at {size.ways} ways (it works up to {cls.max_ways})")
        return None

    def _make_head(self, dim: int) -> nn.Module:
        return nn.Sequential(nn.Linear(2 * dim, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))

    def prepare(self, support, support_y, n_way):
        return class_means(support, support_y, n_way)

    def score(self, prototypes, query):
        n_query, n_way = query.shape[0], prototypes.shape[0]
        pairs = torch.cat(
            [query.unsqueeze(1).expand(n_query, n_way, -1), prototypes.unsqueeze(0).expand(n_query, n_way, -1)], dim=-1
        )
        return self.head(pairs).squeeze(-1)

    def query_cost(self, prototypes):
        return prototypes.shape[0] * (2 * prototypes.shape[1] + self.hidden)

    def loss(self, logits, query_y):
        target = F.one_hot(query_y, logits.shape[-1]).to(logits.dtype)
        return F.mse_loss(torch.sigmoid(logits), target)


class MatchingNet(_MetricLearner):
    """Matching Networks (Vinyals et al. 2016), the basic version without full-context embeddings.

    Each query attends over the support rows with a softmax of cosine similarities; its class
    probabilities are the attention-weighted sum of the support rows' one-hot labels, and
    ``predict`` returns their logarithms. Support and query are embedded independently: the
    optional full-context embeddings (a bidirectional LSTM over the support, an attention LSTM
    over the queries) are not implemented. Training uses the default cross-entropy, which on
    these logits is the paper's negative log-likelihood (log-probabilities that already sum to
    one pass through log_softmax unchanged).

    ``learn_scale=False`` is the paper's attention: softmax over raw cosines. With embeddings
    that end in a ReLU the cosines lie in [0, 1], so attention can barely favour the right
    class and training stalls; ``learn_scale=True`` (the default) multiplies the cosines by a
    learned temperature, initially ``COSINE_SCALE``, as ProtoNet's cosine distance does.
    """

    name = "matchingnet"
    search_space = {**_TRAINING, "learn_scale": CategoricalDistribution([True, False])}

    def __init__(
        self,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        learn_scale: bool = True,
        train_ways: int | None = None,
        train_shots: int | None = None,
    ):
        super().__init__(lr=lr, weight_decay=weight_decay, train_ways=train_ways, train_shots=train_shots)
        self.learn_scale = learn_scale

    def _make_head(self, dim: int) -> nn.Module | None:
        return LearnableScale(COSINE_SCALE) if self.learn_scale else None

    def prepare(self, support, support_y, n_way):
        return F.normalize(support, dim=-1, eps=NORM_EPS), F.one_hot(support_y, n_way).to(support.dtype)

    def score(self, context, query):
        keys, labels = context
        similarity = F.normalize(query, dim=-1, eps=NORM_EPS) @ keys.T
        if self.head is not None:
            similarity = self.head(similarity)
        attention = torch.softmax(similarity, dim=-1)
        # A learned temperature can grow until far support rows' weights underflow to zero.
        return (attention @ labels).clamp_min(torch.finfo(attention.dtype).tiny).log()

    def query_cost(self, context):
        keys, labels = context
        return keys.shape[0] + labels.shape[1]
