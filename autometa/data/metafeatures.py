"""Task statistics ("meta-features") that describe a dataset, for comparing datasets.

The warm start finds the stored datasets nearest to a new one by a distance defined across
modalities (:func:`meta_feature_distance`, below), so every value is a finite
float, the same for the same data and ``seed``, and cheap (seconds on 10^4 rows; see
``benchmarks/metafeatures.py``). Features come in groups (:data:`FEATURE_GROUPS`); a feature
that means the same on every dataset has the same name everywhere.

==========  =================================  ==============================================
group       feature                            what it measures
==========  =================================  ==============================================
simple      rows, log_rows                     labelled rows (log10 for ``log_rows``)
            classes, rows_per_class            distinct labels; mean rows per class
            columns, modalities                feature columns; modalities present
            missing_rate                       fraction of empty feature cells
            groups                             distinct groups (only with a group column)
class       class_entropy                      label entropy / log(classes): 1 when balanced
            imbalance_ratio                    rows of the largest class / of the smallest
            class_min_rows                     rows of the smallest class (the most shots)
            majority_rate                      fraction of rows in the largest class
tabular     tabular_numeric,                   numeric and categorical columns
            tabular_categorical
            numeric_skewness[_min, _max]       mean, min, max over numeric columns of pandas'
                                               ``skew()`` (adjusted Fisher-Pearson G1)
            numeric_kurtosis[_min, _max]       the same for ``kurt()`` (excess kurtosis G2,
                                               0 for a normal distribution)
            numeric_mean_abs_correlation,      mean and max |Pearson r| over pairs of numeric
            numeric_max_abs_correlation        columns (the subsample, first 100 columns)
            categorical_cardinality[_min,      mean, min, max distinct non-empty values per
            _max]                              categorical column
text        text_columns                       text columns (a row's cells are joined)
            text_mean_words, text_mean_chars   mean words (split on whitespace) and
                                               characters per row
            text_vocabulary                    distinct lowercased words
            text_type_token_ratio              text_vocabulary / all words
image       image_height, image_width,         decoded image size
            image_channels
            image_mean_intensity,              mean and std of every pixel, in [0, 1]
            image_std_intensity
            image_contrast                     mean over images of each image's pixel std
            image_brightness_spread            std over images of each image's mean
vector      vector_columns, vector_dim         vector columns; their total dimension
            vector_norm_mean, vector_norm_std  mean and std of the rows' Euclidean norms
                                               (empty entries count as 0)
landmark    landmark_<modality>_1nn            accuracy of 1-nearest-neighbour,
            landmark_<modality>_naive_bayes    Gaussian naive Bayes,
            landmark_<modality>_linear         a linear probe (ridge classifier),
            landmark_<modality>_stump          a depth-1 decision tree, on that modality alone
image_      landmark_image_pca_ncm,            accuracy of nearest class mean and of
landmark    landmark_image_pca_1nn             1-nearest-neighbour on the first
                                               ``IMAGE_COMPONENTS`` principal components of
                                               the shrunk pixels (PCA fitted per training fold)
            landmark_image_pca_variance        fraction of the shrunk pixels' variance those
                                               components hold (mean over the training folds)
==========  =================================  ==============================================

Landmarkers and correlations use a seeded subsample of at most ``max_rows`` rows, stratified
by label. Each landmarker is scored by stratified k-fold (k = min(5, rows of the largest
class)) as the fraction of rows predicted right when held out. Inputs: tabular and vector
columns prepared as for the models (:class:`autometa.data.preprocessing.Preprocessor`: median-imputed
with missing indicators, standardised, one-hot), text as TF-IDF reduced to 100 LSA components,
images shrunk to at most 12x12 pixels in [0, 1]. That preprocessing never sees labels, so it
is fitted once on the whole subsample; the classifiers only on the training folds.

The image landmarkers say how far a few global shapes of the pixels (strokes, faces, textures)
go towards telling the classes apart: a digit set and a glyph set land close together, a
photograph set elsewhere, whatever their sizes. They share the other landmarkers' subsample and
folds, and every fitted step (PCA, class means, neighbours) sees only the training folds.

Undefined values are left out, never filled in: a group that does not apply (no text column),
a statistic no column defines (skewness needs three values and some spread, correlation two
columns that vary), and landmarkers when no class has two rows (nothing could be predicted).
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import RidgeClassifier
from sklearn.model_selection import StratifiedKFold
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize
from sklearn.tree import DecisionTreeClassifier
from sklearn.utils import resample

from autometa.data.loading import Dataset
from autometa.data.preprocessing import Preprocessor, _present, _vector_matrix
from autometa.errors import AutometaError
from autometa.inputs import MODALITIES

MAX_ROWS = 2000  # subsample for landmarkers and correlations
FOLDS = 5
LANDMARKERS = ("1nn", "naive_bayes", "linear", "stump")
MAX_CORRELATION_COLUMNS = 100
TEXT_COMPONENTS = 100
TEXT_TERMS = 2**14
IMAGE_SIDE = 12
IMAGE_COMPONENTS = 8  # principal components of the image landmarkers
_WORD = re.compile(r"\w", re.UNICODE)

FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "simple": ("rows", "log_rows", "classes", "rows_per_class", "columns", "modalities", "missing_rate", "groups"),
    "class": ("class_entropy", "imbalance_ratio", "class_min_rows", "majority_rate"),
    "tabular": (
        "tabular_numeric", "tabular_categorical",
        "numeric_skewness", "numeric_skewness_min", "numeric_skewness_max",
        "numeric_kurtosis", "numeric_kurtosis_min", "numeric_kurtosis_max",
        "numeric_mean_abs_correlation", "numeric_max_abs_correlation",
        "categorical_cardinality", "categorical_cardinality_min", "categorical_cardinality_max",
    ),
    "text": ("text_columns", "text_mean_words", "text_mean_chars", "text_vocabulary", "text_type_token_ratio"),
    "image": (
        "image_height", "image_width", "image_channels", "image_mean_intensity", "image_std_intensity",
        "image_contrast", "image_brightness_spread",
    ),
    "vector": ("vector_columns", "vector_dim", "vector_norm_mean", "vector_norm_std"),
    "landmark": tuple(f"landmark_{m}_{name}" for m in MODALITIES for name in LANDMARKERS),
    "image_landmark": ("landmark_image_pca_ncm", "landmark_image_pca_1nn", "landmark_image_pca_variance"),
}
"""Every feature :func:`describe` can return, by group (a dataset has a subset of them)."""


def describe(
    dataset: Dataset, *, seed: int = 0, max_rows: int = MAX_ROWS, groups: tuple[str, ...] | list[str] | None = None
) -> dict[str, float]:
    """The meta-features of ``dataset`` (all groups, or only ``groups``), as finite floats.

    ``seed`` fixes the subsample and folds of the landmarkers and correlations; the other
    features do not depend on it.
    """
    chosen = list(FEATURE_GROUPS) if groups is None else list(groups)
    unknown = [g for g in chosen if g not in FEATURE_GROUPS]
    if unknown:
        raise AutometaError(f"unknown meta-feature group(s) {', '.join(unknown)}; choose from {', '.join(FEATURE_GROUPS)}")
    rows = _subsample(dataset.labels, max_rows, seed)
    features: dict[str, float] = {}
    for group in chosen:
        features.update(_GROUP_FUNCTIONS[group](dataset, rows, seed))
    # The groups leave undefined values out themselves; this keeps the promise if one slips.
    return {name: float(value) for name, value in features.items() if math.isfinite(value)}


def _subsample(labels: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Sorted row indices: all rows, or ``max_rows`` of them in the classes' proportions."""
    if len(labels) <= max_rows:
        return np.arange(len(labels))
    rows = resample(np.arange(len(labels)), replace=False, n_samples=max_rows, stratify=labels, random_state=seed)
    return np.sort(rows)


# --- simple, class ------------------------------------------------------------------------


def _simple(dataset: Dataset, rows: np.ndarray, seed: int) -> dict[str, float]:
    k = len(set(dataset.labels.tolist()))
    features = {
        "rows": float(len(dataset)),
        "log_rows": math.log10(len(dataset)),
        "classes": float(k),
        "rows_per_class": len(dataset) / k,
        "columns": float(len(dataset.columns)),
        "modalities": float(len(dataset.modalities)),
        "missing_rate": float(dataset.frame.isna().to_numpy().mean()) if dataset.frame.size else 0.0,
    }
    if dataset.groups is not None:
        features["groups"] = float(len(set(dataset.groups.tolist())))
    return features


def _class(dataset: Dataset, rows: np.ndarray, seed: int) -> dict[str, float]:
    counts = np.asarray(list(Counter(dataset.labels.tolist()).values()), dtype=float)
    p = counts / counts.sum()
    k = len(counts)
    return {
        # Normalised by its maximum log(k), so datasets with different class counts compare.
        "class_entropy": float(-(p * np.log(p)).sum() / math.log(k)) if k > 1 else 0.0,
        "imbalance_ratio": float(counts.max() / counts.min()),
        "class_min_rows": float(counts.min()),
        "majority_rate": float(p.max()),
    }


# --- per modality -------------------------------------------------------------------------


def _tabular(dataset: Dataset, rows: np.ndarray, seed: int) -> dict[str, float]:
    tabular = dataset.columns_of("tabular")
    if not tabular:
        return {}
    numeric = [c.name for c in tabular if c.kind == "numeric"]
    categorical = [c.name for c in tabular if c.kind != "numeric"]
    features = {"tabular_numeric": float(len(numeric)), "tabular_categorical": float(len(categorical))}
    if numeric:
        values = dataset.frame[numeric].astype(float)
        features.update(_summary("numeric_skewness", values.skew()))
        features.update(_summary("numeric_kurtosis", values.kurt()))
        correlation = values.iloc[rows, :MAX_CORRELATION_COLUMNS].corr().to_numpy()
        pairs = np.abs(correlation[np.triu_indices_from(correlation, k=1)])
        pairs = pairs[np.isfinite(pairs)]
        if len(pairs):
            features["numeric_mean_abs_correlation"] = float(pairs.mean())
            features["numeric_max_abs_correlation"] = float(pairs.max())
    if categorical:
        cardinality = pd.Series([dataset.frame[c].dropna().astype(str).nunique() for c in categorical], dtype=float)
        features.update(_summary("categorical_cardinality", cardinality))
    return features


def _summary(name: str, per_column: pd.Series) -> dict[str, float]:
    """Mean (under ``name``), min and max of the finite per-column values; none if there are none."""
    values = per_column.to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return {}
    return {name: float(values.mean()), f"{name}_min": float(values.min()), f"{name}_max": float(values.max())}


def _text(dataset: Dataset, rows: np.ndarray, seed: int) -> dict[str, float]:
    text = [c.name for c in dataset.columns_of("text")]
    if not text:
        return {}
    cells = dataset.frame[text].fillna("").astype(str)
    words = cells[text[0]].str.cat([cells[c] for c in text[1:]], sep=" ").str.split()
    total = int(words.str.len().sum())
    vocabulary = int(words.explode().dropna().str.lower().nunique())
    features = {
        "text_columns": float(len(text)),
        "text_mean_words": float(words.str.len().mean()),
        "text_mean_chars": float(sum(cells[c].str.len() for c in text).mean()),
        "text_vocabulary": float(vocabulary),
    }
    if total:
        features["text_type_token_ratio"] = vocabulary / total
    return features


def _image(dataset: Dataset, rows: np.ndarray, seed: int) -> dict[str, float]:
    images = dataset.columns_of("image")
    if not images:
        return {}
    pixels = dataset.images[images[0].name]  # uint8 [N, H, W, C]
    # Per-image first and second moments, a chunk at a time: a float copy of 10^4 large
    # images at once would not fit in memory.
    means, squares = [], []
    for start in range(0, len(pixels), 64):
        chunk = pixels[start:start + 64].astype(np.float64) / 255.0
        means.append(chunk.mean(axis=(1, 2, 3)))
        squares.append((chunk**2).mean(axis=(1, 2, 3)))
    mean, square = np.concatenate(means), np.concatenate(squares)
    overall = mean.mean()
    return {
        "image_height": float(pixels.shape[1]),
        "image_width": float(pixels.shape[2]),
        "image_channels": float(pixels.shape[3]),
        "image_mean_intensity": float(overall),
        "image_std_intensity": math.sqrt(max(square.mean() - overall**2, 0.0)),
        "image_contrast": float(np.sqrt(np.maximum(square - mean**2, 0.0)).mean()),
        "image_brightness_spread": float(mean.std()),
    }


def _vector(dataset: Dataset, rows: np.ndarray, seed: int) -> dict[str, float]:
    vectors = [c.name for c in dataset.columns_of("vector")]
    if not vectors:
        return {}
    matrix = _vector_matrix(dataset.frame, vectors).astype(np.float64)
    features = {"vector_columns": float(len(vectors)), "vector_dim": float(matrix.shape[1])}
    present = ~np.isnan(matrix).all(axis=1)
    if present.any():
        norms = np.linalg.norm(np.nan_to_num(matrix[present]), axis=1)
        features["vector_norm_mean"] = float(norms.mean())
        features["vector_norm_std"] = float(norms.std())
    return features


# --- landmarkers --------------------------------------------------------------------------


def _landmark_models(seed: int) -> dict[str, object]:
    return {
        "1nn": KNeighborsClassifier(n_neighbors=1),
        "naive_bayes": GaussianNB(),
        # Ridge rather than logistic regression: one linear solve whatever the number of
        # classes, where lbfgs over hundreds of few-shot classes takes many seconds.
        "linear": RidgeClassifier(alpha=1.0),
        "stump": DecisionTreeClassifier(max_depth=1, random_state=seed),
    }


def _folds(y: np.ndarray, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The landmarkers' stratified folds over the subsample's labels (none when no class has two rows)."""
    folds = min(FOLDS, max(Counter(y.tolist()).values()))
    if folds < 2:
        return []  # every class has one row: a held-out row's class is never seen in training
    with warnings.catch_warnings():
        # Classes with fewer rows than folds are fine: those rows simply count as missed.
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def _landmark(dataset: Dataset, rows: np.ndarray, seed: int) -> dict[str, float]:
    y = dataset.labels[rows]
    splits = _folds(y, seed)
    if not splits:
        return {}
    features = {}
    for modality, x in _landmark_inputs(dataset, rows, seed).items():
        correct = Counter()
        for train, test in splits:
            if len(set(y[train].tolist())) < 2:
                for name in LANDMARKERS:  # one class to learn: every model predicts it
                    correct[name] += int((y[test] == y[train][0]).sum())
                continue
            # Inputs constant in a fold give Gaussian naive Bayes zero variances (NumPy warns on
            # every search); its predictions then count as they come.
            with np.errstate(divide="ignore", invalid="ignore"):
                for name, model in _landmark_models(seed).items():
                    correct[name] += int((model.fit(x[train], y[train]).predict(x[test]) == y[test]).sum())
        features.update({f"landmark_{modality}_{name}": correct[name] / len(y) for name in LANDMARKERS})
    return features


def _image_landmark(dataset: Dataset, rows: np.ndarray, seed: int) -> dict[str, float]:
    images = dataset.columns_of("image")
    y = dataset.labels[rows]
    splits = _folds(y, seed) if images else []
    if not splits:
        return {}
    x = _image_matrix(dataset.images[images[0].name][rows])
    correct, explained = Counter(), []
    for train, test in splits:
        # Centred on the training fold; its principal axes from an SVD of that fold alone.
        mean = x[train].mean(axis=0)
        _, singular, axes = np.linalg.svd(x[train] - mean, full_matrices=False)
        k = min(IMAGE_COMPONENTS, len(singular))
        total = float((singular**2).sum())
        explained.append(float((singular[:k] ** 2).sum()) / total if total > 0 else 1.0)
        fitted, held = (x[train] - mean) @ axes[:k].T, (x[test] - mean) @ axes[:k].T
        classes = np.unique(y[train])
        centres = np.stack([fitted[y[train] == c].mean(axis=0) for c in classes])
        nearest_centre = classes[_nearest(held, centres)]
        correct["ncm"] += int((nearest_centre == y[test]).sum())
        correct["1nn"] += int((y[train][_nearest(held, fitted)] == y[test]).sum())
    return {
        "landmark_image_pca_ncm": correct["ncm"] / len(y),
        "landmark_image_pca_1nn": correct["1nn"] / len(y),
        "landmark_image_pca_variance": float(np.mean(explained)),
    }


def _nearest(points: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Per point, the index of the nearest reference by Euclidean distance (ties: the first)."""
    squared = (points**2).sum(axis=1)[:, None] - 2 * points @ references.T + (references**2).sum(axis=1)[None, :]
    return squared.argmin(axis=1)


def _landmark_inputs(dataset: Dataset, rows: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """A dense float matrix per modality for the subsample's rows (a modality with no value there is left out)."""
    frame = dataset.frame.iloc[rows].reset_index(drop=True)
    inputs: dict[str, np.ndarray] = {}
    # Tabular and vector columns as the models see them; a vector column empty in the
    # subsample has nothing to standardise and is left out.
    columns = dataset.columns_of("tabular") + [
        c for c in dataset.columns_of("vector") if frame[c.name].map(_present).any()
    ]
    if columns:
        sample = Dataset(
            name=dataset.name, path=dataset.path, frame=frame[[c.name for c in columns]],
            labels=dataset.labels[rows], columns=columns, label_column=dataset.label_column,
        )
        prepared = Preprocessor.fit(sample, np.arange(len(rows))).transform(sample)
        for modality in ("tabular", "vector"):
            if modality in prepared.inputs:
                inputs[modality] = prepared.inputs[modality].numpy().astype(np.float64)
    text = [c.name for c in dataset.columns_of("text")]
    if text:
        documents = [" ".join(v for v in values if isinstance(v, str)) for values in zip(*(frame[c].tolist() for c in text))]
        if any(_WORD.search(d) for d in documents):
            inputs["text"] = _text_matrix(documents, seed)
    images = dataset.columns_of("image")
    if images:
        inputs["image"] = _image_matrix(dataset.images[images[0].name][rows])
    return inputs


def _text_matrix(documents: list[str], seed: int) -> np.ndarray:
    # Single-character words count too (the default pattern drops them), so no row with a
    # word ends up with an empty vocabulary.
    tfidf = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b", sublinear_tf=True, max_features=TEXT_TERMS)
    matrix = tfidf.fit_transform(documents)
    if min(matrix.shape) <= TEXT_COMPONENTS:
        return matrix.toarray()  # small enough to use as it is
    reduced = TruncatedSVD(TEXT_COMPONENTS, random_state=seed).fit_transform(matrix)
    return normalize(reduced)


def _image_matrix(pixels: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] shrunk (box filter) to at most IMAGE_SIDE pixels a side, flattened into [0, 1]."""
    size = (min(IMAGE_SIDE, pixels.shape[2]), min(IMAGE_SIDE, pixels.shape[1]))
    grey = pixels.shape[3] == 1
    small = [np.asarray(Image.fromarray(p[..., 0] if grey else p).resize(size, Image.BOX)) for p in pixels]
    return np.stack(small).reshape(len(pixels), -1).astype(np.float64) / 255.0


_GROUP_FUNCTIONS: dict[str, Callable[[Dataset, np.ndarray, int], dict[str, float]]] = {
    "simple": _simple,
    "class": _class,
    "tabular": _tabular,
    "text": _text,
    "image": _image,
    "vector": _vector,
    "landmark": _landmark,
    "image_landmark": _image_landmark,
}


# --- distance ----------------------------------------------------------------------------

# Features in [0, 1] (rates, accuracies, entropies, correlations, intensities) and log_rows
# compare as they are; every other one (counts, ratios, moments) on a signed log scale, so
# 100 vs 200 rows is as far as 1,000 vs 2,000.
_LINEAR = frozenset({
    "log_rows", "missing_rate", "class_entropy", "majority_rate", "numeric_mean_abs_correlation",
    "numeric_max_abs_correlation", "text_type_token_ratio", "image_mean_intensity", "image_std_intensity",
    "image_contrast", "image_brightness_spread",
})
# The scale of a feature the knowledge base does not hold (in transformed units): a tenth for
# rates and accuracies, a factor e for counts. A knowledge-base scale is never below a quarter
# of it, so a feature constant over the base does not blow a small difference up.
DEFAULT_SCALE = {"linear": 0.1, "log": 1.0}
MAX_DIFFERENCE = 3.0  # a scaled difference counts at most this much ...
MISSING_PENALTY = MAX_DIFFERENCE  # ... and a modality or feature one side lacks counts that much
# The distance's groups, weighted equally: size, classes, per-modality statistics, landmarkers.
SIZE = ("rows", "log_rows", "columns", "modalities", "missing_rate", "groups")
CLASSES = ("classes", "rows_per_class", *FEATURE_GROUPS["class"])
_MODALITY_MARKER = {"tabular": "tabular_numeric", "text": "text_columns", "image": "image_height", "vector": "vector_columns"}


def landmarkers_of(modality: str) -> tuple[str, ...]:
    """The landmark features of one modality (images have their own group besides the common four)."""
    common = tuple(f"landmark_{modality}_{name}" for name in LANDMARKERS)
    return common + FEATURE_GROUPS["image_landmark"] if modality == "image" else common


def _is_linear(name: str) -> bool:
    return name in _LINEAR or name.startswith("landmark_")


def transformed(name: str, value: float) -> float:
    """A feature on the scale the distance compares it on (see :data:`_LINEAR`)."""
    return value if _is_linear(name) else math.copysign(math.log1p(abs(value)), value)


def default_scale(name: str) -> float:
    return DEFAULT_SCALE["linear" if _is_linear(name) else "log"]


def feature_scales(described: list[Mapping[str, Any]]) -> dict[str, float]:
    """Per feature, the standard deviation of its transformed value over ``described`` (the whole
    knowledge base), at least a quarter of its default; features fewer than two items have are left out."""
    pooled: dict[str, list[float]] = defaultdict(list)
    for features in described:
        for key, value in _numeric(features).items():
            pooled[key].append(transformed(key, value))
    return {
        key: round(max(float(np.std(values)), default_scale(key) / 4), 6)
        for key, values in sorted(pooled.items()) if len(values) >= 2
    }


def modalities_of(features: Mapping[str, Any]) -> set[str]:
    """The modalities a set of meta-features describes (each modality group has a marker feature)."""
    return {m for m, marker in _MODALITY_MARKER.items() if marker in features}


@dataclass
class Neighbour:
    study: str  # the key the item was given: a study, or a dataset's key in warm start
    distance: float
    shared: int


def meta_feature_distance(a: Mapping[str, Any], b: Mapping[str, Any], scales: Mapping[str, float] | None = None) -> float:
    """How far apart two datasets' meta-features are, whatever their modalities.

    Four groups count equally (root mean square over those either side has): size, classes,
    the per-modality statistics and the landmarkers (an image set's own among them). Each
    feature's difference is taken on its transformed scale, divided by its fixed scale (``scales``, from the knowledge base; a default
    for a feature it lacks) and capped at :data:`MAX_DIFFERENCE`. Within a group the differences
    are averaged as a root mean square; in the two per-modality groups each modality of either
    side counts equally, and a modality (or a feature) one side lacks counts the full penalty.
    """
    a, b = _numeric(a), _numeric(b)
    scales = scales or {}

    def spread(keys) -> float | None:
        terms = []
        for key in keys:
            if key in a and key in b:
                scale = scales.get(key) or default_scale(key)
                terms.append(min(abs(transformed(key, a[key]) - transformed(key, b[key])) / scale, MAX_DIFFERENCE))
            elif key in a or key in b:
                terms.append(MISSING_PENALTY)
        return math.sqrt(sum(t * t for t in terms) / len(terms)) if terms else None

    def per_modality(keys_of) -> float | None:
        terms = []
        for modality in sorted(modalities_of(a) | modalities_of(b)):
            keys = keys_of(modality)
            in_a, in_b = any(k in a for k in keys), any(k in b for k in keys)
            if in_a and in_b:
                terms.append(spread(keys))
            elif in_a or in_b:
                terms.append(MISSING_PENALTY)
        return math.sqrt(sum(t * t for t in terms) / len(terms)) if terms else None

    groups = [
        spread(SIZE),
        spread(CLASSES),
        per_modality(lambda m: FEATURE_GROUPS[m]),
        per_modality(landmarkers_of),
    ]
    groups = [g for g in groups if g is not None]
    return math.sqrt(sum(g * g for g in groups) / len(groups)) if groups else math.inf


def rank_by_meta_features(
    current: Mapping[str, Any], others: Mapping[str, Mapping[str, Any]], scales: Mapping[str, float] | None = None
) -> list[Neighbour]:
    """Others ordered by :func:`meta_feature_distance` to ``current`` (ties by key).

    ``scales`` come from the knowledge base (:func:`feature_scales`, stored with the prior), so a
    distance does not change with what else is stored. Non-numeric and non-finite values are
    ignored; items sharing no feature are left out.
    """
    mine = _numeric(current)
    ranked = []
    for name, features in others.items():
        theirs = _numeric(features)
        shared = len(set(mine) & set(theirs))
        if shared:
            ranked.append(Neighbour(name, meta_feature_distance(mine, theirs, scales), shared))
    return sorted(ranked, key=lambda n: (n.distance, n.study))


def _numeric(features: Mapping[str, Any] | None) -> dict[str, float]:
    out = {}
    for key, value in (features or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[str(key)] = float(value)
    return out
