"""Built-in fusions: early concatenation and the seed's modality attention."""

from __future__ import annotations

import torch
from optuna.distributions import IntDistribution
from torch import nn

from autometa.components import Fusion


class Concat(Fusion):
    """Early fusion: the modality embeddings side by side, in the fixed modality order."""

    name = "concat"

    def __init__(self, in_dims: dict[str, int]):
        super().__init__()
        self.order = list(in_dims)
        self.out_dim = sum(in_dims.values())

    def forward(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([embeddings[m] for m in self.order], dim=-1)


class Attention(Fusion):
    """Per-dimension attention over modalities: a_i = softmax_i(W h_i + b), z = Σ_i a_i ⊙ h_i.

    Each modality is first projected to a common size so the weighted sum is defined.
    """

    name = "attention"
    search_space = {"dim": IntDistribution(16, 128, log=True)}

    def __init__(self, in_dims: dict[str, int], *, dim: int = 64):
        super().__init__()
        self.order = list(in_dims)
        self.project = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in in_dims.items()})
        self.score = nn.Linear(dim, dim)
        self.out_dim = dim

    def forward(self, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        h = torch.stack([self.project[m](embeddings[m]) for m in self.order], dim=-2)  # [..., M, dim]
        a = torch.softmax(self.score(h), dim=-2)
        return (a * h).sum(dim=-2)
