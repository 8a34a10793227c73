"""Cross-modal mapping: predict each modality's embedding from the others'.

A :class:`CrossModalMapper` holds one linear map per ordered pair of modalities (source →
target). A target's prediction is the mean, over the sources a row has, of the maps applied to
those sources' embeddings, so it works for any number of modalities and any pattern of
missing ones. It serves twice in the :class:`~autometa.components.Backbone`:

- as an auxiliary objective (:meth:`CrossModalMapper.loss`): the relative squared error
  between predicted and actual embeddings on rows that have the target, which teaches every
  encoder to carry what the other modalities need;
- as an imputer (:meth:`CrossModalMapper.impute`): a row that lacks a modality gets the
  prediction instead, and counts as having it, so any fusion sees a plausible embedding.

Like the fusions, it runs under ``torch.func`` (vmap over tasks, grad of grad): rows are
selected with ``torch.where`` (never by multiplying by a mask, as ``0 * NaN`` is NaN), there
are no Python branches on tensor values, and every op works on ``[..., batch, dim]``.
"""

from __future__ import annotations

import torch
from torch import nn

# Floor of a target's mean squared norm per dimension in the relative error: an RMS of 0.01.
# It only matters when the targets are all near zero, where dividing by their energy alone
# would turn the loss (and its gradient) huge.
ENERGY_FLOOR = 1e-4


def pair_key(source: str, target: str) -> str:
    # ModuleDict keys may not contain dots.
    return f"{source}_to_{target}"


class CrossModalMapper(nn.Module):
    """Linear maps between modality embeddings; ``in_dims`` gives each modality's size."""

    def __init__(self, in_dims: dict[str, int]):
        super().__init__()
        if len(in_dims) < 2:
            raise ValueError(f"cross-modal mapping needs two or more modalities, got {list(in_dims)}")
        self.order = list(in_dims)
        self.maps = nn.ModuleDict(
            {pair_key(s, t): nn.Linear(in_dims[s], in_dims[t]) for t in self.order for s in self.order if s != t}
        )

    def predict(
        self, embeddings: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per target modality: (prediction ``[..., batch, dim]``, bool ``[..., batch]`` whether the
        row has any other modality to predict it from; where not, the prediction is zero)."""
        keep = {m: masks.get(m) for m in self.order}
        out = {}
        for target in self.order:
            total, count = None, None
            for source in self.order:
                if source == target:
                    continue
                x, k = embeddings[source], keep[source]
                if k is not None:  # an absent source's (possibly non-finite) values must not leak
                    x = torch.where(k.unsqueeze(-1), x, x.new_zeros(()))
                y = self.maps[pair_key(source, target)](x)
                if k is not None:
                    y = torch.where(k.unsqueeze(-1), y, y.new_zeros(()))
                    n = k.to(y.dtype)
                else:
                    n = y.new_ones(y.shape[:-1])
                total = y if total is None else total + y
                count = n if count is None else count + n
            out[target] = (total / count.clamp_min(1.0).unsqueeze(-1), count > 0)
        return out

    def loss(
        self,
        embeddings: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Mean over target modalities of Σ‖prediction − target‖² / Σ‖target‖² over the rows that
        have the target and something to predict it from (0 for a target without such rows).

        Why this form: the target is detached (stop-gradient), so the auxiliary loss cannot be
        lowered by the target's encoder shrinking or collapsing its embeddings; only the sources'
        encoders and the maps learn from it, towards predicting the target. Dividing by the
        (detached) target energy makes the loss scale-free, so one searched weight means the same
        for every encoder, while, unlike a cosine loss, it still asks for the right magnitude,
        which imputation needs.
        """
        predictions = self.predict(embeddings, masks) if predictions is None else predictions
        terms = []
        for target in self.order:
            predicted, predictable = predictions[target]
            valid = predictable if masks.get(target) is None else predictable & masks[target]
            # Zeroed where not scored, so an absent row's NaN cannot reach the gradient either.
            actual = torch.where(valid.unsqueeze(-1), embeddings[target].detach(), embeddings[target].new_zeros(()))
            error = torch.where(valid, ((predicted - actual) ** 2).sum(-1), predicted.new_zeros(()))
            energy = torch.where(valid, (actual**2).sum(-1), actual.new_zeros(()))
            floor = ENERGY_FLOOR * actual.shape[-1] * valid.to(actual.dtype).sum(-1)
            terms.append(error.sum(-1) / torch.maximum(energy.sum(-1), floor).clamp_min(torch.finfo(actual.dtype).tiny))
        return torch.stack(terms).mean()

    def impute(
        self,
        embeddings: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        predictions: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Embeddings with each absent (row, modality) replaced by its prediction, and the masks
        updated: an imputed row counts as present; a row with nothing to predict from stays absent."""
        predictions = self.predict(embeddings, masks) if predictions is None else predictions
        embeddings, new_masks = dict(embeddings), {}
        for m in self.order:
            keep = masks.get(m)
            if keep is None:
                continue
            predicted, predictable = predictions[m]
            embeddings[m] = torch.where(keep.unsqueeze(-1), embeddings[m], predicted)
            new_masks[m] = keep | predictable
        return embeddings, new_masks
