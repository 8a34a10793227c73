"""Multinomial logistic regression (scikit-learn's LogisticRegression) on fixed features.

A few lines of scikit-learn — TF-IDF of the text beside the scaled numeric columns, into a
logistic regression — are what a user would otherwise try first, and on text + table data with
hundreds of rows per class they are hard to beat (issue 15: 90.2 % on fastfood where the search's
neural and tree models reached 85 %). ``linear`` is that model inside the search: it reads fixed
features (``tfidf`` of the text by default, the preprocessed ``table``), fits once, is scored on
the same validation rows as every other trial and is available to the ensemble.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from optuna.distributions import FloatDistribution
from threadpoolctl import threadpool_limits
from torch import nn

from autometa.components import Backbone, MetaAlgorithm
from autometa.types import Task, TrainingPool
from autometa_builtins.meta_algorithms._common import embed, embedding_placement, every_training_row, through_training_classes

# A class absent from the training rows can never be predicted: its logit is this far below.
ABSENT = -1e4
# Features with at most this share of non-zeros (tfidf's n-grams: 2 % on the birds set) are fitted as
# a sparse matrix: L-BFGS's products then skip the zeros (a fit there 5-7x faster, same optimum).
SPARSE_SHARE = 0.1


class Linear(MetaAlgorithm):
    """Multinomial logistic regression on fixed features (L2 penalty, inverse strength ``C``).

    It trains no encoder (``fixed_features``) and fits once, in its first ``train_step``, on every
    training row with L-BFGS (at most ``max_iter`` iterations; a fit that has not converged by then
    is used as it is, as scikit-learn does, and scored like any other). The fitted weights are a
    frozen ``[classes, features]`` linear layer, saved in the model's safetensors file, so a saved
    model predicts without scikit-learn. Tasks with their own labels (held-out groups,
    ``autometa predict --support``) are answered through the class probabilities, as gbm does.
    """

    name = "linear"
    protocols = ("grouped", "standard")
    fixed_features = True
    fits_in_one_step = True
    preferred_features = ("tfidf",)
    search_space = {"C": FloatDistribution(1e-2, 1e3, log=True)}

    def __init__(self, *, C: float = 10.0, max_iter: int = 300):
        if not C > 0:
            raise ValueError(f"C must be positive, got {C!r}")
        self.C, self.max_iter = float(C), int(max_iter)
        self.loss: float | None = None

    def setup(self, backbone: Backbone, pool: TrainingPool, shape: tuple[int, int, int]) -> None:
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_dim, pool.n_classes).to(**embedding_placement(backbone, pool))
        self.head.requires_grad_(False)
        # Saved with the weights, so a loaded model knows it was fitted.
        self.head.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=self.head.weight.device))

    def modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "head": self.head}

    def train_step(self, pool: TrainingPool, rng: np.random.Generator) -> float:
        if self.loss is not None:
            return self.loss
        from scipy import sparse
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        x, y = every_training_row(self.backbone, pool, rng)
        labels = y.cpu().numpy()
        classes = np.unique(labels)
        weight = torch.zeros_like(self.head.weight)
        bias = torch.full_like(self.head.bias, ABSENT)
        if len(classes) == 1:  # nothing to separate: the one class always wins
            bias[int(classes[0])] = 0.0
        else:
            model = LogisticRegression(C=self.C, max_iter=self.max_iter)
            fitted = x.detach().cpu().double().numpy()
            if np.count_nonzero(fitted) <= SPARSE_SHARE * fitted.size:
                fitted = sparse.csr_matrix(fitted)
            # One thread: these fits are small, and trials run in parallel instead (see gbm).
            with threadpool_limits(1), warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(fitted, labels)
            coef = torch.as_tensor(model.coef_, dtype=weight.dtype, device=weight.device)
            intercept = torch.as_tensor(model.intercept_, dtype=bias.dtype, device=bias.device)
            index = torch.as_tensor(classes, device=weight.device)
            if len(classes) == 2:  # scikit-learn keeps one row: the second class's log-odds
                coef, intercept = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros_like(intercept), intercept])
            weight[index], bias[index] = coef, intercept
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
            self.head.fitted.fill_(True)
            self.loss = float(torch.nn.functional.cross_entropy(self.head(x), y))
        return self.loss

    @torch.no_grad()
    def predict(self, task: Task) -> torch.Tensor:
        if not self.head.fitted:
            raise RuntimeError("linear predicts only after its first train_step has fitted the weights")
        return through_training_classes(task, lambda inputs: self.head(embed(self.backbone, inputs)))
