"""The worker's module: the queue's tasks. `run_job(job_id, where)` runs one row of the jobs table, whatever its
kind (`backend.jobs.dispatch`, re-exported here for the consumer); `labeling_poll` is a periodic task (every minute)
that pulls the annotations of each synced project whose retrain loop the user turned on, and queues a retrain job
when the loop says so (`backend.labeling.loop`).

The worker: `huey_consumer backend.jobs.tasks.huey -k process -w 1 -m 1`. Its settings come from its environment
(the same `YOLODEX_*` variables as the app's); a job carries its storage folder and database URL, so a job submitted
with explicit settings (tests, an immediate queue) runs against the same database it was recorded in.

Lifecycle hooks: a starting worker marks the running jobs of dead processes on its host "interrupted"
(`lifecycle.recover_dead_jobs`) and resets labeling loops whose retrain died; SIGNAL_INTERRUPTED (the consumer
stopped by SIGTERM mid-task) marks that task's job interrupted. Each worker process also runs a watchdog thread that
marks, every heartbeat interval, the running jobs whose worker stopped sending heartbeats, on any machine
(`lifecycle.interrupt_stale_jobs`), and each task checks the same before it starts.

Several workers, on one or several machines: point them all at one Redis queue, one database and one storage folder
(a shared mount at the same path on every machine), with the same environment as the app:

    YOLODEX_QUEUE_URL=redis://queue-host:6379/0 YOLODEX_DATABASE_URL=postgresql+psycopg://... \
    YOLODEX_STORAGE=/mnt/yolodex huey_consumer backend.jobs.tasks.huey -k process -w 1 -m 1

Each consumer takes one job at a time (`-w 1`: a training uses the whole machine); add consumers to run more jobs
at once. A machine that dies mid-job leaves its job "running" until its heartbeat is `YOLODEX_JOB_STALE_S` old;
then it is "interrupted" and `api.resume` queues its continuation for whichever worker is free.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import threading
import time
from dataclasses import asdict
from typing import Any

from huey import crontab, signals

from backend.ingest.service import open_store
from backend.jobs import lifecycle
from backend.jobs.api import STARTED_BY, submit
from backend.jobs.dispatch import enqueue_job, revoke_job, run_job, settings_from
from backend.jobs.queue import huey, on_redis
from backend.labeling import loop
from backend.labeling.client import LabelStudioError
from backend.labeling.service import labeling_session
from backend.settings import Settings, get_settings
from backend.store.db import session_scope

__all__ = [
    "enqueue_job",
    "huey",
    "labeling_poll",
    "labeling_prelabel",
    "labeling_retrain",
    "labeling_sync",
    "poll_labeling",
    "revoke_job",
    "run_job",
]

logger = logging.getLogger(__name__)


@huey.signal(signals.SIGNAL_INTERRUPTED)
def _on_interrupted(signal: str, task: Any, *_args: Any, **_kwargs: Any) -> None:
    # The runner marks the job itself when the interrupt reaches it; this covers a stop outside its try block.
    if getattr(task, "name", None) != "run_job" or not task.args:
        return
    job_id, where = task.args[0], task.args[1] if len(task.args) > 1 else None
    lifecycle.mark_interrupted(int(job_id), settings_from(where), "interrupted: the worker was stopped mid-job")


def labeling_sync(project_name: str) -> int:
    """Queues a sync job; returns its id."""
    return submit("labeling_sync", {"project": project_name})


def labeling_prelabel(project_name: str, model_path: str, only_unlabeled: bool = True) -> int:
    """Queues a pre-label job; returns its id."""
    return submit("labeling_prelabel", {"project": project_name, "model": model_path, "only_unlabeled": only_unlabeled})


def labeling_retrain(project_name: str) -> int:
    """Queues a retrain job (what the loop does when enough new annotations arrived); returns its id. The job says
    the loop started it (`started_by`), so the Jobs page tells it from the ones the user started."""
    return submit("labeling_retrain", {"project": project_name, STARTED_BY: loop.STARTED_BY})


def poll_labeling() -> list[dict[str, Any]]:
    """One poll of every synced project whose loop is on (what the periodic task runs; a project whose loop is off
    is not visited: nothing is pulled or queued for it); Label Studio being down skips the poll."""
    engine, _ = open_store()
    with session_scope(engine) as session:
        names = [project.name for project in loop.synced_projects(session, loop_on=True)]
    checks = []
    for name in names:
        try:
            with labeling_session(name) as (session, _settings, project, client):
                check = loop.check_loop(session, project, client, enqueue=functools.partial(labeling_retrain, name))
                checks.append({"project": name, **asdict(check)})
        except LabelStudioError as error:
            logger.warning("labeling poll of %r skipped: %s", name, error)
            checks.append({"project": name, "error": str(error)})
    return checks


@huey.periodic_task(crontab(minute="*"))
def labeling_poll() -> list[dict[str, Any]]:
    return poll_labeling()


def _watch_heartbeats(settings: Settings) -> None:
    interval = lifecycle.heartbeat_interval_s()
    while True:
        time.sleep(interval)
        try:
            dead = lifecycle.interrupt_stale_jobs(settings)
        except Exception as error:  # the database briefly away: try again next time
            logger.warning("the heartbeat watchdog could not check the jobs: %s", error)
            continue
        if dead:
            logger.warning("jobs %s stopped sending heartbeats (their worker died): marked interrupted", dead)


WORKER_LOG_FORMAT = "[%(asctime)s] %(levelname)s:%(name)s:%(process)d:%(threadName)s:%(message)s"


def _log_backend_to_stderr() -> None:
    """Sends the `backend` loggers (INFO and up) to the worker's stderr, its log file, whichever thread logs: huey
    configures only its own logger, and without this a warning of a job's heartbeat or of the watchdog thread would
    reach no handler while a job runs (the job's log-tail handler keeps its own thread's records only)."""
    backend = logging.getLogger("backend")
    if any(getattr(handler, "yolodex_worker", False) for handler in backend.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(WORKER_LOG_FORMAT))
    handler.setLevel(logging.INFO)
    handler.yolodex_worker = True  # type: ignore[attr-defined]
    backend.addHandler(handler)
    if backend.getEffectiveLevel() > logging.INFO:
        backend.setLevel(logging.INFO)


@huey.on_startup()
def _recover() -> None:
    _log_backend_to_stderr()
    settings = get_settings()
    redis = on_redis(settings)
    if redis and settings.database_url.startswith("sqlite"):
        logger.warning(
            "the queue is on Redis but the database is a SQLite file: workers on other machines cannot share it, "
            "and several workers writing it at once fail with 'database is locked'. Set YOLODEX_DATABASE_URL to a "
            "PostgreSQL server (postgresql+psycopg://user:password@host:5432/yolodex) for more than one worker."
        )
    if 3 * lifecycle.heartbeat_interval_s() > lifecycle.stale_after_s() * (1 + 1e-9):  # 3 x 0.2 is 0.6000000000000001
        logger.warning(
            "YOLODEX_JOB_HEARTBEAT_S=%g is more than a third of YOLODEX_JOB_STALE_S=%g: a slow beat may get a live "
            "job marked interrupted. Keep the interval well under the timeout (defaults 10 and 60).",
            lifecycle.heartbeat_interval_s(),
            lifecycle.stale_after_s(),
        )
    threading.Thread(target=_watch_heartbeats, args=(settings,), name="heartbeat-watchdog", daemon=True).start()
    interrupted = lifecycle.recover_dead_jobs(settings)
    if interrupted:
        logger.warning("jobs %s were running in a worker that stopped: marked interrupted", interrupted)
    engine, _ = open_store(settings)
    with session_scope(engine) as session:
        reset = loop.recover_interrupted(session)
    if reset:
        logger.warning("%d labeling retrains were interrupted by a worker restart; their loops are idle again", reset)
    queue = "a Redis queue" if redis else "the SQLite queue"
    # Its start-up hooks ran; the next step is the queue. The URLs may hold passwords: the line names the kind only.
    logger.info("worker process %s:%d is ready and takes jobs from %s", socket.gethostname(), os.getpid(), queue)
