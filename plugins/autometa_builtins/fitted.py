"""Fixed features fitted on training rows, with an identity-initialised map the meta-learner adapts.

Few-shot learning meets classes never seen in training; a representation learned from scratch on
a few thousand rows often does not transfer to them, where plain statistics of the training rows
(n-gram weights, principal directions of the pixels) do. Encoders here compute such features once
per dataset (``fit_input`` on the training rows only, ``prepare`` for every row) and put a small
learned map on top that starts as the identity, so training starts from the fixed features.
"""

from __future__ import annotations

import numpy as np
import torch
from optuna.distributions import CategoricalDistribution
from sklearn.decomposition import TruncatedSVD
from sklearn.preprocessing import normalize
from torch import nn

from autometa.components import Encoder, InputSpec


def unit_rows(z: np.ndarray) -> torch.Tensor:
    """float32 rows scaled to unit L2 norm (an all-zero row stays zero)."""
    return torch.from_numpy(normalize(z).astype(np.float32))


class FittedFeatures(Encoder):
    """Base of the fixed-feature encoders: ``prepare`` gives ``[N, dims]`` features; the module maps
    them by x + Wx + b with W, b zero at first (``projection="linear"``) or passes them as they are
    (``"none"``: a nearest-centroid-like model over the fixed features)."""

    search_space = {"projection": CategoricalDistribution(["linear", "none"])}
    fixed_params = {"projection": "none"}  # the fitted features as they are (for fixed-features learners)

    def __init__(self, spec: InputSpec, *, projection: str = "linear"):
        super().__init__()
        if projection not in ("linear", "none"):
            raise ValueError(f"projection must be 'linear' or 'none', got {projection!r}")
        # The spec is the prepared input's ([dims]) in a search; the registry's example spec
        # (the modality's raw shape) only checks construction.
        dim = int(np.prod(spec.shape))
        self.linear = None
        if projection == "linear":
            self.linear = nn.Linear(dim, dim)
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return x if self.linear is None else x + self.linear(x)


PIXEL_DIMS = 128


def _pixels(raw: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` → float64 ``[N, H·W·C]`` in [0, 1]."""
    return np.asarray(raw).reshape(len(raw), -1).astype(np.float64) / 255.0


class PixelPCA(FittedFeatures):
    """Pixels → principal components of the training rows (128) → unit norm, then the
    identity-initialised map: the image counterpart of ``lsa`` beside the learned ``conv4``.

    The mean image and the principal directions are fitted on training rows only; a pixel that
    no training image lights has no weight in them, whatever held-out classes draw there. With
    few training rows or little time a fixed basis can beat a convolutional network learned from
    scratch; with thousands of training images conv4 usually wins, and the search chooses.
    Size: the state is the mean image and ``dims × H·W·C`` float32 components (28×28 grey:
    0.4 MiB); the map has dims² + dims weights. Fitting is a randomised SVD, a second or two per
    10,000 small images.
    """

    name = "pixelpca"
    modality = "image"

    @classmethod
    def fit_input(cls, raw: np.ndarray, rows: np.ndarray) -> dict[str, torch.Tensor]:
        x = _pixels(np.asarray(raw)[rows])
        mean = x.mean(axis=0)
        dims = max(1, min(PIXEL_DIMS, len(rows) - 1, x.shape[1] - 1))
        svd = TruncatedSVD(dims, algorithm="randomized", n_iter=7, random_state=0).fit(x - mean)
        # Directions without variance in the training rows (beyond their rank) are arbitrary and
        # could weigh pixels no training image lights: only held-out images would move along them.
        kept = svd.singular_values_ > 1e-6 * max(svd.singular_values_.max(), 1e-12)
        kept[0] = True
        return {
            "mean": torch.from_numpy(mean.astype(np.float32)),
            "components": torch.from_numpy(svd.components_[kept].astype(np.float32)),
        }

    @classmethod
    def prepare(cls, raw: np.ndarray, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if state is None:
            raise ValueError("pixelpca features are fitted on training rows: call fit_input first")
        x = _pixels(raw)
        mean, components = state["mean"].numpy().astype(np.float64), state["components"].numpy().astype(np.float64)
        if x.shape[1] != mean.shape[0]:
            raise ValueError(f"pixelpca was fitted on images of {mean.shape[0]} values each; these have {x.shape[1]}")
        return unit_rows((x - mean) @ components.T)
