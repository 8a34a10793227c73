"""Meta-features (autometa.data.metafeatures): values against hand computations, landmarkers on
planted data, determinism and edge cases that must not produce NaN."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from autometa.data import metafeatures
from autometa.data.loading import Column, Dataset, load_dataset
from autometa.data.metafeatures import FEATURE_GROUPS, describe
from autometa.errors import AutometaError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastfood.csv"

# Landmarker accuracies on random labels: with n held-out rows the standard deviation around
# chance (0.5) is sqrt(0.25 / n), 0.035 for n = 200, so 0.15 is more than four of them.
CHANCE_TOLERANCE = 0.15


def make_dataset(frame: pd.DataFrame, labels, kinds: dict[str, tuple[str, str]], *, images=None, groups=None) -> Dataset:
    """A Dataset built directly, as load_dataset would type it (``kinds``: column -> (modality, kind))."""
    columns = [Column(name, *kinds[name]) for name in frame.columns]
    return Dataset(
        name="t", path=Path("t.csv"), frame=frame, labels=np.asarray(labels, dtype=str).astype(object),
        columns=columns, label_column="y", groups=None if groups is None else np.asarray(groups, dtype=object),
        images=images or {},
    )


def assert_all_finite(features: dict[str, float]) -> None:
    assert features, "no features"
    assert all(isinstance(v, float) and math.isfinite(v) for v in features.values()), features


def moments_skew_kurt(values: list[float]) -> tuple[float, float]:
    """Sample skewness G1 and excess kurtosis G2 (the bias-adjusted estimators pandas documents)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    d = x - x.mean()
    m2, m3, m4 = (d**2).mean(), (d**3).mean(), (d**4).mean()
    g1, g2 = m3 / m2**1.5, m4 / m2**2 - 3
    skew = g1 * math.sqrt(n * (n - 1)) / (n - 2)
    kurt = ((n + 1) * g2 + 6) * (n - 1) / ((n - 2) * (n - 3))
    return skew, kurt


def pearson(a: list[float], b: list[float]) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    da, db = a - a.mean(), b - b.mean()
    return float((da * db).sum() / math.sqrt((da**2).sum() * (db**2).sum()))


# ---------------------------------------------------------------------------- hand computations


def test_simple_and_class_features_by_hand():
    frame = pd.DataFrame({"a": [1.0, np.nan, 3.0, 4.0], "b": [0.5, 0.5, 1.5, 2.0]})
    dataset = make_dataset(frame, ["p", "p", "p", "q"], {"a": ("tabular", "numeric"), "b": ("tabular", "numeric")},
                           groups=["g1", "g2", "g1", "g3"])
    features = describe(dataset, groups=["simple", "class"])
    # Entropy of (3/4, 1/4) in nats, divided by log 2: 0.811278...
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2)
    assert features == pytest.approx({
        "rows": 4.0, "log_rows": math.log10(4), "classes": 2.0, "rows_per_class": 2.0, "columns": 2.0,
        "modalities": 1.0, "missing_rate": 1 / 8, "groups": 3.0,
        "class_entropy": entropy, "imbalance_ratio": 3.0, "class_min_rows": 1.0, "majority_rate": 0.75,
    })
    assert entropy == pytest.approx(0.8112781244591328)


def test_numeric_statistics_by_hand():
    x = [1.0, 2.0, 3.0, 10.0, 4.0, 0.0]
    z = [2.0, 1.0, 7.0, 3.0, np.nan, 5.0]  # the empty cell is ignored, as pandas does
    constant = [5.0] * 6  # no spread: skewness, kurtosis and correlation undefined, left out
    frame = pd.DataFrame({"x": x, "z": z, "c": constant})
    kinds = {name: ("tabular", "numeric") for name in frame.columns}
    features = describe(make_dataset(frame, list("pqpqpq"), kinds), groups=["tabular"])

    skew_x, kurt_x = moments_skew_kurt(x)
    skew_z, kurt_z = moments_skew_kurt([2.0, 1.0, 7.0, 3.0, 5.0])
    r_xz = pearson([1.0, 2.0, 3.0, 10.0, 0.0], [2.0, 1.0, 7.0, 3.0, 5.0])  # rows where both have a value
    assert features == pytest.approx({
        "tabular_numeric": 3.0, "tabular_categorical": 0.0,
        "numeric_skewness": (skew_x + skew_z) / 2, "numeric_skewness_min": min(skew_x, skew_z),
        "numeric_skewness_max": max(skew_x, skew_z),
        "numeric_kurtosis": (kurt_x + kurt_z) / 2, "numeric_kurtosis_min": min(kurt_x, kurt_z),
        "numeric_kurtosis_max": max(kurt_x, kurt_z),
        "numeric_mean_abs_correlation": abs(r_xz), "numeric_max_abs_correlation": abs(r_xz),
    })
    # The textbook formulas agree with pandas' definitions (documented in the module).
    assert skew_x == pytest.approx(pd.Series(x).skew()) and kurt_x == pytest.approx(pd.Series(x).kurt())


def test_categorical_cardinality_by_hand():
    frame = pd.DataFrame({"colour": ["red", "blue", "red", None], "size": ["s", "m", "l", "xl"], "n": [1.0, 2.0, 3.0, 4.0]})
    kinds = {"colour": ("tabular", "categorical"), "size": ("tabular", "categorical"), "n": ("tabular", "numeric")}
    features = describe(make_dataset(frame, list("pqpq"), kinds), groups=["tabular"])
    assert features["tabular_categorical"] == 2.0 and features["tabular_numeric"] == 1.0
    # Distinct non-empty values: colour 2, size 4.
    assert (features["categorical_cardinality"], features["categorical_cardinality_min"],
            features["categorical_cardinality_max"]) == (3.0, 2.0, 4.0)
    assert "numeric_mean_abs_correlation" not in features  # one numeric column: no pair


def test_text_features_by_hand():
    frame = pd.DataFrame({"title": ["The cat sat", "the dog", None], "body": ["on a  mat", None, "Dog"]})
    kinds = {"title": ("text", ""), "body": ("text", "")}
    features = describe(make_dataset(frame, list("pqp"), kinds), groups=["text"])
    # Words per row 6, 2, 1; characters per row 11 + 9, 7, 3; lowercased vocabulary
    # {the, cat, sat, on, a, mat, dog} over 9 words.
    assert features == pytest.approx({
        "text_columns": 2.0, "text_mean_words": 3.0, "text_mean_chars": 30 / 3,
        "text_vocabulary": 7.0, "text_type_token_ratio": 7 / 9,
    })


def test_image_features_by_hand():
    dark = np.zeros((2, 2, 1), dtype=np.uint8)
    bright = np.array([[0, 255], [255, 255]], dtype=np.uint8)[..., None]
    frame = pd.DataFrame({"img": ["a.png", "b.png"]})
    dataset = make_dataset(frame, list("pq"), {"img": ("image", "")}, images={"img": np.stack([dark, bright])})
    features = describe(dataset, groups=["image"])
    # Pixels in [0, 1]: 0,0,0,0 and 0,1,1,1. All eight: mean 3/8, variance 3/8 - 9/64 = 15/64.
    # Per image: means 0 and 3/4, standard deviations 0 and sqrt(3/4 - 9/16) = sqrt(3)/4.
    assert features == pytest.approx({
        "image_height": 2.0, "image_width": 2.0, "image_channels": 1.0,
        "image_mean_intensity": 3 / 8, "image_std_intensity": math.sqrt(15 / 64),
        "image_contrast": math.sqrt(3) / 8, "image_brightness_spread": 3 / 8,
    })


def test_rgb_image_size_and_channels():
    pixels = np.full((3, 4, 5, 3), 51, dtype=np.uint8)
    dataset = make_dataset(pd.DataFrame({"img": ["a", "b", "c"]}), list("pqp"), {"img": ("image", "")}, images={"img": pixels})
    features = describe(dataset, groups=["image"])
    assert (features["image_height"], features["image_width"], features["image_channels"]) == (4.0, 5.0, 3.0)
    assert features["image_mean_intensity"] == pytest.approx(0.2)
    assert features["image_std_intensity"] == pytest.approx(0.0, abs=1e-7) and features["image_contrast"] == pytest.approx(0.0, abs=1e-7)


def test_vector_features_by_hand():
    frame = pd.DataFrame({"v": [[3.0, 4.0], [0.0, 0.0], None, [np.nan, 2.0]], "w": [[1.0], [1.0], [1.0], [1.0]]})
    kinds = {"v": ("vector", ""), "w": ("vector", "")}
    features = describe(make_dataset(frame, list("pqpq"), kinds), groups=["vector"])
    # Rows side by side: [3, 4, 1], [0, 0, 1], [NaN, NaN, 1], [NaN, 2, 1]; an empty entry counts
    # as 0, so the norms are sqrt(26), 1, 1, sqrt(5).
    norms = np.array([math.sqrt(26), 1.0, 1.0, math.sqrt(5)])
    assert features == pytest.approx({
        "vector_columns": 2.0, "vector_dim": 3.0, "vector_norm_mean": norms.mean(), "vector_norm_std": norms.std(),
    })


# ---------------------------------------------------------------------------- landmarkers


def planted(rows: int = 200, *, signal: bool, seed: int = 0) -> Dataset:
    """Every modality with the same labels: perfectly separable when ``signal``, else random labels."""
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % 2
    side = np.where(y == 1, 1.0, -1.0)
    x = side * rng.uniform(1, 3, rows)  # the sign of x is the class, with a margin of 2
    words = {0: ["apple", "pear", "plum", "fig"], 1: ["engine", "wheel", "brake", "gear"]}
    text = [" ".join(rng.choice(words[int(c)], 4)) for c in y]
    images = np.clip(np.where(y == 1, 200, 40)[:, None, None, None] + rng.normal(0, 15, (rows, 6, 6, 1)), 0, 255).astype(np.uint8)
    vectors = [np.full(3, 2 * s) + rng.normal(0, 0.3, 3) for s in side]
    frame = pd.DataFrame({
        "x": x, "noise": rng.standard_normal(rows), "kind": rng.choice(["a", "b", "c"], rows),
        "text": text, "img": ["f.png"] * rows, "vec": vectors,
    })
    kinds = {"x": ("tabular", "numeric"), "noise": ("tabular", "numeric"), "kind": ("tabular", "categorical"),
             "text": ("text", ""), "img": ("image", ""), "vec": ("vector", "")}
    labels = y if signal else rng.permutation(y)
    return make_dataset(frame, [f"class{c}" for c in labels], kinds, images={"img": images})


def landmarks(features: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in features.items() if k.startswith("landmark_")}


def test_landmarkers_perfect_on_separable_data():
    found = landmarks(describe(planted(signal=True), groups=["landmark"]))
    assert set(found) == set(FEATURE_GROUPS["landmark"])  # four landmarkers for each of the four modalities
    for modality in ("tabular", "text", "image", "vector"):
        assert found[f"landmark_{modality}_1nn"] == 1.0, modality
        assert found[f"landmark_{modality}_linear"] == 1.0, modality
        assert found[f"landmark_{modality}_naive_bayes"] >= 0.95, modality
    # One feature (tabular x, any pixel, any vector entry) splits the classes.
    for modality in ("tabular", "image", "vector"):
        assert found[f"landmark_{modality}_stump"] == 1.0, modality


def test_landmarkers_near_chance_on_random_labels():
    # Held-out rows only: a landmarker that saw its test rows would score 1-NN at 1.0 here.
    found = landmarks(describe(planted(signal=False), groups=["landmark"]))
    assert len(found) == 16
    for name, accuracy in found.items():
        assert abs(accuracy - 0.5) <= CHANCE_TOLERANCE, (name, accuracy)


def test_landmarkers_per_modality_see_only_their_modality():
    dataset = planted(signal=True)
    rng = np.random.default_rng(1)
    dataset.frame["text"] = [" ".join(rng.choice(["red", "green", "blue", "grey"], 4)) for _ in range(len(dataset))]
    found = describe(dataset, groups=["landmark"])
    assert found["landmark_tabular_1nn"] == 1.0
    assert abs(found["landmark_text_linear"] - 0.5) <= CHANCE_TOLERANCE


def test_landmarkers_on_real_data_beat_the_majority_class():
    dataset = load_dataset(EXAMPLE, "restaurant")
    features = describe(dataset)
    assert (features["rows"], features["classes"]) == (515.0, 8.0)
    # Item names tell the restaurant apart far better than always guessing the largest one.
    assert features["landmark_text_linear"] > features["majority_rate"] + 0.3
    assert features["landmark_tabular_1nn"] > features["majority_rate"] + 0.3
    assert_all_finite(features)


def test_image_landmarkers_against_scikit_learn_on_the_same_folds():
    """PCA + nearest class mean / 1-NN, fitted on each training fold only, as scikit-learn computes them."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 90)
    pixels = np.clip(12 * y[:, None, None, None] + rng.normal(100, 50, (90, 5, 5, 1)), 0, 255).astype(np.uint8)
    dataset = make_dataset(pd.DataFrame({"img": ["f.png"] * 90}), [f"c{c}" for c in y], {"img": ("image", "")},
                           images={"img": pixels})
    found = describe(dataset, groups=["image_landmark"], seed=2)
    x, labels = pixels.reshape(90, -1) / 255.0, dataset.labels
    ncm = nn = 0
    explained = []
    for train, test in metafeatures._folds(labels, 2):
        pca = PCA(metafeatures.IMAGE_COMPONENTS, svd_solver="full").fit(x[train])
        explained.append(pca.explained_variance_ratio_.sum())
        a, b = pca.transform(x[train]), pca.transform(x[test])
        ncm += (NearestCentroid().fit(a, labels[train]).predict(b) == labels[test]).sum()
        nn += (KNeighborsClassifier(1).fit(a, labels[train]).predict(b) == labels[test]).sum()
    assert found == pytest.approx({"landmark_image_pca_ncm": ncm / 90, "landmark_image_pca_1nn": nn / 90,
                                   "landmark_image_pca_variance": np.mean(explained)})
    assert 1 / 3 + 0.1 < found["landmark_image_pca_ncm"] < 1.0  # above chance (3 classes), short of perfect


def test_image_landmarkers_perfect_on_separable_images_and_chance_on_random_labels():
    assert describe(planted(signal=True), groups=["image_landmark"])["landmark_image_pca_ncm"] == 1.0
    # Held-out rows only: fitted on the test rows, 1-NN would score 1.0 on random labels.
    found = describe(planted(signal=False), groups=["image_landmark"])
    for name in ("landmark_image_pca_ncm", "landmark_image_pca_1nn"):
        assert abs(found[name] - 0.5) <= CHANCE_TOLERANCE, (name, found[name])
    # Images of one constant pattern times a brightness: one component holds all the variance.
    pattern = np.arange(16).reshape(4, 4, 1)
    pixels = np.stack([pattern * (1 + s % 16) for s in range(40)]).astype(np.uint8)  # exact: at most 15 * 16
    dataset = make_dataset(pd.DataFrame({"img": ["f"] * 40}), ["a", "b"] * 20, {"img": ("image", "")},
                           images={"img": pixels})
    assert describe(dataset, groups=["image_landmark"])["landmark_image_pca_variance"] == pytest.approx(1.0)
    # No image column, or no class with two rows: nothing to say.
    assert describe(planted(signal=True).subset(np.arange(2)), groups=["image_landmark"]) == {}


# ---------------------------------------------------------------------------- determinism, edge cases


def test_same_seed_same_features_and_the_seed_matters():
    dataset = planted(signal=False)
    first = describe(dataset, seed=3, max_rows=60)
    assert describe(dataset, seed=3, max_rows=60) == first
    other = describe(dataset, seed=4, max_rows=60)
    seeded = {k for k in first if k.startswith("landmark_") or "correlation" in k}
    # Only the subsample's features move with the seed ...
    assert {k: v for k, v in other.items() if k not in seeded} == {k: v for k, v in first.items() if k not in seeded}
    # ... and they do move: another subsample and other folds.
    assert any(other[k] != first[k] for k in seeded)


def test_subsample_keeps_class_proportions():
    labels = np.array(["a"] * 300 + ["b"] * 100, dtype=object)
    rows = metafeatures._subsample(labels, 40, seed=0)
    assert len(rows) == 40 and len(set(rows.tolist())) == 40
    assert (labels[rows] == "a").sum() == 30


def test_missing_values_everywhere_give_finite_features():
    dataset = planted(rows=60, signal=True)
    frame = dataset.frame
    frame.loc[::3, "x"] = np.nan
    frame.loc[::4, "kind"] = None
    frame.loc[::5, "text"] = None
    frame["vec"] = [None if i % 2 else v for i, v in enumerate(frame["vec"])]
    features = describe(dataset)
    assert_all_finite(features)
    assert features["missing_rate"] > 0
    assert {f"landmark_{m}_1nn" for m in ("tabular", "text", "image", "vector")} <= set(features)


def test_vector_column_empty_in_the_subsample_is_left_out():
    dataset = planted(rows=100, signal=True)
    dataset.frame["vec"] = [v if i == 0 else None for i, v in enumerate(dataset.frame["vec"])]
    features = describe(dataset, max_rows=20, seed=0)  # row 0 falls outside this subsample
    assert_all_finite(features)
    assert "landmark_vector_1nn" not in features and "landmark_tabular_1nn" in features
    assert features["vector_norm_mean"] > 0  # the full-data statistics still see row 0


def test_one_class_per_row_has_no_landmarkers_and_no_nan():
    frame = pd.DataFrame({"x": [1.0, 2.0, np.nan, 4.0], "t": ["a b", "c", None, "d e f"]})
    dataset = make_dataset(frame, ["w", "x", "y", "z"], {"x": ("tabular", "numeric"), "t": ("text", "")})
    features = describe(dataset)
    assert_all_finite(features)
    assert not landmarks(features)  # no class has a second row to learn it from
    assert (features["class_entropy"], features["imbalance_ratio"], features["rows_per_class"]) == (1.0, 1.0, 1.0)


def test_too_few_values_leave_statistics_out():
    frame = pd.DataFrame({"x": [1.0, 2.0], "t": ["", "  "]})
    features = describe(make_dataset(frame, ["p", "q"], {"x": ("tabular", "numeric"), "t": ("text", "")}))
    assert_all_finite(features)
    # Skewness needs three values, a type/token ratio at least one word.
    assert "numeric_skewness" not in features and "text_type_token_ratio" not in features
    assert features["text_vocabulary"] == 0.0 and features["class_entropy"] == 1.0


# ---------------------------------------------------------------------------- names and groups


def test_every_feature_is_listed_and_documented():
    dataset = planted(rows=40, signal=True)
    dataset.groups = np.array(["g1", "g2"] * 20, dtype=object)
    features = describe(dataset)
    listed = {name for names in FEATURE_GROUPS.values() for name in names}
    assert set(features) == listed
    for name in listed - set(FEATURE_GROUPS["landmark"]):
        base = name.removesuffix("_min").removesuffix("_max")
        assert base in metafeatures.__doc__, name
    # Names stored by earlier versions (and compared with them) are kept.
    assert {"rows", "log_rows", "classes", "rows_per_class", "class_entropy", "imbalance_ratio", "missing_rate",
            "modalities", "groups", "tabular_numeric", "tabular_categorical", "numeric_skewness", "numeric_kurtosis",
            "text_columns", "text_mean_words", "text_vocabulary", "image_height", "image_width", "image_channels",
            "image_mean_intensity", "image_std_intensity", "vector_dim"} <= set(features)


def test_groups_select_features():
    dataset = planted(rows=40, signal=True)
    assert set(describe(dataset, groups=["text", "class"])) == set(FEATURE_GROUPS["text"]) | set(FEATURE_GROUPS["class"])


def test_unknown_group_is_an_error():
    with pytest.raises(AutometaError, match=r"unknown meta-feature group\(s\) landmarks; choose from simple, class"):
        describe(planted(rows=20, signal=True), groups=["landmarks"])
