"""Queued jobs. Each takes JSON-serialisable arguments and calls the backend; the settings come from the worker's
environment (the same variables as the app's), read when the task runs.

Label Studio jobs: `labeling_sync`, `labeling_prelabel`, `labeling_retrain`, and `labeling_poll`, a periodic task
(every minute) that pulls each synced project's annotations and queues a retrain when the loop says so
(`backend.labeling.loop`).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from huey import crontab

from backend.jobs.queue import make_huey

logger = logging.getLogger(__name__)

huey = make_huey()


@huey.task()
def labeling_sync(project_name: str) -> dict[str, Any]:
    from backend.labeling import service

    return service.sync(project_name)


@huey.task()
def labeling_prelabel(project_name: str, model_path: str, only_unlabeled: bool = True) -> dict[str, Any]:
    from backend.labeling import service

    return service.prelabel(model_path, project_name, only_unlabeled=only_unlabeled)


@huey.task()
def labeling_retrain(project_name: str) -> dict[str, Any]:
    from backend.labeling.loop import run_retrain
    from backend.labeling.service import labeling_session

    with huey.lock_task(f"labeling-retrain-{project_name}"), labeling_session(project_name) as (
        session, settings, project, client
    ):  # fmt: skip
        result = run_retrain(session, settings, project, client)
        return {**asdict(result), "run_dir": str(result.run_dir)}


def poll_labeling() -> list[dict[str, Any]]:
    """One poll of every synced project (what the periodic task runs); Label Studio being down skips the poll."""
    from backend.ingest.service import open_store
    from backend.labeling.client import LabelStudioError
    from backend.labeling.loop import check_loop, synced_projects
    from backend.labeling.service import labeling_session
    from backend.store.db import session_scope

    engine, _ = open_store()
    with session_scope(engine) as session:
        names = [project.name for project in synced_projects(session)]
    checks = []
    for name in names:
        try:
            with labeling_session(name) as (session, _settings, project, client):
                check = check_loop(session, project, client, enqueue=lambda name=name: labeling_retrain(name))
                checks.append({"project": name, **asdict(check)})
        except LabelStudioError as error:
            logger.warning("labeling poll of %r skipped: %s", name, error)
            checks.append({"project": name, "error": str(error)})
    return checks


@huey.periodic_task(crontab(minute="*"))
def labeling_poll() -> list[dict[str, Any]]:
    return poll_labeling()


@huey.on_startup()
def _recover() -> None:
    from backend.ingest.service import open_store
    from backend.labeling.loop import recover_interrupted
    from backend.store.db import session_scope

    engine, _ = open_store()
    with session_scope(engine) as session:
        reset = recover_interrupted(session)
    if reset:
        logger.warning("%d labeling retrains were interrupted by a worker restart; their loops are idle again", reset)
