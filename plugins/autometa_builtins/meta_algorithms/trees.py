"""Tree ensembles on fixed features: gradient-boosted trees (``gbm``, scikit-learn's
HistGradientBoostingClassifier) and randomised forests (``forest``, its ExtraTreesClassifier or
RandomForestClassifier).

On tables whose numeric columns carry most of the signal, a tree ensemble beats an MLP encoder
(issue 15: AutoGluon's best single model on a text + table set was LightGBM). Both read the
backbone's output without training it (``fixed_features``): the preprocessed table (``table``),
a text's TF-IDF + SVD (``lsa``) or pretrained embeddings (``minilm``), flattened pixels
(``pixels``), side by side (``concat``). A forest is the ensemble's other kind of tree model:
its errors differ from boosting's, as AutoGluon's and auto-sklearn's model lists assume.

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

# Rows × features from which a fit uses several threads (see FittedTrees.train_step).
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
    """Fitted trees as flat tensors, and their sum: ``baseline + Σ leaf values`` over the trees.

    Nodes of every tree share one array: ``feature``/``threshold`` of each split (a row goes left
    when its value is at most the threshold, or, when missing, where ``missing_left`` says),
    ``left``/``right`` children (global indices) and ``value``. A leaf is its own child on both
    sides with an infinite threshold, so walking every tree ``depth`` steps needs no test for
    leaves. ``roots`` gives each tree's first node. Two kinds of leaf value: boosting's regression
    trees (``set_trees``) have one score per leaf, learning rate included, added to the class
    ``tree_class`` names (one tree per class and iteration; binary: per iteration, class 1); a
    forest's classification trees (``set_forest``) have a row of class fractions per leaf, divided
    by the number of trees, so the sum is the forest's mean probability. Shapes depend on the fit,
    so loading a state dict takes the saved shapes.
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
        nodes, classes = [], []
        for iteration in model._predictors:  # noqa: SLF001 - the fitted trees have no public accessor
            for k, predictor in enumerate(iteration):
                n = predictor.nodes
                if n["is_categorical"].any():
                    raise ValueError("gbm fits numeric features only; a categorical split cannot be exported")
                nodes.append(n)
                classes.append(k)
        every = np.concatenate(nodes)
        leaf = every["is_leaf"].astype(bool)
        self._store(
            sizes=[len(n) for n in nodes], leaf=leaf, feature=every["feature_idx"], threshold=every["num_threshold"],
            missing_left=every["missing_go_to_left"].astype(bool), left=every["left"], right=every["right"],
            value=every["value"], tree_class=np.asarray(classes), depth=int(every["depth"].max()), columns=columns,
            baseline=np.asarray(model._baseline_prediction, dtype=np.float64).reshape(-1),  # noqa: SLF001
        )

    def set_forest(self, model, n_classes: int, columns: np.ndarray | None = None) -> None:
        """Take the trees of a fitted ``RandomForestClassifier`` or ``ExtraTreesClassifier`` whose
        labels are among ``0 … n_classes - 1`` (``model.classes_``; a class it never saw gets 0),
        fitted on the input ``columns`` (None: all of them). Its scores are ``predict_proba``'s
        for inputs rounded to float32, as scikit-learn's trees read them."""
        trees = [estimator.tree_ for estimator in model.estimators_]
        every = lambda attribute: np.concatenate([getattr(t, attribute) for t in trees])  # noqa: E731
        fractions = every("value")[:, 0, :]
        fractions = fractions / fractions.sum(axis=1, keepdims=True)  # counts before scikit-learn 1.4
        value = np.zeros((len(fractions), n_classes))
        value[:, np.asarray(model.classes_, dtype=np.int64)] = fractions / len(trees)
        left = every("children_left")
        self._store(
            sizes=[t.node_count for t in trees], leaf=left == -1, feature=every("feature"), threshold=every("threshold"),
            missing_left=every("missing_go_to_left").astype(bool), left=left, right=every("children_right"),
            value=value, tree_class=np.zeros(len(trees), dtype=np.int64), depth=max(t.max_depth for t in trees),
            columns=columns, baseline=np.zeros(n_classes),
        )

    def _store(self, *, sizes: list[int], leaf: np.ndarray, feature: np.ndarray, threshold: np.ndarray,
               missing_left: np.ndarray, left: np.ndarray, right: np.ndarray, value: np.ndarray,
               tree_class: np.ndarray, depth: int, columns: np.ndarray | None, baseline: np.ndarray) -> None:
        """The trees' nodes, concatenated (each tree's ``sizes``; children as indices in their own
        tree), as this module's tensors."""
        roots = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        index = np.arange(len(leaf))
        start = np.repeat(roots, sizes)  # each node's tree's first node
        feature = feature if columns is None else np.asarray(columns)[np.where(leaf, 0, feature)]
        as_tensor = lambda a, dtype: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)  # noqa: E731
        device = self.baseline.device
        # A leaf reads column 0, never passes its infinite threshold, and points to itself.
        state = {
            "feature": as_tensor(np.where(leaf, 0, feature), torch.int64),
            "threshold": as_tensor(np.where(leaf, np.inf, threshold), torch.float64),
            "missing_left": as_tensor(leaf | missing_left, torch.bool),
            "left": as_tensor(np.where(leaf, index, left + start), torch.int64),
            "right": as_tensor(np.where(leaf, index, right + start), torch.int64),
            "value": as_tensor(value, torch.float64),
            "roots": as_tensor(roots, torch.int64),
            "tree_class": as_tensor(tree_class, torch.int64),
            "baseline": as_tensor(baseline, torch.float64),
            "depth": torch.tensor(depth, dtype=torch.int64),
        }
        for name, tensor in state.items():
            setattr(self, name, tensor.to(device))

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
        per_leaf = 1 if self.value.dim() == 1 else n_scores  # a forest's leaves hold a row of fractions
        chunk = max(1, WALK_ELEMENTS // (n_trees * per_leaf))
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
            if per_leaf == 1:
                out[start: start + chunk].index_add_(1, self.tree_class, self.value[node])
            else:
                out[start: start + chunk] += self.value[node].sum(dim=1)
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


class FittedTrees(MetaAlgorithm):
    """What ``gbm`` and ``forest`` share: a tree ensemble fitted once, in the first ``train_step``,
    on every training row's fixed features (later steps change nothing and return the same loss),
    and kept as a ``TreeEnsemble``.

    It trains no encoder: the search pairs it only with fixed feature maps (``fixed_features``).
    Of an input wider than ``MAX_COLUMNS`` it fits on the columns that best separate the classes
    of the training rows (``informative_columns``): each column costs time, and most n-grams say
    nothing of the label. A task of the training classes (standard protocol) gets the ensemble's
    logits; a task with its own labels is answered through their class probabilities
    (``through_training_classes``).
    """

    protocols = ("grouped", "standard")
    fixed_features = True
    fits_in_one_step = True
    loss: float | None = None  # the training loss, once fitted

    def setup(self, backbone: Backbone, pool: TrainingPool, shape: tuple[int, int, int]) -> None:
        self.backbone = backbone
        self.trees = TreeEnsemble().to(pool.device)
        self.n_classes = pool.n_classes

    def modules(self) -> dict[str, nn.Module]:
        return {"backbone": self.backbone, "trees": self.trees}

    def train_step(self, pool: TrainingPool, rng: np.random.Generator) -> float:
        if self.loss is not None:
            return self.loss
        x, y = every_training_row(self.backbone, pool, rng)
        seed = int(rng.integers(2**31))
        fitted, labels = x.detach().cpu().double().numpy(), y.cpu().numpy()
        columns = informative_columns(fitted, labels, MAX_COLUMNS) if fitted.shape[1] > MAX_COLUMNS else None
        fitted = fitted if columns is None else fitted[:, columns]
        # One thread for small fits: there threads only contend, and on a busy 2-core machine two
        # had not finished in 120 s a 310-row gbm fit that one did in 25 s (trials run in parallel
        # instead); large ones get the threads torch may use here (a worker's share of the cores).
        threads = torch.get_num_threads() if fitted.size >= LARGE_FIT else 1
        self.fit_trees(fitted, labels, columns, threads=threads, seed=seed)
        with torch.no_grad():
            self.loss = float(F.cross_entropy(self._logits(x), y))
        return self.loss

    def fit_trees(self, x: np.ndarray, y: np.ndarray, columns: np.ndarray | None, *, threads: int, seed: int) -> None:
        """Fit on ``x`` (the input's ``columns``; None: all) and labels ``y`` and set ``self.trees``."""
        raise NotImplementedError

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, task: Task) -> torch.Tensor:
        if not self.trees.fitted:
            raise RuntimeError(f"{self.name} predicts only after its first train_step has fitted the trees")
        return through_training_classes(task, lambda inputs: self._logits(embed(self.backbone, inputs)))


class GradientBoosting(FittedTrees):
    """Gradient-boosted trees on fixed features (``HistGradientBoostingClassifier``).

    Its hyperparameters are scikit-learn's, with its defaults (``l2_regularization`` 1e-4 stands
    for its 0, which a log scale cannot hold); ``early_stopping`` holds out 10 % of the training
    rows and stops after 10 iterations without improvement. The trees' raw scores are the logits.
    """

    name = "gbm"
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

    def fit_trees(self, x: np.ndarray, y: np.ndarray, columns: np.ndarray | None, *, threads: int, seed: int) -> None:
        from sklearn.ensemble import HistGradientBoostingClassifier

        model = HistGradientBoostingClassifier(**self.params, validation_fraction=0.1, n_iter_no_change=10, random_state=seed)
        with threadpool_limits(threads, user_api="openmp"):
            model.fit(x, y)
        self.trees.set_trees(model, columns)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.trees(x)
        if raw.shape[1] == 1:  # binary: the score is class 1's log-odds
            raw = torch.cat([torch.zeros_like(raw), raw], dim=1)
        return raw.to(x.dtype)


class Forest(FittedTrees):
    """A randomised forest on fixed features: ``ExtraTreesClassifier`` (``extra``: split
    thresholds drawn at random) or ``RandomForestClassifier`` (best thresholds, bootstrapped rows).

    Its default trial, extremely randomised trees with half the columns tried at each split and
    leaves of at least 2 rows, differs from scikit-learn's default (``sqrt`` of the columns), which
    on text + table inputs draws mostly text components and misses the few informative table
    columns (docs/components.md "Forests"). Its logits are the log of the trees' mean class
    fractions (``predict_proba``); a class no tree gives any weight gets the smallest float.
    """

    name = "forest"
    default_rank = 1  # its default trial after gbm's and linear's, the stronger models alone
    search_space = {
        "extra": CategoricalDistribution([True, False]),
        "n_estimators": IntDistribution(50, 300, log=True),
        "max_features": FloatDistribution(0.1, 1.0),
        "min_samples_leaf": IntDistribution(1, 32, log=True),
    }

    def __init__(self, *, extra: bool = True, n_estimators: int = 100, max_features: float = 0.5, min_samples_leaf: int = 2):
        self.extra = bool(extra)
        self.params = {"n_estimators": n_estimators, "max_features": max_features, "min_samples_leaf": min_samples_leaf}

    def fit_trees(self, x: np.ndarray, y: np.ndarray, columns: np.ndarray | None, *, threads: int, seed: int) -> None:
        from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier

        kind = ExtraTreesClassifier if self.extra else RandomForestClassifier
        model = kind(**self.params, n_jobs=threads, random_state=seed).fit(x, y)
        self.trees.set_forest(model, self.n_classes, columns)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        # scikit-learn's trees read float32 inputs (their thresholds are midpoints of float32 values).
        probabilities = self.trees(x.to(torch.float32))
        return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log().to(x.dtype)
