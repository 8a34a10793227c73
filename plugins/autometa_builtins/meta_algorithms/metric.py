"""Metric-based meta-learners: classify queries by comparing embeddings with the support set."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from optuna.distributions import FloatDistribution

from autometa.components import Backbone, MetaAlgorithm
from autometa.tasks import Task, TrainingPool
from autometa_builtins.meta_algorithms._common import embed, first_task, make_optimizer, step


def prototype_logits(support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, n_way: int) -> torch.Tensor:
    """Negative squared euclidean distance from each query to each class mean of the support."""
    sums = torch.zeros(n_way, support.shape[-1], dtype=support.dtype, device=support.device)
    sums = sums.index_add(0, support_y, support)
    counts = torch.bincount(support_y, minlength=n_way).clamp_min(1).unsqueeze(-1).to(support.dtype)
    prototypes = sums / counts
    return -((query.unsqueeze(-2) - prototypes) ** 2).sum(-1)


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
        self.optimizer = make_optimizer(backbone.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def train_step(self, pool: TrainingPool, rng: np.random.Generator) -> float:
        task = pool.episodes(1, *self.shape, rng)
        support = self.backbone(first_task(task.support_inputs()))
        query = self.backbone(first_task(task.query_inputs()))
        logits = prototype_logits(support, task.support_y[0], query, task.n_way)
        loss = F.cross_entropy(logits, task.query_y[0])
        step(self.optimizer, loss)
        return loss.item()

    @torch.no_grad()
    def predict(self, task: Task) -> torch.Tensor:
        support = embed(self.backbone, task.support_inputs())
        query = embed(self.backbone, task.query_inputs())
        return prototype_logits(support, task.support_y, query, task.n_way)
