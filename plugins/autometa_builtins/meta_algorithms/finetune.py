"""Transfer-learning baselines: pre-train a classifier, then fit a new head per task."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from optuna.distributions import FloatDistribution, IntDistribution
from torch import nn

from autometa.components import Backbone, MetaAlgorithm
from autometa.tasks import Task, TrainingPool
from autometa_builtins.meta_algorithms._common import embed, make_optimizer, placement, step


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
        self.head = nn.Linear(backbone.out_dim, pool.n_classes).to(**placement(backbone, pool.device))
        params = [*backbone.parameters(), *self.head.parameters()]
        self.optimizer = make_optimizer(params, lr=self.lr, weight_decay=self.weight_decay)

    def modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "head": self.head}

    def train_step(self, pool: TrainingPool, rng: np.random.Generator) -> float:
        x, y = pool.rows_batch(self.batch_size, rng)
        loss = F.cross_entropy(self.head(self.backbone(x)), y)
        step(self.optimizer, loss)
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
