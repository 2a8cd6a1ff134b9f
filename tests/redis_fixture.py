"""A real redis-server for the tests (Debian's `redis-server` package).

`redis_server` (session scoped) starts `redis-server` on a free port of 127.0.0.1 only, without persistence (no
RDB snapshots, no AOF) and with its working folder in a temporary directory, waits until it answers PING, yields
its URL (`redis://127.0.0.1:<port>/0`) and shuts it down at the end of the session, failures included. Tests that
need it skip, saying what to install, when there is no `redis-server` (CI has it: `make setup` apt-installs it).
Each test that uses it should take its own database number or flush it (`flush_redis`).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.labelstudio_fixture import free_port

_START_ATTEMPTS = 3  # another process may take the free port between free_port() and redis binding it


def _ping(url: str) -> bool:
    import redis  # deferred: the suite imports this plugin even where the client is not installed

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _start(binary: str, folder: Path) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = folder / f"redis-{port}.log"
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    command += ["--dir", str(folder), "--logfile", str(log), "--daemonize", "no"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and process.poll() is None:
        if _ping(url):
            return process, url, log
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)
    raise RuntimeError(f"redis-server did not answer on port {port}: {log.read_text()[-2000:] if log.exists() else ''}")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A running redis-server's URL, `redis://127.0.0.1:<port>/0`."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: apt-get install redis-server (make setup does, as root)")
    pytest.importorskip("redis", reason="the redis client is missing: make setup installs requirements.txt")
    with tempfile.TemporaryDirectory(prefix="yolodex-redis-") as folder:
        error: Exception | None = None
        for _ in range(_START_ATTEMPTS):
            try:
                process, url, _log = _start(binary, Path(folder))
                break
            except RuntimeError as failure:
                error = failure
        else:
            raise RuntimeError(f"could not start redis-server: {error}")
        try:
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def flush_redis(url: str) -> None:
    """Empties the database `url` names (each test starts from an empty queue)."""
    import redis

    redis.Redis.from_url(url).flushdb()
