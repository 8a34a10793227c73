"""A distributed search on a real PostgreSQL server: `autometa search` starts the study, is
stopped after a few trials, and three `autometa worker` processes finish its budget.

The server is Debian's (package ``postgresql``; .ci/run installs it), started here in a
temporary folder on a free port of 127.0.0.1 and stopped afterwards; the test is skipped only
where its binaries are not installed."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from helpers import CLI, ENV, FINISHED, default_sigint, open_storages_together, write_blobs_csv
from optuna.trial import TrialState


def _postgres_bin() -> Path | None:
    """Debian keeps the server's programs out of PATH, one folder per major version."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb and shutil.which("pg_ctl", path=str(Path(initdb).resolve().parent)) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user(user: str | None, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """PostgreSQL refuses to run as root: run its programs as ``user`` when we are root."""
    command = ["runuser", "-u", user, "--", *args] if user else args
    # A folder the server user can enter: it may not read the caller's working directory.
    return subprocess.run(command, check=True, capture_output=True, text=True, cwd="/", **kwargs)


@pytest.fixture(scope="session")
def postgres_url():
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:  # the Debian package creates it; a hand-made install may not have
            subprocess.run(["useradd", "--system", "--no-create-home", user], check=True)
    # Not pytest's tmp_path: its parents are private to root, and the server runs as `user`.
    folder = Path(tempfile.mkdtemp(prefix="autometa-pg-"))
    if user:
        shutil.chown(folder, user)
    data, port = folder / "data", _free_port()
    _as_server_user(user, [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                           "--no-sync"])
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder} -c fsync=off"
    try:
        _as_server_user(user, [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-o", options,
                               "-w", "-t", "60", "start"])
    except subprocess.CalledProcessError as exc:
        log = (folder / "server.log").read_text() if (folder / "server.log").exists() else ""
        pytest.fail(f"PostgreSQL did not start: {exc.stderr}\n{log}")
    try:
        subprocess.run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "autometa"],
                       check=True, capture_output=True, text=True)
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/autometa"
    finally:
        _as_server_user(user, [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(folder, ignore_errors=True)


def _new_database(postgres_url: str, name: str) -> str:
    """The URL of an empty database ``name`` on the test server (dropped first if there)."""
    import sqlalchemy

    server = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with server.connect() as connection:
        connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    server.dispose()
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"


def _launch(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=ENV,
                                preexec_fn=default_sigint, cwd=log.parent)
    proc.log = log
    return proc


def _finished(db: str, study: str) -> int:
    try:
        trials = optuna.load_study(study_name=study, storage=db).get_trials(deepcopy=False)
    except Exception:  # not created yet
        return 0
    return sum(t.state in FINISHED for t in trials)


@pytest.mark.slow
def test_workers_on_three_processes_finish_a_search_on_postgresql(postgres_url, tmp_path):
    data = write_blobs_csv(tmp_path / "tiny.csv")
    budget, study = 9, "pg-search"
    search = _launch(
        [*CLI, "search", str(data), "--label", "y", "--trials", str(budget), "--db", postgres_url, "--study", study,
         "--devices", "cpu", "--steps", "1500", "--eval-every", "300", "--validation-tasks", "2", "--test-tasks", "2",
         "--top-k", "1", "--meta-algorithm", "protonet", "--fusion", "concat", "--encoder", "tabular=linear",
         "--output", str(tmp_path / "out"), "--no-progress"],
        tmp_path / "search.log",
    )
    procs = [search]
    try:
        deadline = time.monotonic() + 120
        while _finished(postgres_url, study) < 2:
            assert search.poll() is None, search.log.read_text()
            assert time.monotonic() < deadline, search.log.read_text()
            time.sleep(0.3)
        os.killpg(search.pid, signal.SIGINT)  # this machine leaves; the budget is not reached yet
        assert search.wait(60) == 130, search.log.read_text()
        stopped = optuna.load_study(study_name=study, storage=postgres_url).get_trials()
        assert 2 <= sum(t.state in FINISHED for t in stopped) < budget
        assert not [t for t in stopped if t.state == TrialState.RUNNING]

        workers = [
            _launch([*CLI, "worker", "--db", postgres_url, "--study", study, "--devices", "cpu"], tmp_path / f"worker{i}.log")
            for i in range(3)
        ]
        procs += workers
        for worker in workers:
            assert worker.wait(180) == 0, worker.log.read_text()
            assert "budget reached" in worker.log.read_text()
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    trials = optuna.load_study(study_name=study, storage=postgres_url).get_trials()
    assert all(t.state in FINISHED for t in trials), [t.state.name for t in trials]
    # Each host counts the study's trials in the database; two claiming the last one at once may
    # run one extra, so at most one more per host beyond the first.
    assert budget <= len(trials) <= budget + 2
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert {t.number for t in stopped} <= {t.number for t in trials}
    joined = {t.user_attrs["pid"] for t in trials if t.number not in {s.number for s in stopped}}
    assert len(joined) >= 2, "the joined workers did not share the remaining trials"
    failures = [t.user_attrs.get("fail_reason", "") for t in trials if t.state == TrialState.FAIL]
    assert all(reason.startswith("interrupted (Ctrl-C)") for reason in failures), failures

    listing = subprocess.run([*CLI, "db", "studies", "--db", postgres_url, "--format", "json"], capture_output=True,
                             text=True, env=ENV, timeout=120)
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert [(row["study"], row["trials"]) for row in rows] == [(study, len(trials))]


def test_autometa_tables_on_postgresql(postgres_url, tmp_path):
    """A short search records autometa's tables on PostgreSQL; `db` queries read them and `db
    sql` runs in a READ ONLY transaction. (A database of its own: the search above lists its studies.)"""
    import sqlalchemy

    from autometa.errors import SearchError
    from autometa.store import queries, schema
    from autometa.store.storage import engine_for
    from autometa.study.engine import search

    db = _new_database(postgres_url, "autometa_tables")
    result = search(write_blobs_csv(tmp_path / "tiny.csv"), "y", trials=2, db=db, isolate=False, output=None, steps=20,
                    eval_every=10, progress=False, echo=lambda message: None, warm_start=False,
                    include={"meta_algorithm": ["protonet"], "fusion": ["concat"], "encoder.tabular": ["linear"]})
    name = result.study.study_name

    engine = engine_for(db)
    with engine.connect() as connection:
        assert schema.stored_version(connection) == schema.SCHEMA_VERSION
        [run] = connection.execute(sqlalchemy.select(schema.searches)).all()
        facts = connection.execute(sqlalchemy.select(schema.trial_facts).order_by(schema.trial_facts.c.number)).all()
    schema.ensure(engine)  # idempotent here too
    engine.dispose()
    assert (run.study, run.status, run.budget) == (name, "finished", 2)
    assert [(f.number, f.device) for f in facts] == [(0, "cpu"), (1, "cpu")]
    assert facts[result.best.trial].test_mean == result.best.test.mean

    [dataset] = queries.datasets(db)
    assert (dataset["dataset"], dataset["rows"], dataset["trials"]) == ("tiny", 60, 2)
    rows, _ = queries.sql(db, "SELECT f.number, t.state FROM autometa_trial_facts f JOIN trials t ON t.number = f.number "
                              "ORDER BY f.number")
    assert rows == [{"number": 0, "state": "COMPLETE"}, {"number": 1, "state": "COMPLETE"}]
    for statement in ("DELETE FROM autometa_trial_facts", "WITH gone AS (DELETE FROM trials RETURNING 1) SELECT * FROM gone",
                      "SELECT set_config('transaction_read_only', 'off', true)", "SELECT 1; SELECT 2"):
        with pytest.raises(SearchError, match="read only|one statement at a time"):
            queries.sql(db, statement)
    assert len(queries.sql(db, "SELECT * FROM autometa_trial_facts")[0]) == 2


def test_db_sql_on_postgresql_is_bounded_in_value_size_output_and_time(postgres_url):
    from autometa.errors import SearchError
    from autometa.store import queries

    # The server never sends a value past the cap (about 300 MB would arrive otherwise).
    with pytest.raises(SearchError, match=r"larger than 10,000,000 bytes \(the --max-bytes cap\)"):
        queries.sql(postgres_url, "SELECT 1 AS n, repeat('x', 300000000) AS big")
    rows, cut = queries.sql(postgres_url, "SELECT 1 AS n, repeat('x', 300000) AS big", max_bytes=400_000)
    assert rows == [{"n": 1, "big": "x" * 300000}] and cut is None
    # Many rows under the cap: output stops at the cap, read from a server-side cursor.
    rows, cut = queries.sql(postgres_url, "SELECT g, repeat('y', 100000) FROM generate_series(1, 100000) g")
    assert len(rows) == 99 and "--max-bytes N for more" in cut
    rows, cut = queries.sql(postgres_url, "SELECT g AS a, g AS a FROM generate_series(1, 5) g ORDER BY g DESC", limit=3)
    assert rows == [{"a": 5, "a_2": 5}, {"a": 4, "a_2": 4}, {"a": 3, "a_2": 3}] and "--limit" in cut
    assert queries.sql(postgres_url, "SHOW server_encoding")[0] == [{"server_encoding": "UTF8"}]
    assert queries.sql(postgres_url, "SELECT '100%' AS p")[0] == [{"p": "100%"}]
    with pytest.raises(SearchError, match="ran longer than 0.5s and was stopped"):
        queries.sql(postgres_url, "SELECT pg_sleep(5)", timeout=0.5)
    with pytest.raises(SearchError, match="--timeout nan"):
        queries.sql(postgres_url, "SELECT 1", timeout=float("nan"))


def test_processes_opening_a_new_postgresql_database_together_all_succeed(postgres_url):
    assert open_storages_together(_new_database(postgres_url, "autometa_race")) == ["ok"] * 4
