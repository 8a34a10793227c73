"""Read-only queries over a study database, for `autometa db ...`.

Each function returns rows (a list of dicts) for the CLI to print as a table, JSON or CSV
(:func:`format_rows`). The database is only read: SQLite files are opened in SQLite's
read-only mode (as for reports), and :func:`sql` runs user SQL behind SQLite's authorizer
or in a PostgreSQL ``READ ONLY`` transaction.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import re
import sqlite3
import time
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Iterator, Mapping
from urllib.parse import urlencode

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from autometa.config import configuration_label
from autometa.errors import SearchError, first_line
from autometa.store import schema
from autometa.store.storage import load_study, read_only_url, shown, unknown

# Float columns that hold accuracies: shown as percentages in tables.
PERCENT_COLUMNS = {"value", "validation", "best_validation", "best_test", "best_test_low", "best_test_high", "test_mean",
                   "test_low", "test_high"}
# Meta-features every dataset has, shown by `autometa db datasets`.
KEY_META_FEATURES = ("class_entropy", "imbalance_ratio", "missing_rate")
SQL_ROW_LIMIT = 1000
# `db sql` output cap (bytes as printed; also the largest single value): a query must not be
# able to fill the memory or the terminal (`SELECT randomblob(1000000000)`).
SQL_MAX_BYTES = 10_000_000


# --- formatting -------------------------------------------------------------------------------


def format_rows(rows: list[Mapping[str, Any]], fmt: str, *, raw: bool = False) -> str:
    """``rows`` as an aligned text table, JSON or CSV (every row has the first row's columns).

    Tables show accuracies (``PERCENT_COLUMNS``) as percentages unless ``raw``."""
    if fmt == "json":
        return json.dumps([dict(r) for r in rows], indent=2, default=_plain) + "\n"
    if not rows:
        return "(no rows)\n" if fmt == "table" else ""
    header = list(rows[0])
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(header)
        writer.writerows([[_cell(r.get(h), h, percent=False, table=False) for h in header] for r in rows])
        return buffer.getvalue()
    table = [[_cell(r.get(h), h, percent=not raw) for h in header] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    return "".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() + "\n" for line in [header, *table])


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _cell(value: Any, column: str, percent: bool, table: bool = True) -> str:
    if value is None:
        return "-" if table else ""
    if isinstance(value, float):
        if percent and column in PERCENT_COLUMNS and math.isfinite(value):
            return f"{100 * value:.1f}%"
        return f"{value:.4g}" if table else repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=_plain)
    if isinstance(value, datetime):
        return _plain(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


# --- reading ----------------------------------------------------------------------------------


@contextmanager
def _reading(db: str) -> Iterator[Connection]:
    """A connection that only reads (SQLite files in read-only mode)."""
    url = read_only_url(db)
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            schema.warn_if_newer(connection, shown(db))
            yield connection
    except SQLAlchemyError as exc:
        raise SearchError(f"cannot read {shown(db)}: {first_line(exc.orig if hasattr(exc, 'orig') else exc)}") from exc
    finally:
        engine.dispose()


def _require_tables(connection: Connection, db: str) -> None:
    version = schema.stored_version(connection)
    if version == 0:
        raise SearchError(
            f"{shown(db)} has no autometa tables (written by autometa 0.1); `autometa db upgrade --db {db}` "
            "adds them, filled from its studies (any new search on it does the same)"
        )


def _studies_in(storage: optuna.storages.RDBStorage) -> list[optuna.study.StudySummary]:
    # A damaged file fails here; every public query's _clear_errors says so in one line.
    return optuna.study.get_all_study_summaries(storage, include_best_trial=True)


def _latest_searches(connection: Connection) -> dict[str, dict[str, Any]]:
    """Per study: status of its latest run, first start, last end, number of runs."""
    found: dict[str, dict[str, Any]] = {}
    for row in connection.execute(select(schema.searches).order_by(schema.searches.c.id)):
        entry = found.setdefault(row.study, {"runs": 0, "started_at": schema.as_utc(row.started_at)})
        entry["runs"] += 1
        entry["status"] = row.status
        entry["ended_at"] = schema.as_utc(row.ended_at)
        entry["dataset_id"] = row.dataset_id
    return found


def _clear_errors(query):
    """A damaged database fails inside Optuna's storage: say which database, in one line."""
    @functools.wraps(query)
    def wrapped(db: str, *args, **kwargs):
        try:
            return query(db, *args, **kwargs)
        except optuna.exceptions.StorageInternalError as exc:
            cause = exc.__cause__ or exc
            raise SearchError(f"cannot read the studies in {db}: {first_line(cause)} (the file was not changed)") from exc
    return wrapped


@_clear_errors
def studies(db: str) -> list[dict[str, Any]]:
    """One row per study: dataset, protocol, trial counts, best validation and test scores, and
    (with autometa's tables) the status and times of its search runs."""
    storage = schema.read_storage(db)
    try:
        return _studies(storage, db)
    finally:
        storage.engine.dispose()


def _studies(storage: optuna.storages.RDBStorage, db: str) -> list[dict[str, Any]]:
    with _reading(db) as connection:
        tables = schema.stored_version(connection) >= 1
        runs = _latest_searches(connection) if tables else {}
        winners = _winners(connection) if tables else {}
    rows = []
    for summary in _studies_in(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        attrs = study.user_attrs
        trials = study.get_trials(deepcopy=False)
        states = [t.state for t in trials]
        complete = [t.value for t in trials if t.state == TrialState.COMPLETE]
        # A 0.1 database (no autometa tables) kept its leaderboard in the study's attributes only.
        best = winners.get(summary.study_name, {}) if tables else (attrs.get("leaderboard") or [{}])[0]
        run = runs.get(summary.study_name, {})
        rows.append({
            "study": summary.study_name,
            "dataset": attrs.get("dataset"),
            "protocol": attrs.get("protocol"),
            "trials": len(trials),
            "complete": states.count(TrialState.COMPLETE),
            "pruned": states.count(TrialState.PRUNED),
            "failed": states.count(TrialState.FAIL),
            "best_validation": max(complete) if complete else None,
            **_best_test(schema.score_columns(best)),
            "status": run.get("status"),
            "runs": run.get("runs"),
            "started_at": run.get("started_at"),
            "ended_at": run.get("ended_at"),
            "model_path": attrs.get("model_path"),
        })
    return rows


def _winners(connection: Connection) -> dict[str, dict[str, Any]]:
    """Each study's leaderboard winner as ``Score.as_dict()`` names its test score."""
    facts = schema.trial_facts.c
    return {row.study: _as_entry(row._mapping) for row in connection.execute(
        select(schema.trial_facts).where(facts.finalist_rank == 1))}


def _as_entry(fact: Mapping[str, Any]) -> dict[str, Any]:
    """An autometa_trial_facts finalist row under the names ``LeaderboardEntry.as_dict()`` uses."""
    return {"rank": fact["finalist_rank"], "trial": fact["number"], "parameters": fact.get("parameters"),
            "test_accuracy": fact.get("test_mean"), "test_ci95_low": fact.get("test_low"),
            "test_ci95_high": fact.get("test_high"), "test_units": fact.get("test_units"),
            "test_unit": fact.get("test_unit"), "test_ci95": fact.get("test_ci95")}


def finalists(db: str, study: str, attrs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The finalists of ``study``'s latest leaderboard, best first, as ``LeaderboardEntry.as_dict()``
    names their rank, trial, test score and parameter count: from autometa_trial_facts, their one
    home; from the study's attributes ``attrs`` only on a 0.1 database (no autometa tables)."""
    with _reading(db) as connection:
        if schema.stored_version(connection) < 1:
            return [dict(e) for e in attrs.get("leaderboard") or [] if isinstance(e, Mapping)]
        table = schema.trial_facts
        rows = connection.execute(select(table).where(table.c.study == study, table.c.finalist_rank.is_not(None))
                                  .order_by(table.c.finalist_rank))
        return [_as_entry(row._mapping) for row in rows]


def ensemble_note(chosen: bool, best_single: float | None) -> str:
    """What a leaderboard says of its ensemble row. The ensemble is chosen and scored on the
    validation rows alone, while a finalist's validation may be cross-validated (one-step
    learners), so its figure is set beside the best single trial's on the same rows."""
    verdict = "saved as the model" if chosen else "not kept: no better on validation than the best single trial"
    if best_single is None or not math.isfinite(best_single):
        return verdict
    return f"validation on the validation rows alone, the best single trial's {100 * best_single:.1f}% there; {verdict}"


def stored_ensemble(db: str, study: str) -> dict[str, Any] | None:
    """``study``'s latest ensemble (members, validation, test score, whether it was saved), if any."""
    with _reading(db) as connection:
        return schema.stored_ensemble(connection, study)


def _best_test(score: Mapping[str, Any]) -> dict[str, Any]:
    """The leaderboard winner's test score as `db studies` and `db models` name it."""
    return {"best_test": score["test_mean"], "best_test_low": score["test_low"], "best_test_high": score["test_high"],
            "best_test_unit": score["test_unit"]}


def models(db: str) -> list[dict[str, Any]]:
    """Saved best models recorded in the database."""
    return [
        {k: row[k] for k in ("study", "dataset", "protocol", "best_test", "best_test_low", "best_test_high",
                             "best_test_unit", "model_path")}
        for row in studies(db)
        if row["model_path"]
    ]


@_clear_errors
def datasets(db: str) -> list[dict[str, Any]]:
    """One row per stored dataset: where it came from, its size, modalities, key meta-features,
    how often it was searched and the best validation accuracy reached on it."""
    with _reading(db) as connection:
        _require_tables(connection, db)
        stored = schema.stored_datasets(connection)
        runs = dict(connection.execute(
            select(schema.searches.c.dataset_id, func.count()).group_by(schema.searches.c.dataset_id)
        ).all())
        sizes = {row.id: (row.rows, row.classes) for row in connection.execute(
            select(schema.datasets.c.id, schema.datasets.c.rows, schema.datasets.c.classes))}
    storage = schema.read_storage(db)
    try:
        summaries = {s.study_name: s for s in _studies_in(storage)}
    finally:
        storage.engine.dispose()
    rows = []
    for d in stored:
        on_it = [summaries[study] for study, _ in d.studies if study in summaries]
        values = [s.best_trial.value for s in on_it if s.best_trial is not None and s.best_trial.value is not None]
        modalities = sorted({m for m in d.columns.values() if m != "ignore"})
        rows.append({
            "dataset": d.name,
            "fingerprint": d.fingerprint[:10],
            "source": d.source,
            "rows": sizes[d.id][0],
            "classes": sizes[d.id][1],
            "modalities": ",".join(modalities),
            **{k: d.meta_features.get(k) for k in KEY_META_FEATURES},
            "studies": len(d.studies),
            "searches": runs.get(d.id, 0),
            "trials": sum(s.n_trials for s in on_it),
            "best_validation": max(values) if values else None,
        })
    return rows


def _reason(trial: FrozenTrial) -> str | None:
    return trial.user_attrs.get("fail_reason") or trial.user_attrs.get("prune_reason")


@_clear_errors
def trials(db: str, study: str) -> list[dict[str, Any]]:
    """A study's trials: state, validation accuracy, configuration, where and how long it ran."""
    storage = schema.read_storage(db)
    try:
        loaded = load_study(storage, study, db)
        frozen = loaded.get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()
    facts = _facts(db, study)
    rows = []
    for t in frozen:
        fact = facts.get(t.number, {})
        encoders = {k.split(".", 1)[1]: v for k, v in t.params.items() if k.startswith("encoder.") and k.count(".") == 1}
        rows.append({
            "number": t.number,
            "state": t.state.name.lower(),
            "value": t.value,
            "meta_algorithm": t.params.get("meta_algorithm"),
            "fusion": t.params.get("fusion"),
            "encoders": ", ".join(f"{m}={e}" for m, e in encoders.items()) or None,
            "device": fact.get("device", t.user_attrs.get("device")),
            "wall_time_s": fact.get("wall_time_s", t.user_attrs.get("wall_time_s")),
            "parameters": fact.get("parameters", t.user_attrs.get("parameters")),
            "reason": _reason(t),
        })
    return rows


def _facts(db: str, study: str) -> dict[int, dict[str, Any]]:
    """autometa_trial_facts rows of ``study`` by trial number (none on a 0.1 database)."""
    with _reading(db) as connection:
        if schema.stored_version(connection) < 1:
            return {}
        table = schema.trial_facts
        found = {}
        for row in connection.execute(select(table).where(table.c.study == study)):
            found[row.number] = {k: v for k, v in row._mapping.items() if v is not None}
        return found


@_clear_errors
def leaderboard(db: str, study: str) -> list[dict[str, Any]]:
    """The finalists of a study's latest leaderboard with their test accuracy and 95% interval
    (over test rows, tasks or groups: ``test_unit``), then its baselines."""
    storage = schema.read_storage(db)
    try:
        loaded = load_study(storage, study, db)
        by_number = {t.number: t for t in loaded.get_trials(deepcopy=False)}
        attrs = loaded.user_attrs
    finally:
        storage.engine.dispose()
    rows = []
    for entry in finalists(db, study, attrs):
        trial = by_number.get(entry.get("trial"))
        rows.append({
            "rank": entry.get("rank"),
            "trial": entry.get("trial"),
            "validation": trial.value if trial is not None else entry.get("validation_accuracy"),
            **schema.score_columns(entry),
            "parameters": entry.get("parameters"),
            "configuration": configuration_label(trial.params) if trial is not None else None,
        })
    ensemble = stored_ensemble(db, study)
    if ensemble is not None:
        members = ", ".join(f"{m['trial']}×{m['weight']:.2f}" for m in ensemble["members"])
        rows.append({"rank": None, "trial": None, "validation": ensemble["validation"],
                     **{k: ensemble[k] for k in ("test_mean", "test_low", "test_high", "test_units", "test_unit")},
                     "parameters": None, "configuration": f"ensemble of trials {members}"
                     + f" ({ensemble_note(ensemble['chosen'], ensemble.get('best_member_validation'))})"})
    with _reading(db) as connection:
        stored = schema.stored_baselines(connection, study)
    if not stored:  # before schema version 2: the study's attributes
        stored = [{"label": b.get("label"), **schema.score_columns(b)} for b in schema.attribute_baselines(attrs)]
    for b in stored:
        rows.append({"rank": None, "trial": None, "validation": None,
                     **{k: b[k] for k in ("test_mean", "test_low", "test_high", "test_units", "test_unit")},
                     "parameters": None, "configuration": f"baseline: {b['label']}"})
    return rows


def _fact_score(fact: Mapping[str, Any]) -> dict[str, Any]:
    """A trial_facts row's test score; a database not yet upgraded to version 2 has mean ± test_ci95."""
    if "test_low" in fact or "test_unit" in fact:
        return {k: fact.get(k) for k in ("test_mean", "test_low", "test_high", "test_units", "test_unit")}
    return schema.score_columns({"test_accuracy": fact.get("test_mean"), "test_ci95": fact.get("test_ci95"),
                                 "test_units": fact.get("test_units")})


@_clear_errors
def best(db: str, dataset: str, protocol: str | None = None) -> list[dict[str, Any]]:
    """The best configuration found on ``dataset`` (a name or a fingerprint prefix), one row per
    protocol: its validation accuracy, test accuracy ± CI when it was a finalist, and parameters."""
    with _reading(db) as connection:
        _require_tables(connection, db)
        stored = schema.stored_datasets(connection)
    matches = [d for d in stored if d.name == dataset] or [
        d for d in stored if len(dataset) >= 4 and d.fingerprint.startswith(dataset.lower())
    ]
    if not matches:
        raise unknown("dataset", "datasets", dataset, sorted({d.name for d in stored}), db)
    if len(matches) > 1:
        listed = ", ".join(f"{d.name} ({d.fingerprint[:10]})" for d in matches)
        raise SearchError(f"{dataset!r} names {len(matches)} datasets in {shown(db)}: {listed}; pass a fingerprint prefix")
    chosen = matches[0]
    studies_on = [(s, p) for s, p in chosen.studies if protocol is None or p == protocol]
    if not studies_on:
        done = ", ".join(sorted({p for _, p in chosen.studies})) or "none"
        raise SearchError(f"no {protocol} search on dataset {chosen.name!r} in {shown(db)}; protocols searched: {done}")
    storage = schema.read_storage(db)
    top: dict[str, tuple[FrozenTrial, str]] = {}
    try:
        for name, proto in studies_on:
            try:
                loaded = optuna.load_study(study_name=name, storage=storage)
            except KeyError:
                continue  # the study was deleted from Optuna's tables
            for t in loaded.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                if proto not in top or t.value > top[proto][0].value:
                    top[proto] = (t, name)
    finally:
        storage.engine.dispose()
    rows = []
    for proto, (trial, name) in sorted(top.items()):
        fact = _facts(db, name).get(trial.number, {})
        rows.append({
            "dataset": chosen.name,
            "protocol": proto,
            "study": name,
            "trial": trial.number,
            "validation": trial.value,
            **{k: v for k, v in _fact_score(fact).items() if k != "test_units"},
            "configuration": configuration_label(trial.params),
            "params": dict(trial.params),
        })
    if not rows:
        raise SearchError(f"no trial completed on dataset {chosen.name!r} in {shown(db)} yet")
    return rows


# --- read-only SQL ----------------------------------------------------------------------------

# SQLite authorizer actions a read needs; every other action (writes, DDL, ATTACH, transactions,
# most PRAGMAs) is denied. PRAGMAs that only describe the schema are allowed.
_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
# Functions a read may not call: loading native code, and fts3_tokenizer, which returns a
# pointer into this process (an address to print is a gift to an exploit).
_DENIED_FUNCTIONS = {"load_extension", "fts3_tokenizer"}
_SCHEMA_PRAGMAS = {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
_ACTION_NAMES = {
    1: "CREATE INDEX", 2: "CREATE TABLE", 3: "CREATE TEMP INDEX", 4: "CREATE TEMP TABLE", 5: "CREATE TEMP TRIGGER",
    6: "CREATE TEMP VIEW", 7: "CREATE TRIGGER", 8: "CREATE VIEW", 9: "DELETE", 10: "DROP INDEX", 11: "DROP TABLE",
    12: "DROP TEMP INDEX", 13: "DROP TEMP TABLE", 14: "DROP TEMP TRIGGER", 15: "DROP TEMP VIEW", 16: "DROP TRIGGER",
    17: "DROP VIEW", 18: "INSERT", 19: "PRAGMA", 22: "BEGIN/COMMIT/ROLLBACK", 23: "UPDATE", 24: "ATTACH", 25: "DETACH",
    26: "ALTER TABLE", 27: "REINDEX", 28: "ANALYZE", 29: "CREATE VIRTUAL TABLE", 30: "DROP VIRTUAL TABLE", 32: "SAVEPOINT",
}
# PostgreSQL: statements that only read (inside a READ ONLY transaction, as a second guard).
_PG_READ_KEYWORDS = {"select", "with", "values", "table", "explain", "show"}


def split_statements(text: str) -> list[str]:
    """``text`` split at semicolons outside quotes, dollar quotes and comments; empty parts dropped."""
    parts, current, i = [], [], 0
    while i < len(text):
        c = text[i]
        if c in "'\"`[":
            close = "]" if c == "[" else c
            end = text.find(close, i + 1)
            while end != -1 and close != "]" and text[end + 1:end + 2] == close:  # '' escapes a quote
                end = text.find(close, end + 2)
            end = len(text) if end == -1 else end + 1
        elif text.startswith("--", i):
            end = text.find("\n", i)
            end = len(text) if end == -1 else end
            current.append(" ")
            i = end
            continue
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = len(text) if end == -1 else end + 2
            current.append(" ")
            continue
        elif c == "$" and (m := re.match(r"\$[A-Za-z_]*\$", text[i:])):
            end = text.find(m.group(), i + len(m.group()))
            end = len(text) if end == -1 else end + len(m.group())
        elif c == ";":
            parts.append("".join(current))
            current, i = [], i + 1
            continue
        else:
            end = i + 1
        current.append(text[i:end])
        i = end
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def sql(
    db: str, statement: str, *, limit: int = SQL_ROW_LIMIT, timeout: float = 30.0, max_bytes: int = SQL_MAX_BYTES,
) -> tuple[list[dict[str, Any]], str | None]:
    """Run one read-only SQL statement; return its first rows and, when some were left out,
    a note saying why and how to see more (None when every row is there).

    It cannot write: SQLite files are opened read only and an authorizer denies every action
    but reading; PostgreSQL runs it in a READ ONLY transaction. It cannot lock writers out for
    long either: it is stopped after ``timeout`` seconds (search databases use SQLite's WAL
    mode, where readers never block writers). Nor can it fill the memory: at most ``limit``
    rows and ``max_bytes`` of output (as printed) are read, and a single value larger than
    ``max_bytes`` is refused before it is built (SQLite) or sent (PostgreSQL).
    """
    if limit < 1:
        raise SearchError("--limit must be at least 1")
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise SearchError(f"--timeout {timeout}: give a positive number of seconds, e.g. --timeout 30")
    if max_bytes < 1:
        raise SearchError("--max-bytes must be at least 1")
    statements = split_statements(statement)
    if not statements:
        raise SearchError("no SQL statement given; e.g. autometa db sql \"SELECT study_name FROM studies\"")
    if len(statements) > 1:
        raise SearchError(
            f"autometa db sql runs one statement at a time; this has {len(statements)} (separated by ';'): run them one by one"
        )
    url = read_only_url(db)
    with _reading(db):
        pass  # a database written by a newer autometa: warn (its tables may differ from the docs)
    if url.get_backend_name() == "sqlite":
        return _sqlite_sql(db, url, statements[0], limit, timeout, max_bytes)
    if url.get_backend_name() == "postgresql":
        return _postgres_sql(db, url, statements[0], limit, timeout, max_bytes)
    raise SearchError(f"autometa db sql supports SQLite and PostgreSQL databases, not {url.get_backend_name()}")


def _printed_size(value: Any) -> int:
    """About how many bytes ``value`` takes once printed (bytes are printed in hex)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return 2 * len(value)
    if isinstance(value, str):
        return len(value)
    return len(str(value)) if value is not None else 1


def _take(rows: Iterator[tuple], limit: int, max_bytes: int) -> tuple[list[tuple], str | None]:
    """The first ``limit`` rows within ``max_bytes`` of output, and why the rest was left out."""
    taken: list[tuple] = []
    size = 0
    for row in rows:
        if len(taken) == limit:
            return taken, f"only the first {limit} rows; --limit N for more"
        size += sum(_printed_size(v) for v in row) + len(row)
        if size > max_bytes:
            return taken, (
                f"output stopped after {len(taken)} row(s): the next would pass {max_bytes:,} bytes; "
                "--max-bytes N for more"
            )
        taken.append(tuple(row))
    return taken, None


def _too_big(max_bytes: int) -> SearchError:
    return SearchError(
        f"a value in the result is larger than {max_bytes:,} bytes (the --max-bytes cap); select a part of it "
        "(e.g. substr(value, 1, 1000) or length(value)) or pass a larger --max-bytes"
    )


def _columns(description) -> list[str]:
    names: list[str] = []
    for column in description:
        name, n = column[0], 2
        while name in names:  # SELECT * over a join repeats names: keep every column
            name, n = f"{column[0]}_{n}", n + 1
        names.append(name)
    return names


def _read_only_refusal(denied: list[str]) -> SearchError:
    return SearchError(
        f"autometa db sql is read only: {denied[0]} is not allowed; only queries that read (SELECT, WITH … SELECT, "
        "and schema PRAGMAs such as table_info) run"
    )


def _sqlite_sql(db: str, url, statement: str, limit: int, timeout: float,
                max_bytes: int) -> tuple[list[dict[str, Any]], str | None]:
    denied: list[str] = []

    def authorize(action: int, arg1, arg2, database, trigger) -> int:
        if action in _READ_ACTIONS and not (action == sqlite3.SQLITE_FUNCTION and arg2.lower() in _DENIED_FUNCTIONS):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and arg1 in _SCHEMA_PRAGMAS:
            return sqlite3.SQLITE_OK
        what = _ACTION_NAMES.get(action, f"SQLite action {action}")
        if action == sqlite3.SQLITE_PRAGMA:
            what = f"PRAGMA {arg1}" + (f" = {arg2}" if arg2 is not None else "")
        elif action == sqlite3.SQLITE_FUNCTION:
            what = f"the function {arg2}()"
        elif arg1 in ("sqlite_master", "sqlite_schema", "sqlite_temp_master"):
            # DDL reaches the authorizer as a write to the schema table first (and so does a
            # pragma_*() table function; PRAGMA table_info(NAME) is the allowed way).
            what = "changing the database schema (CREATE, DROP, ALTER or a pragma_*() function)"
        elif arg1 and action not in (22, 32):
            what = f"{what} ({arg1})"
        denied.append(what)
        return sqlite3.SQLITE_DENY

    options = {**{k: v for k, v in url.query.items() if k != "uri"}, "mode": "ro"}
    connection = sqlite3.connect(f"{url.database}?{urlencode(options)}", uri=True, timeout=5)
    deadline = time.monotonic() + timeout
    connection.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    connection.set_authorizer(authorize)
    # No string or blob may grow past the output cap, so randomblob(1e9) fails before it is made.
    connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max(max_bytes, 1_000_000))
    try:
        cursor = connection.execute(statement)
        rows, cut = _take(cursor, limit, max_bytes)
        names = _columns(cursor.description or [])
    except sqlite3.ProgrammingError as exc:
        if "one statement" in str(exc):
            raise SearchError("autometa db sql runs one statement at a time: run them one by one") from exc
        raise SearchError(f"SQL error: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        if denied:
            raise _read_only_refusal(denied) from exc
        if "interrupted" in str(exc):
            raise SearchError(f"the query ran longer than {timeout:g}s and was stopped; narrow it or pass --timeout") from exc
        if "readonly" in str(exc) or "read-only" in str(exc):
            raise _read_only_refusal(["writing"]) from exc
        if "too big" in str(exc):
            raise _too_big(max_bytes) from exc
        raise SearchError(f"SQL error: {exc} (in {shown(db)})") from exc
    finally:
        connection.close()  # no lock outlives the call
    return [dict(zip(names, row)) for row in rows], cut


def _postgres_sql(db: str, url, statement: str, limit: int, timeout: float,
                  max_bytes: int) -> tuple[list[dict[str, Any]], str | None]:
    keyword = (re.match(r"\s*\(*\s*([A-Za-z]+)", statement) or [None, ""])[1].lower()
    if keyword not in _PG_READ_KEYWORDS:
        raise _read_only_refusal([keyword.upper() or "this statement"])
    statement = statement.replace("%", "%%")  # psycopg2 reads % as a parameter marker
    engine = create_engine(url, poolclass=NullPool)  # no session state outlives the call
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SET TRANSACTION READ ONLY")
            connection.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, math.ceil(timeout * 1000))}")
            try:
                names, capped = _pg_capped(connection, statement, keyword, max_bytes)
                # A query runs in a server-side cursor: its rows arrive as they are read, not all at
                # once. (EXPLAIN and SHOW cannot; their output is small.)
                streamed = connection.execution_options(stream_results=True, max_row_buffer=100) if capped else connection
                result = streamed.exec_driver_sql(capped or statement)
                if names is None:
                    names = _columns([(k,) for k in result.keys()]) if result.returns_rows else []
                rows = iter(result.fetchone, None) if result.returns_rows else iter(())
                rows, cut = _take(_refuse_too_big(rows, max_bytes) if capped else rows, limit, max_bytes)
                result.close()
            except SQLAlchemyError as exc:
                cause = getattr(exc, "orig", exc)
                # (A data-modifying WITH is refused where the caps wrap it in a subquery.)
                if any(text in str(cause) for text in ("read-only transaction", "read-write mode", "data-modifying")):
                    raise _read_only_refusal([first_line(cause)]) from exc
                if "statement timeout" in str(cause):
                    raise SearchError(f"the query ran longer than {timeout:g}s and was stopped; narrow it or pass --timeout") from exc
                raise SearchError(f"SQL error: {first_line(cause)} (in {shown(db)})") from exc
            finally:
                connection.rollback()
    except SQLAlchemyError as exc:
        raise SearchError(f"cannot read {shown(db)}: {first_line(getattr(exc, 'orig', exc))}") from exc
    finally:
        engine.dispose()
    return [dict(zip(names, row)) for row in rows], cut


def _refuse_too_big(rows: Iterator[tuple], max_bytes: int) -> Iterator[tuple]:
    """Rows of a statement from :func:`_pg_capped`, its size column dropped; a value past the cap is an error."""
    for row in rows:
        if row[-1] is not None and row[-1] > max_bytes:
            raise _too_big(max_bytes)
        yield tuple(row)[:-1]


def _pg_capped(connection: Connection, statement: str, keyword: str, max_bytes: int) -> tuple[list[str] | None, str | None]:
    """``statement`` rewritten so that the server never sends a value larger than ``max_bytes``:
    each column of a query (SELECT, WITH, VALUES, TABLE) becomes NULL past the cap, and a last
    column holds the widest value's size, for :func:`_refuse_too_big`. Returns the column names
    too; (None, None) for EXPLAIN and SHOW, whose output is small, and a query without columns."""
    if keyword not in ("select", "with", "values", "table"):
        return None, None
    names = _columns([(k,) for k in connection.exec_driver_sql(f"SELECT * FROM ({statement}) AS q LIMIT 0").keys()])
    if not names:
        return None, None
    # Columns renamed by position: a join may repeat a name, and any name may need quoting.
    columns = [f"c{i}" for i in range(len(names))]
    sizes = [f"octet_length({c}::text)" for c in columns]
    capped = [f"CASE WHEN {size} > {max_bytes} THEN NULL ELSE {c} END" for c, size in zip(columns, sizes)]
    return names, f"SELECT {', '.join(capped)}, greatest({', '.join(sizes)}) FROM ({statement}) AS q({', '.join(columns)})"
