"""Built-in encoders. No BatchNorm: its batched second-order gradient under vmap is wrong
(pytorch/functorch#534), so convolutions use GroupNorm, which is per-example."""

from __future__ import annotations

import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch import nn

from autometa.components import Encoder, InputSpec


def _mlp(in_dim: int, hidden: int, out_dim: int, layers: int, dropout: float) -> nn.Sequential:
    blocks: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        blocks += [nn.Linear(width, hidden), nn.ReLU()]
        if dropout > 0:
            blocks.append(nn.Dropout(dropout))
        width = hidden
    blocks += [nn.Linear(width, out_dim), nn.ReLU()]
    return nn.Sequential(*blocks)


class TabularMLP(Encoder):
    """Standardised numeric and one-hot columns through a ReLU multi-layer perceptron."""

    name = "mlp"
    modality = "tabular"
    search_space = {
        "hidden": IntDistribution(32, 256, log=True),
        "out_dim": IntDistribution(16, 128, log=True),
        "layers": IntDistribution(1, 3),
        "dropout": FloatDistribution(0.0, 0.5),
    }

    def __init__(self, spec: InputSpec, *, hidden: int = 128, out_dim: int = 64, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.net = _mlp(spec.shape[0], hidden, out_dim, layers, dropout)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VectorMLP(TabularMLP):
    """A precomputed embedding vector through a ReLU multi-layer perceptron."""

    name = "vector_mlp"
    modality = "vector"


class Identity(Encoder):
    """A precomputed embedding vector used as it is."""

    name = "identity"
    modality = "vector"

    def __init__(self, spec: InputSpec):
        super().__init__()
        self.out_dim = spec.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class HashBag(Encoder):
    """Hashed word uni/bigrams: mean of learned embeddings (fastText-style), then a ReLU layer."""

    name = "hashbag"
    modality = "text"
    search_space = {
        "dim": IntDistribution(16, 128, log=True),
        "out_dim": IntDistribution(16, 128, log=True),
    }

    def __init__(self, spec: InputSpec, *, dim: int = 64, out_dim: int = 64):
        super().__init__()
        self.embedding = nn.Embedding(spec.vocab_size, dim, padding_idx=0)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.proj = nn.Linear(dim, out_dim)
        self.out_dim = out_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids > 0).unsqueeze(-1).to(self.embedding.weight.dtype)
        summed = (self.embedding(ids) * mask).sum(dim=-2)
        return torch.relu(self.proj(summed / mask.sum(dim=-2).clamp_min(1.0)))


class Conv4(Encoder):
    """Four conv3x3 ▶ GroupNorm ▶ ReLU ▶ max-pool blocks (the few-shot standard backbone)."""

    name = "conv4"
    modality = "image"
    search_space = {
        "channels": CategoricalDistribution([32, 64]),
    }

    def __init__(self, spec: InputSpec, *, channels: int = 64):
        super().__init__()
        blocks: list[nn.Module] = []
        width, size = spec.shape[0], min(spec.shape[1:])
        for _ in range(4):
            blocks += [nn.Conv2d(width, channels, 3, padding=1), nn.GroupNorm(1, channels), nn.ReLU()]
            if size >= 2:
                blocks.append(nn.MaxPool2d(2))
                size //= 2
            width = channels
        self.net = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# Registered in this order: the first encoder of each modality is its default.
ENCODERS = [TabularMLP, HashBag, Conv4, Identity, VectorMLP]
