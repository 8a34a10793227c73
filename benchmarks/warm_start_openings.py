"""Which opening order of default trials and warm-start seeds reaches a good trial soonest?

Replays the searches that ``benchmarks/warm_start.py`` recorded in its ``--work`` folder, one seed:
the default trials come from the knowledge base's defaults search of each task (``kb-seedN.db``,
its enqueued trials in order) and the seeds from the task's warm search (``warm-TASK-seedN.db``,
the trials carrying a ``warm_start`` attribute). A configuration scores the same whichever trial
runs it (its training seed follows from the configuration), so each order's best validation
accuracy after n trials is read off the recorded values without training anything; a pruned or
failed trial adds nothing, as in the benchmark. Each task's curve is normalised between the worst
and best completed trial of its recorded searches (scratch, defaults and warm), as the benchmark
does. Validation scores only: no test row is involved.

    python benchmarks/warm_start_openings.py --work WORK [--seed 0]

Only the opening (defaults and seeds) is replayed: what the sampler would propose after it
depends on the history, so checkpoints beyond the opening's length are left out per task (the
count of tasks is printed for each).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

import numpy as np
import optuna
from optuna.trial import TrialState
from scipy import stats

from autometa.config import stored_config
from autometa.plugins import get_registry
from autometa.study.warmstart import opening

Order = Callable[[list, list], list]


ORDERS: dict[str, Order] = {
    "seeds first": lambda defaults, seeds: seeds + defaults,
    "defaults only": lambda defaults, seeds: defaults,
    "one default first": lambda defaults, seeds: defaults[:1] + seeds + defaults[1:],
    "two defaults first": lambda defaults, seeds: defaults[:2] + seeds + defaults[2:],
    "alternating": opening,  # autometa's own
}
CHECKPOINTS = (1, 3, 5, 10)


def trials(db: Path, study: str | None = None) -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{db}"
    name = study or optuna.get_all_study_names(storage)[0]
    return sorted(optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False), key=lambda t: t.number)


def replay(order: list[str], values: dict[str, float | None]) -> list[float | None]:
    """Best value so far after each trial of ``order`` (configurations queued once)."""
    best, seen, curve = None, set(), []
    for key in order:
        if key in seen:
            continue
        seen.add(key)
        value = values.get(key)
        best = value if best is None or (value is not None and value > best) else best
        curve.append(best)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="warm_start.py's --work folder.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    registry = get_registry()
    kb = args.work / f"kb-seed{args.seed}.db"
    kb_studies = optuna.get_all_study_names(f"sqlite:///{kb}")
    scores: dict[str, dict[int, list[float]]] = {name: {n: [] for n in CHECKPOINTS} for name in ORDERS}
    tasks = 0
    for warm_db in sorted(args.work.glob(f"warm-*-seed{args.seed}.db")):
        task = warm_db.name[len("warm-"):-len(f"-seed{args.seed}.db")]
        kb_name = next((n for n in kb_studies if n.rsplit("-", 1)[0] == task), None)
        if kb_name is None:
            print(f"{task}: no defaults search in {kb.name}; left out")
            continue
        warm, defaults_search = trials(warm_db), trials(kb, kb_name)
        scratch_db = args.work / f"scratch-{task}-seed{args.seed}.db"
        recorded = warm + defaults_search + (trials(scratch_db) if scratch_db.exists() else [])
        choices = optuna.load_study(study_name=kb_name, storage=f"sqlite:///{kb}").user_attrs["choices"]

        def key(trial: optuna.trial.FrozenTrial) -> str:
            return json.dumps(stored_config(trial.params, registry, choices), sort_keys=True, default=str)

        completed = [t.value for t in recorded if t.state == TrialState.COMPLETE]
        if not completed:
            continue
        low, high = min(completed), max(completed)
        values: dict[str, float | None] = {}
        for t in warm + defaults_search:
            values.setdefault(key(t), t.value if t.state == TrialState.COMPLETE else None)
        defaults = [key(t) for t in defaults_search if "fixed_params" in t.system_attrs]
        seeds = [key(t) for t in warm if "warm_start" in t.user_attrs]
        tasks += 1
        for name, order in ORDERS.items():
            curve = replay(order(defaults, seeds), values)
            for n in CHECKPOINTS:
                if n <= len(curve):
                    best = curve[n - 1]
                    scores[name][n].append(0.0 if best is None else (best - low) / (high - low) if high > low else 1.0)
    print(f"{tasks} tasks of {args.work}, seed {args.seed}: mean normalised best validation after n trials "
          "(tasks whose opening is that long)")
    print(f"{'order':<20}" + "".join(f"{'@' + str(n):>16}" for n in CHECKPOINTS))
    for name in ORDERS:
        print(f"{name:<20}" + "".join(
            f"{np.mean(v):>10.3f} ({len(v):>2})" if v else f"{'-':>16}" for v in scores[name].values()))
    print("\nalternating minus each other order, paired over tasks, 95% Student-t interval:")
    for other in ORDERS:
        if other == "alternating":
            continue
        cells = []
        for n in CHECKPOINTS:
            a, b = scores["alternating"][n], scores[other][n]
            if len(a) != len(b) or len(a) < 2:
                cells.append(f"@{n} -")
                continue
            d = np.array(a) - np.array(b)
            half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
            cells.append(f"@{n} {d.mean():+.3f} [{d.mean() - half:+.3f}, {d.mean() + half:+.3f}]")
        print(f"  vs {other:<18} " + "; ".join(cells))


if __name__ == "__main__":
    main()
