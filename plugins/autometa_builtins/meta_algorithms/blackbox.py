"""Black-box (model-based) meta-learners: a task is adapted to by a forward pass, never a gradient step.

- ``mann`` reads an external key-value memory: the support set is written to it (keys from
  the embeddings, values the labels) and each query reads it by content, as the read heads of
  Santoro et al. 2016 do.
- ``snail`` reads the labelled support set as a sequence and predicts each query's label with
  stacked causal attention (the attention blocks of Mishra et al. 2018).

Both are meta-trained end to end on episodes whose labels are a random assignment of the
episode's classes, so the only way to answer a query is to use the support set.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch import nn

from autometa.components import Backbone, MetaAlgorithm
from autometa.errors import ProtocolError
from autometa.types import Task, TaskSize, TrainingPool
from autometa_builtins.meta_algorithms._common import (
    embed,
    embedding_placement,
    make_optimizer,
    step,
    training_shape,
)
from autometa_builtins.meta_algorithms.metric import _TRAINING, NORM_EPS, _MetricLearner

# Elements of the largest attention tensor while ``snail`` reads one slice of queries.
QUERY_CHUNK_ELEMENTS = 2**22
# ``snail``'s test-time views are drawn from this fixed seed, so predictions are reproducible.
VIEW_SEED = 0


# -- memory-augmented network -----------------------------------------------------------------------
class KeyValueMemory(nn.Module):
    """Content-addressed reads of a memory of (key, value) slots by ``heads`` read heads.

    Each head projects an embedding to a ``key_dim`` key; a query's weight on a slot is the
    softmax over slots of the head's sharpness × the cosine of their keys (sharpness learned,
    stored as its log so it stays positive, starting at ``sharpness``). A head reads the
    weighted sum of the values; the heads' reads are averaged.
    """

    def __init__(self, dim: int, *, key_dim: int, heads: int, sharpness: float):
        super().__init__()
        self.heads, self.key_dim = heads, key_dim
        self.project = nn.Linear(dim, heads * key_dim, bias=False)
        self.log_sharpness = nn.Parameter(torch.full((heads,), math.log(sharpness)))

    def address(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, heads, key_dim]`` unit-length keys of ``[n, dim]`` embeddings."""
        return F.normalize(self.project(x).unflatten(-1, (self.heads, self.key_dim)), dim=-1, eps=NORM_EPS)

    def weights(self, keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``[n_query, heads, n_slots]`` read weights of ``query`` embeddings over slots with ``keys``."""
        cosine = torch.einsum("qhk,shk->qhs", self.address(query), keys)
        return torch.softmax(self.log_sharpness.exp().unsqueeze(-1) * cosine, dim=-1)

    def read(self, keys: torch.Tensor, values: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``[n_query, value_dim]``: the heads' mean read of ``values`` (``[n_slots, value_dim]``)."""
        return torch.einsum("qhs,sv->qv", self.weights(keys, query), values) / self.heads


class MANN(_MetricLearner):
    """Memory-augmented network: the support set is written to a key-value memory that queries read.

    Writing a task stores one slot per support row: its key is the row's embedding through
    each read head's learned projection, its value the row's one-hot label. A query reads the
    memory with every head (cosine addressing sharpened by a learned temperature, Santoro et
    al. 2016's content-based read) and the heads' mean read is a distribution over the task's
    classes; ``predict`` returns its logarithm. Keys, sharpness and backbone are meta-trained
    end to end by the query cross-entropy of episodes.

    Values are the labels themselves rather than a learned label code, so one model serves
    tasks of any number of ways (grouped tasks vary) and any label order, and the standard
    protocol's single task works too: its memory holds every training row, read in slices.
    Santoro et al. write with least-recently-used addressing into a fixed number of slots,
    which can overwrite support rows; here a task's rows are all kept.
    """

    name = "mann"
    search_space = {
        **_TRAINING,
        "key_dim": IntDistribution(8, 128, log=True),
        "heads": IntDistribution(1, 4),
        "sharpness": FloatDistribution(1.0, 30.0, log=True),
    }

    def __init__(
        self,
        *,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        key_dim: int = 32,
        heads: int = 2,
        sharpness: float = 10.0,
        train_ways: int | None = None,
        train_shots: int | None = None,
    ):
        if key_dim < 1 or heads < 1 or not sharpness > 0:
            raise ValueError(
                f"key_dim and heads must be at least 1 and sharpness positive; got {key_dim}, {heads}, {sharpness}"
            )
        super().__init__(lr=lr, weight_decay=weight_decay, train_ways=train_ways, train_shots=train_shots)
        self.key_dim = key_dim
        self.heads = heads
        self.sharpness = sharpness

    def _make_head(self, dim: int) -> nn.Module:
        return KeyValueMemory(dim, key_dim=self.key_dim, heads=self.heads, sharpness=self.sharpness)

    def prepare(self, support, support_y, n_way):
        """Write: one slot per support row."""
        return self.head.address(support), F.one_hot(support_y, n_way).to(support.dtype)

    def score(self, memory, query):
        keys, values = memory
        # A sharp head can give far slots weights that underflow to zero.
        return self.head.read(keys, values, query).clamp_min(torch.finfo(query.dtype).tiny).log()

    def query_cost(self, memory):
        keys, values = memory
        return self.heads * (keys.shape[0] + self.key_dim) + values.shape[1]


# -- SNAIL-style sequence learner ------------------------------------------------------------------
class CausalAttention(nn.Module):
    """One SNAIL attention block: causal soft attention whose read is appended to the input.

    ``forward`` takes a task's support sequence ``[tasks, S, C]`` and its queries ``[tasks, Q, C]``.
    Support position i attends to positions 0..i. Each query is the last element of its own
    sequence (the support, then that query), so it attends to the whole support and itself but
    never to another query; the support part of those sequences is shared, so it is computed once.
    """

    def __init__(self, in_dim: int, key_size: int, value_size: int):
        super().__init__()
        self.query = nn.Linear(in_dim, key_size)
        self.key = nn.Linear(in_dim, key_size)
        self.value = nn.Linear(in_dim, value_size)
        # Keys start equal to queries, so a score starts as the dot product of two steps under one
        # random projection: a query already favours the support rows most like it and reads their
        # labels, a signal to learn from at once. Independent projections start with scores
        # unrelated to similarity (see SequenceReader for what that cost on KanjiVG).
        with torch.no_grad():
            self.key.weight.copy_(self.query.weight)
            self.key.bias.copy_(self.query.bias)
        self.scale = key_size**-0.5
        self.out_dim = in_dim + value_size

    def forward(self, support: torch.Tensor, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_support = support.shape[-2]
        keys, values = self.key(support), self.value(support)
        scores = self.scale * self.query(support) @ keys.transpose(-1, -2)
        later = torch.ones(n_support, n_support, dtype=torch.bool, device=support.device).triu(1)
        support_read = torch.softmax(scores.masked_fill(later, float("-inf")), dim=-1) @ values
        asks = self.query(query)
        own = self.scale * (asks * self.key(query)).sum(-1, keepdim=True)
        weights = torch.softmax(torch.cat([self.scale * asks @ keys.transpose(-1, -2), own], dim=-1), dim=-1)
        query_read = weights[..., :n_support] @ values + weights[..., n_support:] * self.value(query)
        return torch.cat([support, support_read], dim=-1), torch.cat([query, query_read], dim=-1)


class SequenceReader(nn.Module):
    """Stacked causal attention blocks over (embedding, one-hot label slot) steps, then a linear
    map of each query's final state to ``slots`` label logits."""

    def __init__(self, dim: int, slots: int, *, key_size: int, value_size: int, blocks: int):
        super().__init__()
        self.slots = slots
        # Steps are embeddings centred on the task's support mean, then layer-normalised: backbones
        # differ wildly in scale, and an untrained CNN embeds every image in nearly the same
        # direction (cosines of 0.98 on KanjiVG), which centring removes so that rows differ.
        # Measured on KanjiVG 5-way 1-shot (conv4): with layer normalisation alone and independent
        # keys, training was still at chance after 100 episodes; with centring and the tied initial
        # keys of CausalAttention, validation accuracy was 60% after 150 and 94% after 350.
        self.norm = nn.LayerNorm(dim)
        width = dim + slots
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            self.blocks.append(CausalAttention(width, key_size, value_size))
            width = self.blocks[-1].out_dim
        self.out = nn.Linear(width, slots)

    def forward(self, support: torch.Tensor, support_slot: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """``[tasks, Q, slots]`` logits from support embeddings ``[tasks, S, dim]`` with their label
        slots ``[tasks, S]`` and query embeddings ``[tasks, Q, dim]`` (whose label input is zero)."""
        centre = support.mean(dim=-2, keepdim=True)
        labels = F.one_hot(support_slot, self.slots).to(support.dtype)
        support = torch.cat([self.norm(support - centre), labels], dim=-1)
        query = torch.cat([self.norm(query - centre), query.new_zeros(*query.shape[:-1], self.slots)], dim=-1)
        for block in self.blocks:
            support, query = block(support, query)
        return self.out(query)


def _flat(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows of a batch of tasks, ``[tasks, rows, ...]`` → ``[tasks * rows, ...]``."""
    return {m: t.flatten(0, 1) for m, t in inputs.items()}


class SNAIL(MetaAlgorithm):
    """A SNAIL-style sequence learner (Mishra et al. 2018): causal attention over the support set.

    A task becomes one sequence per query: the support rows, each its embedding concatenated
    with its one-hot label, then the query with an all-zero label; ``blocks`` causal attention
    blocks (each appends its read to its input, as in the paper) and a linear layer give the
    query's label logits. Queries never see each other (see ``CausalAttention``). Embeddings
    enter centred on the task's support mean and layer-normalised (see ``SequenceReader``). The
    paper's temporal-convolution blocks are left out: they read the sequence's order, which
    carries no information here.

    Labels are ``slots`` one-hot positions, fixed at setup: ``max_ways``, or by default the
    larger of the protocol's ways and ``train_ways``. Each training episode puts its classes
    on a random choice of slots and its support rows in a random order, so every slot is
    trained and no order is learned. ``predict`` averages the log-probabilities of ``views``
    such random (order, slot) choices drawn from a fixed seed, applied to the support sorted
    by row: the same support set in any order gives the same prediction. A task with more
    classes than slots is a ProtocolError.

    Only ``fewshot`` and ``grouped``: the standard protocol's single task has every training row
    as its support, a sequence whose causal attention grows with the square of its length.
    """

    name = "snail"
    protocols = ("fewshot", "grouped")
    uses_auxiliary_loss = True  # the backbone's cross-modal loss joins the episode loss
    search_space = {
        "lr": FloatDistribution(1e-4, 1e-2, log=True),
        "weight_decay": FloatDistribution(1e-7, 1e-3, log=True),
        "key_size": IntDistribution(16, 128, log=True),
        "value_size": IntDistribution(16, 128, log=True),
        "blocks": IntDistribution(1, 3),
        "meta_batch": IntDistribution(1, 8),
        "train_ways": CategoricalDistribution([None, 5, 10]),
        "train_shots": CategoricalDistribution([None, 1, 5]),
    }

    def __init__(
        self,
        *,
        lr: float = 3e-3,
        weight_decay: float = 1e-6,
        key_size: int = 64,
        value_size: int = 32,
        blocks: int = 2,
        meta_batch: int = 2,
        views: int = 4,
        max_ways: int | None = None,
        train_ways: int | None = None,
        train_shots: int | None = None,
    ):
        for option, value, least in (("key_size", key_size, 1), ("value_size", value_size, 1), ("blocks", blocks, 1),
                                     ("meta_batch", meta_batch, 1), ("views", views, 1), ("train_ways", train_ways, 2),
                                     ("max_ways", max_ways, 2), ("train_shots", train_shots, 1)):
            if value is not None and value < least:
                raise ValueError(f"snail: {option} must be at least {least}, got {value}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.key_size = key_size
        self.value_size = value_size
        self.blocks = blocks
        self.meta_batch = meta_batch
        self.views = views
        self.max_ways = max_ways
        self.train_ways = train_ways
        self.train_shots = train_shots

    @classmethod
    def fits_task(cls, size: TaskSize) -> str | None:
        slots = max(size.ways, *(w for w in cls.search_space["train_ways"].choices if w is not None))
        if size.task_ways > slots:
            return (f"held-out tasks have up to {size.task_ways} classes, more than the {slots} one-hot label slots "
                    f"any of its configurations sets up (--ways {size.ways})")
        return None

    def setup(self, backbone: Backbone, pool: TrainingPool, shape: tuple[int, int, int]) -> None:
        self.backbone = backbone
        self.shape = training_shape(pool, shape, self.train_ways, self.train_shots)
        # From the configuration alone, not the pool, so a saved model rebuilds with the same size.
        self.slots = self.max_ways or max(shape[0], self.train_ways or 0)
        if self.shape[0] > self.slots:
            raise ValueError(f"snail: max_ways={self.max_ways} is below the {self.shape[0]} ways of training episodes")
        self.reader = SequenceReader(
            backbone.out_dim, self.slots, key_size=self.key_size, value_size=self.value_size, blocks=self.blocks
        ).to(**embedding_placement(backbone, pool))
        self.optimizer = make_optimizer(
            [*backbone.parameters(), *self.reader.parameters()], lr=self.lr, weight_decay=self.weight_decay
        )

    def modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "reader": self.reader}

    def train_step(self, pool: TrainingPool, rng: np.random.Generator) -> float:
        task = pool.episodes(self.meta_batch, *self.shape, rng)
        n_tasks, n_support = task.support.shape
        device = task.support.device
        support, support_aux = self.backbone.embed_with_aux(_flat(task.support_inputs()))
        query, query_aux = self.backbone.embed_with_aux(_flat(task.query_inputs()))
        support, query = support.unflatten(0, (n_tasks, n_support)), query.unflatten(0, (n_tasks, -1))
        order = torch.as_tensor(rng.permuted(np.tile(np.arange(n_support), (n_tasks, 1)), axis=1), device=device)
        slot_of = torch.as_tensor(
            np.stack([rng.permutation(self.slots)[: task.n_way] for _ in range(n_tasks)]), device=device
        )
        support_y = task.support_y.gather(1, order)
        support = support.gather(1, order.unsqueeze(-1).expand_as(support))
        logits = self.reader(support, slot_of.gather(1, support_y), query)
        # Only the episode's slots compete, as at test time; column j is the class labelled j.
        logits = logits.gather(2, slot_of.unsqueeze(1).expand(-1, logits.shape[1], -1))
        loss = F.cross_entropy(logits.flatten(0, 1), task.query_y.flatten())
        loss = loss + (support_aux + query_aux) / 2
        step(self.optimizer, loss)
        return loss.item()

    @torch.no_grad()
    def predict(self, task: Task) -> torch.Tensor:
        if task.n_way > self.slots:
            raise ProtocolError(
                f"snail reads labels as {self.slots} one-hot slots (the protocol's ways, train_ways or max_ways "
                f"when it was set up) and cannot answer a task with {task.n_way} classes; raise --ways or "
                f"max_ways to at least {task.n_way}, or use another meta-algorithm"
            )
        support = embed(self.backbone, task.support_inputs())
        query = embed(self.backbone, task.query_inputs())
        device = support.device
        # Sorted by row: the views depend on the support set, not on the order it was given in.
        by_row = torch.argsort(task.support, stable=True)
        generator = torch.Generator().manual_seed(VIEW_SEED)
        size = max(1, QUERY_CHUNK_ELEMENTS // ((len(by_row) + 1) * max(self.key_size, self.value_size)))
        total = None
        for _ in range(self.views):
            order = by_row[torch.randperm(len(by_row), generator=generator).to(device)]
            slot_of = torch.randperm(self.slots, generator=generator)[: task.n_way].to(device)
            seen = support[order].unsqueeze(0), slot_of[task.support_y[order]].unsqueeze(0)
            logits = torch.cat([self.reader(*seen, chunk.unsqueeze(0))[0] for chunk in query.split(size)])
            view = torch.log_softmax(logits[:, slot_of], dim=-1)
            total = view if total is None else total + view
        return total / self.views
