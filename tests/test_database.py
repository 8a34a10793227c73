"""autometa's tables in the study database: the upgrade from autometa 0.1 (a real database it
wrote, ``tests/data/studies-0.1.db``), what a search records, the `autometa db` query commands,
read-only SQL, and Optuna's own readers (storage API, optuna-dashboard) on the same file.

The fixture holds two 0.1 searches of 3 trials on 60 rows (3 classes): ``tabular`` (two numeric
columns, worker processes) and ``mixed`` (plus a text column, in process), made with
``git archive b6717b5`` and ``autometa search ... --trials 3 --steps 20``.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import timezone
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from helpers import write_blobs_csv
from optuna.trial import TrialState
from sqlalchemy import select

from autometa.cli.main import cli
from autometa.data.loading import load_dataset
from autometa.data.metafeatures import describe
from autometa.errors import SearchError
from autometa.store import queries, schema
from autometa.store.storage import engine_for
from autometa.study.engine import search

FIXTURE = Path(__file__).parent / "data" / "studies-0.1.db"
TABULAR = "tabular-standard-5994a753f4"
MIXED = "mixed-standard-a98ec6de0b"
TABULAR_FINGERPRINT = "5994a753f4b7fc9ab854e267da853e5c6189cf3a4a6ff9113d29202c7ebcea43"
MIXED_FINGERPRINT = "a98ec6de0b5c48eb571e87b6d551cf6e22b467d05f9a728e260e019043149f86"
AUTOMETA_TABLES = {t.name for t in schema.metadata.sorted_tables}
FAST = dict(steps=20, eval_every=10, progress=False, echo=lambda message: None, warm_start=False,
            include={"meta_algorithm": ["protonet"], "fusion": ["concat"], "encoder.tabular": ["linear"]})


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def table_contents(path: Path) -> dict[str, list[tuple]]:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [n for (n,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {n: sorted(connection.execute(f'SELECT * FROM "{n}"').fetchall(), key=repr) for n in names}
    finally:
        connection.close()


def url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def old_db(tmp_path) -> Path:
    copy = tmp_path / "studies.db"
    shutil.copyfile(FIXTURE, copy)
    return copy


@pytest.fixture(scope="module")
def upgraded(tmp_path_factory) -> Path:
    """The fixture upgraded once; tests that only read share it."""
    copy = tmp_path_factory.mktemp("upgraded") / "studies.db"
    shutil.copyfile(FIXTURE, copy)
    schema.ensure(engine_for(url(copy)))
    return copy


# --- the upgrade from autometa 0.1 --------------------------------------------------------------


def test_fixture_is_a_small_autometa_0_1_database():
    assert FIXTURE.stat().st_size < 300_000
    contents = table_contents(FIXTURE)
    assert not AUTOMETA_TABLES & set(contents)
    assert len(contents["studies"]) == 2 and len(contents["trials"]) == 6


def test_upgrade_from_0_1_keeps_every_optuna_row_and_fills_the_tables(old_db):
    before = table_contents(old_db)
    engine = engine_for(url(old_db))
    with engine.connect() as connection:
        assert schema.stored_version(connection) == 0
    schema.ensure(engine)

    after = table_contents(old_db)
    assert {n: rows for n, rows in after.items() if n not in AUTOMETA_TABLES} == before  # every Optuna row, unchanged
    assert AUTOMETA_TABLES <= set(after)
    storage = optuna.storages.RDBStorage(url(old_db), skip_table_creation=True)
    studies = {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage) for s in storage.get_all_studies()}

    with engine.connect() as connection:
        assert schema.stored_version(connection) == schema.SCHEMA_VERSION
        stored = {d.name: d for d in schema.stored_datasets(connection)}
        rows = {r.study: r for r in connection.execute(select(schema.searches))}
        facts = {(r.study, r.number): r for r in connection.execute(select(schema.trial_facts))}
        sizes = {r.fingerprint: (r.rows, r.classes, r.label) for r in connection.execute(select(schema.datasets))}
    engine.dispose()

    assert {n: d.fingerprint for n, d in stored.items()} == {"tabular": TABULAR_FINGERPRINT, "mixed": MIXED_FINGERPRINT}
    assert stored["mixed"].columns == {"size": "tabular", "noise": "tabular", "note": "text"}
    assert stored["tabular"].source.endswith("tabular.csv")
    assert sizes[TABULAR_FINGERPRINT] == (60, 3, "y")
    assert stored["mixed"].meta_features == studies[MIXED].user_attrs["meta_features"]
    assert stored["mixed"].meta_features["text_columns"] == 1.0
    assert stored["tabular"].studies == [(TABULAR, "standard")]

    search_row = rows[TABULAR]
    assert (search_row.protocol, search_row.budget, search_row.seed, search_row.status) == ("standard", 3, 0, "finished")
    assert search_row.autometa_version == "0.1.0"
    assert json.loads(search_row.host)["python"].count(".") == 2
    plugins = json.loads(search_row.plugins)
    assert set(plugins) == {f"{k.split('.')[0]}/{n}" for k, names in studies[TABULAR].user_attrs["choices"].items()
                            for n in names}
    assert plugins["meta_algorithm/protonet"].startswith("autometa ")  # its version, from the registry
    trials = studies[TABULAR].get_trials()
    assert schema.as_utc(search_row.started_at) == min(t.datetime_start for t in trials).astimezone(timezone.utc)
    assert schema.as_utc(search_row.ended_at) == max(t.datetime_complete for t in trials).astimezone(timezone.utc)

    assert len(facts) == 6
    first = facts[(TABULAR, 0)]
    assert (first.device, first.wall_time_s, first.parameters) == ("cpu", 1.4200235419993987, 8835)
    for (study, number), fact in facts.items():
        assert fact.wall_time_s == studies[study].trials[number].user_attrs["wall_time_s"]
    # The leaderboard attribute's finalists: rank, test accuracy ± CI over 12 query rows.
    assert [(facts[(TABULAR, n)].finalist_rank, facts[(TABULAR, n)].test_mean) for n in (0, 2, 1)] == [
        (1, 0.5), (2, 0.5833333333333334), (3, 0.4166666666666667)]
    assert facts[(TABULAR, 0)].test_ci95 == pytest.approx(0.2954811176862084)
    assert facts[(TABULAR, 0)].test_units == 12
    # Version 2 keeps the interval 0.1 reported (mean ± its half-width), with its unit.
    assert (facts[(TABULAR, 0)].test_low, facts[(TABULAR, 0)].test_high) == pytest.approx((0.5 - 0.2954811176862084,
                                                                                            0.5 + 0.2954811176862084))
    assert {f.test_unit for f in facts.values() if f.test_mean is not None} == {"rows"}
    assert all(f.test_low is None for f in facts.values() if f.test_mean is None)


def test_ensure_is_idempotent(old_db):
    engine = engine_for(url(old_db))
    schema.ensure(engine)
    once = table_contents(old_db)
    schema.ensure(engine)
    engine.dispose()
    assert table_contents(old_db) == once
    assert len(once["autometa_schema"]) == 1 and len(once["autometa_searches"]) == 2


def _ensure_after(barrier, db: str) -> None:
    barrier.wait(30)
    schema.ensure(engine_for(db))


def test_processes_upgrading_at_once_do_not_fail_or_fill_twice(old_db):
    context = mp.get_context("fork")
    barrier = context.Barrier(4)
    processes = [context.Process(target=_ensure_after, args=(barrier, url(old_db))) for _ in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
    assert [p.exitcode for p in processes] == [0, 0, 0, 0]
    contents = table_contents(old_db)
    assert len(contents["autometa_searches"]) == 2 and len(contents["autometa_datasets"]) == 2
    assert len(contents["autometa_trial_facts"]) == 6 and contents["autometa_schema"][0][0] == schema.SCHEMA_VERSION


def test_a_newer_schema_is_refused_and_the_file_left_byte_identical(old_db):
    schema.ensure(engine_for(url(old_db)))
    connection = sqlite3.connect(old_db)
    connection.execute("UPDATE autometa_schema SET version = ?", (schema.SCHEMA_VERSION + 1,))
    connection.commit()
    connection.close()
    digest = sha256(old_db)
    newer, known = schema.SCHEMA_VERSION + 1, schema.SCHEMA_VERSION
    with pytest.raises(SearchError, match=rf"newer autometa \(autometa schema version {newer}, this one knows {known}\).*not changed"):
        schema.ensure(engine_for(url(old_db)))
    run = CliRunner().invoke(cli, ["db", "upgrade", "--db", url(old_db)])
    assert run.exit_code == 1 and "newer autometa" in run.output
    # Reading it works, with a warning (tests/test_hostile_inputs.py checks the read commands).
    assert [row["dataset"] for row in queries.datasets(url(old_db))]
    assert sha256(old_db) == digest


def test_db_upgrade_command(old_db, tmp_path):
    run = CliRunner().invoke(cli, ["db", "upgrade", "--db", url(old_db)])
    assert run.exit_code == 0, run.output
    assert f"version 0 → {schema.SCHEMA_VERSION}" in run.output
    assert "already current" in CliRunner().invoke(cli, ["db", "upgrade", "--db", url(old_db)]).output
    missing = tmp_path / "nothere.db"
    run = CliRunner().invoke(cli, ["db", "upgrade", "--db", url(missing)])
    assert run.exit_code == 1 and "no study database at" in run.output and "--db" in run.output
    assert not missing.exists()


def test_upgrade_from_version_1_adds_intervals_and_baselines(old_db):
    """A version-1 database (the 0.1 fixture upgraded, then put back into version 1's layout)."""
    schema.ensure(engine_for(url(old_db)))
    connection = sqlite3.connect(old_db)
    for column in ("test_low", "test_high", "test_unit"):
        connection.execute(f"ALTER TABLE autometa_trial_facts DROP COLUMN {column}")
    for table in ("autometa_baselines", "autometa_validation_predictions", "autometa_ensembles"):
        connection.execute(f"DROP TABLE {table}")
    connection.execute("UPDATE autometa_schema SET version = 1")
    connection.commit()
    connection.close()
    before = table_contents(old_db)
    run = CliRunner().invoke(cli, ["db", "upgrade", "--db", url(old_db)])
    assert run.exit_code == 0 and f"version 1 → {schema.SCHEMA_VERSION}" in run.output, run.output
    after = table_contents(old_db)
    assert {n: rows for n, rows in after.items() if n not in AUTOMETA_TABLES} == {
        n: rows for n, rows in before.items() if n not in AUTOMETA_TABLES}
    assert after["autometa_baselines"] == [] and after["autometa_schema"][0][0] == schema.SCHEMA_VERSION
    engine = engine_for(url(old_db))
    with engine.connect() as connection:
        facts = {(r.study, r.number): r for r in connection.execute(select(schema.trial_facts))}
    engine.dispose()
    first = facts[(TABULAR, 0)]
    assert (first.test_mean, first.test_units, first.test_unit) == (0.5, 12, "rows")
    assert (first.test_low, first.test_high) == pytest.approx((0.5 - 0.2954811176862084, 0.5 + 0.2954811176862084))
    assert sum(f.test_low is not None for f in facts.values()) == 6  # every finalist of both studies


def test_upgrade_from_version_2_adds_prediction_and_ensemble_tables_keeping_every_row(old_db):
    """A version-2 database (the 0.1 fixture upgraded, then put back into version 2's layout)."""
    schema.ensure(engine_for(url(old_db)))
    connection = sqlite3.connect(old_db)
    for table in ("autometa_validation_predictions", "autometa_ensembles"):
        connection.execute(f"DROP TABLE {table}")
    connection.execute("UPDATE autometa_schema SET version = 2")
    connection.commit()
    connection.close()
    before = table_contents(old_db)
    assert len(before["autometa_trial_facts"]) == 6 and before["autometa_searches"]
    run = CliRunner().invoke(cli, ["db", "upgrade", "--db", url(old_db)])
    assert run.exit_code == 0 and "version 2 → 3" in run.output, run.output
    after = table_contents(old_db)
    assert {n: rows for n, rows in after.items() if n != "autometa_schema"} == {
        **{n: rows for n, rows in before.items() if n != "autometa_schema"},
        "autometa_validation_predictions": [], "autometa_ensembles": []}
    assert after["autometa_schema"][0][0] == 3


# --- what a search records --------------------------------------------------------------------


def test_search_records_dataset_search_and_trial_facts(tmp_path):
    data = write_blobs_csv(tmp_path / "blobs.csv", shift=1.5)
    db = url(tmp_path / "s.db")
    result = search(data, "y", trials=2, db=db, seed=3, isolate=False, output=None, **FAST)
    dataset = load_dataset(data, "y")
    engine = engine_for(db)
    with engine.connect() as connection:
        [stored] = schema.stored_datasets(connection)
        [run] = connection.execute(select(schema.searches)).all()
        facts = {r.number: r for r in connection.execute(select(schema.trial_facts))}
    assert stored.fingerprint == dataset.fingerprint and stored.source == str(data.resolve())
    # Described from the training rows only: warm start seeds the search from these.
    train = result.split.row_splits["train"]
    assert stored.meta_features == pytest.approx(describe(dataset.subset(train)))
    assert stored.meta_features["rows"] == len(train) < len(dataset)
    assert result.study.user_attrs["meta_features"] == stored.meta_features
    assert (run.study, run.protocol, run.budget, run.seed, run.status) == (result.study.study_name, "standard", 2, 3, "finished")
    assert json.loads(run.host)["pid"] == os.getpid()
    assert run.started_at <= run.ended_at
    assert json.loads(run.plugins) == {"meta_algorithm/protonet": "autometa 0.1.0", "fusion/concat": "autometa 0.1.0",
                                       "encoder/linear": "autometa 0.1.0"}
    trials = result.study.get_trials()
    assert sorted(facts) == [t.number for t in trials]
    for t in trials:
        assert facts[t.number].device == "cpu"
        assert facts[t.number].wall_time_s == t.user_attrs["wall_time_s"]
        assert facts[t.number].parameters == t.user_attrs["parameters"] > 0
    for entry in result.leaderboard:
        fact = facts[entry.trial]
        assert (fact.finalist_rank, fact.test_mean, fact.test_low, fact.test_high, fact.test_units, fact.test_unit) == (
            entry.rank, entry.test.mean, entry.test.low, entry.test.high, entry.test.n, "rows")
        assert fact.test_ci95 is None  # version 1's half-width: an interval is [low, high] now
    with engine.connect() as connection:
        stored_baselines = schema.stored_baselines(connection, result.study.study_name)
    assert [(b["kind"], b["label"], b["test_mean"], b["test_low"], b["test_high"], b["test_units"], b["test_unit"])
            for b in stored_baselines] == [(b.kind, b.label, b.score.mean, b.score.low, b.score.high, b.score.n, "rows")
                                           for b in result.baselines]
    board = queries.leaderboard(db, result.study.study_name)
    assert [r["configuration"] for r in board[-2:]] == [
        "baseline: majority class of the training rows", "baseline: logistic regression on the preprocessed inputs"]
    assert board[-1]["test_mean"] == result.baselines[1].score.mean and board[-1]["rank"] is None

    # A search killed without a word (its process gone) is marked interrupted by the next one.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with engine.begin() as connection:
        connection.execute(schema.searches.insert().values(
            study=run.study, dataset_id=run.dataset_id, protocol="standard", budget=2, status="running",
            host=json.dumps({"host": platform.node(), "pid": gone.pid}), started_at=schema.now()))
    # A resumed search is a second row; the dataset is stored once.
    search(data, "y", trials=3, db=db, seed=3, isolate=False, output=None, **FAST)
    with engine.connect() as connection:
        runs = connection.execute(select(schema.searches.c.budget, schema.searches.c.status)).all()
        assert len(schema.stored_datasets(connection)) == 1
        assert len(connection.execute(select(schema.trial_facts)).all()) == 3
    engine.dispose()
    assert runs == [(2, "finished"), (2, "interrupted"), (3, "finished")]
    rows = queries.studies(db)
    assert (rows[0]["status"], rows[0]["runs"], rows[0]["trials"]) == ("finished", 3, 3)


@pytest.mark.parametrize("stop, status", [(KeyboardInterrupt, "interrupted"), (RuntimeError, "failed")])
def test_a_search_stopped_on_the_way_is_marked(tmp_path, stop, status):
    data = write_blobs_csv(tmp_path / "blobs.csv", shift=1.5)
    db = url(tmp_path / "s.db")

    def echo(message: str) -> None:
        if message.startswith("scoring the top"):  # after the trials, before the leaderboard
            raise stop("stopped here")

    with pytest.raises(stop):
        search(data, "y", trials=1, db=db, isolate=False, output=None, **{**FAST, "echo": echo})
    engine = engine_for(db)
    with engine.connect() as connection:
        [run] = connection.execute(select(schema.searches)).all()
        assert len(connection.execute(select(schema.trial_facts)).all()) == 1  # the finished trial is kept
    engine.dispose()
    assert run.status == status and run.ended_at is not None


@pytest.mark.slow  # worker processes take seconds to start
def test_pool_workers_record_trial_facts(tmp_path):
    data = write_blobs_csv(tmp_path / "blobs.csv", shift=1.5)
    db = url(tmp_path / "s.db")
    result = search(data, "y", trials=2, db=db, devices="cpu", output=None, **FAST)
    engine = engine_for(db)
    with engine.connect() as connection:
        facts = {r.number: r for r in connection.execute(select(schema.trial_facts))}
    engine.dispose()
    trials = result.study.get_trials()
    assert sorted(facts) == [0, 1]
    for t in trials:
        assert (facts[t.number].device, facts[t.number].wall_time_s) == ("cpu", t.user_attrs["wall_time_s"])
        assert t.user_attrs["pid"] != os.getpid()  # it ran (and was recorded) in a worker


def test_a_search_refuses_a_newer_schema_before_creating_its_study(tmp_path):
    db = url(tmp_path / "s.db")
    schema.ensure(engine_for(db))
    connection = sqlite3.connect(tmp_path / "s.db")
    connection.execute("UPDATE autometa_schema SET version = 99")
    connection.commit()
    connection.close()
    with pytest.raises(SearchError, match="newer autometa"):
        search(write_blobs_csv(tmp_path / "blobs.csv", shift=1.5), "y", trials=1, db=db, isolate=False, output=None, **FAST)
    assert optuna.get_all_study_names(db) == []


# --- query commands ---------------------------------------------------------------------------


def invoke(*args: str) -> str:
    run = CliRunner().invoke(cli, list(args))
    assert run.exit_code == 0, run.output
    return run.stdout


def test_db_datasets(upgraded):
    rows = json.loads(invoke("db", "datasets", "--db", url(upgraded), "--format", "json"))
    by_name = {r["dataset"]: r for r in rows}
    assert by_name["mixed"] == {
        "dataset": "mixed", "fingerprint": MIXED_FINGERPRINT[:10], "source": by_name["mixed"]["source"], "rows": 60,
        "classes": 3, "modalities": "tabular,text", "class_entropy": pytest.approx(1.0), "imbalance_ratio": 1.0,
        "missing_rate": 0.0, "studies": 1, "searches": 1, "trials": 3, "best_validation": pytest.approx(1 / 3),
    }
    assert by_name["tabular"]["best_validation"] == pytest.approx(5 / 12)
    table = invoke("db", "datasets", "--db", url(upgraded)).splitlines()
    assert table[0].split()[:3] == ["dataset", "fingerprint", "source"] and len(table) == 3
    assert "41.7%" in table[1] + table[2]
    lines = invoke("db", "datasets", "--db", url(upgraded), "--format", "csv").splitlines()
    assert lines[0].startswith("dataset,fingerprint,source,rows,classes,modalities") and len(lines) == 3


def test_db_trials_and_leaderboard(upgraded):
    rows = json.loads(invoke("db", "trials", TABULAR, "--db", url(upgraded), "--format", "json"))
    assert [(r["number"], r["state"], r["meta_algorithm"], r["fusion"], r["encoders"], r["device"]) for r in rows] == [
        (0, "complete", "finetune", "concat", "tabular=mlp", "cpu"),
        (1, "complete", "matchingnet", "concat", "tabular=mlp", "cpu"),
        (2, "complete", "protonet", "concat", "tabular=mlp", "cpu"),
    ]
    assert rows[0]["value"] == pytest.approx(5 / 12) and rows[0]["parameters"] == 8835
    board = json.loads(invoke("db", "leaderboard", TABULAR, "--db", url(upgraded), "--format", "json"))
    assert [(r["rank"], r["trial"], r["test_mean"], r["test_units"], r["test_unit"]) for r in board] == [
        (1, 0, 0.5, 12, "rows"), (2, 2, 0.5833333333333334, 12, "rows"), (3, 1, 0.4166666666666667, 12, "rows"),
        (None, None, pytest.approx(1 / 3), None, None)]
    assert board[0]["configuration"] == "finetune + concat [tabular=mlp]"
    # 0.1 stored only this baseline; it is shown under the name it had.
    assert board[3]["configuration"] == "baseline: majority class of the support set"
    assert (board[0]["test_low"], board[0]["test_high"]) == pytest.approx((0.2045188823137916, 0.7954811176862084))
    table = invoke("db", "leaderboard", TABULAR, "--db", url(upgraded)).splitlines()
    assert table[0].split() == ["rank", "trial", "validation", "test_mean", "test_low", "test_high", "test_units",
                                "test_unit", "parameters", "configuration"]
    assert table[1].split()[3:8] == ["50.0%", "20.5%", "79.5%", "12", "rows"]


def test_queries_on_a_0_1_database_read_its_attributes_and_never_write(old_db):
    digest = sha256(old_db)
    [row] = [r for r in queries.studies(url(old_db)) if r["study"] == MIXED]
    assert (row["trials"], row["status"], row["best_test"], row["best_test_unit"]) == (3, None, 0.5, None)
    board = queries.leaderboard(url(old_db), TABULAR)
    assert [(r["rank"], r["trial"], r["test_mean"]) for r in board] == [
        (1, 0, 0.5), (2, 2, 0.5833333333333334), (3, 1, 0.4166666666666667), (None, None, pytest.approx(1 / 3))]
    assert queries.trials(url(old_db), TABULAR)[0]["wall_time_s"] == 1.4200235419993987
    with pytest.raises(SearchError, match=r"no autometa tables \(written by autometa 0.1\); `autometa db upgrade"):
        queries.datasets(url(old_db))
    assert sha256(old_db) == digest


def test_db_best(upgraded):
    [row] = json.loads(invoke("db", "best", "tabular", "--db", url(upgraded), "--format", "json"))
    assert (row["study"], row["trial"], row["validation"], row["test_mean"]) == (TABULAR, 0, pytest.approx(5 / 12), 0.5)
    assert row["params"]["meta_algorithm"] == "finetune" and row["params"]["encoder.tabular"] == "mlp"
    by_prefix = json.loads(invoke("db", "best", MIXED_FINGERPRINT[:8], "--db", url(upgraded), "--protocol", "standard",
                                  "--format", "json"))
    assert by_prefix[0]["dataset"] == "mixed"
    run = CliRunner().invoke(cli, ["db", "best", "tabular", "--db", url(upgraded), "--protocol", "fewshot"])
    assert run.exit_code == 1 and "no fewshot search on dataset 'tabular'" in run.output and "standard" in run.output


def test_unknown_names_and_missing_files_say_what_exists(upgraded, tmp_path):
    run = CliRunner().invoke(cli, ["db", "trials", "tabular-standard", "--db", url(upgraded)])
    assert run.exit_code == 1
    assert "no study 'tabular-standard'" in run.output and f"did you mean {TABULAR}" in run.output
    run = CliRunner().invoke(cli, ["db", "best", "iris", "--db", url(upgraded)])
    assert run.exit_code == 1 and "no dataset 'iris'" in run.output and "datasets there: mixed, tabular" in run.output
    missing = url(tmp_path / "none.db")
    for command in (["datasets"], ["studies"], ["trials", TABULAR], ["sql", "SELECT 1"]):
        run = CliRunner().invoke(cli, ["db", *command, "--db", missing])
        assert run.exit_code == 1 and f"no study database at {missing}" in run.output and "--db" in run.output, command
    assert not (tmp_path / "none.db").exists()


# --- read-only SQL ----------------------------------------------------------------------------


@pytest.mark.parametrize("statement, refusal", [
    ("INSERT INTO studies (study_name) VALUES ('x')", r"read only: INSERT \(studies\) is not allowed"),
    ("UPDATE trials SET number = 7", r"read only: UPDATE \(trials\) is not allowed"),
    ("DELETE FROM autometa_trial_facts", r"read only: DELETE \(autometa_trial_facts\) is not allowed"),
    ("DROP TABLE trials", "read only: changing the database schema"),
    ("CREATE TABLE x (y INTEGER)", "read only: changing the database schema"),
    ("CREATE TEMP VIEW v AS SELECT 1", "read only: changing the database schema"),
    ("ATTACH DATABASE 'other.db' AS other", r"read only: ATTACH \(other.db\) is not allowed"),
    ("PRAGMA journal_mode = DELETE", "read only: PRAGMA journal_mode = DELETE is not allowed"),
    ("PRAGMA user_version = 5", "read only: PRAGMA user_version = 5 is not allowed"),
    ("PRAGMA wal_checkpoint", "read only: PRAGMA wal_checkpoint is not allowed"),
    ("BEGIN IMMEDIATE", "read only: BEGIN/COMMIT/ROLLBACK is not allowed"),
    ("SELECT 1; SELECT 2", "runs one statement at a time; this has 2"),
    ("SELECT 1; DELETE FROM trials", "runs one statement at a time; this has 2"),
    ("SELECT 1 -- one\n; /* two */ ; UPDATE trials SET number = 1", "runs one statement at a time; this has 2"),
    ("  ;  ", "no SQL statement given"),
])
def test_sql_refuses_writes_and_several_statements(upgraded, statement, refusal):
    digest = sha256(upgraded)
    run = CliRunner().invoke(cli, ["db", "sql", statement, "--db", url(upgraded)])
    assert run.exit_code == 1
    assert re.search(refusal, run.output), run.output
    assert sha256(upgraded) == digest


def test_sql_reads_joining_autometa_and_optuna_tables(upgraded):
    statement = """
        SELECT s.study_name AS study, t.number, v.value AS validation, f.device, f.test_mean, f.finalist_rank
        FROM autometa_trial_facts f
        JOIN studies s ON s.study_name = f.study
        JOIN trials t ON t.study_id = s.study_id AND t.number = f.number
        JOIN trial_values v ON v.trial_id = t.trial_id
        WHERE f.finalist_rank = 1 AND s.study_name LIKE 'tabular%'  -- a comment; not a second statement
    """
    rows, truncated = queries.sql(url(upgraded), statement)
    assert not truncated
    assert rows == [{"study": TABULAR, "number": 0, "validation": pytest.approx(5 / 12), "device": "cpu", "test_mean": 0.5,
                     "finalist_rank": 1}]
    rows, truncated = queries.sql(url(upgraded), "SELECT * FROM trials JOIN autometa_trial_facts f ON f.number = trials.number",
                                  limit=4)
    assert truncated and len(rows) == 4
    assert {"number", "number_2"} <= set(rows[0])  # the repeated column is kept under another name
    columns, _ = queries.sql(url(upgraded), "PRAGMA table_info(autometa_searches)")
    assert [c["name"] for c in columns][:3] == ["id", "study", "dataset_id"]
    assert queries.sql(url(upgraded), "SELECT 'a;b' AS text;")[0] == [{"text": "a;b"}]
    csv_lines = invoke("db", "sql", "SELECT version FROM autometa_schema", "--db", url(upgraded), "--format", "csv").splitlines()
    assert csv_lines == ["version", str(schema.SCHEMA_VERSION)]
    run = CliRunner().invoke(cli, ["db", "sql", "SELECT number FROM trials", "--db", url(upgraded), "--limit", "2"])
    assert run.exit_code == 0 and "only the first 2 rows" in run.stderr and len(run.stdout.splitlines()) == 3


def test_sql_never_blocks_a_writer_and_stops_runaway_queries(tmp_path, upgraded):
    path = tmp_path / "live.db"
    shutil.copyfile(upgraded, path)
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode = WAL")  # as every search database (autometa.store.storage.storage_for)
    connection.execute("CREATE TABLE scratch (x INTEGER)")
    connection.commit()
    connection.close()
    errors: list[BaseException] = []
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM trials, c"

    def read() -> None:
        try:
            queries.sql(url(path), endless, timeout=3)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)
    assert reader.is_alive()
    writer = sqlite3.connect(path, timeout=0)  # fails at once if the reader held a blocking lock
    writer.execute("INSERT INTO scratch VALUES (1)")
    writer.commit()
    assert reader.is_alive()  # the write went through while the query was running
    writer.close()
    reader.join(30)
    assert len(errors) == 1 and isinstance(errors[0], SearchError)
    assert "ran longer than 3s and was stopped" in str(errors[0])


# --- Optuna's readers on the same file ---------------------------------------------------------


def test_optuna_storage_api_reads_every_study_and_trial(upgraded):
    digest = sha256(upgraded)
    storage = optuna.storages.RDBStorage(url(upgraded), skip_table_creation=True)
    summaries = optuna.get_all_study_summaries(storage)
    assert sorted(s.study_name for s in summaries) == sorted([TABULAR, MIXED])
    for summary in summaries:
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials()
        assert len(trials) == summary.n_trials == 3
        assert all(t.state == TrialState.COMPLETE and t.params["fusion"] == "concat" for t in trials)
    storage.engine.dispose()
    assert sha256(upgraded) == digest


def test_optuna_dashboard_serves_the_studies(upgraded):
    optuna_dashboard = pytest.importorskip("optuna_dashboard")
    from wsgiref.util import setup_testing_defaults

    app = optuna_dashboard.wsgi(optuna.storages.RDBStorage(url(upgraded), skip_table_creation=True))
    environ: dict = {"PATH_INFO": "/api/studies", "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status == ["200 OK"]
    studies = json.loads(body)["study_summaries"]
    assert sorted(s["study_name"] for s in studies) == sorted([TABULAR, MIXED])


def test_reports_read_old_and_upgraded_databases_without_writing(old_db, upgraded, tmp_path):
    from autometa.results.report import build_report

    for path, study in ((old_db, MIXED), (upgraded, TABULAR)):
        digest = sha256(path)
        page = build_report(study, url(path), tmp_path / path.parent.name).read_text()
        assert study in page and "finetune + concat" in page
        assert sha256(path) == digest


def test_a_read_cut_short_by_an_interrupt_does_not_lock_the_writes_that_follow(tmp_path):
    """Ctrl-C or SIGTERM inside one of Optuna's reads leaves it open (its guard catches
    Exception only); failing the running trials then must not hit "database is locked"."""
    import sqlalchemy

    from autometa.store.storage import end_interrupted_read, storage_for
    from autometa.study.pool import fail_trial

    db = f"sqlite:///{tmp_path / 'cut.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="cut", storage=storage_for(db))
    running = study.ask()
    for value in (0.5, 0.6):
        study.tell(study.ask(), value)
    frozen = study._storage.get_trial(running._trial_id)

    def cut_read():  # what an interrupt inside get_trials leaves: a read fetched in part
        rows = study._storage._backend.scoped_session().execute(sqlalchemy.text("SELECT * FROM trials"))
        rows.fetchone()
        other = optuna.load_study(study_name="cut", storage=storage_for(db))
        other.tell(other.ask(), 0.7)  # another process writes meanwhile
        return rows  # kept: a cursor dropped would close the read

    held = cut_read()
    with pytest.raises(optuna.exceptions.StorageInternalError):  # the failure this guards against
        fail_trial(study, frozen, "interrupted")
    held = cut_read()
    end_interrupted_read(study)
    fail_trial(study, frozen, "interrupted")
    assert study._storage.get_trial(running._trial_id).state == TrialState.FAIL
    del held
