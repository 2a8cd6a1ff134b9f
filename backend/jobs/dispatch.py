"""Putting a job on the queue and taking it off: the huey task `run_job(job_id, where)` that runs one row of the
jobs table in a worker (`runner.execute_job`), whatever its kind.

A job carries its storage folder and database URL (`where`), so a job submitted with explicit settings (tests, an
immediate queue) runs against the same database it was recorded in. `backend.jobs.api` calls `enqueue_job` and
`revoke_job`; the worker's own module is `backend.jobs.tasks`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from huey import Huey
from sqlalchemy import update

from backend.jobs.lifecycle import interrupt_stale_jobs_quietly, job_engine
from backend.jobs.queue import QUEUE_URL, huey, make_huey
from backend.jobs.runner import execute_job
from backend.settings import Settings, get_settings
from backend.store.db import session_scope
from backend.store.models import Job

_OTHER_QUEUES: dict[str, tuple[Huey, Any]] = {}


def where(settings: Settings) -> dict[str, str]:
    """The storage folder and database a job runs against (what `settings_from` reads back in the worker)."""
    return {"storage": str(settings.storage), "database_url": settings.database_url}


def settings_from(place: dict[str, str] | None) -> Settings:
    settings = get_settings()
    if place:
        settings = replace(settings, storage=Path(place["storage"]), database_url=place["database_url"])
    return settings


def _run_job(job_id: int, place: dict[str, str] | None = None) -> None:
    settings = settings_from(place)
    interrupt_stale_jobs_quietly(settings)
    execute_job(int(job_id), settings)
    return None  # the state is in the jobs table; a stored result would only grow the queue's storage


# huey keys a task by its function's module and name: "backend.jobs.tasks.run_job", as before the jobs were split
# into modules, so messages an older version left in a queue still find their task.
_run_job.__module__ = "backend.jobs.tasks"
run_job = huey.task(name="run_job")(_run_job)


def queue_for(settings: Settings) -> tuple[Huey, Any]:
    """The huey and its `run_job` task for `settings`' queue: this process's, or one made for another queue URL."""
    if huey.immediate or settings.queue_url == QUEUE_URL:
        return huey, run_job
    if settings.queue_url not in _OTHER_QUEUES:
        other = make_huey(settings)
        _OTHER_QUEUES[settings.queue_url] = (other, other.task(name="run_job")(_run_job))
    return _OTHER_QUEUES[settings.queue_url]


def enqueue_job(job_id: int, settings: Settings) -> str:
    """Queues the job row `job_id` (already committed as "queued"); returns the huey task id it was given.

    The task id is stored on the row before the task is queued, so an immediate queue that runs it inline, or a
    cancel right after, both find it.
    """
    queue, task = queue_for(settings)
    message = task.s(job_id, where(settings))
    with session_scope(job_engine(settings)) as session:
        session.execute(update(Job).where(Job.id == job_id).values(task_id=message.id))
    queue.enqueue(message)
    return message.id


def revoke_job(task_id: str, settings: Settings) -> None:
    """Revokes a queued task so a worker that pops it skips it."""
    queue, _ = queue_for(settings)
    if not queue.immediate:
        queue.revoke_by_id(task_id)
