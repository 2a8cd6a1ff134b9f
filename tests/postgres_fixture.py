"""A real PostgreSQL server for the tests (Debian's `postgresql` package, any version from 13 on).

`postgres_server` (session scoped) runs `initdb` into a fresh temporary folder and starts `postgres` on a free
port of 127.0.0.1 only (its unix socket in that folder too), with password (scram-sha-256) authentication for
one superuser, and stops it with `pg_ctl stop -m fast` at the end of the session, failures included.
`postgres_url` gives each test its own fresh database (dropped afterwards).

initdb and postgres refuse to run as root: under root they run as the `postgres` system user (`runuser`), and
the folder is made in /tmp (pytest's own tmp dirs are root-only, 0700) and handed to that user. The binaries
come from `pg_config --bindir`, else the newest /usr/lib/postgresql/*/bin; the tests that need them skip, saying
what to install, when there are none (CI has them: `make setup` apt-installs `postgresql`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.labelstudio_fixture import free_port

USER = "yolodex_test"
_START_ATTEMPTS = 3  # another process may take the free port between free_port() and postgres binding it


@dataclass(frozen=True)
class PostgresServer:
    """A running server: `host:port` over TCP, `user`/`password` a superuser; `repr` hides the password."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    data_dir: Path

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        """A URL for `database`: SQLAlchemy's with psycopg 3 by default; `driver="postgresql"` for libpq/Django."""
        return f"{driver}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """Creates an empty database (`name`, else a fresh unique one) and returns its name."""
        import psycopg  # deferred: the suite imports this plugin even where psycopg is not installed

        name = name or f"test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url("postgres", "postgresql"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drops `name`, closing whatever connections still use it (PostgreSQL 13+ `WITH (FORCE)`)."""
        import psycopg

        with psycopg.connect(self.url("postgres", "postgresql"), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres: `pg_config --bindir`, else the newest Debian one."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        result = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if result.returncode == 0:
            candidates.append(Path(result.stdout.strip()))

    def version(path: Path) -> float:
        with contextlib.suppress(ValueError):
            return float(path.parent.name)
        return 0.0

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    return None


def _as_server_user(command: list[str]) -> list[str]:
    """`command` as the `postgres` system user when we are root (initdb/postgres refuse root), else as is."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(_as_server_user(command), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")


def _start(bindir: Path, root: Path, data_dir: Path) -> int:
    """Starts postgres on a free port and returns the port; retries on a new port when it was taken meanwhile."""
    log = root / "postgres.log"
    for attempt in range(_START_ATTEMPTS):
        port = free_port()
        # fsync and friends off: a test database need not survive a power cut, and it halves write latency.
        options = (
            f"-c listen_addresses=127.0.0.1 -p {port} -k {root / 'socket'} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        command = [str(bindir / "pg_ctl"), "-D", str(data_dir), "-l", str(log), "-o", options, "-w", "-t", "60"]
        try:
            _run([*command, "start"], "pg_ctl start")
            return port
        except RuntimeError:
            if attempt == _START_ATTEMPTS - 1:
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
                raise RuntimeError(f"PostgreSQL did not start; the end of {log}:\n{tail}") from None
    raise AssertionError("unreachable")


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here (or no way to run them as root); the message says what to install."""


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """Initialises and starts a throw-away server; stops it and deletes its folder when the block ends.

    Raises:
        PostgresUnavailable: the binaries (or, as root, the `postgres` user and runuser) are missing.
        RuntimeError: initdb or the start failed (the message carries the output or the server log's end).
    """
    bindir = postgres_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            "needs PostgreSQL's server binaries (initdb, pg_ctl, postgres): `apt-get install postgresql` "
            "(make setup does this in CI)"
        )
    if os.geteuid() == 0 and (shutil.which("runuser") is None or not _has_user("postgres")):
        raise PostgresUnavailable("running as root needs the `postgres` system user and runuser to start PostgreSQL")
    root = Path(tempfile.mkdtemp(prefix="yolodex-postgres-"))
    data_dir = root / "data"
    password = secrets.token_urlsafe(18)
    started = False
    try:
        (root / "socket").mkdir()
        password_file = root / "password"
        password_file.write_text(password + "\n")
        password_file.chmod(0o600)
        if os.geteuid() == 0:
            for path in (root, root / "socket", password_file):
                shutil.chown(path, "postgres", "postgres")
        _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                USER,
                f"--pwfile={password_file}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            "initdb",
        )
        password_file.unlink()
        port = _start(bindir, root, data_dir)
        started = True
        yield PostgresServer(host="127.0.0.1", port=port, user=USER, password=password, data_dir=data_dir)
    finally:
        if started:
            with contextlib.suppress(RuntimeError):
                _run([str(bindir / "pg_ctl"), "-D", str(data_dir), "-m", "fast", "-w", "stop"], "pg_ctl stop")
        shutil.rmtree(root, ignore_errors=True)


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on a free 127.0.0.1 port with password auth, stopped after the session."""
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(running_postgres())
        except PostgresUnavailable as error:
            pytest.skip(str(error))
        except RuntimeError as error:
            pytest.fail(f"PostgreSQL could not be set up for the tests: {error}", pytrace=False)
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The SQLAlchemy URL (`postgresql+psycopg://...`) of a fresh, empty database, dropped after the test."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)
