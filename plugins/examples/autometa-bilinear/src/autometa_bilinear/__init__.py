"""autometa plugin: low-rank bilinear pooling (MLB) as a fusion for any number of modalities.

Kim et al. 2017, "Hadamard Product for Low-rank Bilinear Pooling" (ICLR), fuse two vectors x
and y as f = P^T (tanh(U^T x) ⊙ tanh(V^T y)) + b: every output is a rank-``rank``
factorisation of a bilinear form x^T W_i y, computed without the (dim_x · dim_y · out_dim)
weight tensor a full bilinear layer needs. Here the product runs over M modalities.
"""

from __future__ import annotations

import torch
from optuna.distributions import FloatDistribution, IntDistribution
from torch import nn

import autometa


class Bilinear(autometa.Fusion):
    """z = P^T (h_1 ⊙ … ⊙ h_M) + b with h_m = tanh(U_m^T x_m + c_m), dropout before P.

    Each modality's embedding x_m is projected to the joint size ``rank`` and squashed; the
    Hadamard product of the h_m is the joint representation, projected to ``out_dim``. With
    two modalities this is the paper's MLB; with one, a tanh layer and a linear layer.

    A row that lacks modality m uses h_m = 1, the neutral element of the product, so it fuses
    the modalities it has (and a row with none gets P^T 1 + b, one constant for all such rows).
    Multiplication is the point here, so unlike the additive fusions a missing modality cannot
    simply be zero: that would zero the whole product.
    """

    name = "bilinear"
    search_space = {
        "rank": IntDistribution(16, 256, log=True),
        "out_dim": IntDistribution(16, 128, log=True),
        "dropout": FloatDistribution(0.0, 0.5),
    }

    def __init__(self, in_dims: dict[str, int], *, rank: int = 64, out_dim: int = 64, dropout: float = 0.1):
        super().__init__()
        # The model's modality order is fixed here; embeddings may arrive in any dict order.
        self.order = list(in_dims)
        self.project = nn.ModuleDict({m: nn.Linear(d, rank) for m, d in in_dims.items()})
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(rank, out_dim)
        self.out_dim = out_dim

    def forward(
        self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        joint = None
        for m in self.order:
            x = embeddings[m]  # [..., batch, dim_m]: meta-algorithms may vmap over a task dimension
            keep = None if masks is None or m not in masks else masks[m].unsqueeze(-1)
            if keep is not None:
                # torch.where, never a multiplication by the mask: 0 * NaN is NaN. The input is
                # zeroed too, or a NaN in a missing row would reach U's gradient through tanh'.
                x = torch.where(keep, x, x.new_zeros(()))
            h = torch.tanh(self.project[m](x))
            if keep is not None:
                h = torch.where(keep, h, h.new_ones(()))
            joint = h if joint is None else joint * h
        return self.out(self.dropout(joint))


@autometa.hookimpl
def register_fusions(register):
    register(Bilinear)
