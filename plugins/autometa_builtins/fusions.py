"""Built-in fusions: how the per-modality embeddings become one representation per row.

Every fusion keeps the modality order it was built with (the keys of ``in_dims``), so the
dict order of ``embeddings`` at call time never matters. All of them follow the same rules,
because meta-algorithms run them under ``torch.func`` (vmap over tasks, grad of grad):

- missing rows are removed with ``torch.where`` rather than by multiplying by the mask, so
  not even a NaN or inf in a missing modality's embedding reaches the output or the
  fusion's gradients;
- softmax weights over modalities use :func:`masked_softmax`, which gives a missing entry
  exactly zero weight and an all-missing row zeros instead of NaN (NaN in the forward pass
  would poison gradients even where it is later discarded);
- no BatchNorm (see encoders.py), no in-place ops and no Python branches on tensor values;
- every op works on ``[..., batch, dim]`` so extra leading dims pass through.
"""

from __future__ import annotations

import math

import torch
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from torch import nn

from autometa.components import Fusion
from autometa_builtins.layers import LayerNorm


def keep_mask(masks: dict[str, torch.Tensor] | None, modality: str) -> torch.Tensor | None:
    """Bool ``[...]`` presence of ``modality``, or None when every row has it."""
    if masks is None or modality not in masks:
        return None
    return masks[modality]


def present(embedding: torch.Tensor, masks: dict[str, torch.Tensor] | None, modality: str) -> torch.Tensor:
    """The embedding with rows that lack ``modality`` set to zero."""
    keep = keep_mask(masks, modality)
    if keep is None:
        return embedding
    return torch.where(keep.unsqueeze(-1), embedding, embedding.new_zeros(()))


def stacked_mask(masks: dict[str, torch.Tensor], order: list[str], like: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., M]`` presence of each modality in ``order`` (absent from masks = present)."""
    shape = like.shape[:-2]
    return torch.stack(
        [masks[m] if m in masks else torch.ones(shape, dtype=torch.bool, device=like.device) for m in order], dim=-1
    )


def masked_softmax(scores: torch.Tensor, keep: torch.Tensor | None, dim: int) -> torch.Tensor:
    """Softmax over ``dim`` restricted to entries where ``keep`` (broadcastable) is True.

    Dropped entries get exactly zero weight, and a slice with nothing kept gets all zeros.
    """
    if keep is None:
        return torch.softmax(scores, dim=dim)
    # A finite floor instead of -inf: an all-dropped slice then stays finite (exp(0) = 1,
    # zeroed below) where softmax over all -inf would give NaN.
    scores = torch.where(keep, scores, torch.finfo(scores.dtype).min)
    # Softmax is shift invariant, so the max needs no gradient.
    weights = torch.exp(scores - scores.amax(dim=dim, keepdim=True).detach())
    weights = torch.where(keep, weights, weights.new_zeros(()))
    # Any slice with a kept entry sums to at least 1 (its max gives exp(0)); the clamp only
    # keeps 0 / 0 away from the all-dropped ones.
    return weights / weights.sum(dim=dim, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def _modality_weights(masks, order: list[str], like: torch.Tensor) -> torch.Tensor | None:
    """``[..., M, 1]`` presence for a ``[..., M, dim]`` stack, or None without masks."""
    if masks is None:
        return None
    return stacked_mask(masks, order, like).unsqueeze(-1)


_DIM = IntDistribution(16, 128, log=True)
_OUT_DIM = IntDistribution(16, 128, log=True)
_DROPOUT = FloatDistribution(0.0, 0.3)


class Concat(Fusion):
    """Early fusion: the modality embeddings side by side, in the fixed modality order."""

    name = "concat"
    fixed_params = {}

    def __init__(self, in_dims: dict[str, int]):
        super().__init__()
        self.order = list(in_dims)
        self.out_dim = sum(in_dims.values())

    def forward(self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return torch.cat([present(embeddings[m], masks, m) for m in self.order], dim=-1)


class _Projected(Fusion):
    """Shared base: every modality projected by its own Linear to a common ``dim``."""

    def __init__(self, in_dims: dict[str, int], dim: int):
        super().__init__()
        self.order = list(in_dims)
        self.project = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in in_dims.items()})
        self.out_dim = dim

    def projected(self, embeddings, masks) -> torch.Tensor:
        """``[..., M, dim]``; a missing modality's row is zero after projection (bias too)."""
        # Zeroed before too, so a NaN there cannot reach the weights' gradient (0 · NaN).
        return torch.stack(
            [present(self.project[m](present(embeddings[m], masks, m)), masks, m) for m in self.order], dim=-2
        )


class Sum(_Projected):
    """Σ over present modalities of a per-modality Linear projection to ``dim``."""

    name = "sum"
    search_space = {"dim": _DIM}

    def __init__(self, in_dims: dict[str, int], *, dim: int = 64):
        super().__init__(in_dims, dim)

    def forward(self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return self.projected(embeddings, masks).sum(dim=-2)


class Mean(_Projected):
    """Mean over present modalities of a per-modality Linear projection to ``dim``.

    Unlike ``sum``, the scale does not depend on how many modalities a row has; a row with
    none fuses to zeros.
    """

    name = "mean"
    search_space = {"dim": _DIM}

    def __init__(self, in_dims: dict[str, int], *, dim: int = 64):
        super().__init__(in_dims, dim)

    def forward(self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        h = self.projected(embeddings, masks)
        keep = _modality_weights(masks, self.order, h)
        if keep is None:
            return h.mean(dim=-2)
        return h.sum(dim=-2) / keep.to(h.dtype).sum(dim=-2).clamp_min(1.0)


class Attention(_Projected):
    """Per-dimension attention over modalities: a_i = softmax_i(W h_i + b), z = Σ_i a_i ⊙ h_i.

    Each modality is first projected to a common size so the weighted sum is defined.
    Missing modalities get no weight; a row missing all of them fuses to zeros.
    """

    name = "attention"
    search_space = {"dim": _DIM}

    def __init__(self, in_dims: dict[str, int], *, dim: int = 64):
        super().__init__(in_dims, dim)
        self.score = nn.Linear(dim, dim)

    def forward(self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        h = self.projected(embeddings, masks)  # [..., M, dim]
        a = masked_softmax(self.score(h), _modality_weights(masks, self.order, h), dim=-2)
        return (a * h).sum(dim=-2)


class Gated(Fusion):
    """Gated Multimodal Unit (Arevalo et al., 2017) for any number of modalities.

    h_i = tanh(W_i x_i); the gates z = softmax over modalities of W_z [x_1; …; x_M] + b_z,
    one gate per modality and output dimension; output Σ_i z_i ⊙ h_i. With two modalities
    this is the paper's z ⊙ h_1 + (1 − z) ⊙ h_2 with z a sigmoid. Missing modalities enter
    the gate network as zeros and get zero gate weight.
    """

    name = "gated"
    search_space = {"dim": _DIM}

    def __init__(self, in_dims: dict[str, int], *, dim: int = 64):
        super().__init__()
        self.order = list(in_dims)
        self.hidden = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in in_dims.items()})
        self.gate = nn.Linear(sum(in_dims.values()), len(in_dims) * dim)
        self.out_dim = dim

    def forward(self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        xs = [present(embeddings[m], masks, m) for m in self.order]
        h = torch.stack([torch.tanh(self.hidden[m](x)) for m, x in zip(self.order, xs)], dim=-2)  # [..., M, dim]
        logits = self.gate(torch.cat(xs, dim=-1)).unflatten(-1, (len(self.order), self.out_dim))
        z = masked_softmax(logits, _modality_weights(masks, self.order, h), dim=-2)
        return (z * h).sum(dim=-2)


class TensorFusion(Fusion):
    """Tensor Fusion Network (Zadeh et al., 2017): Linear(⊗_i [W_i x_i; 1]) to ``out_dim``.

    Appending 1 keeps every lower-order interaction (each modality alone, every pair, …) in
    the flattened outer product. A missing modality contributes (0, …, 0, 1), so the product
    reduces to the other modalities' terms.

    Size: with M modalities and per-modality size k the product has (k + 1)^M features and
    the final Linear (k + 1)^M · out_dim weights. To keep that bounded whatever M is, k is
    ``dim`` lowered until (k + 1)^M ≤ ``max_features`` (default 4096: the searched k ≤ 16
    is kept for up to two modalities, capped at 15 for three and 7 for four, the most any
    dataset has); ``factor_dim`` holds the k used and ``flat_dim`` the product's size.
    """

    name = "tensor"
    search_space = {
        "dim": IntDistribution(4, 16, log=True),
        "out_dim": _OUT_DIM,
    }

    def __init__(self, in_dims: dict[str, int], *, dim: int = 8, out_dim: int = 64, max_features: int = 4096):
        super().__init__()
        self.order = list(in_dims)
        k = dim
        while k > 1 and (k + 1) ** len(in_dims) > max_features:
            k -= 1
        self.factor_dim = k
        self.project = nn.ModuleDict({m: nn.Linear(d, k) for m, d in in_dims.items()})
        self.flat_dim = (k + 1) ** len(in_dims)
        self.out = nn.Linear(self.flat_dim, out_dim)
        self.out_dim = out_dim

    def forward(self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        product = None
        for m in self.order:
            z = present(self.project[m](present(embeddings[m], masks, m)), masks, m)
            z = torch.cat([z, z.new_ones(z.shape[:-1] + (1,))], dim=-1)
            # Row-major flattening: index i·(k+1) + j holds product_i · z_j, as torch.outer.
            product = z if product is None else (product.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2)
        return self.out(product)


class LowRank(Fusion):
    """Low-rank Multimodal Fusion (Liu et al., 2018): a rank-r factorisation of tensor fusion.

    Each modality has r factors W_i^(j) over [x_i; 1]; the output is
    Σ_j λ_j Π_i ([x_i; 1] W_i^(j)) + b, the tensor fusion weight restricted to rank r,
    without ever forming the outer product. A missing modality's factors see (0, …, 0, 1),
    i.e. contribute their last row, as in ``tensor``.
    """

    name = "lowrank"
    search_space = {
        "rank": IntDistribution(2, 8),
        "out_dim": _OUT_DIM,
    }

    def __init__(self, in_dims: dict[str, int], *, rank: int = 4, out_dim: int = 64):
        super().__init__()
        self.order = list(in_dims)
        self.factors = nn.ParameterDict({m: nn.Parameter(torch.empty(rank, d + 1, out_dim)) for m, d in in_dims.items()})
        for factor in self.factors.values():
            for j in range(rank):
                nn.init.xavier_normal_(factor.data[j])
        self.rank_weight = nn.Parameter(torch.empty(1, rank))
        nn.init.xavier_normal_(self.rank_weight)
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.out_dim = out_dim

    def forward(self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        product = None
        for m in self.order:
            x = present(embeddings[m], masks, m)
            w = self.factors[m]
            f = torch.einsum("...d,rdo->...ro", x, w[:, :-1]) + w[:, -1]  # [..., rank, out]
            product = f if product is None else product * f
        return torch.einsum("...ro,r->...o", product, self.rank_weight[0]) + self.bias


class Late(Fusion):
    """Decision-level fusion: one small MLP per modality gives a decision vector of size
    ``out_dim``; they are averaged with learned softmax weights over the present modalities.

    The meta-algorithms put a linear task head on top, and a linear head commutes with the
    weighted average: head(Σ_i a_i d_i) = Σ_i a_i head(d_i) (the a_i sum to one). So this is a
    weighted vote of per-modality predictions, each modality scored through its own MLP and
    the shared task head.
    """

    name = "late"
    search_space = {
        "hidden": IntDistribution(16, 128, log=True),
        "out_dim": _OUT_DIM,
        "dropout": _DROPOUT,
    }

    def __init__(self, in_dims: dict[str, int], *, hidden: int = 64, out_dim: int = 64, dropout: float = 0.1):
        super().__init__()
        self.order = list(in_dims)
        self.heads = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))
                for m, d in in_dims.items()
            }
        )
        # Equal weights to begin with: no modality is preferred before training says so.
        self.weight_logits = nn.Parameter(torch.zeros(len(in_dims)))
        self.out_dim = out_dim

    def forward(self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        d = torch.stack([self.heads[m](present(embeddings[m], masks, m)) for m in self.order], dim=-2)  # [..., M, out]
        keep = None if masks is None else stacked_mask(masks, self.order, d)
        a = masked_softmax(self.weight_logits.expand(d.shape[:-1]), keep, dim=-1)
        return (a.unsqueeze(-1) * d).sum(dim=-2)


class _Block(nn.Module):
    """A pre-norm transformer layer over the modality tokens.

    Attention is written out instead of using nn.MultiheadAttention: on CUDA that calls the
    fused scaled-dot-product kernels, whose backward is not differentiable again, and MAML
    needs grad of grad. M is at most a handful of tokens, so the plain form costs nothing.
    """

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        dim = x.shape[-1]
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, dim // self.heads)).unbind(-3)
        q, k, v = (t.transpose(-2, -3) for t in (q, k, v))  # [..., heads, M, head_dim]
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim // self.heads)
        key_keep = None if keep is None else keep.unsqueeze(-2).unsqueeze(-2)  # [..., 1, 1, M]
        context = (masked_softmax(scores, key_keep, dim=-1) @ v).transpose(-2, -3).flatten(-2)
        x = x + self.drop(self.out(context))
        return x + self.drop(self.ff(self.norm2(x)))


class Transformer(Fusion):
    """One token per modality (Linear projection + learned modality embedding), a small
    pre-norm transformer encoder over the tokens, then the mean of the present tokens.

    Missing modalities are masked out as keys and left out of the mean, so they influence
    nothing; a row with no modality fuses to zeros.
    """

    name = "transformer"
    # Categorical so that every dim is divisible by every head count.
    search_space = {
        "dim": CategoricalDistribution([16, 32, 64, 128]),
        "heads": CategoricalDistribution([1, 2, 4]),
        "layers": IntDistribution(1, 2),
        "dropout": _DROPOUT,
    }

    def __init__(self, in_dims: dict[str, int], *, dim: int = 64, heads: int = 4, layers: int = 1, dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer fusion: dim={dim} is not divisible by heads={heads}")
        self.order = list(in_dims)
        self.project = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in in_dims.items()})
        self.modality_embedding = nn.Parameter(torch.randn(len(in_dims), dim) * 0.02)
        self.blocks = nn.ModuleList([_Block(dim, heads, dropout) for _ in range(layers)])
        self.norm = LayerNorm(dim)
        self.out_dim = dim

    def forward(self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        tokens = torch.stack([self.project[m](present(embeddings[m], masks, m)) for m in self.order], dim=-2)
        x = tokens + self.modality_embedding
        keep = None if masks is None else stacked_mask(masks, self.order, x)
        for block in self.blocks:
            x = block(x, keep)
        x = self.norm(x)
        if keep is None:
            return x.mean(dim=-2)
        weights = keep.unsqueeze(-1)
        pooled = torch.where(weights, x, x.new_zeros(())).sum(dim=-2)
        return pooled / weights.to(x.dtype).sum(dim=-2).clamp_min(1.0)


class FiLM(Fusion):
    """Feature-wise linear modulation (Perez et al., 2018) by the first modality.

    The first modality in the fixed order is the conditioner (a fixed rule, since a search
    space cannot depend on which modalities a dataset has); the others are concatenated,
    projected to ``dim`` and modulated: (1 + Δγ(c)) ⊙ h + β(c). Writing γ as 1 + Δγ starts
    training near plain projection. A row missing the conditioner gets γ = 1, β = 0; missing
    modulated modalities enter the projection as zeros. With one modality this is a Linear
    projection of it.
    """

    name = "film"
    search_space = {"dim": _DIM}

    def __init__(self, in_dims: dict[str, int], *, dim: int = 64):
        super().__init__()
        self.order = list(in_dims)
        self.conditioner = self.order[0]
        self.modulated = self.order[1:]
        cond_dim = in_dims[self.conditioner]
        if self.modulated:
            self.project = nn.Linear(sum(in_dims[m] for m in self.modulated), dim)
            self.film = nn.Linear(cond_dim, 2 * dim)
        else:
            self.project = nn.Linear(cond_dim, dim)
            self.film = None
        self.out_dim = dim

    def forward(self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        c = present(embeddings[self.conditioner], masks, self.conditioner)
        if self.film is None:
            return self.project(c)
        h = self.project(torch.cat([present(embeddings[m], masks, m) for m in self.modulated], dim=-1))
        # A zero (Δγ, β) is the identity modulation, so zeroing it covers a missing conditioner.
        delta_gamma, beta = present(self.film(c), masks, self.conditioner).chunk(2, dim=-1)
        return (1 + delta_gamma) * h + beta


FUSIONS = [Concat, Sum, Mean, Attention, Gated, TensorFusion, LowRank, Late, Transformer, FiLM]
