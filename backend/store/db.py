"""Engine, schema migration and sessions for the metadata database.

SQLite is the default (one file in the storage folder, WAL journal so the app, the worker and the CLI can read
while one of them writes); any SQLAlchemy URL works, e.g. `postgresql+psycopg://user:password@host:5432/yolodex`
(psycopg 3; a plain `postgresql://` or `postgres://` URL means the same here). The schema is created and
upgraded only by the Alembic scripts in `backend/store/migrations/` (never `create_all`), so a database made by
an older yolodex is upgraded in place. The scripts ship inside the package: no alembic.ini is needed at run time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
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

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# How long a SQLite writer waits for another process's write lock before failing ("database is locked").
SQLITE_BUSY_TIMEOUT_MS = 10_000


BUSY_ADVICE = (
    "the database is busy: another process holds the SQLite file's write lock (an import or crawl writes in one "
    "transaction and commits at its end). Try again when it has finished (the Jobs page shows it); for several "
    "workers or people at once, put the metadata on a PostgreSQL server (YOLODEX_DATABASE_URL)"
)


def database_locked(error: BaseException) -> bool:
    """Whether `error` is SQLite saying another connection held the file's write lock past the busy timeout."""
    return isinstance(error, OperationalError) and "locked" in str(error.orig or error).lower()


def describe_error(error: BaseException) -> str:
    """One line for a person: `BUSY_ADVICE` for a locked SQLite file (instead of the SQL), else the error's text."""
    return BUSY_ADVICE if database_locked(error) else str(error)


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
        event.listen(engine, "connect", _configure_sqlite_connection)
        event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def _configure_sqlite_connection(dbapi_connection, _connection_record) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # SQLite leaves foreign keys off unless asked, per connection; ON DELETE CASCADE depends on them.
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")  # persistent in the file; an in-memory database answers "memory"
        cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: a crash loses at most the last commits
    finally:
        cursor.close()
    # The sqlite3 module opens transactions only before INSERT/UPDATE/DELETE, so a SAVEPOINT issued first would
    # run outside any transaction and its RELEASE would commit for good (a failed import would keep half its
    # images). Take transaction control away from the driver and BEGIN ourselves (SQLAlchemy's documented recipe).
    dbapi_connection.isolation_level = None


def _begin_sqlite_transaction(connection) -> None:
    # "BEGIN IMMEDIATE" (asked for by a connection's `sqlite_begin` option) takes the write lock at once, waiting
    # the busy timeout for it; a plain BEGIN takes it at the first write, and fails there if another writer won.
    connection.exec_driver_sql(connection.get_execution_options().get("sqlite_begin", "BEGIN"))


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
    return engine.dialect.name == "sqlite" and bool(database) and database != ":memory:" and not Path(database).exists()


@contextmanager
def session_scope(engine: Engine, *, busy_timeout_ms: int | None = None) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back (then re-raises) when it raises.

    Args:
        busy_timeout_ms: on a SQLite file, how long this session's writes wait for another connection's write
            lock before "database is locked" (default `SQLITE_BUSY_TIMEOUT_MS`); short for writes that may simply
            be put off (a job's progress), so they never stall their caller behind a long import.
    """
    session = Session(engine, expire_on_commit=False)
    raw = None
    if busy_timeout_ms is not None and engine.dialect.name == "sqlite":
        raw = session.connection().connection.dbapi_connection
        raw.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        if raw is not None:  # the connection goes back to the pool: with the usual timeout
            raw.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        session.close()
