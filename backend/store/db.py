"""Engine, schema migration and sessions for the metadata database.

SQLite is the default (one file in the storage folder, WAL journal so the app, the worker and the CLI can read
while one of them writes); any SQLAlchemy URL works, e.g. `postgresql+psycopg://user:password@host:5432/yolodex`
(psycopg 3; a plain `postgresql://` or `postgres://` URL means the same here). The schema is created and
upgraded only by the Alembic scripts in `backend/store/migrations/` (never `create_all`), so a database made by
an older yolodex is upgraded in place. The scripts ship inside the package: no alembic.ini is needed at run time.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# How long a SQLite writer waits for another process's write lock before failing ("database is locked"); the README
# promises this wait. A write session (`session_scope(write=True)`) waits it from its BEGIN IMMEDIATE.
SQLITE_BUSY_TIMEOUT_MS = 10_000


BUSY_ADVICE = (
    "the database is busy: another process held the SQLite file's write lock longer than the 10 s a writer waits "
    "(an import writes its images in one transaction and commits at its end). Try again when it has finished (the "
    "Jobs page shows it); for several workers or people at once, put the metadata on a PostgreSQL server "
    "(YOLODEX_DATABASE_URL)"
)


def database_locked(error: BaseException) -> bool:
    """Whether `error` is SQLite saying another connection held the file's write lock past the busy timeout."""
    return isinstance(error, OperationalError) and "locked" in str(error.orig or error).lower()


class DiskFullError(OSError):
    """The disk holding the database or the storage folder is full; the message says which folder and what to do."""


# What a full disk looks like from SQLite: SQLITE_FULL ("database or disk is full"), or, reading a WAL database whose
# shared-memory file (-shm, 32 KiB) cannot be grown, SQLITE_IOERR_SHMSIZE ("disk I/O error").
_SQLITE_FULL_NAMES = ("SQLITE_FULL", "SQLITE_IOERR_SHMSIZE")


def disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, says the disk is full (ENOSPC, or SQLite's "disk is full")."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DiskFullError):
            return True
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        original = getattr(current, "orig", None)  # a SQLAlchemy DBAPIError wraps the driver's error
        for candidate in (current, original):
            if candidate is None:
                continue
            if getattr(candidate, "sqlite_errorname", None) in _SQLITE_FULL_NAMES:
                return True
            text = str(candidate).lower()
            # SQLite's text; PostgreSQL says "could not extend file ... No space left on device" (SQLSTATE 53100)
            if "database or disk is full" in text or "no space left on device" in text:
                return True
        current = current.__cause__ or current.__context__
    return False


def full_disk_message(error: BaseException, folder: str | Path | None = None, *, rolled_back: bool = False) -> str:
    """One line for a full disk: which folder (the file the error names, else `folder`), how much is free, and what to
    do. `rolled_back`: the operation's transaction was undone and its new files removed: say nothing was kept."""
    where = _error_path(error) or (Path(folder) if folder else None)
    free = _free_bytes(where) if where is not None else None
    place = f"the disk holding {where.parent if where.suffix else where}" if where is not None else "the disk"
    amount = f" ({free / 1e6:.1f} MB free now)" if free is not None else ""
    kept = "; nothing from this operation was kept" if rolled_back else ""
    return (
        f"{place} ran out of space{amount}: free some space there (e.g. old training runs or exported files), then "
        f"try again{kept}"
    )


def _error_path(error: BaseException) -> Path | None:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.filename:
            return Path(os.fsdecode(current.filename))
        current = current.__cause__ or current.__context__
    return None


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def describe_error(error: BaseException) -> str:
    """One line for a person: `BUSY_ADVICE` for a locked SQLite file (instead of the SQL), a full disk said as such,
    else the error's text."""
    if database_locked(error):
        return BUSY_ADVICE
    if disk_full(error) and not isinstance(error, DiskFullError):
        return full_disk_message(error)
    return str(error)


def make_engine(url: str) -> Engine:
    """Creates an engine; for SQLite, creates the file's folder and sets WAL, foreign keys and a busy timeout.

    Args:
        url: a SQLAlchemy database URL (`sqlite:///<path>`, `postgresql+psycopg://...`; `postgresql://` and
            `postgres://` use psycopg 3 too).
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        # SQLAlchemy's default PostgreSQL driver is psycopg2; yolodex installs psycopg 3.
        parsed = parsed.set(drivername="postgresql+psycopg")
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    # A server database may restart under a long-lived worker: test pooled connections before handing them out.
    engine = create_engine(parsed, future=True, pool_pre_ping=not is_sqlite)
    if is_sqlite:
        event.listen(engine, "do_connect", _connect_sqlite)
        event.listen(engine, "connect", _configure_sqlite_connection)
        event.listen(engine, "checkin", _close_exclusive_connection)
        event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def _connect_sqlite(dialect, connection_record, cargs, cparams):
    """Opens a SQLite connection; on a full disk, one that can still read.

    Reading a WAL database needs its shared-memory file (-shm, 32 KiB), which the first connection creates and the
    last one deletes; with no room for it every read fails ("disk I/O error", even for `yolodex dataset stats`).
    A connection in EXCLUSIVE locking mode keeps that index in its own memory instead (https://sqlite.org/wal.html,
    "Use of WAL Without Shared-Memory"), so it reads; it also locks the file for others while open, so it is closed
    as soon as it goes back to the pool (`_close_exclusive_connection`). Writes still fail, as `DiskFullError`.
    """
    connection = dialect.connect(*cargs, **cparams)
    try:
        connection.execute("PRAGMA journal_mode").fetchall()  # the first read: maps the -shm of a WAL database
        return connection
    except dialect.loaded_dbapi.OperationalError as error:
        connection.close()
        if not disk_full(error):
            raise
        first_error = error
    connection = dialect.connect(*cargs, **cparams)
    try:
        connection.execute("PRAGMA locking_mode=EXCLUSIVE")  # before the first read, or it has no effect
        connection.execute("PRAGMA journal_mode").fetchall()
    except dialect.loaded_dbapi.OperationalError:
        connection.close()
        raise first_error from None
    connection_record.info["sqlite_exclusive"] = True
    if not _warned_full_disk.is_set():
        _warned_full_disk.set()
        logger.warning("the disk holding the database is full: it can be read, not written")
    return connection


_warned_full_disk = threading.Event()  # once per process


def _configure_sqlite_connection(dbapi_connection, connection_record) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # SQLite leaves foreign keys off unless asked, per connection; ON DELETE CASCADE depends on them.
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # WAL is persistent in the file: set it only when it is not (setting it writes, which a full disk refuses).
        # An in-memory database answers "memory".
        (mode,) = cursor.execute("PRAGMA journal_mode").fetchone()
        if mode.lower() not in ("wal", "memory") and not connection_record.info.get("sqlite_exclusive"):
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: a crash loses at most the last commits
    finally:
        cursor.close()
    # The sqlite3 module opens transactions only before INSERT/UPDATE/DELETE, so a SAVEPOINT issued first would
    # run outside any transaction and its RELEASE would commit for good (a failed import would keep half its
    # images). Take transaction control away from the driver and BEGIN ourselves (SQLAlchemy's documented recipe).
    dbapi_connection.isolation_level = None


def _close_exclusive_connection(_dbapi_connection, connection_record) -> None:
    if connection_record is not None and connection_record.info.get("sqlite_exclusive"):
        connection_record.invalidate()  # releases its lock on the file; the next checkout connects afresh


def _begin_sqlite_transaction(connection) -> None:
    # "BEGIN IMMEDIATE" (asked for by a connection's `sqlite_begin` option) takes the write lock at once, waiting
    # the busy timeout for it. A plain BEGIN takes it at the first write; if another writer committed after this
    # transaction's first read, SQLite fails that write at once (SQLITE_BUSY_SNAPSHOT, "database is locked"),
    # without waiting: a "database is locked" after about 2 s when the other writer's commit came 2 s in.
    options = connection.get_execution_options()
    # Set per transaction, so a pooled connection never keeps another session's shorter wait.
    connection.exec_driver_sql(
        f"PRAGMA busy_timeout={int(options.get('sqlite_busy_timeout_ms', SQLITE_BUSY_TIMEOUT_MS))}"
    )
    connection.exec_driver_sql(options.get("sqlite_begin", "BEGIN"))


def alembic_config() -> Config:
    """An Alembic config pointing at the packaged migration scripts (for `command.upgrade`/`revision`)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


# The key of the PostgreSQL advisory lock that migrations take (any fixed 64-bit number; "yolo" in ASCII).
MIGRATION_LOCK_KEY = 0x796F6C6F


def init_db(url: str | Engine) -> Engine:
    """Brings the database at `url` to the newest schema (Alembic `upgrade head`); a no-op when it is there.

    Processes started together (the app and its workers) may all find a fresh database. The one that migrates holds
    a lock meanwhile (an advisory lock on PostgreSQL, the write lock on SQLite), and the others wait for it, then
    find the schema there. A database already at head is only read, so no process waits behind a long import.

    Args:
        url: a database URL or an engine made by `make_engine`.

    Returns:
        The engine (made from `url` when a URL was given).
    """
    engine = make_engine(url) if isinstance(url, str) else url
    config = alembic_config()
    head = ScriptDirectory.from_config(config).get_current_head()
    with engine.connect() as connection:
        if MigrationContext.configure(connection).get_current_revision() == head:
            return engine
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            connection = connection.execution_options(sqlite_begin="BEGIN IMMEDIATE")
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
            # env.py uses this connection rather than building its own engine from a URL (URLs with passwords
            # would otherwise go through configparser interpolation). Alembic reads the revision again, under the lock.
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    return engine


_SHARED: dict[tuple[int, str], Engine] = {}
_SHARED_LOCK = threading.Lock()


def shared_engine(url: str) -> Engine:
    """This process's engine for `url`, migrated at its first use: one connection pool per database and process.

    An engine made per call keeps its pooled connections open until the garbage collector finds it (30 calls left 15
    connections open on a PostgreSQL server, measured), which a long-lived app or worker would pile up. Keyed by
    process id too: pooled connections must not cross a fork (huey's process workers). A SQLite file deleted since
    (a storage folder reset) is made again rather than written through a connection to the deleted file.
    """
    key = (os.getpid(), url)
    with _SHARED_LOCK:
        engine = _SHARED.get(key)
        if engine is not None and _sqlite_file_gone(engine):
            engine.dispose()
            engine = None
        if engine is None:
            engine = _SHARED[key] = init_db(url)
        return engine


def _sqlite_file_gone(engine: Engine) -> bool:
    database = engine.url.database
    if engine.dialect.name != "sqlite" or database is None or database in ("", ":memory:"):
        return False
    return not Path(database).exists()


@contextmanager
def session_scope(engine: Engine, *, write: bool = False, busy_timeout_ms: int | None = None) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back (then re-raises) when it raises.

    A full disk is raised as `DiskFullError` (one line: which disk, what to do) after the rollback, and the callbacks
    registered with `on_rollback` (e.g. removing the image files this session wrote) run after any rollback.

    Args:
        write: the block writes. On a SQLite file the transaction then starts with BEGIN IMMEDIATE: it waits for
            another writer's lock (up to the busy timeout) before its first read, rather than failing at its first
            write when another writer committed meanwhile. Reads need no lock and leave this off.
        busy_timeout_ms: on a SQLite file, how long this session's writes wait for another connection's write
            lock before "database is locked" (default `SQLITE_BUSY_TIMEOUT_MS`); short for writes that may simply
            be put off (a job's progress), so they never stall their caller behind a long import.
    """
    session = Session(engine, expire_on_commit=False)
    try:
        if engine.dialect.name == "sqlite" and (write or busy_timeout_ms is not None):
            options: dict = {"sqlite_busy_timeout_ms": busy_timeout_ms} if busy_timeout_ms is not None else {}
            if write:
                options["sqlite_begin"] = "BEGIN IMMEDIATE"
            session.connection(execution_options=options)  # begins the transaction with these options
        yield session
        session.commit()
    except BaseException as error:
        try:
            session.rollback()
        finally:
            _run_rollback_callbacks(session)
        if isinstance(error, Exception) and not isinstance(error, DiskFullError) and disk_full(error):
            folder = Path(engine.url.database) if engine.dialect.name == "sqlite" and engine.url.database else None
            raise DiskFullError(full_disk_message(error, folder, rolled_back=True)) from error
        raise
    else:
        session.info.pop(_ROLLBACK_CALLBACKS, None)
    finally:
        session.close()


_ROLLBACK_CALLBACKS = "yolodex_on_rollback"


def on_rollback(session: Session, callback: Callable[[], None]) -> None:
    """Runs `callback` if `session` (from `session_scope`) rolls back instead of committing; dropped at its commit."""
    session.info.setdefault(_ROLLBACK_CALLBACKS, []).append(callback)


def _run_rollback_callbacks(session: Session) -> None:
    for callback in session.info.pop(_ROLLBACK_CALLBACKS, []):
        try:
            callback()
        except Exception:  # cleaning up must not hide the error that caused the rollback
            logger.warning("cleanup after a rollback failed", exc_info=True)
