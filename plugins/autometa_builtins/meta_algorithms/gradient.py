"""Gradient-based meta-learners on torch.func: functional inner loops, vmapped over tasks.

The family shares one functional core, :class:`GradientMetaLearner`. A model is the pair
``(body, head)`` of parameter dicts: ``body`` holds the backbone's parameters by name, ``head``
a linear classifier made afresh for every task, which keeps it invariant to the order of
labels and valid for any number of ways (a meta-learned head shared by all classes would gain
nothing: its meta-gradient is exactly zero, as softmax ignores a shift common to every class).
Learners that adapt the body start the head at the support set's class means, w_k = 2 c_k and
b_k = −‖c_k‖², the nearest-class-mean classifier as a linear layer (Proto-MAML, Triantafillou
et al. 2020). A zero head would leave the body without an inner-loop gradient in the first
step (the loss's gradient w.r.t. the features, Wᵀ(p − y), is zero), so that one inner step
would adapt the head alone, exactly as ANIL, which keeps the zero head (Kao et al. 2022's
"zeroing trick"). A task's inner loop is a pure function of the initial
parameters and the task's tensors, so the same code runs per task or under ``vmap`` over the
meta-batch (``chunk_size`` bounds the memory of the latter).

- ``maml`` (Finn et al. 2017) adapts body and head, differentiating through the inner loop;
  ``fomaml`` is its first-order approximation.
- ``anil`` (Raghu et al. 2020) adapts only the head on features the body computes once per task.
- ``metasgd`` (Li et al. 2017) meta-learns a learning rate for every parameter with the init.
- ``reptile`` (Nichol et al. 2018) moves the init towards each task's adapted parameters.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap
from torch.utils._pytree import tree_map

from autometa.components import Backbone, MetaAlgorithm, vmap_blocker
from autometa.types import Task, TrainingPool
from autometa_builtins.meta_algorithms._common import EMBED_BATCH, make_optimizer, placement, training_shape
from autometa_builtins.meta_algorithms.metric import class_means

Params = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]
logger = logging.getLogger("autometa.meta")


def _detach(tree):
    return tree_map(torch.Tensor.detach, tree)


def _index(tree, i: int):
    return tree_map(lambda t: t[i], tree)


def _concat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], dim: int = 0) -> dict[str, torch.Tensor]:
    return {m: torch.cat([a[m], b[m]], dim=dim) for m in a}


def _head_logits(head: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    return F.linear(features, head["weight"], head["bias"])


def _head_loss(head: dict[str, torch.Tensor], features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_head_logits(head, features), y)


# Training-episode shapes offered to the search; None keeps the protocol's own.
_WAYS = CategoricalDistribution([None, 5, 10])
_SHOTS = CategoricalDistribution([None, 1, 5])


class GradientMetaLearner(MetaAlgorithm):
    """Shared functional core of the gradient-based family (not registered by itself).

    Subclasses change one piece: ``_update`` (how a gradient moves the fast weights), ``adapt``
    (what the inner loop touches), ``_task_loss`` (a task's outer loss) or ``meta_step`` (the
    outer update). ``vectorize`` chooses ``vmap`` over the meta-batch or a plain loop over its
    tasks; both compute the same numbers. A backbone with a module that vmap gets wrong
    (:func:`autometa.components.vmap_blocker`) always takes the loop. ``chunk_size`` tasks at a time (None: all) go
    through vmap, forward and backward, which bounds a meta-update's memory. ``train_ways`` /
    ``train_shots`` set the training episodes (None: the protocol's), clamped to what the
    training pool can supply. ``vectorize`` and ``chunk_size`` change speed and memory, never
    the result, so they are left out of the search spaces.
    """

    protocols = ("fewshot", "grouped")
    uses_auxiliary_loss = True
    # Drop the inner loop's second-order terms (MAML's option; fixed by other members).
    first_order: bool = False
    # Learners whose inner loop costs time and state per adapted weight (a learned rate or update
    # rule for each) set the most backbone weights it may adapt; beyond it, the largest tensors
    # (a hashed embedding table has a million) stay fixed within a task, as in ANIL.
    max_adapted: int | None = None

    def __init__(
        self,
        *,
        inner_lr: float = 0.1,
        inner_steps: int = 3,
        lr: float = 1e-3,
        meta_batch: int = 4,
        train_ways: int | None = None,
        train_shots: int | None = None,
        vectorize: bool = True,
        chunk_size: int | None = None,
    ):
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.lr = lr
        self.meta_batch = meta_batch
        self.train_ways = train_ways
        self.train_shots = train_shots
        self.vectorize = vectorize
        self.chunk_size = chunk_size

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, backbone: Backbone, pool: TrainingPool, shape: tuple[int, int, int]) -> None:
        self.backbone = backbone
        self.device = pool.device
        self.shape = training_shape(pool, shape, self.train_ways, self.train_shots)
        self.vmap_blocker = vmap_blocker(backbone)
        if self.vectorize and self.vmap_blocker:
            logger.info("%s: tasks one at a time, not vmapped: %s", self.name, self.vmap_blocker)
        self.fixed_in_task = self._fixed_in_task()
        self._build()
        self.optimizer = make_optimizer(self._meta_parameters(), lr=self.lr)

    @property
    def vectorized(self) -> bool:
        """Whether tasks go through vmap: asked for, and nothing in the backbone forbids it."""
        return self.vectorize and self.vmap_blocker is None

    def _fixed_in_task(self) -> frozenset[str]:
        """Backbone parameters the inner loop leaves alone: the largest, until ``max_adapted`` holds."""
        sizes = {n: p.numel() for n, p in self.backbone.named_parameters()}
        adapted, fixed = sum(sizes.values()), set()
        for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
            if self.max_adapted is None or adapted <= self.max_adapted:
                break
            fixed.add(name)
            adapted -= sizes[name]
        if fixed:
            logger.warning(
                "%s adapts %s of the backbone's %s weights per task (its inner loop costs time and memory per "
                "weight; limit %s): %s stay fixed within a task and are meta-learned only",
                self.name, f"{adapted:,}", f"{sum(sizes.values()):,}", f"{self.max_adapted:,}", ", ".join(sorted(fixed)),
            )
        return frozenset(fixed)

    def _split(self, params: Params) -> tuple[dict[str, torch.Tensor], Params]:
        """(backbone tensors fixed within a task, the parameters the inner loop adapts)."""
        body, head = params
        fixed = {n: body[n] for n in self.fixed_in_task}
        return fixed, ({n: p for n, p in body.items() if n not in fixed}, head)

    @staticmethod
    def _join(fixed: dict[str, torch.Tensor], params: Params) -> Params:
        body, head = params
        return {**fixed, **body}, head

    def _build(self) -> None:
        """Create learned state beyond the backbone (before the optimiser is made)."""

    def _meta_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    # -- functional pieces ---------------------------------------------------------------------
    def _initial(self, n_way: int) -> Params:
        body = dict(self.backbone.named_parameters())
        where = placement(self.backbone, self.device)
        head = {
            "weight": torch.zeros(n_way, self.backbone.out_dim, **where),
            "bias": torch.zeros(n_way, **where),
        }
        return body, head

    def _features(self, body: dict[str, torch.Tensor], x: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(self.backbone, body, (x,))

    def _features_and_aux(self, body: dict[str, torch.Tensor], x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and the backbone's weighted auxiliary loss (zero without one)."""
        return functional_call(self.backbone, body, (x,), {"aux": True})

    def _logits(self, params: Params, x: dict[str, torch.Tensor]) -> torch.Tensor:
        body, head = params
        return _head_logits(head, self._features(body, x))

    def _loss(self, params: Params, x, y) -> torch.Tensor:
        return F.cross_entropy(self._logits(params, x), y)

    def _outer_loss(self, params: Params, x, y) -> torch.Tensor:
        """The training objective: ``_loss`` plus the backbone's auxiliary loss (the inner loop
        fits the task alone)."""
        body, head = params
        features, aux = self._features_and_aux(body, x)
        return F.cross_entropy(_head_logits(head, features), y) + aux

    def _update(self, params: Params, grads: Params) -> Params:
        """One inner SGD step."""
        return tree_map(lambda p, g: p - self.inner_lr * g, params, grads)

    def _start(self, params: Params, x, y) -> Params:
        """A task's starting point: the meta-learned body, and the head at the class means of
        ``(x, y)`` under it (w_k = 2 c_k, b_k = −‖c_k‖²; see the module's docstring)."""
        body, head = params
        means = class_means(self._features(body, x), y, head["bias"].shape[-1])
        return body, {"weight": 2 * means, "bias": -(means**2).sum(-1)}

    def adapt(self, params: Params, x, y, *, steps: int | None = None) -> Params:
        """Inner loop: the head starts at the class means of ``(x, y)``, then ``steps`` gradient
        steps on their loss, differentiable through the gradients unless first-order."""
        fixed, params = self._split(self._start(params, x, y))

        def loss(adapted: Params, x, y) -> torch.Tensor:
            return self._loss(self._join(fixed, adapted), x, y)

        for _ in range(self.inner_steps if steps is None else steps):
            # First-order: the gradient's value is the same, but taking it at detached
            # parameters records no graph for the outer backward to walk.
            grads = grad(loss)(_detach(params) if self.first_order else params, x, y)
            params = self._update(params, grads)
        return self._join(fixed, params)

    def _task_loss(self, params: Params, sx, sy, qx, qy) -> torch.Tensor:
        return self._outer_loss(self.adapt(params, sx, sy), qx, qy)

    def _map_tasks(self, fn: Callable, params, *batched):
        """``fn(params, *task)`` for every task of a batch, results stacked on a leading dim."""
        if self.vectorized:
            in_dims = (None,) + (0,) * len(batched)
            return vmap(fn, in_dims=in_dims, randomness="different", chunk_size=self.chunk_size)(params, *batched)
        n_tasks = batched[-1].shape[0]
        results = [fn(params, *_index(batched, i)) for i in range(n_tasks)]
        return tree_map(lambda *xs: torch.stack(xs), *results)

    @staticmethod
    def _task_args(task: Task) -> tuple:
        return task.support_inputs(), task.support_y, task.query_inputs(), task.query_y

    def meta_loss(self, task: Task) -> torch.Tensor:
        """Mean query loss after adaptation over a batch of same-shape tasks."""
        return self._map_tasks(self._task_loss, self._initial(task.n_way), *self._task_args(task)).mean()

    def meta_backward(self, task: Task) -> float:
        """Add the meta-gradient of a batch of same-shape tasks to the meta-parameters'
        ``.grad``; returns the batch's mean query loss.

        It is accumulated slice by slice (``chunk_size`` tasks under vmap, one task in the
        per-task loop), each slice's graph freed by its backward before the next is built.
        That, rather than vmap's own chunking (whose chunks' graphs all live until the
        backward), is what bounds the memory of a meta-update.
        """
        n_tasks = len(task)
        size = (self.chunk_size or n_tasks) if self.vectorized else 1
        args = self._task_args(task)
        total = 0.0
        for start in range(0, n_tasks, size):
            part = tree_map(lambda t: t[start: start + size], args)
            loss = self._map_tasks(self._task_loss, self._initial(task.n_way), *part).sum() / n_tasks
            if loss.requires_grad:  # not with a parameterless backbone
                loss.backward()
            total += loss.item()
        return total

    def meta_step(self, task: Task) -> float:
        """One meta-update on a batch of same-shape tasks; returns their mean query loss."""
        if self.optimizer is None:  # nothing to learn
            with torch.no_grad():
                return self.meta_loss(task).item()
        self.optimizer.zero_grad()
        loss = self.meta_backward(task)
        self.optimizer.step()
        return loss

    # -- host protocol -------------------------------------------------------------------------
    def train_step(self, pool: TrainingPool, rng: np.random.Generator) -> float:
        return self.meta_step(pool.episodes(self.meta_batch, *self.shape, rng))

    def _predict_initial(self, task: Task) -> Params:
        """The parameters ``predict`` adapts to ``task`` from: the meta-learned initialisation."""
        return _detach(self._initial(task.n_way))

    def predict(self, task: Task) -> torch.Tensor:
        start = self._predict_initial(task)
        # torch.func.grad ignores an outer no_grad, so the inner loop still runs while nothing
        # meta-learned (learning rates included) records a graph.
        with torch.no_grad():
            fast = self.adapt(start, task.support_inputs(), task.support_y)
            query = task.query_inputs()
            n = next(iter(query.values())).shape[0]
            # One task at a time, so grouped tasks of any size work; slices bound the memory.
            return torch.cat(
                [self._logits(fast, {m: t[i: i + EMBED_BATCH] for m, t in query.items()}) for i in range(0, n, EMBED_BATCH)]
            )


_SHARED_SPACE = {
    "inner_lr": FloatDistribution(1e-3, 1.0, log=True),
    "inner_steps": IntDistribution(1, 5),
    "lr": FloatDistribution(1e-4, 1e-2, log=True),
    "meta_batch": IntDistribution(1, 8),
    "train_ways": _WAYS,
    "train_shots": _SHOTS,
}


class MAML(GradientMetaLearner):
    """Model-Agnostic Meta-Learning (Finn et al. 2017): the inner loop adapts the backbone and
    the head started at the support's class means; the meta-gradient flows through it (second-order unless
    ``first_order``).

    Defaults: one inner step of 0.01. The class-mean head starts each task at ProtoNet's classifier
    (same softmax as its squared Euclidean distances), so with a small inner step the meta-objective
    is ProtoNet's plus a correction (the Proto-MAML view, Triantafillou et al. 2020) and MAML
    converges as fast. Larger steps move a body that already classifies well by far too much: on rendered KanjiVG, 5-way 1-shot, 60 meta-updates, one step of 0.01 scored 97.1 %
    (ProtoNet 95.6 %), one of 0.1 36.9 %, three of 0.1 (the former default) 24.2 %; one step of 0.4
    (Finn et al.'s Omniglot setting, meant for a zero head whose first step moves the head alone)
    32.2 % after 200 (docs/benchmarks.md).
    """

    name = "maml"
    search_space = {**_SHARED_SPACE, "first_order": CategoricalDistribution([False, True])}

    def __init__(
        self,
        *,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        lr: float = 1e-3,
        meta_batch: int = 4,
        first_order: bool = False,
        train_ways: int | None = None,
        train_shots: int | None = None,
        vectorize: bool = True,
        chunk_size: int | None = None,
    ):
        super().__init__(
            inner_lr=inner_lr, inner_steps=inner_steps, lr=lr, meta_batch=meta_batch, train_ways=train_ways,
            train_shots=train_shots, vectorize=vectorize, chunk_size=chunk_size,
        )
        self.first_order = first_order


class FOMAML(MAML):
    """First-order MAML: the meta-gradient is the query gradient at the adapted parameters
    (no second derivatives, so cheaper in time and memory)."""

    name = "fomaml"
    search_space = {k: v for k, v in MAML.search_space.items() if k != "first_order"}

    def __init__(
        self,
        *,
        inner_lr: float = 0.1,
        inner_steps: int = 3,
        lr: float = 1e-3,
        meta_batch: int = 4,
        train_ways: int | None = None,
        train_shots: int | None = None,
        vectorize: bool = True,
        chunk_size: int | None = None,
    ):
        super().__init__(
            inner_lr=inner_lr, inner_steps=inner_steps, lr=lr, meta_batch=meta_batch, first_order=True,
            train_ways=train_ways, train_shots=train_shots, vectorize=vectorize, chunk_size=chunk_size,
        )


class ANIL(GradientMetaLearner):
    """Almost No Inner Loop (Raghu et al. 2020): the body embeds a task's rows once and is not
    adapted; the inner loop fits only the head on those features, so it is cheap even with many
    steps. The meta-gradient reaches the body through the query loss at the adapted head (and,
    unless ``first_order``, through the support features the head was adapted on)."""

    name = "anil"
    search_space = {
        **_SHARED_SPACE,
        "inner_steps": IntDistribution(1, 10),
        "first_order": CategoricalDistribution([False, True]),
    }

    def __init__(
        self,
        *,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        lr: float = 1e-3,
        meta_batch: int = 4,
        first_order: bool = False,
        train_ways: int | None = None,
        train_shots: int | None = None,
        vectorize: bool = True,
        chunk_size: int | None = None,
    ):
        super().__init__(
            inner_lr=inner_lr, inner_steps=inner_steps, lr=lr, meta_batch=meta_batch, train_ways=train_ways,
            train_shots=train_shots, vectorize=vectorize, chunk_size=chunk_size,
        )
        self.first_order = first_order

    def _adapt_head(self, head, features, y, steps: int | None = None):
        for _ in range(self.inner_steps if steps is None else steps):
            if self.first_order:
                g = grad(_head_loss)(_detach(head), features.detach(), y)
            else:
                g = grad(_head_loss)(head, features, y)
            head = {k: head[k] - self.inner_lr * g[k] for k in head}
        return head

    def adapt(self, params: Params, x, y, *, steps: int | None = None) -> Params:
        body, head = params
        return body, self._adapt_head(head, self._features(body, x), y, steps)

    def _task_loss(self, params: Params, sx, sy, qx, qy) -> torch.Tensor:
        body, head = params
        # Support and query rows in one forward pass: the encoders treat rows independently.
        features, aux = self._features_and_aux(body, _concat(sx, qx))
        n_support = sy.shape[0]
        head = self._adapt_head(head, features[:n_support], sy)
        return _head_loss(head, features[n_support:], qy) + aux

    def predict(self, task: Task) -> torch.Tensor:
        with torch.no_grad():
            body, head = self._initial(task.n_way)
            support = self._embed(body, task.support_inputs())
            head = self._adapt_head(head, support, task.support_y)
            return _head_logits(head, self._embed(body, task.query_inputs()))

    def _embed(self, body, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        n = next(iter(inputs.values())).shape[0]
        return torch.cat(
            [self._features(body, {m: t[i: i + EMBED_BATCH] for m, t in inputs.items()}) for i in range(0, n, EMBED_BATCH)]
        )


def _lr_key(name: str) -> str:
    # ParameterDict keys may not contain dots.
    return name.replace(".", ":")


class MetaSGD(GradientMetaLearner):
    """Meta-SGD (Li et al. 2017): every body parameter has its own inner learning rate,
    meta-learned with the initialisation (starting at ``inner_lr``; unconstrained in sign, as
    in the paper). The per-task head, whose row count varies with the ways, gets one rate per
    embedding dimension shared by all classes (which keeps the head label-permutation
    invariant) and one for its bias. The rates are state: ``modules()['inner_lrs']``. Beyond
    ``max_adapted`` backbone weights the largest tensors get no rate and stay fixed per task."""

    name = "metasgd"
    search_space = {**_SHARED_SPACE, "inner_steps": IntDistribution(1, 3)}
    # Cheap per weight (over hashbag's million: 0.4 s and 170 MiB per meta-update, as MAML), but a
    # meta-learned rate per hash bucket, most of them absent from any one task, is noise to learn.
    max_adapted = 250_000

    def __init__(
        self,
        *,
        inner_lr: float = 0.1,
        inner_steps: int = 1,
        lr: float = 1e-3,
        meta_batch: int = 4,
        train_ways: int | None = None,
        train_shots: int | None = None,
        vectorize: bool = True,
        chunk_size: int | None = None,
    ):
        super().__init__(
            inner_lr=inner_lr, inner_steps=inner_steps, lr=lr, meta_batch=meta_batch, train_ways=train_ways,
            train_shots=train_shots, vectorize=vectorize, chunk_size=chunk_size,
        )

    def _build(self) -> None:
        where = placement(self.backbone, self.device)
        rates = {
            _lr_key(n): torch.full_like(p.detach(), self.inner_lr)
            for n, p in self.backbone.named_parameters() if n not in self.fixed_in_task
        }
        rates["head:weight"] = torch.full((self.backbone.out_dim,), self.inner_lr, **where)
        rates["head:bias"] = torch.full((), self.inner_lr, **where)
        self.inner_lrs = nn.ParameterDict({k: nn.Parameter(v) for k, v in rates.items()})

    def _meta_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.inner_lrs.parameters()]

    def modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "inner_lrs": self.inner_lrs}

    def _update(self, params: Params, grads: Params) -> Params:
        (body, head), (gb, gh) = params, grads
        rates = self.inner_lrs
        body = {n: p - rates[_lr_key(n)] * gb[n] for n, p in body.items()}
        head = {
            "weight": head["weight"] - rates["head:weight"] * gh["weight"],
            "bias": head["bias"] - rates["head:bias"] * gh["bias"],
        }
        return body, head


class Reptile(GradientMetaLearner):
    """Reptile (Nichol et al. 2018): run ``inner_steps`` of SGD or Adam on each task's rows
    (support and query together), then move the initialisation towards the adapted weights,
    θ ← θ + lr · mean over the meta-batch of (θ'ᵢ − θ). Only first derivatives, no graph kept.

    Inner Adam uses β₁ = 0 as in the paper (a task's few steps leave no time for momentum).
    ``lr`` is the interpolation step ε (1 with a meta-batch of 1 is plain fine-tuning).
    """

    name = "reptile"
    first_order = True
    search_space = {
        **_SHARED_SPACE,
        "inner_steps": IntDistribution(1, 10),
        "lr": FloatDistribution(0.05, 1.0, log=True),
        "inner_optimizer": CategoricalDistribution(["sgd", "adam"]),
    }
    ADAM_BETAS = (0.0, 0.999)
    ADAM_EPS = 1e-8

    def __init__(
        self,
        *,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        lr: float = 0.5,
        meta_batch: int = 4,
        inner_optimizer: str = "sgd",
        train_ways: int | None = None,
        train_shots: int | None = None,
        vectorize: bool = True,
        chunk_size: int | None = None,
    ):
        super().__init__(
            inner_lr=inner_lr, inner_steps=inner_steps, lr=lr, meta_batch=meta_batch, train_ways=train_ways,
            train_shots=train_shots, vectorize=vectorize, chunk_size=chunk_size,
        )
        if inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"reptile: inner_optimizer must be 'sgd' or 'adam', got {inner_optimizer!r}")
        self.inner_optimizer = inner_optimizer

    def setup(self, backbone: Backbone, pool: TrainingPool, shape: tuple[int, int, int]) -> None:
        super().setup(backbone, pool, shape)
        # The outer update is an interpolation, not an optimiser step.
        self.optimizer = None

    def _inner(self, params: Params, x, y, steps: int | None = None, *, training: bool = False) -> tuple[Params, torch.Tensor]:
        """The adapted parameters and the loss before the last step. Reptile's meta-update follows
        the inner loop, so in training the inner loss carries the auxiliary loss too."""
        steps = self.inner_steps if steps is None else steps
        objective = self._outer_loss if training else self._loss
        params = self._start(params, x, y)
        loss = torch.zeros((), **placement(self.backbone, self.device))
        if self.inner_optimizer == "sgd":
            for _ in range(steps):
                grads, loss = grad_and_value(objective)(_detach(params), x, y)
                params = self._update(params, grads)
            return params, loss
        beta1, beta2 = self.ADAM_BETAS
        m = tree_map(torch.zeros_like, params)
        v = tree_map(torch.zeros_like, params)
        for t in range(1, steps + 1):
            grads, loss = grad_and_value(objective)(_detach(params), x, y)
            m = tree_map(lambda a, g: beta1 * a + (1 - beta1) * g, m, grads)
            v = tree_map(lambda a, g: beta2 * a + (1 - beta2) * g * g, v, grads)
            c1, c2 = 1 - beta1**t, 1 - beta2**t
            params = tree_map(
                lambda p, a, b: p - self.inner_lr * (a / c1) / ((b / c2).sqrt() + self.ADAM_EPS), params, m, v
            )
        return params, loss

    def adapt(self, params: Params, x, y, *, steps: int | None = None) -> Params:
        return self._inner(params, x, y, steps)[0]

    def _task_update(self, params: Params, x, y) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        (body, _), loss = self._inner(params, x, y, training=True)
        return {n: body[n] - params[0][n] for n in body}, loss

    def meta_update(self, task: Task) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Mean over the batch of each task's θ'ᵢ − θ (by parameter name), and the mean loss."""
        x = _concat(task.support_inputs(), task.query_inputs(), dim=1)
        y = torch.cat([task.support_y, task.query_y], dim=1)
        deltas, losses = self._map_tasks(self._task_update, _detach(self._initial(task.n_way)), x, y)
        return {n: d.mean(0) for n, d in deltas.items()}, losses.mean()

    def meta_step(self, task: Task) -> float:
        """θ ← θ + lr · mean(θ'ᵢ − θ); returns the mean inner loss before each task's last step."""
        deltas, loss = self.meta_update(task)
        with torch.no_grad():
            for n, p in self.backbone.named_parameters():
                p.add_(deltas[n], alpha=self.lr)
        return loss.item()
