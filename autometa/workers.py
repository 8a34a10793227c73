"""Trials on a pool of devices: isolated worker processes sharing one Optuna storage.

Each worker process is pinned to one device and runs trials one after another, claiming each
from the search's budget first. The parent watches them: a worker that dies (crash, CUDA
out-of-memory abort, SIGKILL) or overruns ``--trial-timeout`` has its trial failed with the
reason and is replaced by a fresh one. Trials a dead search left RUNNING are failed with a
reason and re-queued when the study is opened again. Other machines join the same study with
``autometa worker`` (Optuna's RDB storage is the distributed engine; PostgreSQL for many hosts).
"""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import platform
import queue
import signal
import sqlite3
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import optuna
import sqlalchemy
import torch
from optuna.storages._rdb import models as optuna_models
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from autometa import schema
from autometa.errors import AutometaError, SearchError, first_line

try:
    import fcntl
except ImportError:  # Windows: no flock; searches there start one at a time
    fcntl = None

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
HEARTBEAT_S = 10
GRACE_S = 60
MAX_STRIKES = 3  # deaths in a row before any trial, after which a slot is given up
REQUEUED = "requeued"  # user attribute of a trial failed because its worker was lost: not counted
_TABLES_LOCK = 7346312831  # PostgreSQL advisory lock key while Optuna's tables are made (schema's is ...830)


@dataclass
class Slot:
    """One worker place: a device and its index among the workers sharing it."""

    device: str
    index: int

    @property
    def label(self) -> str:
        return f"{self.device}#{self.index}"


def worker_label(attrs: Mapping[str, Any]) -> str:
    """Where a trial ran, for trial lines: its worker slot (``cpu#0``), with ``@host`` when that
    is another machine sharing the study (every machine has its own ``cpu#0``)."""
    label, host = attrs.get("worker", "?"), attrs.get("host")
    return f"{label}@{host}" if host and host != platform.node() else label


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
    try:
        cores = len(os.sched_getaffinity(0))  # what this process may use (taskset, container limits)
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, cpu_workers)) if cpu_workers else max(1, min(4, cores // len(slots)))
    # OMP_NUM_THREADS is how users (and other searches on the same machine) ask for fewer.
    try:
        return max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
    except (KeyError, ValueError):
        return threads


def storage_for(db: str, *, create: bool = True) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage with what parallel workers need: WAL and a busy timeout on SQLite
    (no "database is locked"), and heartbeats so a dead worker's trial is noticed.

    ``create=False`` opens only a database that a search has written (``autometa worker``: a
    mistyped URL must not leave a new, empty database behind)."""
    try:
        url = make_url(db)
    except Exception as exc:
        raise SearchError(f"--db {db!r} is not a database URL; give one like sqlite:///studies.db") from exc
    kwargs: dict[str, Any] = {}
    wal: Path | None = None  # the SQLite file to switch to WAL mode
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise SearchError(
                f"--db {db}: an in-memory database would lose every trial at exit and cannot be shared with "
                "worker processes; give a file, e.g. sqlite:///studies.db"
            )
        if url.database:
            path = Path(url.database)
            if not create and not path.is_file():
                raise SearchError(f"no study database at {db} ({path} does not exist); pass the --db URL the search used")
            if not path.parent.exists():
                raise SearchError(f"--db {db}: folder {path.parent} does not exist; create it or pass another --db")
            if path.parent.is_file():
                raise SearchError(f"--db {db}: {path.parent} is a file, not a folder; pass another --db")
            if not os.access(path.parent, os.W_OK):
                raise SearchError(f"--db {db}: folder {path.parent} is not writable; pass another --db")
            if create:  # a database a search wrote is in WAL mode already; another is not changed
                wal = path
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    if not create:
        kwargs["skip_table_creation"] = True
    # Optuna renamed the stale-trial callback (4.9); either re-queues a trial no heartbeat vouches for.
    accepted = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    callback = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in accepted else "failed_trial_callback"
    kwargs[callback] = _requeue_stale
    try:
        with warnings.catch_warnings(), _creating_tables(url):  # heartbeats: flagged experimental, long stable
            if wal is not None:  # under the lock too: processes switching a new file at once deadlock
                _enable_wal(wal, db)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return _Storage(db, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **kwargs)
    except AutometaError:
        raise
    except Exception as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, ModuleNotFoundError):
            extra = ' (pip install "autometa[postgres]")' if url.get_backend_name() == "postgresql" else ""
            raise SearchError(
                f"--db {url.render_as_string(hide_password=True)}: its database driver {cause.name!r} is not installed{extra}"
            ) from exc
        shown = url.render_as_string(hide_password=True)
        missing_table = "no such table" in str(cause) or ("relation" in str(cause) and "does not exist" in str(cause))
        if not create and missing_table:
            raise SearchError(f"{shown} holds no Optuna studies; pass the --db URL the search used") from exc
        raise SearchError(f"cannot open the study database {shown}: {type(cause).__name__}: {first_line(cause)}") from exc


@contextmanager
def _creating_tables(url) -> Iterator[None]:
    """Hold a lock while Optuna's storage creates (or checks) its tables.

    Optuna creates its tables and stamps their version without a lock: two searches started
    together on a new database both create them, and one fails ("table studies already
    exists"; on SQLite switching the new file to WAL mode at once fails too, "database is
    locked"). On SQLite the lock is an flock on the database's folder: it leaves no file
    behind and does not touch the database file itself, whose POSIX locks SQLite owns (see
    ``_enable_wal``); on PostgreSQL, a session advisory lock.
    """
    backend = url.get_backend_name()
    if backend == "sqlite" and fcntl is not None:
        try:
            folder = os.open(Path(url.database).parent, os.O_RDONLY)
        except OSError:  # an unreadable folder: go on unlocked rather than refuse
            yield
            return
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            yield
        finally:
            os.close(folder)  # releases the lock
    elif backend == "postgresql":
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        try:
            connection = engine.connect()
            connection.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({_TABLES_LOCK})"))
        except Exception:  # noqa: BLE001 - opening the storage next says why the database cannot be used
            engine.dispose()
            yield
            return
        try:
            yield
        finally:
            connection.close()  # ends the session, and its lock
            engine.dispose()
    else:
        yield


class _Storage(optuna.storages.RDBStorage):
    """Optuna's RDB storage with an atomic claim of waiting trials and reasons for stale ones."""

    def set_trial_state_values(self, trial_id: int, state: TrialState, values=None) -> bool:
        if state != TrialState.RUNNING or values is not None:
            return super().set_trial_state_values(trial_id, state, values)
        # Optuna pops a waiting (enqueued or re-queued) trial by reading its state, then writing
        # RUNNING under SELECT ... FOR UPDATE, which SQLite ignores: two processes could both run
        # the same trial and the second one's tell would crash. One conditional UPDATE is atomic
        # on every database.
        table = optuna_models.TrialModel.__table__
        with self.engine.begin() as connection:
            claimed = connection.execute(
                sqlalchemy.update(table)
                .where(table.c.trial_id == trial_id, table.c.state == TrialState.WAITING)
                .values(state=TrialState.RUNNING, datetime_start=datetime.now())
            ).rowcount
        if claimed == 1:
            return True
        return super().set_trial_state_values(trial_id, state, values)  # False, or raises for a finished trial

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = super()._get_stale_trial_ids(study_id)
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
        # Whoever fails these next (Optuna in any worker, or recover_orphans) leaves this reason.
        for trial_id in stale:
            try:
                self.set_trial_user_attr(
                    trial_id, "fail_reason", f"no heartbeat from its worker for over {grace}s (host or worker lost); re-queued"
                )
                self.set_trial_user_attr(trial_id, REQUEUED, True)
            except RuntimeError:
                pass  # failed meanwhile
        return stale


def _requeue_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if trial.params:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)


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
    # A dead worker whose parent died too stays a zombie where PID 1 does not reap (containers):
    # it still answers signal 0, yet its trial is orphaned.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def fail_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str, requeue: bool = False,
               db: str | None = None) -> None:
    """Mark a RUNNING trial FAILED with ``reason`` (and optionally queue its parameters again);
    with ``db``, record its facts too (its own process, which would have, is gone)."""
    storage = study._storage  # noqa: SLF001 - Optuna's public Study has no way to fail another trial
    try:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)  # noqa: SLF001
        if requeue:
            storage.set_trial_user_attr(trial._trial_id, REQUEUED, True)  # noqa: SLF001
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # noqa: SLF001
    except RuntimeError:
        return  # it finished meanwhile
    if db is not None:
        schema.record_trial(db, study.study_name, storage.get_trial(trial._trial_id))  # noqa: SLF001
    if requeue and trial.params:
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None  # gone, or no /proc (then only a dead worker counts as gone)


def _worker_gone(pid: int, search_pid: int | None) -> bool:
    """A worker is gone when its process is, or when its search process is: it then stops at its
    next check (``parent_alive``) without finishing its trial."""
    if not _alive(pid):
        return True
    if search_pid is None or search_pid == pid:
        return False
    parent = _parent_of(pid)
    return parent is not None and parent != search_pid


def recover_orphans(study: optuna.Study, say: Callable[[str], None]) -> int:
    """Fail (with a reason) and re-queue RUNNING trials whose worker is gone.

    On this host a worker is gone when its process, or the search that started it, no longer
    exists (a search resumed right after a kill finds the old workers still finishing a step);
    elsewhere when its Optuna heartbeat is older than the grace period.
    """
    host = platform.node()
    stale = set()
    try:
        stale = set(study._storage._get_stale_trial_ids(study._study_id))  # noqa: SLF001
    except Exception:  # storages without heartbeats
        pass
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid, where, search_pid = (trial.user_attrs.get(key) for key in ("pid", "host", "search_pid"))
        if where == host and pid is not None and _worker_gone(int(pid), search_pid):
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


def worker_main(job: WorkerJob, budget: "Budget", events) -> None:
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

    def run(trial: optuna.Trial) -> float:
        budget.release()  # the trial is in the database now: the next local worker can count it
        # Who runs it, first thing: a trial whose process dies is recognised by these.
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("host", platform.node())
        trial.set_user_attr("search_pid", job.parent_pid)
        return objective(trial)

    while parent_alive(job.parent_pid) and budget.claim(study, job.parent_pid):
        try:
            study.optimize(run, n_trials=1, catch=(Exception,), callbacks=[schema.TrialRecorder(job.db)])
        finally:
            budget.release()
        if objective.stop_requested:
            break


def parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


def budget_used(study: optuna.Study, *, running: bool = True) -> int:
    """Trials that count against the study's budget: finished ones (and running ones, unless
    ``running`` is False), except a trial whose worker was lost and that was failed and
    re-queued: its retry takes its place (or, when it had not sampled its parameters yet, the
    sampler's next trial does), so a kill never costs the user a trial."""
    trials = study.get_trials(deepcopy=False)
    # retry_of alone marks the re-queued trials of databases written before REQUEUED existed.
    replaced = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    counted = FINISHED + ((TrialState.RUNNING,) if running else ())
    return sum(t.state in counted and t.number not in replaced and not t.user_attrs.get(REQUEUED) for t in trials)


class Budget:
    """Trials this host's workers may still start: the study's total budget minus the trials in
    the database that use it (see ``budget_used``).

    A worker holds the claim lock from that count until its trial exists in the database, so
    this host's workers never overshoot the budget together. Other hosts are seen only through
    the database: two hosts claiming the last trial at once may run one extra.
    """

    def __init__(self, context, total: int):
        self.total = total
        self._lock = context.Lock()
        self._holder = context.Value("i", 0, lock=False)
        self._cancelled = context.Value("b", 0, lock=False)

    def remaining(self, study: optuna.Study) -> int:
        if self._cancelled.value:
            return 0
        return self.total - budget_used(study)

    def claim(self, study: optuna.Study, parent_pid: int | None = None) -> bool:
        """Take the claim lock if a trial is left (then ``release`` once the trial exists)."""
        while not self._lock.acquire(timeout=1.0):
            if parent_pid is not None and not parent_alive(parent_pid):
                return False
        self._holder.value = os.getpid()
        try:
            if self.remaining(study) > 0:
                return True
        except BaseException:
            self.release()
            raise
        self.release()
        return False

    def release(self) -> None:
        if self._holder.value == os.getpid():
            self._holder.value = 0
            self._lock.release()

    def release_for(self, pid: int | None) -> None:
        """Free the claim lock a dead worker took with it."""
        if pid and self._holder.value == pid:
            self._holder.value = 0
            self._lock.release()

    def cancel(self) -> None:
        self._cancelled.value = 1


class DatabaseBudget:
    """The study's total budget, for workers joining from another process or machine (they run
    trials until the study holds ``budget`` finished or running ones)."""

    def __init__(self, db: str, study: str, budget: int):
        self.db, self.study, self.budget = db, study, budget

    def remaining(self) -> int:
        stored = optuna.load_study(study_name=self.study, storage=storage_for(self.db))
        return self.budget - budget_used(stored)


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
    """Run ``n_trials`` more trials of ``study`` on worker processes, one per slot, replacing dead ones.

    ``n_trials`` may be a DatabaseBudget instead: trials until the study holds its budget
    (workers joining from another machine). Either way trials run elsewhere on the same study
    count: the budget is the study's, not this process's.
    """
    context = mp.get_context("spawn")
    if isinstance(n_trials, DatabaseBudget):
        total = n_trials.budget
    else:
        total = budget_used(study, running=False) + n_trials
    budget = Budget(context, total)
    events = context.Queue()
    threads = threads_per_worker(slots)
    workers: dict[str, mp.Process] = {}
    started = time.monotonic()

    def start(slot: Slot) -> None:
        job = WorkerJob(build, build_args, db, study.study_name, slot, threads, os.getpid())
        process = context.Process(target=worker_main, args=(job, budget, events), name=f"autometa-{slot.label}", daemon=True)
        with _without_main_module(), _sigint_ignored():
            process.start()
        workers[slot.label] = process

    def running_by_pid() -> dict[int, list[optuna.trial.FrozenTrial]]:
        running: dict[int, list[optuna.trial.FrozenTrial]] = {}
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            running.setdefault(trial.user_attrs.get("pid"), []).append(trial)
        return running

    errors: dict[str, str] = {}  # why a slot's worker could not start
    strikes: dict[str, int] = {}  # deaths in a row of a slot's workers before any trial
    timed_out: set[int] = set()

    def handle(event: tuple) -> None:
        if event[0] == "error":
            errors[event[1]] = event[2]
        on_event(event)

    def drain(seconds: float) -> None:
        try:
            deadline = time.monotonic() + seconds  # a chatty queue must not starve the checks below
            while time.monotonic() < deadline:
                handle(events.get(timeout=0.2))
        except queue.Empty:
            pass

    for slot in slots:
        start(slot)
    by_label = {s.label: s for s in slots}
    try:
        while workers:
            drain(1.0)
            on_poll()
            if timeout is not None and time.monotonic() - started > timeout:
                budget.cancel()  # workers finish their current trial and stop
            running = running_by_pid() if trial_timeout is not None else None
            for label, process in list(workers.items()):
                if trial_timeout is not None and process.is_alive():
                    for trial in running.get(process.pid, []):
                        began = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
                        if time.time() - began > trial_timeout:
                            process.kill()
                            process.join(10)
                            timed_out.add(process.pid)
                            fail_trial(study, trial, f"exceeded --trial-timeout of {trial_timeout:g}s on {label}; its worker was replaced",
                                       db=db)
                if process.is_alive():
                    continue
                process.join()
                del workers[label]
                budget.release_for(process.pid)
                if process.exitcode == 0:
                    continue
                orphaned = running_by_pid().get(process.pid, [])
                for trial in orphaned:
                    fail_trial(
                        study, trial,
                        f"its worker process on {label} {_exit_reason(process.exitcode)} during the trial "
                        "(crash, out of memory or a kill); the search went on with a fresh worker", db=db,
                    )
                # A worker that cannot even build its objective, or keeps dying before any trial,
                # would do so again: give its slot up rather than restart it forever.
                if process.exitcode == 3:
                    strikes[label] = MAX_STRIKES
                elif orphaned or process.pid in timed_out or _ran_a_trial(study, process.pid):
                    strikes[label] = 0
                else:
                    strikes[label] = strikes.get(label, 0) + 1
                if strikes[label] >= MAX_STRIKES:
                    drain(0.5)  # its last words may still be in the queue
                    reason = errors.get(label) or f"{_exit_reason(process.exitcode)} before running a trial"
                    if workers:
                        say(f"worker {label} could not start ({reason}); going on without it")
                        continue
                    if budget.remaining(study) > 0:
                        raise SearchError(f"worker {label} could not start: {reason}")
                    continue
                if budget.remaining(study) > 0:
                    say(f"worker {label} {_exit_reason(process.exitcode)}; starting a fresh one")
                    start(by_label[label])
    except KeyboardInterrupt:
        budget.cancel()
        for process in workers.values():
            process.terminate()
        for process in workers.values():
            process.join(10)
        running = running_by_pid()
        for process in workers.values():
            for trial in running.get(process.pid, []):
                fail_trial(study, trial, "interrupted (Ctrl-C) while running; run the search again to resume", db=db)
        raise
    finally:
        for process in workers.values():
            if process.is_alive():
                process.kill()
        events.close()


def _ran_a_trial(study: optuna.Study, pid: int) -> bool:
    return any(t.user_attrs.get("pid") == pid for t in study.get_trials(deepcopy=False))


@contextmanager
def _sigint_ignored():
    """Start a worker with SIGINT ignored: a spawned Python then never installs its Ctrl-C
    handler, so a Ctrl-C while it is still importing cannot kill it with a traceback (the
    parent stops its workers itself)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
