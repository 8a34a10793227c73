"""Trials on a pool of devices: isolated worker processes sharing one Optuna storage.

Each worker process is pinned to one device and runs trials one after another, claiming each
from the search's budget first. The parent watches them: a worker that dies (crash, CUDA
out-of-memory abort, SIGKILL) or overruns ``--trial-timeout`` has its trial failed with the
reason and is replaced by a fresh one. Trials a dead search left RUNNING are failed with a
reason and re-queued when the study is opened again. Other machines join the same study with
``autometa worker`` (Optuna's RDB storage is the distributed engine; PostgreSQL for many hosts).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import platform
import queue
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
import torch
from optuna.trial import TrialState

from autometa.errors import SearchError, Terminated
from autometa.store import schema
from autometa.store.schema import process_alive
from autometa.store.storage import GRACE_S, REQUEUED, end_interrupted_read, storage_for
from autometa.study.budget import Budget, DatabaseBudget, budget_used, parent_alive
from autometa.study.devices import Slot, threads_per_worker

MAX_STRIKES = 3  # deaths in a row before any trial, after which a slot is given up
# Trials prune themselves at the search's --timeout (TrialLimits); a worker still in a trial this
# long after it (stuck inside one step) is killed and its trial failed.
DEADLINE_GRACE_S = 10.0


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
    if not process_alive(pid):
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
    _SIGTERM.install()
    torch.set_num_threads(job.threads)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        objective = job.build(job.slot, *job.build_args, events=events, parent_pid=job.parent_pid, db=job.db)
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
        _SIGTERM.release()  # a stop from here on leaves a trial its search can attribute and fail
        return objective(trial)

    while parent_alive(job.parent_pid) and budget.claim(study, job.parent_pid):
        # The search stops its workers with SIGTERM (Ctrl-C): held from before the trial exists until
        # it names its worker, or the trial would stay "running" with nothing to say whose it is.
        _SIGTERM.hold()
        try:
            study.optimize(run, n_trials=1, catch=(Exception,), callbacks=[schema.TrialRecorder(job.db)])
        finally:
            budget.release()
            _SIGTERM.release()
        if objective.stop_requested:
            break
    # The search waits for this process to end: skip the exit's garbage collections over every
    # object the trials left (~1.5 s with torch and scikit-learn loaded), as the command line does.
    gc.freeze()


class _HeldSigterm:
    """A worker's SIGTERM, held back while asked to (delivered on release): it still kills the
    worker as the default action would, exit status included.

    A Python handler, not the signal mask: the mask is per thread, and the threads torch starts in
    a worker's first trial would take a masked SIGTERM and die of it, leaving the next trial
    "running" unnamed (CI caught it). Python runs handlers in the main thread, whichever took it.
    """

    def __init__(self) -> None:
        self.held = self.pending = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._received)

    def hold(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False
        if self.pending:
            self._die()

    def _received(self, signum, frame) -> None:
        if self.held:
            self.pending = True
        else:
            self._die()

    @staticmethod
    def _die() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        os._exit(128 + signal.SIGTERM)  # not reached where the default action kills at once


_SIGTERM = _HeldSigterm()


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


def _stopped_by(stop: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted (Ctrl-C)"


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
    timeout: float | Callable[[], float] | None,
    trial_timeout: float | None,
    on_event: Callable[[tuple], None],
    on_poll: Callable[[], None],
    say: Callable[[str], None],
    go_on: Callable[[], bool] = lambda: True,
) -> None:
    """Run ``n_trials`` more trials of ``study`` on worker processes, one per slot, replacing dead ones.

    ``timeout``: seconds from the start after which no trial starts and running ones must end
    (or a function giving them, for a limit that moves while the trials run). Once ``go_on()``
    is False (checked after ``on_poll``), no trial starts and running ones finish.

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
            if not go_on():
                budget.cancel()
            overdue = False
            limit = timeout() if callable(timeout) else timeout
            if limit is not None and time.monotonic() - started > limit:
                budget.cancel()  # workers stop their current trial (TrialLimits) and start no other
                overdue = time.monotonic() - started > limit + DEADLINE_GRACE_S
            running = running_by_pid() if trial_timeout is not None or overdue else None
            for label, process in list(workers.items()):
                if overdue and process.is_alive() and running.get(process.pid):
                    process.kill()
                    process.join(10)
                    for trial in running[process.pid]:
                        fail_trial(study, trial, f"still running {DEADLINE_GRACE_S:g}s after the search's --timeout of "
                                   f"{limit:.0f}s on {label}; its worker was stopped", db=db)
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
    except KeyboardInterrupt as stop:
        end_interrupted_read(study)
        budget.cancel()
        for process in workers.values():
            process.terminate()
        for process in workers.values():
            process.join(10)
        running = running_by_pid()
        for process in workers.values():
            for trial in running.get(process.pid, []):
                fail_trial(study, trial, f"{_stopped_by(stop)} while running; run the search again to resume", db=db)
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
