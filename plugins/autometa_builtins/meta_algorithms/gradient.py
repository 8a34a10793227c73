"""Gradient-based meta-learners on torch.func: functional inner loops, vmapped over tasks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch.func import functional_call, grad, vmap

from autometa.components import Backbone, MetaAlgorithm
from autometa.tasks import Task, TrainingPool
from autometa_builtins.meta_algorithms._common import make_optimizer, placement, step


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
        self.optimizer = make_optimizer(backbone.parameters(), lr=self.lr)

    # -- functional pieces -------------------------------------------------------------
    def _initial(self, n_way: int) -> tuple[dict, dict]:
        body = dict(self.backbone.named_parameters())
        head = {
            "weight": torch.zeros(n_way, self.backbone.out_dim, **placement(self.backbone, self.device)),
            "bias": torch.zeros(n_way, **placement(self.backbone, self.device)),
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
        step(self.optimizer, loss)
        return loss.item()

    def predict(self, task: Task) -> torch.Tensor:
        params = torch.utils._pytree.tree_map(torch.Tensor.detach, self._initial(task.n_way))
        fast = self.adapt(params, task.support_inputs(), task.support_y)
        with torch.no_grad():
            return self._logits(fast, task.query_inputs())
