"""Built-in meta-algorithms: Prototypical Networks, MAML (torch.func) and fine-tuning.

All share the host's loop: ``setup`` → ``train_step`` × N (validated in between) → ``predict``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch import nn
from torch.func import functional_call, grad, vmap

from autometa.components import Backbone, MetaAlgorithm
from autometa.tasks import Task, TrainingPool

EMBED_BATCH = 1024


def embed(backbone: Backbone, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Embed many rows in slices so a large support set does not exhaust memory."""
    n = next(iter(inputs.values())).shape[0]
    return torch.cat(
        [backbone({m: t[i: i + EMBED_BATCH] for m, t in inputs.items()}) for i in range(0, n, EMBED_BATCH)]
    )


def prototype_logits(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int) -> torch.Tensor:
    """Negative squared euclidean distance from each query to each class mean of the support."""
    sums = torch.zeros(n_way, support.shape[-1], dtype=support.dtype, device=support.device)
    sums = sums.index_add(0, support_y, support)
    counts = torch.bincount(support_y, minlength=n_way).clamp_min(1).unsqueeze(-1).to(support.dtype)
    prototypes = sums / counts
    return -((query.unsqueeze(-2) - prototypes) ** 2).sum(-1)


def _placement(backbone: Backbone, device: torch.device) -> dict:
    """Device and dtype for new tensors: the backbone's, or the data's for a parameterless one."""
    first = next(backbone.parameters(), None)
    return {"device": device, "dtype": first.dtype if first is not None else torch.get_default_dtype()}


def _step(optimizer: torch.optim.Optimizer | None, loss: torch.Tensor) -> None:
    """One optimiser step; a model with nothing to train (e.g. identity ▶ concat) skips it."""
    if optimizer is not None and loss.requires_grad:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _optimizer(params, **kwargs) -> torch.optim.Optimizer | None:
    params = [p for p in params if p.requires_grad]
    return torch.optim.Adam(params, **kwargs) if params else None


class ProtoNet(MetaAlgorithm):
    """Prototypical Networks (Snell et al. 2017): classify queries by the nearest class mean."""

    name = "protonet"
    search_space = {
        "lr": FloatDistribution(1e-4, 1e-2, log=True),
        "weight_decay": FloatDistribution(1e-7, 1e-3, log=True),
    }

    def __init__(self, *, lr: float = 1e-3, weight_decay: float = 1e-6):
        self.lr = lr
        self.weight_decay = weight_decay

    def setup(self, backbone: Backbone, pool: TrainingPool, shape: tuple[int, int, int]) -> None:
        self.backbone = backbone
        self.shape = pool.episode_shape(*shape)
        self.optimizer = _optimizer(backbone.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def train_step(self, pool: TrainingPool, rng: np.random.Generator) -> float:
        task = pool.episodes(1, *self.shape, rng)
        support = self.backbone(_first(task.support_inputs()))
        query = self.backbone(_first(task.query_inputs()))
        logits = prototype_logits(support, task.support_y[0], query, task.n_way)
        loss = F.cross_entropy(logits, task.query_y[0])
        _step(self.optimizer, loss)
        return loss.item()

    @torch.no_grad()
    def predict(self, task: Task) -> torch.Tensor:
        support = embed(self.backbone, task.support_inputs())
        query = embed(self.backbone, task.query_inputs())
        return prototype_logits(support, task.support_y, query, task.n_way)


def _first(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {m: t[0] for m, t in inputs.items()}


class MAML(MetaAlgorithm):
    """Model-Agnostic Meta-Learning (Finn et al. 2017) on torch.func, vectorised over tasks.

    Each task's linear head starts at zero (the "zeroing trick", Kao et al. 2022): invariant to
    the order of labels and valid for any number of ways. A meta-learned head shared by all
    classes would gain nothing, as its meta-gradient is exactly zero (softmax ignores a shift
    common to every class). The inner loop adapts the backbone and the head; ``first_order``
    drops the second-order terms.
    """

    name = "maml"
    protocols = ("fewshot", "grouped")
    search_space = {
        "inner_lr": FloatDistribution(1e-3, 1.0, log=True),
        "inner_steps": IntDistribution(1, 5),
        "lr": FloatDistribution(1e-4, 1e-2, log=True),
        "meta_batch": IntDistribution(1, 8),
        "first_order": CategoricalDistribution([False, True]),
    }

    def __init__(
        self,
        *,
        inner_lr: float = 0.1,
        inner_steps: int = 3,
        lr: float = 1e-3,
        meta_batch: int = 4,
        first_order: bool = False,
        vectorize: bool = True,
        chunk_size: int | None = None,
    ):
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.lr = lr
        self.meta_batch = meta_batch
        self.first_order = first_order
        self.vectorize = vectorize
        self.chunk_size = chunk_size

    def setup(self, backbone: Backbone, pool: TrainingPool, shape: tuple[int, int, int]) -> None:
        self.backbone = backbone
        self.shape = pool.episode_shape(*shape)
        self.device = pool.device
        self.optimizer = _optimizer(backbone.parameters(), lr=self.lr)

    # -- functional pieces -------------------------------------------------------------
    def _initial(self, n_way: int) -> tuple[dict, dict]:
        body = dict(self.backbone.named_parameters())
        head = {
            "weight": torch.zeros(n_way, self.backbone.out_dim, **_placement(self.backbone, self.device)),
            "bias": torch.zeros(n_way, **_placement(self.backbone, self.device)),
        }
        return body, head

    def _logits(self, params: tuple[dict, dict], x: dict[str, torch.Tensor]) -> torch.Tensor:
        body, head = params
        return F.linear(functional_call(self.backbone, body, (x,)), head["weight"], head["bias"])

    def _loss(self, params, x, y) -> torch.Tensor:
        return F.cross_entropy(self._logits(params, x), y)

    def adapt(self, params, x, y, *, steps: int | None = None):
        """Inner loop: ``steps`` SGD steps on the support loss, differentiable unless first-order."""
        for _ in range(self.inner_steps if steps is None else steps):
            grads = grad(self._loss)(params, x, y)
            if self.first_order:
                grads = torch.utils._pytree.tree_map(torch.Tensor.detach, grads)
            params = torch.utils._pytree.tree_map(lambda p, g: p - self.inner_lr * g, params, grads)
        return params

    def _task_loss(self, params, sx, sy, qx, qy) -> torch.Tensor:
        return self._loss(self.adapt(params, sx, sy), qx, qy)

    def meta_loss(self, task: Task) -> torch.Tensor:
        """Mean query loss after adaptation over a batch of same-shape tasks."""
        params = self._initial(task.n_way)
        args = (task.support_inputs(), task.support_y, task.query_inputs(), task.query_y)
        if self.vectorize:
            losses = vmap(
                self._task_loss, in_dims=(None, 0, 0, 0, 0), randomness="different", chunk_size=self.chunk_size
            )(params, *args)
            return losses.mean()
        sx, sy, qx, qy = args
        return torch.stack(
            [self._task_loss(params, {m: t[i] for m, t in sx.items()}, sy[i], {m: t[i] for m, t in qx.items()}, qy[i])
             for i in range(len(task))]
        ).mean()

    def train_step(self, pool: TrainingPool, rng: np.random.Generator) -> float:
        loss = self.meta_loss(pool.episodes(self.meta_batch, *self.shape, rng))
        _step(self.optimizer, loss)
        return loss.item()

    def predict(self, task: Task) -> torch.Tensor:
        params = torch.utils._pytree.tree_map(torch.Tensor.detach, self._initial(task.n_way))
        fast = self.adapt(params, task.support_inputs(), task.support_y)
        with torch.no_grad():
            return self._logits(fast, task.query_inputs())


class FineTune(MetaAlgorithm):
    """Baseline (Chen et al. 2019): train a classifier on all training rows, then fit a new
    linear head on a task's support embeddings (the backbone frozen) to predict its queries."""

    name = "finetune"
    search_space = {
        "lr": FloatDistribution(1e-4, 1e-2, log=True),
        "batch_size": IntDistribution(16, 128, log=True),
        "weight_decay": FloatDistribution(1e-7, 1e-3, log=True),
        "head_steps": IntDistribution(25, 200, log=True),
        "head_lr": FloatDistribution(1e-3, 1e-1, log=True),
    }

    def __init__(
        self,
        *,
        lr: float = 1e-3,
        batch_size: int = 64,
        weight_decay: float = 1e-5,
        head_steps: int = 100,
        head_lr: float = 1e-2,
    ):
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.head_steps = head_steps
        self.head_lr = head_lr

    def setup(self, backbone: Backbone, pool: TrainingPool, shape: tuple[int, int, int]) -> None:
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_dim, pool.n_classes).to(**_placement(backbone, pool.device))
        params = [*backbone.parameters(), *self.head.parameters()]
        self.optimizer = _optimizer(params, lr=self.lr, weight_decay=self.weight_decay)

    def modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "head": self.head}

    def train_step(self, pool: TrainingPool, rng: np.random.Generator) -> float:
        x, y = pool.rows_batch(self.batch_size, rng)
        loss = F.cross_entropy(self.head(self.backbone(x)), y)
        _step(self.optimizer, loss)
        return loss.item()

    def predict(self, task: Task) -> torch.Tensor:
        with torch.no_grad():
            query = embed(self.backbone, task.query_inputs())
            if task.same_classes_as_training:
                return self.head(query)
            support = embed(self.backbone, task.support_inputs())
        head = nn.Linear(support.shape[-1], task.n_way).to(device=support.device, dtype=support.dtype)
        nn.init.zeros_(head.weight), nn.init.zeros_(head.bias)
        optimizer = torch.optim.Adam(head.parameters(), lr=self.head_lr)
        with torch.enable_grad():
            for _ in range(self.head_steps):
                loss = F.cross_entropy(head(support), task.support_y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            return head(query)
