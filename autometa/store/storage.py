"""The one owner of how autometa opens its databases: URLs and their checks, engines, read-only
access, SQLite's WAL mode, busy timeout, checkpoints and table-creation lock, Optuna's RDB
storage (and every use of its private internals), the default URL and the lookup of a study by
name.
"""

from __future__ import annotations

import difflib
import inspect
import os
import sqlite3
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import optuna
import sqlalchemy
from optuna.storages._rdb import models as optuna_models
from optuna.trial import TrialState
from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError

from autometa.errors import AutometaError, SearchError, first_line

try:
    import fcntl
except ImportError:  # Windows: no flock; searches there start one at a time
    fcntl = None

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)  # trial states that end a trial
HEARTBEAT_S = 10
GRACE_S = 60
REQUEUED = "requeued"  # user attribute of a trial failed because its worker was lost: not counted
_TABLES_LOCK = 7346312831  # PostgreSQL advisory lock key while Optuna's tables are made (schema's is ...830)


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


def end_interrupted_read(study: optuna.Study) -> None:
    """Close this thread's database session before writing after an interrupt.

    Ctrl-C or SIGTERM can land inside one of Optuna's reads, which then neither finishes nor
    rolls back (Optuna's session guard catches ``Exception``, not ``KeyboardInterrupt``); the cut
    read keeps its snapshot, and on SQLite's WAL a write from the same session fails at once
    with "database is locked" once another process has written, whatever the busy timeout."""
    storage = getattr(study._storage, "_backend", study._storage)  # noqa: SLF001 - Optuna's cache wraps it
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.scoped_session.remove()
        storage.engine.dispose()  # the cut read's cursor may still be referenced (the traceback): close its connection


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


def read_only_url(db: str) -> URL:
    """``db`` as a URL to read from: an SQLite file is opened in SQLite's read-only mode, so a
    report or query can never take a write lock on a live search's database."""
    try:
        url = make_url(db)
    except ArgumentError as exc:
        raise SearchError(f"--db {db!r} is not a database URL (e.g. sqlite:///studies.db)") from exc
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise SearchError(f"--db {shown}: an in-memory database holds no stored studies")
        if not url.query.get("uri"):  # a plain file path (a file: URI is passed on as given)
            path = Path(url.database)
            if not path.is_file():
                raise SearchError(
                    f"no study database at {shown} ({path} does not exist); pass the --db URL the search used"
                )
            url = url.set(database="file:" + quote(str(path.resolve())), query={**url.query, "mode": "ro", "uri": "true"})
    return url


def open_storage(db: str) -> optuna.storages.RDBStorage:
    """Optuna's storage for ``db``, never creating tables; SQLite files are opened read only."""
    url = read_only_url(db)
    shown = make_url(db).render_as_string(hide_password=True)
    try:
        storage = optuna.storages.RDBStorage(url.render_as_string(hide_password=False), skip_table_creation=True)
        with storage.engine.connect():
            pass  # a database that cannot be read fails here, inside this message
        return storage
    except Exception as exc:
        # An empty or foreign database fails where Optuna looks for its version table; the
        # wrapped database error says more than Optuna's generic wrapper.
        cause = exc.__cause__ or exc
        raise SearchError(
            f"cannot read Optuna studies from {shown} (is it the database a search wrote?): "
            f"{type(cause).__name__}: {first_line(cause)}"
        ) from exc


def engine_for(db: str) -> Engine:
    """An engine on ``db`` that waits for writers instead of failing (SQLite busy timeout)."""
    kwargs: dict[str, Any] = {}
    if db.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 120}
    return create_engine(db, **kwargs)


def shown(db: str) -> str:
    """``db`` as it may be printed: the URL without its password."""
    return make_url(db).render_as_string(hide_password=True)


def unknown(kind: str, kinds: str, name: str, known: list[str], db: str) -> SearchError:
    """The error for a ``kind`` (plural ``kinds``) ``name`` that ``db`` does not hold, with close names."""
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    listed = ", ".join(known[:30]) + (f" … and {len(known) - 30} more" if len(known) > 30 else "")
    return SearchError(f"no {kind} {name!r} in {shown(db)}; {hint}available {kinds} there: "
                       f"{listed or 'none (the database is empty)'}")


def load_study(storage: optuna.storages.RDBStorage, name: str, db: str) -> optuna.Study:
    """The autometa study ``name`` in ``db``, or an error listing the studies there."""
    try:
        names = sorted(s.study_name for s in storage.get_all_studies())
    except optuna.exceptions.StorageInternalError as exc:
        cause = exc.__cause__ or exc
        raise SearchError(f"cannot read the studies in {db}: {first_line(cause)} (the file was not changed)") from exc
    if name not in names:
        raise unknown("study", "studies", name, names, db)
    study = optuna.load_study(study_name=name, storage=storage)
    if len(study.directions) != 1:
        raise SearchError(f"study {name!r} has {len(study.directions)} objectives: it is not an autometa search")
    return study
