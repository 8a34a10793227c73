"""Trials on a pool of devices: isolated worker processes sharing one Optuna storage.

Each worker process is pinned to one device and runs trials one after another, claiming each
from the search's budget first. The parent watches them: a worker that dies (crash, CUDA
out-of-memory abort, SIGKILL) or overruns ``--trial-timeout`` has its trial failed with the
reason and is replaced by a fresh one. Trials a dead search left RUNNING are failed with a
reason and re-queued when the study is opened again. Other machines join the same study with
``autometa worker`` (Optuna's RDB storage is the distributed engine; PostgreSQL for many hosts).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import queue
import signal
import sqlite3
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import torch
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from autometa.errors import AutometaError, SearchError

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
HEARTBEAT_S = 10
GRACE_S = 60


@dataclass
class Slot:
    """One worker place: a device and its index among the workers sharing it."""

    device: str
    index: int

    @property
    def label(self) -> str:
        return f"{self.device}#{self.index}"


def resolve_devices(spec: str, per_device: int) -> list[Slot]:
    """``auto`` (every GPU, else the CPU), ``cpu`` or ``cuda:0,cuda:1`` → worker slots."""
    if per_device < 1:
        raise SearchError("--trials-per-device must be at least 1")
    if spec == "auto":
        names = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise SearchError(f"--devices {spec!r}: give auto, cpu or cuda:N[,cuda:M...]")
    count = torch.cuda.device_count()
    for name in names:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise SearchError(f"--devices: {name!r} is not a device name; use auto, cpu or cuda:N") from exc
        if device.type == "cuda" and (device.index or 0) >= count:
            raise SearchError(f"--devices {spec}: torch sees {count} CUDA device(s) on this machine; use cpu or auto")
        if device.type not in ("cpu", "cuda"):
            raise SearchError(f"--devices {spec}: only cpu and cuda devices are supported")
    if len(set(names)) != len(names):
        raise SearchError(f"--devices {spec}: a device is listed twice; use --trials-per-device for several trials per device")
    return [Slot(name, i) for name in names for i in range(per_device)]


def threads_per_worker(slots: list[Slot]) -> int:
    """CPU threads each worker may use: the cores shared out among the CPU workers.

    Oversubscribing cores stalls (second-order) autograd badly, so never more than a fair share.
    """
    cpu_workers = sum(1 for s in slots if s.device == "cpu")
    cores = os.cpu_count() or 1
    return max(1, cores // max(1, cpu_workers)) if cpu_workers else max(1, min(4, cores // len(slots)))


def storage_for(db: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with what parallel workers need: WAL and a busy timeout on SQLite
    (no "database is locked"), and heartbeats so a dead worker's trial is noticed."""
    try:
        url = make_url(db)
    except Exception as exc:
        raise SearchError(f"--db {db!r} is not a database URL; give one like sqlite:///studies.db") from exc
    kwargs: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise SearchError(
                f"--db {db}: an in-memory database would lose every trial at exit and cannot be shared with "
                "worker processes; give a file, e.g. sqlite:///studies.db"
            )
        if url.database:
            path = Path(url.database)
            if not path.parent.exists():
                raise SearchError(f"--db {db}: folder {path.parent} does not exist")
            if path.parent.is_file():
                raise SearchError(f"--db {db}: {path.parent} is a file, not a folder")
            if not os.access(path.parent, os.W_OK):
                raise SearchError(f"--db {db}: folder {path.parent} is not writable")
            _enable_wal(path, db)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    try:
        with warnings.catch_warnings():  # heartbeats are flagged experimental but long stable
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
            db,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            **kwargs,
            )
    except AutometaError:
        raise
    except Exception as exc:
        cause = exc.__cause__ or exc
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise SearchError(f"cannot open the study database {db}: {type(cause).__name__}: {first}") from exc


def _enable_wal(path: Path, db: str) -> None:
    # Only through SQLite itself: a plain open()/close() of the file would drop this process's
    # POSIX locks on it, and another process could then checkpoint the WAL away under us.
    try:
        connection = sqlite3.connect(path, timeout=120)
        try:
            connection.execute("PRAGMA schema_version").fetchone()  # "file is not a database" here
            check = connection.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise sqlite3.DatabaseError(f"integrity check: {check[0][0]}")
            connection.execute("PRAGMA journal_mode=WAL")
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        raise SearchError(
            f"--db {db}: {path} cannot be used as an SQLite database ({exc}); it was left untouched: pass another --db"
        ) from exc


def checkpoint(db: str) -> None:
    """Fold SQLite's write-ahead log back into the database file, so the file alone is complete
    (to copy, back up or attach) once a search is over."""
    url = make_url(db)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return
    try:
        connection = sqlite3.connect(url.database, timeout=120)
        try:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            connection.close()
    except sqlite3.Error:
        pass  # another process is busy with it; its own checkpoint will follow


# -- orphaned trials -------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str, requeue: bool = False) -> None:
    """Mark a RUNNING trial FAILED with ``reason`` (and optionally queue its parameters again)."""
    storage = study._storage  # noqa: SLF001 - Optuna's public Study has no way to fail another trial
    try:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)  # noqa: SLF001
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # noqa: SLF001
    except RuntimeError:
        return  # it finished meanwhile
    if requeue and trial.params:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)


def recover_orphans(study: optuna.Study, say: Callable[[str], None]) -> int:
    """Fail (with a reason) and re-queue RUNNING trials whose worker is gone.

    On this host a worker is gone when its process no longer exists; elsewhere when its
    Optuna heartbeat is older than the grace period.
    """
    host = platform.node()
    stale = set()
    try:
        stale = set(study._storage._get_stale_trial_ids(study._study_id))  # noqa: SLF001
    except Exception:  # storages without heartbeats
        pass
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid, where = trial.user_attrs.get("pid"), trial.user_attrs.get("host")
        if where == host and pid is not None and not _alive(int(pid)):
            reason = f"its worker (pid {pid} on {host}) stopped while the trial ran; re-queued"
        elif trial._trial_id in stale:  # noqa: SLF001
            reason = f"no heartbeat from its worker on {where or 'an unknown host'} for over {GRACE_S}s; re-queued"
        else:
            continue
        fail_trial(study, trial, reason, requeue=True)
        recovered += 1
    if recovered:
        say(f"{recovered} trial(s) left running by a stopped worker were marked failed and queued again")
    return recovered


# -- the worker process ----------------------------------------------------------------------
@dataclass
class WorkerJob:
    """Everything a worker process needs (picklable; spawn sends it to the child)."""

    build: Callable[[str], Any]  # device -> (objective factory context); a module-level callable
    build_args: tuple
    db: str
    study: str
    slot: Slot
    threads: int
    parent_pid: int
    extra: dict[str, Any] = field(default_factory=dict)


def worker_main(job: WorkerJob, claim, events) -> None:
    """Run trials until the budget is claimed away or the parent disappears."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    torch.set_num_threads(job.threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        objective = job.build(job.slot, *job.build_args, events=events, parent_pid=job.parent_pid)
    except Exception as exc:
        events.put(("error", job.slot.label, f"{type(exc).__name__}: {exc}"))
        raise SystemExit(3) from exc
    study = optuna.load_study(
        study_name=job.study, storage=storage_for(job.db),
        sampler=getattr(objective, "sampler", None), pruner=getattr(objective, "pruner", None),
    )
    while os.getppid() == job.parent_pid and claim():
        study.optimize(objective, n_trials=1, catch=(Exception,))
        if objective.stop_requested:
            break


def parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


class SharedBudget:
    """Trials left to start, shared by the local workers (exact: one claim per trial)."""

    def __init__(self, context, count: int):
        self.value = context.Value("i", count)

    def __call__(self) -> bool:
        with self.value.get_lock():
            if self.value.value <= 0:
                return False
            self.value.value -= 1
            return True

    def cancel(self) -> None:
        with self.value.get_lock():
            self.value.value = 0

    def remaining(self) -> int:
        return self.value.value


class DatabaseBudget:
    """Trials left by the study's stored budget, counted in the database (for workers on other
    machines, which share no memory: two hosts claiming the last trial at once may run one extra)."""

    def __init__(self, db: str, study: str, budget: int):
        self.db, self.study, self.budget = db, study, budget
        self.cancelled = False
        self._study: optuna.Study | None = None

    def remaining(self) -> int:
        if self.cancelled:
            return 0
        if self._study is None:
            self._study = optuna.load_study(study_name=self.study, storage=storage_for(self.db))
        used = len(self._study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,)))
        return self.budget - used

    def __call__(self) -> bool:
        return self.remaining() > 0

    def cancel(self) -> None:
        self.cancelled = True

    def __getstate__(self):
        return {"db": self.db, "study": self.study, "budget": self.budget, "cancelled": self.cancelled, "_study": None}


@contextmanager
def _without_main_module():
    """Start spawned workers without re-running the parent's ``__main__``.

    Spawn re-imports the main module in the child; for the ``autometa`` console script (or a
    user's script without a ``__main__`` guard) that would run the whole search again in every
    worker. Workers need only autometa itself, so the main module is hidden while they start.
    """
    main = sys.modules["__main__"]
    saved_file = main.__dict__.pop("__file__", None)
    saved_spec = main.__dict__.get("__spec__")
    main.__spec__ = None
    try:
        yield
    finally:
        main.__spec__ = saved_spec
        if saved_file is not None:
            main.__file__ = saved_file


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def run_pool(
    study: optuna.Study,
    db: str,
    slots: list[Slot],
    n_trials: int | DatabaseBudget,
    build: Callable,
    build_args: tuple,
    *,
    timeout: float | None,
    trial_timeout: float | None,
    on_event: Callable[[tuple], None],
    on_poll: Callable[[], None],
    say: Callable[[str], None],
) -> None:
    """Run ``n_trials`` trials of ``study`` on worker processes, one per slot, replacing dead ones.

    ``n_trials`` may be a DatabaseBudget instead, for workers joining from another machine.
    """
    context = mp.get_context("spawn")
    budget = SharedBudget(context, n_trials) if isinstance(n_trials, int) else n_trials
    events = context.Queue()
    threads = threads_per_worker(slots)
    workers: dict[str, mp.Process] = {}
    started = time.monotonic()

    def start(slot: Slot) -> None:
        job = WorkerJob(build, build_args, db, study.study_name, slot, threads, os.getpid())
        process = context.Process(target=worker_main, args=(job, budget, events), name=f"autometa-{slot.label}", daemon=True)
        with _without_main_module():
            process.start()
        workers[slot.label] = process

    def running_of(pid: int) -> list[optuna.trial.FrozenTrial]:
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.user_attrs.get("pid") == pid]

    for slot in slots:
        start(slot)
    by_label = {s.label: s for s in slots}
    try:
        while workers:
            try:
                while True:
                    on_event(events.get(timeout=0.2))
            except queue.Empty:
                pass
            on_poll()
            if timeout is not None and time.monotonic() - started > timeout:
                budget.cancel()  # workers finish their current trial and stop
            for label, process in list(workers.items()):
                if trial_timeout is not None and process.is_alive():
                    for trial in running_of(process.pid):
                        began = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
                        if time.time() - began > trial_timeout:
                            process.kill()
                            process.join(10)
                            fail_trial(study, trial, f"exceeded --trial-timeout of {trial_timeout:g}s on {label}; its worker was replaced")
                if process.is_alive():
                    continue
                process.join()
                del workers[label]
                if process.exitcode != 0:
                    for trial in running_of(process.pid):
                        fail_trial(
                            study, trial,
                            f"its worker process on {label} {_exit_reason(process.exitcode)} during the trial "
                            "(crash, out of memory or a kill); the search went on with a fresh worker",
                        )
                    if budget.remaining() > 0:
                        say(f"worker {label} {_exit_reason(process.exitcode)}; starting a fresh one")
                        start(by_label[label])
    except KeyboardInterrupt:
        budget.cancel()
        for process in workers.values():
            process.terminate()
        for label, process in workers.items():
            process.join(10)
            for trial in running_of(process.pid):
                fail_trial(study, trial, "interrupted (Ctrl-C) while running; run the search again to resume")
        raise
    finally:
        for process in workers.values():
            if process.is_alive():
                process.kill()
        events.close()
