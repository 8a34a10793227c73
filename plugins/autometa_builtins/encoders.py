"""Built-in encoders.

Every encoder runs inside MAML's inner loop, i.e. under ``torch.func.functional_call``, ``grad``
taken twice and ``vmap`` over a leading task dimension. Hence: no in-place ops on inputs, no
``.item()``, no branching on tensor values, and no BatchNorm or nn.LayerNorm: their fused
backward kernels have a wrong batching rule for the input gradient (pytorch/functorch#534), so
second-order meta-gradients under vmap come out wrong (for LayerNorm by ~1-5% in torch 2.13).
GroupNorm is unaffected; layer normalisation is written out (``LayerNorm`` below).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch import nn

from autometa.components import Encoder, InputSpec
from autometa_builtins.layers import LayerNorm
from autometa_builtins.fitted import PixelPCA
from autometa_builtins.lsa import LatentSemantic, fit_tfidf, tfidf_features
from autometa_builtins.pretrained import MiniLM


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
    fixed_params = {}

    def __init__(self, spec: InputSpec):
        super().__init__()
        self.out_dim = spec.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Table(Identity):
    """The preprocessed columns (standardised numbers, missing indicators, one-hot categories) as
    they are: what a tree ensemble reads, or a linear model when a linear head sits on top."""

    name = "table"
    modality = "tabular"


class TfIdf(Identity):
    """TF-IDF word 1-2-grams and character 2-5-grams, as they are: the most frequent 4,096 columns
    of each kind among the training rows (an n-gram in at least two of them), each kind scaled to
    unit norm, then the row (``autometa_builtins.lsa``). Nothing is learned on top: what a
    linear model reads (the ``linear`` meta-algorithm, as a TF-IDF → logistic regression
    pipeline does), and a wide input the neural fusions project down.

    Against ``lsa``: no SVD, so rare but telling n-grams (a product name, a typo a class shares)
    keep their own weight; a linear model over them usually beats one over 256 SVD dimensions
    on a standard task with hundreds of rows per class. Size: at most 8,192 float32 per row
    (32 KiB: 3,000 rows are 98 MiB, shared read-only by the workers); the state is one column
    index and one idf per kept column.
    """

    name = "tfidf"
    modality = "text"

    @classmethod
    def fit_input(cls, raw: list[str], rows: np.ndarray) -> dict[str, torch.Tensor]:
        return fit_tfidf(raw, rows)

    @classmethod
    def prepare(cls, raw: list[str], state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return tfidf_features(raw, state)


class Pixels(Encoder):
    """The preprocessed image (standardised per channel, at --image-size) flattened to one row of
    C·H·W numbers: nearest-centroid or tree models on raw pixels."""

    name = "pixels"
    modality = "image"
    fixed_params = {}

    def __init__(self, spec: InputSpec):
        super().__init__()
        self.out_dim = math.prod(spec.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-3)  # [..., batch, C, H, W] -> [..., batch, C*H*W]


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


class TabularLinear(Encoder):
    """One affine map of the preprocessed columns: the logistic-regression-like baseline.

    No nonlinearity on purpose: with a linear head on top, the whole model stays linear in
    the inputs, which is the strongest regulariser for small tabular tasks."""

    name = "linear"
    modality = "tabular"
    search_space = {
        "out_dim": IntDistribution(16, 128, log=True),
    }

    def __init__(self, spec: InputSpec, *, out_dim: int = 64):
        super().__init__()
        self.net = nn.Linear(spec.shape[0], out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Attention(nn.Module):
    """Multi-head self-attention written out with matmuls and softmax.

    nn.MultiheadAttention cannot serve MAML: in torch 2.13 on CPU it dispatches to the flash
    attention kernel, whose backward has no derivative, so second-order gradients raise. Fused
    SDPA kernels are chosen per device and dtype; plain tensor algebra behaves the same on all."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        per_head = h.shape[-1] // self.heads
        # [..., T, 3, heads, d_h] -> three [..., heads, T, d_h]
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, per_head)).movedim(-3, 0).transpose(-3, -2).unbind(0)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(per_head), dim=-1)
        mixed = (self.dropout(weights) @ v).transpose(-3, -2).flatten(-2)
        return self.out(mixed)


class _TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LN x), then x + ReGLU feed-forward(LN x)."""

    def __init__(self, dim: int, heads: int, dropout: float, first: bool):
        super().__init__()
        # As in FT-Transformer, no norm before the first attention: normalising a token
        # x_j * W_j + b_j over its d entries would largely discard the magnitude of x_j.
        self.norm1 = nn.Identity() if first else LayerNorm(dim)
        self.attention = _Attention(dim, heads, dropout)
        self.norm2 = LayerNorm(dim)
        hidden = math.ceil(dim * 4 / 3)
        self.ffn_in = nn.Linear(dim, 2 * hidden)
        self.ffn_out = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.dropout(self.attention(self.norm1(h)))
        value, gate = self.ffn_in(self.norm2(h)).chunk(2, dim=-1)
        return h + self.dropout(self.ffn_out(self.dropout(value * torch.relu(gate))))


class FTTransformer(Encoder):
    """FT-Transformer (Gorishniy et al. 2021): one token per feature column, attention across them.

    Column j of the preprocessed matrix becomes the token ``x_j * W_j + b_j``; for a one-hot
    column that is a learned embedding of the category (``b_j`` alone when absent). A [CLS]
    token joins them, and its final state (LayerNorm ▶ ReLU ▶ Linear) is the embedding.

    There is one token per *preprocessed* column: numeric columns, their missing-value
    indicators and every one-hot level. Attention costs O(T² · d) time and O(heads · T²)
    memory per row and layer with T = columns + 1, so a table whose categoricals expand to
    hundreds of levels is far slower here than in ``mlp`` (and, under MAML, that memory is
    multiplied by the task batch and kept for the second-order gradient).
    """

    name = "ft_transformer"
    modality = "tabular"
    search_space = {
        "dim": CategoricalDistribution([16, 32, 64]),
        "heads": CategoricalDistribution([1, 2, 4]),
        "layers": IntDistribution(1, 2),
        "dropout": FloatDistribution(0.0, 0.3),
        "out_dim": IntDistribution(16, 128, log=True),
    }

    def __init__(
        self, spec: InputSpec, *, dim: int = 32, heads: int = 4, layers: int = 1, dropout: float = 0.1, out_dim: int = 64
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ft_transformer: heads={heads} must divide dim={dim}")
        features = spec.shape[0]
        bound = 1 / math.sqrt(dim)
        self.token_weight = nn.Parameter(torch.empty(features, dim).uniform_(-bound, bound))
        self.token_bias = nn.Parameter(torch.empty(features, dim).uniform_(-bound, bound))
        self.cls = nn.Parameter(torch.empty(dim).uniform_(-bound, bound))
        self.blocks = nn.ModuleList(_TransformerBlock(dim, heads, dropout, first=i == 0) for i in range(layers))
        self.norm = LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.unsqueeze(-1) * self.token_weight + self.token_bias  # [..., F, d]
        cls = self.cls.expand(*tokens.shape[:-2], 1, tokens.shape[-1])
        h = torch.cat([tokens, cls], dim=-2)
        for block in self.blocks:
            h = block(h)
        return self.proj(torch.relu(self.norm(h[..., -1, :])))


class BagOfWords(Encoder):
    """Hashed word uni/bigrams as a term-frequency vector, then one linear layer (optional ReLU).

    The vector is scikit-learn's ``TfidfVectorizer(use_idf=False, sublinear_tf=True)`` over
    the hash buckets: sublinear term frequency 1 + log(count) (raw counts with ``sublinear=False``),
    scaled to unit L2 norm so that long and short texts are comparable. It is never built
    densely: the linear layer's output is a weighted sum of one weight row per token, each
    occurrence weighted tf(count) / count. Unlike ``hashbag`` (a mean of low-dimensional
    embeddings followed by a hidden layer), every bucket owns a full output row: a wide,
    shallow linear text model.
    """

    name = "bow"
    modality = "text"
    search_space = {
        "out_dim": IntDistribution(16, 128, log=True),
        "sublinear": CategoricalDistribution([True, False]),
        "relu": CategoricalDistribution([True, False]),
    }

    def __init__(self, spec: InputSpec, *, out_dim: int = 64, sublinear: bool = True, relu: bool = True):
        super().__init__()
        # The input vector has unit norm, so each output's scale is that of the weights.
        self.weight = nn.Parameter(torch.randn(spec.vocab_size, out_dim) * 0.5)
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.sublinear = sublinear
        self.relu = relu
        self.out_dim = out_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        dtype = self.weight.dtype
        present = (ids > 0).to(dtype)
        # How often each position's bucket occurs in its row (padding excluded).
        counts = ((ids.unsqueeze(-1) == ids.unsqueeze(-2)).to(dtype) * present.unsqueeze(-2)).sum(-1).clamp_min(1.0)
        tf = 1.0 + torch.log(counts) if self.sublinear else counts
        # A bucket seen c times has c positions: each carries tf/c of its weight and tf²/c of the norm².
        share = present * tf / counts
        norm = torch.sqrt((share * tf).sum(-1, keepdim=True)).clamp_min(1e-12)
        out = (share.unsqueeze(-1) * F.embedding(ids, self.weight)).sum(-2) / norm + self.bias
        return torch.relu(out) if self.relu else out


class _ResidualStage(nn.Module):
    """Three conv3x3 ▶ GroupNorm (▶ LeakyReLU) with a 1x1-conv shortcut, then a 2x2 max-pool."""

    def __init__(self, cin: int, cout: int, pool: bool):
        super().__init__()
        groups = math.gcd(8, cout)
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout)]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(groups, cout))
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.leaky_relu(self.body(x) + self.shortcut(x), 0.1))


class ResNet12(Encoder):
    """ResNet-12 (Oreshkin et al. 2018; Lee et al. 2019), GroupNorm instead of BatchNorm.

    Four residual stages of width · (1, 2, 4, 8) channels, each halving the resolution
    (until 1x1), then global average pooling: ``out_dim = 8 · width``. Published few-shot
    ResNet-12s are far wider (64 to 640 channels); the search stays at width 16–32 because a
    trial on a CPU must finish in minutes (width 64 still constructs, for a GPU).
    """

    name = "resnet12"
    modality = "image"
    search_space = {
        "width": CategoricalDistribution([16, 32]),
    }

    def __init__(self, spec: InputSpec, *, width: int = 16):
        super().__init__()
        stages: list[nn.Module] = []
        cin, size = spec.shape[0], min(spec.shape[1:])
        for scale in (1, 2, 4, 8):
            stages.append(_ResidualStage(cin, width * scale, pool=size >= 2))
            cin, size = width * scale, max(1, size // 2)
        self.net = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# The first registered for a modality is its default encoder; the fixed feature maps (table, pixels, tfidf) come last.
ENCODERS = [TabularMLP, TabularLinear, FTTransformer, LatentSemantic, HashBag, BagOfWords, MiniLM, Conv4, PixelPCA, ResNet12, Identity,
            VectorMLP, Table, Pixels, TfIdf]
