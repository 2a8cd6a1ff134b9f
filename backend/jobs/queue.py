"""The huey instance every process shares: SQLite under the storage folder by default, Redis for a `redis://` URL.

The consumer (the worker) runs `huey_consumer backend.jobs.tasks.huey -k process -w 1`; the app and the CLI only
enqueue. `YOLODEX_QUEUE_IMMEDIATE=1` (or `huey.immediate = True` in tests) runs each task inline, in the caller's
process, with in-memory storage: no worker needed.
"""

from __future__ import annotations

import os

from huey import Huey, RedisHuey, SqliteHuey

from backend.settings import Settings, get_settings

QUEUE_NAME = "yolodex"


def make_huey(settings: Settings | None = None) -> Huey:
    """A huey for the settings' queue URL (`sqlite:///<path>` or `redis://host:port/db`)."""
    settings = settings or get_settings()
    immediate = os.environ.get("YOLODEX_QUEUE_IMMEDIATE", "").strip().lower() in ("1", "true", "yes")
    if settings.queue_url.startswith(("redis://", "rediss://")):
        return RedisHuey(QUEUE_NAME, url=settings.queue_url, immediate=immediate)
    path = settings.queue_url.removeprefix("sqlite:///")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return SqliteHuey(QUEUE_NAME, filename=path, immediate=immediate)
