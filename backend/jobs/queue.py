"""The huey instance every process shares: SQLite under the storage folder by default, Redis for a `redis://` URL.

The consumer (the worker) runs `huey_consumer backend.jobs.tasks.huey -k process -w 1`; the app and the CLI only
enqueue. `YOLODEX_QUEUE_IMMEDIATE=1` (or `huey.immediate = True` in tests) runs each task inline, in the caller's
process, with in-memory storage: no worker needed.

Two workers on two machines (any number works alike): run one Redis server, one PostgreSQL database and one storage
folder that every machine mounts at the same path, then on each machine, with the same environment as the app:

    export YOLODEX_QUEUE_URL=redis://queue-host:6379/0
    export YOLODEX_DATABASE_URL=postgresql+psycopg://yolodex:PASSWORD@db-host:5432/yolodex
    export YOLODEX_STORAGE=/mnt/yolodex
    huey_consumer backend.jobs.tasks.huey -k process -w 1 -m 1

Each job goes to whichever worker is free. A SQLite database cannot be shared between machines (a worker says so
when it meets one with Redis). Dead workers are found by their jobs' heartbeats (`YOLODEX_JOB_HEARTBEAT_S`,
`YOLODEX_JOB_STALE_S`: see `backend.jobs.api`).
"""

from __future__ import annotations

import os

from huey import Huey, RedisHuey, SqliteHuey

from backend.settings import Settings, get_settings

QUEUE_NAME = "yolodex"


def on_redis(settings: Settings) -> bool:
    """Whether the settings' queue is a Redis server (`redis://` or `rediss://`), not the SQLite file."""
    return settings.queue_url.startswith(("redis://", "rediss://"))


def make_huey(settings: Settings | None = None) -> Huey:
    """A huey for the settings' queue URL (`sqlite:///<path>` or `redis://host:port/db`)."""
    settings = settings or get_settings()
    immediate = os.environ.get("YOLODEX_QUEUE_IMMEDIATE", "").strip().lower() in ("1", "true", "yes")
    if on_redis(settings):
        return RedisHuey(QUEUE_NAME, url=settings.queue_url, immediate=immediate)
    path = settings.queue_url.removeprefix("sqlite:///")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return SqliteHuey(QUEUE_NAME, filename=path, immediate=immediate)


huey = make_huey()  # the queue of this process's environment; the consumer runs `backend.jobs.tasks.huey`, this one
QUEUE_URL = get_settings().queue_url  # the queue `huey` was made for
