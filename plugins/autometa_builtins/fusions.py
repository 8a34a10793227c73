"""Built-in fusions: early concatenation and the seed's modality attention."""

from __future__ import annotations

import torch
from optuna.distributions import IntDistribution
from torch import nn

from autometa.components import Fusion


def present(embedding: torch.Tensor, masks: dict[str, torch.Tensor] | None, modality: str) -> torch.Tensor:
    """The embedding with rows that lack ``modality`` set to zero."""
    if masks is None or modality not in masks:
        return embedding
    return embedding * masks[modality].unsqueeze(-1).to(embedding.dtype)


def stacked_mask(masks: dict[str, torch.Tensor], order: list[str], like: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., M]`` presence of each modality in ``order`` (absent from masks = present)."""
    shape = like.shape[:-2]
    return torch.stack(
        [masks[m] if m in masks else torch.ones(shape, dtype=torch.bool, device=like.device) for m in order], dim=-1
    )


class Concat(Fusion):
    """Early fusion: the modality embeddings side by side, in the fixed modality order."""

    name = "concat"

    def __init__(self, in_dims: dict[str, int]):
        super().__init__()
        self.order = list(in_dims)
        self.out_dim = sum(in_dims.values())

    def forward(self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return torch.cat([present(embeddings[m], masks, m) for m in self.order], dim=-1)


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

    def forward(self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        h = torch.stack([self.project[m](embeddings[m]) for m in self.order], dim=-2)  # [..., M, dim]
        scores = self.score(h)
        if masks is not None:
            keep = stacked_mask(masks, self.order, h).unsqueeze(-1)  # [..., M, 1]
            # Missing modalities get no weight; a row missing all of them fuses to zeros.
            scores = scores.masked_fill(~keep, float("-inf"))
            a = torch.nan_to_num(torch.softmax(scores, dim=-2), nan=0.0)
        else:
            a = torch.softmax(scores, dim=-2)
        return (a * h).sum(dim=-2)


FUSIONS = [Concat, Attention]
