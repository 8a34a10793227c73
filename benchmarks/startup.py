"""Start-up cost of light commands: CPU time (user + sys, median of several runs) of
`autometa --help`, `autometa db studies --db <a small database>` and `autometa plugins`, for this
checkout beside the commit before the layered restructure, side by side in one run.

    python benchmarks/startup.py [--runs 7] [--before c202d07]

The earlier commit is checked out in a temporary `git worktree` and put first on PYTHONPATH
(with its plugins/ folder), so both run with the same interpreter and installed libraries.
Targets (issue 14): `--help` under 0.5 s, `db studies` under 1.5 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"--help": ["--help"], "db studies": ["db", "studies", "--db", "{db}"], "plugins": ["plugins"]}
TARGETS = {"--help": 0.5, "db studies": 1.5}


def cpu_seconds(argv: list[str], env: dict[str, str]) -> float:
    """User + system CPU time of one run of ``argv`` (which must succeed). It runs in a neutral
    folder: ``python -c`` puts the working folder first on the path."""
    process = subprocess.Popen(argv, env=env, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({process.returncode}): {process.stderr.read().decode()[-2000:]}")
    process.stderr.close()
    return usage.ru_utime + usage.ru_stime


def small_database(folder: Path) -> str:
    """A study database with one finished study of a few trials, and autometa's tables."""
    import optuna

    from autometa.store import schema

    url = f"sqlite:///{folder / 'small.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="toy", storage=url, direction="maximize")
    study.set_user_attr("dataset", "toy")
    for i in range(5):
        study.add_trial(optuna.trial.create_trial(
            params={"meta_algorithm": "protonet"}, distributions={
                "meta_algorithm": optuna.distributions.CategoricalDistribution(["protonet", "maml"])},
            value=0.5 + i / 20))
    schema.upgrade(url)
    return url


def measure(label: str, launcher: list[str], env: dict[str, str], db: str, runs: int) -> dict[str, float]:
    figures = {}
    for name, args in COMMANDS.items():
        argv = launcher + [a.format(db=db) for a in args]
        cpu_seconds(argv, env)  # warm the file cache
        figures[name] = statistics.median(cpu_seconds(argv, env) for _ in range(runs))
        print(f"  {label:>7} {name:<11} {figures[name]:.2f} s", file=sys.stderr)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--before", default="c202d07", help="the commit to compare with")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="autometa-startup-") as tmp:
        tmp = Path(tmp)
        db = small_database(tmp)
        before = tmp / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(before), args.before], cwd=ROOT, check=True)
        try:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            old_env = {**env, "PYTHONPATH": os.pathsep.join([str(before), str(before / "plugins")])}
            check = [sys.executable, "-c", "import autometa, autometa_builtins; print(autometa.__file__, autometa_builtins.__file__)"]
            where = subprocess.run(check, env=old_env, cwd=tmp, capture_output=True, text=True, check=True).stdout
            assert where.count(str(before)) == 2, f"the earlier commit is not the one imported: {where}"
            old = measure("before", [sys.executable, "-c", "from autometa.cli import main; main()"], old_env, db, args.runs)
            new = measure("now", [sys.executable, "-c", "from autometa.cli.main import main; main()"], env, db, args.runs)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)

    print(f"CPU seconds (user + sys), median of {args.runs} runs; {args.before} vs this checkout")
    print(f"{'command':<22}{args.before:>10}{'now':>10}{'target':>10}")
    for name in COMMANDS:
        target = f"< {TARGETS[name]}" if name in TARGETS else ""
        print(f"autometa {name:<13}{old[name]:>10.2f}{new[name]:>10.2f}{target:>10}")


if __name__ == "__main__":
    main()
