"""Gradient-boosted trees (scikit-learn's HistGradientBoostingClassifier) on fixed features.

On tables whose numeric columns carry most of the signal, a tree ensemble beats an MLP encoder
(issue 15: AutoGluon's best single model on a text + table set was LightGBM). ``gbm`` reads the
backbone's output without training it (``fixed_features``): the preprocessed table (``table``),
a text's TF-IDF + SVD (``lsa``) or pretrained embeddings (``minilm``), flattened pixels
(``pixels``), side by side (``concat``).

Saving: the fitted trees are exported to flat tensors (``TreeEnsemble``), which the model keeps
in its safetensors file like any weights, and every prediction, during the search and after
``autometa.load``, goes through the same vectorised walk of those tensors. So the saved model
needs no pickle, does not depend on scikit-learn's private classes when loaded, and predicts
exactly what was scored. Refitting from stored training rows at load time was the alternative;
it would store every training row and rely on a refit being bitwise reproducible across
scikit-learn versions and thread counts, which nobody promises.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from threadpoolctl import threadpool_limits
from torch import nn

from autometa.components import Backbone, MetaAlgorithm
from autometa.types import Task, TrainingPool
from autometa_builtins.meta_algorithms._common import embed, every_training_row, through_training_classes

# Rows × features from which a fit uses several OpenMP threads (see train_step).
LARGE_FIT = 2**22
# Columns a fit reads at most: of wider inputs (table + lsa's 256, tfidf's 8,192), those whose
# values differ most between the classes (``informative_columns``). A fit's cost grows with the
# columns, and a cross-validated trial makes four: on table + tfidf, 256 of them take a quarter to a
# third of the time of 1,024 for 0.4-2.1 points less, inside the intervals (benchmarks/gbm_columns.py;
# docs/benchmarks.md "gbm's column cap").
MAX_COLUMNS = 256
# Rows × trees walked at once when predicting (each step gathers a few tensors of this size).
WALK_ELEMENTS = 2**22


class TreeEnsemble(nn.Module):
    """Fitted regression trees as flat tensors, and their raw scores: ``baseline + Σ leaf values``
    of each class's trees (one per class and iteration; binary: one per iteration, class 1).

    Nodes of every tree share one array: ``feature``/``threshold`` of each split (a row goes left
    when its value is at most the threshold, or, when missing, where ``missing_left`` says),
    ``left``/``right`` children (global indices) and ``value`` (a leaf's, learning rate included).
    A leaf is its own child on both sides with an infinite threshold, so walking every tree
    ``depth`` steps needs no test for leaves. ``roots`` and ``tree_class`` give each tree's first
    node and its class. Shapes depend on the fit, so loading a state dict takes the saved shapes.
    """

    def __init__(self):
        super().__init__()
        for name, dtype in (("feature", torch.int64), ("threshold", torch.float64), ("missing_left", torch.bool),
                            ("left", torch.int64), ("right", torch.int64), ("value", torch.float64),
                            ("roots", torch.int64), ("tree_class", torch.int64), ("baseline", torch.float64)):
            self.register_buffer(name, torch.zeros(0, dtype=dtype))
        self.register_buffer("depth", torch.zeros((), dtype=torch.int64))

    @property
    def fitted(self) -> bool:
        return len(self.baseline) > 0

    def set_trees(self, model, columns: np.ndarray | None = None) -> None:
        """Take the trees of a fitted ``HistGradientBoostingClassifier`` (numeric features only),
        fitted on the input ``columns`` (None: all of them), so the trees read the whole input."""
        nodes, roots, classes = [], [], []
        offset = 0
        for iteration in model._predictors:  # noqa: SLF001 - the fitted trees have no public accessor
            for k, predictor in enumerate(iteration):
                n = predictor.nodes
                if n["is_categorical"].any():
                    raise ValueError("gbm fits numeric features only; a categorical split cannot be exported")
                nodes.append(n)
                roots.append(offset)
                classes.append(k)
                offset += len(n)
        every = np.concatenate(nodes)
        leaf = every["is_leaf"].astype(bool)
        index = np.arange(len(every))
        # Children as global indices; a leaf points to itself, goes "left" whatever the value.
        start = np.repeat(np.asarray(roots), [len(n) for n in nodes])
        as_tensor = lambda a, dtype: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)  # noqa: E731
        device = self.baseline.device
        state = {
            "feature": as_tensor(np.where(leaf, 0, every["feature_idx"] if columns is None
                                          else np.asarray(columns)[every["feature_idx"]]), torch.int64),
            "threshold": as_tensor(np.where(leaf, np.inf, every["num_threshold"]), torch.float64),
            "missing_left": as_tensor(leaf | every["missing_go_to_left"].astype(bool), torch.bool),
            "left": as_tensor(np.where(leaf, index, every["left"] + start), torch.int64),
            "right": as_tensor(np.where(leaf, index, every["right"] + start), torch.int64),
            "value": as_tensor(every["value"], torch.float64),
            "roots": as_tensor(np.asarray(roots), torch.int64),
            "tree_class": as_tensor(np.asarray(classes), torch.int64),
            "baseline": as_tensor(np.asarray(model._baseline_prediction, dtype=np.float64).reshape(-1), torch.float64),  # noqa: SLF001
            "depth": torch.tensor(int(every["depth"].max()), dtype=torch.int64),
        }
        for name, value in state.items():
            setattr(self, name, value.to(device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The saved trees' shapes replace the empty placeholders before the usual checks.
        for name in self._buffers:
            if prefix + name in state_dict:
                self._buffers[name] = torch.empty_like(state_dict[prefix + name], device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[rows, classes]`` raw scores (binary: one column) of ``[rows, features]`` inputs."""
        x = x.to(torch.float64)  # scikit-learn compares float64 values with float64 thresholds
        n_trees, n_scores = len(self.roots), len(self.baseline)
        out = self.baseline.expand(len(x), n_scores).clone()
        if n_trees == 0:
            return out
        chunk = max(1, WALK_ELEMENTS // n_trees)
        for start in range(0, len(x), chunk):
            rows = x[start: start + chunk]
            missing = bool(torch.isnan(rows).any())
            node = self.roots.expand(len(rows), n_trees)
            for _ in range(int(self.depth)):
                values = rows.gather(1, self.feature[node])
                left = values <= self.threshold[node]
                if missing:  # NaN compares false: it goes where the split sent missing values
                    left |= torch.isnan(values) & self.missing_left[node]
                node = torch.where(left, self.left[node], self.right[node])
            out[start: start + chunk].index_add_(1, self.tree_class, self.value[node])
        return out


def informative_columns(x: np.ndarray, y: np.ndarray, keep: int) -> np.ndarray:
    """The ``keep`` columns of ``x`` whose values differ most between the classes ``y`` (ANOVA F
    statistic of the rows given, scikit-learn's ``f_classif``; constant columns last, ties by
    position), in their order in ``x``.

    Not the most often non-zero, the rule before: beside lsa's 256 dense components that kept no
    one-hot column of the table at all (on the nace set: 44.5 % where the F rule reaches 90.2 %;
    docs/benchmarks.md "gbm features").
    """
    from sklearn.feature_selection import f_classif

    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constant columns: F is NaN, ranked last
        warnings.filterwarnings("ignore", message=r"(?s)Features .* are constant")  # a long list wraps lines
        score = np.nan_to_num(f_classif(x, y)[0], nan=-1.0, posinf=np.finfo(np.float64).max)
    return np.sort(np.argsort(-score, kind="stable")[:keep])


class GradientBoosting(MetaAlgorithm):
    """Gradient-boosted trees on fixed features (``HistGradientBoostingClassifier``).

    It trains no encoder: the search pairs it only with fixed feature maps (``fixed_features``),
    and it fits once, in its first ``train_step``, on every training row (later steps change
    nothing and return the same loss). Its hyperparameters are scikit-learn's, with its defaults
    (``l2_regularization`` 1e-4 stands for its 0, which a log scale cannot hold); ``early_stopping``
    holds out 10 % of the training rows and stops after 10 iterations without improvement.
    Of an input wider than ``MAX_COLUMNS`` it fits on the columns that best separate the classes
    of the training rows (``informative_columns``): each column costs time, and most n-grams say
    nothing of the label.

    A task of the training classes (standard protocol) gets the trees' scores as logits; a task
    with its own labels is answered through their class probabilities (``through_training_classes``).
    """

    name = "gbm"
    protocols = ("grouped", "standard")
    fixed_features = True
    fits_in_one_step = True
    search_space = {
        "learning_rate": FloatDistribution(0.01, 0.3, log=True),
        "max_iter": IntDistribution(50, 500, log=True),
        "max_leaf_nodes": IntDistribution(7, 127, log=True),
        "min_samples_leaf": IntDistribution(2, 64, log=True),
        "l2_regularization": FloatDistribution(1e-4, 10.0, log=True),
        "max_features": FloatDistribution(0.2, 1.0),
        "early_stopping": CategoricalDistribution([False, True]),
    }

    def __init__(
        self,
        *,
        learning_rate: float = 0.1,
        max_iter: int = 100,
        max_leaf_nodes: int = 31,
        min_samples_leaf: int = 20,
        l2_regularization: float = 1e-4,
        max_features: float = 1.0,
        early_stopping: bool = False,
    ):
        self.params = {
            "learning_rate": learning_rate, "max_iter": max_iter, "max_leaf_nodes": max_leaf_nodes,
            "min_samples_leaf": min_samples_leaf, "l2_regularization": l2_regularization,
            "max_features": max_features, "early_stopping": early_stopping,
        }
        self.loss: float | None = None

    def setup(self, backbone: Backbone, pool: TrainingPool, shape: tuple[int, int, int]) -> None:
        self.backbone = backbone
        self.trees = TreeEnsemble().to(pool.device)
        self.n_classes = pool.n_classes

    def modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "trees": self.trees}

    def train_step(self, pool: TrainingPool, rng: np.random.Generator) -> float:
        if self.loss is not None:
            return self.loss
        from sklearn.ensemble import HistGradientBoostingClassifier

        x, y = every_training_row(self.backbone, pool, rng)
        model = HistGradientBoostingClassifier(
            **self.params, validation_fraction=0.1, n_iter_no_change=10, random_state=int(rng.integers(2**31)),
        )
        # One OpenMP thread for small fits: there its threads only contend, and on a busy 2-core
        # machine, two had not finished in 120 s a 310-row fit that one did in 25 s (trials run in parallel instead);
        # large ones get the threads torch may use here (a worker's share of the cores).
        fitted, labels = x.detach().cpu().double().numpy(), y.cpu().numpy()
        columns = informative_columns(fitted, labels, MAX_COLUMNS) if fitted.shape[1] > MAX_COLUMNS else None
        fitted = fitted if columns is None else fitted[:, columns]
        threads = torch.get_num_threads() if fitted.size >= LARGE_FIT else 1
        with threadpool_limits(threads, user_api="openmp"):
            model.fit(fitted, labels)
        self.trees.set_trees(model, columns)
        with torch.no_grad():
            self.loss = float(F.cross_entropy(self._logits(x), y))
        return self.loss

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.trees(x)
        if raw.shape[1] == 1:  # binary: the score is class 1's log-odds
            raw = torch.cat([torch.zeros_like(raw), raw], dim=1)
        return raw.to(x.dtype)

    @torch.no_grad()
    def predict(self, task: Task) -> torch.Tensor:
        if not self.trees.fitted:
            raise RuntimeError("gbm predicts only after its first train_step has fitted the trees")
        return through_training_classes(task, lambda inputs: self._logits(embed(self.backbone, inputs)))
