"""Trials on worker processes, and nothing lost under faults: many workers on one SQLite file,
a worker or the whole search killed, Ctrl-C, --trial-timeout, failing trials, and
`autometa worker` joining a search. Searches that must be killed run in subprocesses (their own
session, so a test can signal the search's whole process group); the rest run in this process
and spawn their workers as users' searches do. Data and models are tiny: the trials' cost is
the processes, not the learning."""

from __future__ import annotations

import inspect
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from helpers import CLI, ENV, FINISHED, default_sigint, write_blobs_csv
from optuna.trial import TrialState

import autometa
from autometa.cli.main import cli
from autometa.errors import SearchError
from autometa.store import storage as stores
from autometa.store.schema import process_alive as _alive
from autometa.store.storage import open_storage, storage_for
from autometa.study import budget, devices, pool
from autometa.study.objective import SearchSpec, build_runner

# One cheap configuration: 100 trials of it take seconds, and protonet ▶ linear has nothing to
# sample that could fail, so a FAIL below is the fault a test caused.
CHEAP = {"meta_algorithm": ["protonet"], "fusion": ["concat"], "encoder.tabular": ["linear"]}
SMALL = dict(validation_tasks=2, test_tasks=2, top_k=1, output=None, progress=False)
# About 1.5-3 s a trial here (0.6 ms a step): long enough to be caught running, reported every
# 200 steps so that a worker whose search died notices it within a fraction of a second.
SLOW = dict(steps=2400, eval_every=200)
SEARCH = "import json, sys, autometa; autometa.search(**json.loads(sys.argv[1]))"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_blobs_csv(tmp_path_factory.mktemp("data") / "tiny.csv")


class Reader:
    """Polls a study through a read-only connection while a search writes it."""

    def __init__(self, db: str, study: str):
        self.db, self.study, self._storage = db, study, None

    def _study(self) -> optuna.Study | None:
        try:
            if self._storage is None:
                self._storage = open_storage(self.db)
            return optuna.load_study(study_name=self.study, storage=self._storage)
        except Exception:  # the file, its tables or the study do not exist yet
            return None

    def trials(self) -> list[optuna.trial.FrozenTrial]:
        study = self._study()
        return study.get_trials() if study else []

    def study_attrs(self) -> dict:
        study = self._study()
        return dict(study.user_attrs) if study else {}


def final(db: str, study: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=study, storage=db).get_trials()


def states(trials) -> Counter:
    return Counter(t.state.name for t in trials)


def is_running(pid: int) -> bool:
    """Alive and not a zombie (PID 1 here does not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def workers_of(pid: int) -> list[int]:
    """The spawned worker processes of process ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in command:
            found.append(int(entry.name))
    return found


@pytest.fixture
def launch(tmp_path):
    """Start a command in its own session with its output in a log; killed (with its workers)
    at the end of the test whatever happened."""
    started: list[subprocess.Popen] = []

    def start(args: list[str], name: str) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=ENV,
                                    preexec_fn=default_sigint, cwd=tmp_path)
        proc.log = log
        started.append(proc)
        return proc

    yield start
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def output(proc) -> str:
    return proc.log.read_text()


def wait_for(predicate, what: str, proc=None, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) before {what}:\n{output(proc)[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}" + (f":\n{output(proc)[-3000:]}" if proc else ""))


def finish(proc, timeout: float = 180) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout}s:\n{output(proc)[-3000:]}")


def running_mid_trial(reader: Reader, finished_at_least: int = 0):
    """A RUNNING trial in its first half (its worker is inside the trial and stays there for a
    while yet), once at least ``finished_at_least`` trials have finished."""
    trials = reader.trials()
    if sum(t.state in FINISHED for t in trials) < finished_at_least:
        return None
    for t in trials:
        if (t.state == TrialState.RUNNING and "pid" in t.user_attrs and t.intermediate_values
                and max(t.intermediate_values) <= SLOW["steps"] // 2):
            return t
    return None


def search_args(data: Path, db: str, study: str, trials: int, **extra) -> list[str]:
    kwargs = dict(data=str(data), label="y", trials=trials, db=db, study=study, devices="cpu", include=CHEAP,
                  **SMALL, **extra)
    return [sys.executable, "-c", SEARCH, json.dumps(kwargs)]


# ------------------------------------------------------------------------------ the storage
def _pop_enqueued(db: str, name: str, n: int) -> None:
    study = optuna.load_study(study_name=name, storage=storage_for(db))
    study.optimize(lambda trial: time.sleep(0.005) or trial.suggest_int("x", 0, 1000), n_trials=n)


def test_enqueued_trials_are_claimed_once_across_processes(tmp_path):
    """SQLite ignores SELECT ... FOR UPDATE: without an atomic claim two processes pop the same
    waiting trial and the second one's result crashes its process."""
    db = f"sqlite:///{tmp_path}/q.db"
    study = optuna.create_study(study_name="q", storage=storage_for(db), direction="maximize")
    for x in range(40):
        study.enqueue_trial({"x": x})
    study._storage._backend.engine.dispose()  # noqa: SLF001 - no pooled connection crosses the fork
    context = mp.get_context("fork")  # plain Optuna work: no need to pay for spawning
    processes = [context.Process(target=_pop_enqueued, args=(db, "q", 10)) for _ in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    assert [p.exitcode for p in processes] == [0, 0, 0, 0]
    trials = final(db, "q")
    assert states(trials) == {"COMPLETE": 40}
    assert sorted(t.params["x"] for t in trials) == list(range(40))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_without_heartbeat_is_failed_with_its_reason_and_requeued(tmp_path):
    """What another host's workers do to the trial of a machine that vanished (Optuna checks
    heartbeats before each trial); the grace period is shortened from a minute to a second."""
    db = f"sqlite:///{tmp_path}/h.db"
    storage_for(db)  # the schema and WAL, as a search would leave them
    storage = stores._Storage(db, heartbeat_interval=1, grace_period=1, **{_stale_callback(): stores._requeue_stale})
    study = optuna.create_study(study_name="lost", storage=storage, direction="maximize")
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    storage.record_heartbeat(trial._trial_id)  # noqa: SLF001
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(study)
    lost, retry = study.get_trials()
    assert lost.state == TrialState.FAIL
    assert lost.user_attrs["fail_reason"] == "no heartbeat from its worker for over 1s (host or worker lost); re-queued"
    assert retry.state == TrialState.WAITING
    assert retry.user_attrs["retry_of"] == lost.number
    assert retry.system_attrs["fixed_params"] == lost.params


def test_a_failed_and_requeued_trial_gives_its_budget_slot_to_its_retry(tmp_path):
    study = optuna.create_study(study_name="b", storage=f"sqlite:///{tmp_path}/b.db", direction="maximize")
    for value in (0.5, 0.6):
        study.enqueue_trial({"x": value})
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1))
    lost = study.ask()
    lost.suggest_float("x", 0, 1)
    running = study.ask()
    running.suggest_float("x", 0, 1)
    assert budget.budget_used(study) == 4
    assert budget.budget_used(study, running=False) == 2
    pool.fail_trial(study, study.get_trials()[2], "worker lost", requeue=True)
    # The failed trial no longer counts; its retry (waiting) does once it runs.
    assert budget.budget_used(study) == 3
    assert budget.budget_used(study, running=False) == 2
    retry = study.ask()
    assert retry.number == 4 and study.get_trials()[4].user_attrs["retry_of"] == 2
    study.tell(retry, retry.suggest_float("x", 0, 1))
    assert budget.budget_used(study, running=False) == 3
    # A failure that was not re-queued (a crash in the trial) uses its slot.
    pool.fail_trial(study, study.get_trials()[3], "raised", requeue=False)
    assert budget.budget_used(study, running=False) == 4


def _stale_callback() -> str:
    accepted = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    return "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in accepted else "failed_trial_callback"


def test_a_zombie_worker_counts_as_gone():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped: a zombie
    try:
        assert not _alive(child.pid)
        assert _alive(os.getpid())
    finally:
        child.wait()


def test_trial_lines_name_the_host_of_a_worker_on_another_machine():
    here = platform.node()
    assert devices.worker_label({"worker": "cpu#0", "host": here}) == "cpu#0"
    assert devices.worker_label({"worker": "cuda:1#0", "host": "gpu-box-7"}) == "cuda:1#0@gpu-box-7"
    assert devices.worker_label({"worker": "cpu#1"}) == "cpu#1"  # stored before hosts were recorded
    assert devices.worker_label({}) == "?"


# -------------------------------------------------------------------------- many workers
@pytest.mark.slow
def test_four_workers_share_one_sqlite_file(data, tmp_path):
    db = f"sqlite:///{tmp_path}/w.db"
    result = autometa.search(
        data, "y", trials=100, db=db, study="four", devices="cpu", trials_per_device=4, steps=5, eval_every=5, patience=0,
        include=CHEAP, echo=lambda message: None, **SMALL,
    )
    assert result.new_trials == 100
    trials = final(db, "four")
    assert len(trials) == 100
    assert all(t.state in FINISHED for t in trials), states(trials)
    reasons = [t.user_attrs.get("fail_reason") for t in trials if t.state == TrialState.FAIL]
    assert not [r for r in reasons if "database is locked" in str(r)]
    assert states(trials)["FAIL"] == 0, reasons
    assert sorted(t.number for t in trials) == list(range(100))
    assert {t.user_attrs["worker"] for t in trials} == {"cpu#0", "cpu#1", "cpu#2", "cpu#3"}
    assert len({t.user_attrs["pid"] for t in trials}) == 4  # no worker had to be replaced
    assert result.leaderboard


# ------------------------------------------------------------------------------- faults
@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is TerminateProcess on Windows: nothing to hold")
def test_a_worker_holds_sigterm_until_its_new_trial_names_it():
    """A worker stopped between creating its trial and naming itself in it left a trial "running"
    that no search could attribute (CI caught it twice): SIGTERM waits until the trial names its
    worker, also once torch has started its threads (the first fix masked SIGTERM in the main
    thread only, and one of torch's threads took it), and then kills as SIGTERM does."""
    source = inspect.getsource(pool.worker_main)
    assert source.index("_SIGTERM.install()") < source.index("job.build(")
    assert source.index("_SIGTERM.hold()") < source.index("study.optimize(run")
    assert source.index('set_user_attr("search_pid"') < source.index("_SIGTERM.release()")
    held = ("import os, signal, threading, torch\nfrom autometa.study.pool import _SIGTERM\n"
            "torch.set_num_threads(2)\nx = torch.randn(400, 400)\nfor _ in range(20): x @ x\n"
            "tasks = f'/proc/{os.getpid()}/task'\nthreads = len(os.listdir(tasks)) if os.path.isdir(tasks) else 2\n"
            "_SIGTERM.install()\n_SIGTERM.hold()\nos.kill(os.getpid(), signal.SIGTERM)\n"
            "for _ in range(20): x @ x\nprint('held', threads, flush=True)\n_SIGTERM.release()\nprint('not reached')")
    done = subprocess.run([sys.executable, "-c", held], capture_output=True, text=True, timeout=120, env=ENV)
    assert done.stdout.startswith("held") and done.returncode == -signal.SIGTERM, (done.stdout, done.stderr)
    assert int(done.stdout.split()[1]) > 1  # torch's threads were there to take the signal (Linux counts them)


@pytest.mark.slow
def test_sigkill_of_a_worker_fails_only_its_trial(data, tmp_path, launch):
    db = f"sqlite:///{tmp_path}/k.db"
    proc = launch(search_args(data, db, "kill-worker", 3, trials_per_device=2, **SLOW), "search")
    reader = Reader(db, "kill-worker")
    victim = wait_for(lambda: running_mid_trial(reader), "a trial running in a worker", proc)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)

    assert finish(proc) == 0, output(proc)
    trials = final(db, "kill-worker")
    assert len(trials) == 3 and all(t.state in FINISHED for t in trials), states(trials)
    killed = trials[victim.number]
    assert killed.state == TrialState.FAIL
    assert "killed by SIGKILL" in killed.user_attrs["fail_reason"]
    assert "fresh worker" in killed.user_attrs["fail_reason"]
    others = [t for t in trials if t.number != victim.number]
    assert all(t.state != TrialState.FAIL for t in others), [t.user_attrs.get("fail_reason") for t in others]
    assert "killed by SIGKILL; starting a fresh one" in output(proc)


@pytest.mark.slow
def test_killed_search_is_resumed_and_its_orphans_requeued(data, tmp_path, launch):
    db = f"sqlite:///{tmp_path}/p.db"
    proc = launch(search_args(data, db, "kill-search", 6, trials_per_device=2, **SLOW), "search")
    reader = Reader(db, "kill-search")
    wait_for(lambda: running_mid_trial(reader, finished_at_least=1), "a finished and a running trial", proc)
    pids = workers_of(proc.pid)
    assert pids
    proc.kill()
    proc.wait()
    # Nothing stops them but their own check that the search is gone.
    wait_for(lambda: not any(map(is_running, pids)), "the orphaned workers to exit", timeout=30)

    before = reader.trials()
    finished = {t.number: (t.state, t.value) for t in before if t.state in FINISHED}
    orphans = [t.number for t in before if t.state == TrialState.RUNNING]
    assert finished and orphans, states(before)
    # A failed orphan's retry takes its budget slot: with two workers at most 2 finished + 2
    # orphans, so a budget of 6 runs every retry and 6 trials that count.
    assert len(finished) + len(orphans) <= 6, states(before)

    messages: list[str] = []
    result = autometa.search(data, "y", trials=6, db=db, study="kill-search", devices="cpu", trials_per_device=2,
                             include=CHEAP, echo=messages.append, **SMALL, **SLOW)
    assert any(f"{len(orphans)} trial(s) left running by a stopped worker were marked failed and queued again" in m
               for m in messages), messages
    assert any("resumed" in m for m in messages), messages
    trials = final(db, "kill-search")
    assert all(t.state in FINISHED for t in trials), states(trials)
    assert len(trials) == 6 + len(orphans)
    for number, kept in finished.items():
        assert (trials[number].state, trials[number].value) == kept
    for number in orphans:
        assert trials[number].state == TrialState.FAIL
        assert "stopped while the trial ran; re-queued" in trials[number].user_attrs["fail_reason"]
    retried = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    assert set(retried) == set(orphans)
    assert all(retried[n].params == trials[n].params for n in orphans)
    assert result.leaderboard


def _orphan(study: optuna.Study, *, pid: int, search_pid: int | None, sample: bool) -> int:
    """A RUNNING trial as a killed search leaves it: its worker's pid (and search's), and its
    parameters when the worker had sampled them already."""
    trial = study.ask()
    if sample:
        for name, values in CHEAP.items():
            trial.suggest_categorical(name, values)
    trial.set_user_attr("pid", pid)
    trial.set_user_attr("host", platform.node())
    if search_pid is not None:
        trial.set_user_attr("search_pid", search_pid)
    return trial.number


def test_a_resumed_search_finishes_exactly_its_budget_whatever_its_orphans_were_doing(data, tmp_path):
    """The budget survives a kill exactly: an orphan that had not sampled its parameters has
    nothing to re-queue, and a worker still alive whose search is gone will never finish its
    trial; neither may cost a slot."""
    db = f"sqlite:///{tmp_path}/o.db"
    fast = dict(devices="cpu", isolate=False, steps=5, eval_every=5, include=CHEAP, **SMALL)
    autometa.search(data, "y", trials=3, db=db, study="orphans", echo=lambda m: None, **fast)
    study = optuna.load_study(study_name="orphans", storage=db)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    # Alive, but not a child of the search it names (that one is gone): a worker about to stop.
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        unsampled = _orphan(study, pid=gone.pid, search_pid=None, sample=False)
        abandoned = _orphan(study, pid=stray.pid, search_pid=gone.pid, sample=True)
        mine = _orphan(study, pid=os.getpid(), search_pid=os.getppid(), sample=True)  # a live worker of a live search
        assert budget.budget_used(study, running=False) == 3

        messages: list[str] = []
        autometa.search(data, "y", trials=6, db=db, study="orphans", echo=messages.append, **fast)
    finally:
        stray.kill()
        stray.wait()
    assert any("2 trial(s) left running by a stopped worker were marked failed and queued again" in m for m in messages)
    trials = final(db, "orphans")
    counted = [t for t in trials if t.number not in (unsampled, abandoned, mine)]
    assert len(counted) == 6 and states(counted)["COMPLETE"] + states(counted)["PRUNED"] == 6, states(trials)
    assert budget.budget_used(optuna.load_study(study_name="orphans", storage=db), running=False) == 6
    assert [trials[n].state for n in (unsampled, abandoned, mine)] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING]
    assert [t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs] == [abandoned]


@pytest.mark.slow
def test_budget_is_exact_after_a_sigkill_and_an_immediate_resume(data, tmp_path, launch):
    db = f"sqlite:///{tmp_path}/e.db"
    quick = dict(steps=1200, eval_every=200)  # half of SLOW: the orphans need not be caught mid-trial
    proc = launch(search_args(data, db, "exact", 8, trials_per_device=2, **quick), "search")
    reader = Reader(db, "exact")
    wait_for(lambda: sum(t.state in FINISHED for t in reader.trials()) >= 6, "six finished trials", proc)
    pids = workers_of(proc.pid)
    proc.kill()  # SIGKILL; its workers notice only at their next validation
    proc.wait()
    assert any(map(is_running, pids))
    # Resumed at once, while the old workers still run (in this process: the recovery is the same).
    autometa.search(data, "y", trials=8, db=db, study="exact", devices="cpu", isolate=False, include=CHEAP,
                    echo=lambda m: None, **SMALL, **quick)
    trials = final(db, "exact")
    assert all(t.state in FINISHED for t in trials), states(trials)
    kept = [t for t in trials if not t.user_attrs.get("requeued")]
    assert len(kept) == 8 and states(kept)["COMPLETE"] + states(kept)["PRUNED"] == 8, states(trials)
    assert budget.budget_used(optuna.load_study(study_name="exact", storage=db), running=False) == 8


@pytest.mark.slow
def test_ctrl_c_exits_130_and_the_search_resumes(data, tmp_path, launch):
    db = f"sqlite:///{tmp_path}/c.db"
    args = [*CLI, "search", str(data), "--label", "y", "--trials", "4", "--db", db, "--study", "ctrl-c",
            "--devices", "cpu", "--trials-per-device", "2", "--steps", str(SLOW["steps"]),
            "--eval-every", str(SLOW["eval_every"]), "--validation-tasks", "2", "--test-tasks", "2", "--top-k", "1",
            "--meta-algorithm", "protonet", "--fusion", "concat", "--encoder", "tabular=linear",
            "--output", str(tmp_path / "out"), "--no-progress"]
    proc = launch(args, "search")
    reader = Reader(db, "ctrl-c")
    wait_for(lambda: running_mid_trial(reader, finished_at_least=1), "a finished and a running trial", proc)
    before = {t.number: (t.state, t.value) for t in reader.trials() if t.state in FINISHED}
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group

    assert finish(proc, 60) == 130, output(proc)
    assert "interrupted" in output(proc)
    assert "Traceback" not in output(proc)
    trials = final(db, "ctrl-c")
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for number, kept in before.items():
        assert (trials[number].state, trials[number].value) == kept
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert interrupted
    assert all(t.user_attrs["fail_reason"].startswith("interrupted (Ctrl-C)") for t in interrupted)

    # Resuming is the same code with or without worker processes; in this process it skips
    # their start-up.
    messages: list[str] = []
    autometa.search(data, "y", trials=4, db=db, study="ctrl-c", devices="cpu", isolate=False, include=CHEAP,
                    echo=messages.append, **SMALL, **SLOW)
    # Counted after the interrupt: a trial may finish between the snapshot above and the signal.
    done = [t for t in trials if t.state in FINISHED]
    assert any(f"resumed: {len(done)} trial(s) already finished" in m for m in messages), messages
    trials = final(db, "ctrl-c")
    assert len(trials) == 4 and all(t.state in FINISHED for t in trials), states(trials)


@pytest.mark.slow
def test_sigterm_stops_the_search_as_ctrl_c_does_and_leaves_no_temporary_files(data, tmp_path, launch, monkeypatch):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setitem(ENV, "TMPDIR", str(temporary))  # where the search maps its shared inputs
    db = f"sqlite:///{tmp_path}/t.db"
    args = [*CLI, "search", str(data), "--label", "y", "--trials", "4", "--db", db, "--study", "term",
            "--devices", "cpu", "--trials-per-device", "2", "--steps", str(SLOW["steps"]),
            "--eval-every", str(SLOW["eval_every"]), "--validation-tasks", "2", "--test-tasks", "2", "--top-k", "1",
            "--meta-algorithm", "protonet", "--fusion", "concat", "--encoder", "tabular=linear", "--no-progress"]
    proc = launch(args, "search")
    reader = Reader(db, "term")
    wait_for(lambda: running_mid_trial(reader, finished_at_least=1), "a finished and a running trial", proc)
    assert list(temporary.glob("autometa-inputs-*"))
    os.kill(proc.pid, signal.SIGTERM)  # the search's process only, as `kill PID` does

    assert finish(proc, 60) == 128 + signal.SIGTERM, output(proc)
    assert "terminated" in output(proc) and "Traceback" not in output(proc)
    trials = final(db, "term")
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert stopped and all(t.user_attrs["fail_reason"].startswith("terminated (SIGTERM)") for t in stopped)
    assert not list(temporary.glob("autometa-inputs-*"))
    assert not workers_of(proc.pid)


@pytest.mark.slow
def test_trial_timeout_fails_the_trial_and_replaces_its_worker(data, tmp_path):
    db = f"sqlite:///{tmp_path}/t.db"
    messages: list[str] = []
    started = time.monotonic()
    result = autometa.search(data, "y", trials=2, db=db, study="timeout", devices="cpu", trial_timeout=2,
                             include=CHEAP, echo=messages.append, **SMALL, steps=200_000, eval_every=1000)
    assert time.monotonic() - started < 120  # each trial would take minutes
    trials = final(db, "timeout")
    assert states(trials) == {"FAIL": 2}
    for t in trials:
        assert "exceeded --trial-timeout of 2s on cpu#0" in t.user_attrs["fail_reason"]
    assert trials[0].user_attrs["pid"] != trials[1].user_attrs["pid"]  # the second ran in a fresh worker
    assert any("worker cpu#0 killed by SIGKILL; starting a fresh one" in m for m in messages), messages
    assert result.leaderboard == []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*out of the range:UserWarning")
def test_diverging_and_raising_trials_are_recorded_with_their_reason(data, tmp_path):
    db = f"sqlite:///{tmp_path}/n.db"
    study = optuna.create_study(study_name="nan", storage=db, direction="maximize")
    # Out of the search space on purpose (Optuna warns and uses them): a learning rate that
    # makes the loss overflow, and a dropout probability torch refuses.
    study.enqueue_trial({"meta_algorithm": "finetune", "meta.finetune.lr": 1e30, "encoder.tabular": "mlp"})
    study.enqueue_trial({"meta_algorithm": "protonet", "encoder.tabular": "mlp", "encoder.tabular.mlp.layers": 2,
                         "encoder.tabular.mlp.dropout": 2.0})
    result = autometa.search(
        data, "y", trials=3, db=db, study="nan", devices="cpu", steps=5, eval_every=5, echo=lambda m: None,
        include={"meta_algorithm": ["finetune", "protonet"], "fusion": ["concat"], "encoder.tabular": ["mlp"]},
        **SMALL,
    )
    trials = final(db, "nan")
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "COMPLETE"]
    diverged, raised, ok = trials
    assert diverged.user_attrs["fail_reason"].startswith("training loss became")
    assert "learning rates are likely too high" in diverged.user_attrs["fail_reason"]
    assert "dropout" in raised.user_attrs["fail_reason"] and "mlp" in raised.user_attrs["fail_reason"]
    assert [e.trial for e in result.leaderboard] == [ok.number]


# ------------------------------------------------------------------------- joining workers
@pytest.fixture(scope="module")
def finished_study(data, tmp_path_factory) -> tuple[str, str]:
    """A one-trial study run in this process: its budget is used up."""
    db = f"sqlite:///{tmp_path_factory.mktemp('finished')}/f.db"
    autometa.search(data, "y", trials=1, db=db, study="done", isolate=False, steps=5, eval_every=5, include=CHEAP,
                    echo=lambda m: None, **SMALL)
    return db, "done"


def test_worker_checks_its_data_and_budget_before_starting_workers(finished_study, tmp_path):
    db, name = finished_study
    runner = CliRunner()
    done = runner.invoke(cli, ["worker", "--db", db, "--study", name, "--devices", "cpu"])
    assert done.exit_code == 0, done.output
    assert "0 trial(s) of the budget of 1 left" in done.stderr
    assert "budget reached (1 trials finished)" in done.stdout

    other = write_blobs_csv(tmp_path / "other.csv", per_class=21)
    wrong = runner.invoke(cli, ["worker", "--db", db, "--study", name, "--data", str(other)])
    assert wrong.exit_code == 1
    assert f"{other} is not the data study 'done' was searched on" in wrong.stderr

    missing = runner.invoke(cli, ["worker", "--db", db, "--study", name, "--data", str(tmp_path / "gone.csv")])
    assert missing.exit_code == 1 and "gone.csv" in missing.stderr and "Traceback" not in missing.output


def test_a_worker_does_not_join_a_search_that_stopped_early_until_it_runs_again(data, tmp_path):
    db = f"sqlite:///{tmp_path}/s.db"
    common = dict(db=db, study="patient", isolate=False, steps=5, eval_every=5, include=CHEAP, echo=lambda m: None, **SMALL)
    result = autometa.search(data, "y", trials=20, patience=1, **common)
    finished = len(result.study.get_trials())
    assert finished < 20 and result.study.user_attrs["stopped"] == "its --patience (1 completed trials without a better one)"
    joined = CliRunner().invoke(cli, ["worker", "--db", db, "--study", "patient", "--devices", "cpu"])
    assert joined.exit_code == 0, joined.output
    assert (f"study 'patient': the search stopped starting trials at its --patience (1 completed trials without a "
            f"better one) ({finished} trials finished)") in joined.stdout
    assert len(optuna.load_study(study_name="patient", storage=storage_for(db)).get_trials()) == finished
    # Run again without patience: it resumes, and workers may join it again.
    resumed = autometa.search(data, "y", trials=finished + 1, patience=0, **common)
    assert len(resumed.study.get_trials()) == finished + 1 and resumed.study.user_attrs["stopped"] is None


@pytest.mark.slow
def test_a_worker_that_cannot_start_is_given_up_with_its_reason(finished_study, tmp_path):
    db, name = finished_study
    study = optuna.load_study(study_name=name, storage=storage_for(db))
    spec = SearchSpec.from_json(study.user_attrs["spec"])
    spec.data = str(tmp_path / "gone.csv")  # as if the file vanished after the search began
    messages: list[str] = []
    with pytest.raises(SearchError, match=r"worker cpu#0 could not start: .*gone\.csv"):
        pool.run_pool(
            study, db, [devices.Slot("cpu", 0)], 2, build_runner, (spec, None, None, None, 1),
            timeout=None, trial_timeout=None, on_event=lambda event: None, on_poll=lambda: None, say=messages.append,
        )
    assert not [m for m in messages if "starting a fresh one" in m]


@pytest.mark.slow
def test_autometa_worker_joins_a_search_on_sqlite(data, tmp_path, launch):
    db = f"sqlite:///{tmp_path}/j.db"
    budget = 8
    search = launch(
        [*CLI, "search", str(data), "--label", "y", "--trials", str(budget), "--db", db, "--study", "joined",
         "--devices", "cpu", "--steps", "3000", "--eval-every", "500", "--validation-tasks", "2", "--test-tasks", "2",
         "--top-k", "1", "--meta-algorithm", "protonet", "--fusion", "concat", "--encoder", "tabular=linear",
         "--output", str(tmp_path / "out"), "--no-progress"],
        "search",
    )
    reader = Reader(db, "joined")
    wait_for(lambda: "spec" in reader.study_attrs(), "the study to be created", search)
    joiners = [launch([*CLI, "worker", "--db", db, "--study", "joined", "--devices", "cpu"], f"worker{i}") for i in range(2)]

    assert finish(search) == 0, output(search)
    for joiner in joiners:
        assert finish(joiner) == 0, output(joiner)
        assert "budget reached" in output(joiner)
    trials = final(db, "joined")
    assert all(t.state in FINISHED for t in trials), states(trials)
    # Every host counts the study's trials in the database; two claiming the last one at once
    # may run one extra, so at most one more per joined host.
    assert budget <= len(trials) <= budget + len(joiners), states(trials)
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert states(trials)["FAIL"] == 0, [t.user_attrs.get("fail_reason") for t in trials]
    assert len({t.user_attrs["pid"] for t in trials}) >= 2, "the joined workers ran no trial"
