"""Transfer-learning baselines: pre-train a classifier, then fit a new head per task."""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch import nn

from autometa.components import Backbone, MetaAlgorithm, suggest_value
from autometa.types import Task, TrainingPool
from autometa_builtins.meta_algorithms._common import embed, embedding_placement, make_optimizer, step
from autometa_builtins.meta_algorithms.metric import class_means, cosine_matrix


class CosineClassifier(nn.Module):
    """Baseline++'s head: logits are ``scale`` × cosine(embedding, each class's weight row).

    ``scale`` is fixed, as in Chen et al. 2019: it only sets how peaked the softmax can get.
    """

    def __init__(self, in_features: int, out_features: int, scale: float):
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, scale
        # Only the rows' directions matter, so any scale of initialisation will do.
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * cosine_matrix(x, self.weight)


class FineTune(MetaAlgorithm):
    """Baseline and Baseline++ (Chen et al. 2019): train a classifier on all training rows, then
    fit a new head on a task's support embeddings (the backbone frozen) to predict its queries.

    ``head="linear"`` is Baseline; ``head="cosine"`` is Baseline++ (a ``CosineClassifier`` with
    scale ``scale``), for pre-training and for each task's new head alike. A task whose labels
    are the training classes (standard protocol) is answered by the pre-trained head directly.
    A new linear head starts at zero; a new cosine head starts at the support's normalised class
    means (weight imprinting, Qi et al. 2018), since a zero row has no direction to normalise.
    """

    name = "finetune"
    uses_auxiliary_loss = True
    heads = ("linear", "cosine")
    search_space = {
        "lr": FloatDistribution(1e-4, 1e-2, log=True),
        "batch_size": IntDistribution(16, 128, log=True),
        "weight_decay": FloatDistribution(1e-7, 1e-3, log=True),
        "head_steps": IntDistribution(25, 200, log=True),
        "head_lr": FloatDistribution(1e-3, 1e-1, log=True),
        "head": CategoricalDistribution(list(heads)),
        # Sampled only for the cosine head (see suggest).
        "scale": FloatDistribution(2.0, 30.0, log=True),
    }

    def __init__(
        self,
        *,
        lr: float = 1e-3,
        batch_size: int = 64,
        weight_decay: float = 1e-5,
        head_steps: int = 100,
        head_lr: float = 1e-2,
        head: str = "linear",
        scale: float = 10.0,
    ):
        if head not in self.heads:
            raise ValueError(f"head must be one of {', '.join(self.heads)}; got {head!r}")
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.head_steps = head_steps
        self.head_lr = head_lr
        # ``self.head`` is the trained classifier module, so the choice is kept under another name.
        self.head_kind = head
        self.scale = scale

    @classmethod
    def suggest(cls, trial: optuna.Trial, prefix: str) -> dict[str, Any]:
        space = {k: d for k, d in cls.search_space.items() if k != "scale"}
        params = {key: suggest_value(trial, prefix + key, dist) for key, dist in space.items()}
        if params["head"] == "cosine":
            params["scale"] = suggest_value(trial, prefix + "scale", cls.search_space["scale"])
        return params

    def _new_head(self, in_features: int, out_features: int) -> nn.Module:
        if self.head_kind == "cosine":
            return CosineClassifier(in_features, out_features, self.scale)
        return nn.Linear(in_features, out_features)

    def setup(self, backbone: Backbone, pool: TrainingPool, shape: tuple[int, int, int]) -> None:
        self.backbone = backbone
        self.head = self._new_head(backbone.out_dim, pool.n_classes).to(**embedding_placement(backbone, pool))
        params = [*backbone.parameters(), *self.head.parameters()]
        self.optimizer = make_optimizer(params, lr=self.lr, weight_decay=self.weight_decay)

    def modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "head": self.head}

    def train_step(self, pool: TrainingPool, rng: np.random.Generator) -> float:
        x, y = pool.rows_batch(self.batch_size, rng)
        features, aux = self.backbone.embed_with_aux(x)
        loss = F.cross_entropy(self.head(features), y) + aux
        step(self.optimizer, loss)
        return loss.item()

    def task_head(self, support: torch.Tensor, support_y: torch.Tensor, n_way: int) -> nn.Module:
        """A new head for ``n_way`` classes, fitted to the (frozen) ``support`` embeddings."""
        head = self._new_head(support.shape[-1], n_way).to(device=support.device, dtype=support.dtype)
        with torch.no_grad():
            if isinstance(head, CosineClassifier):
                head.weight.copy_(class_means(F.normalize(support, dim=-1), support_y, n_way))
            else:
                head.weight.zero_()
                head.bias.zero_()
        optimizer = torch.optim.Adam(head.parameters(), lr=self.head_lr)
        with torch.enable_grad():
            for _ in range(self.head_steps):
                loss = F.cross_entropy(head(support), support_y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return head

    def predict(self, task: Task) -> torch.Tensor:
        with torch.no_grad():
            query = embed(self.backbone, task.query_inputs())
            if task.same_classes_as_training:
                return self.head(query)
            support = embed(self.backbone, task.support_inputs())
        head = self.task_head(support, task.support_y, task.n_way)
        with torch.no_grad():
            return head(query)
