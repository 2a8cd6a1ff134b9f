"""Label Studio steps by project name, for the CLI and the jobs: each opens the store and a client, runs one step
of `backend.labeling.sync` / `loop`, commits, and returns a JSON-serialisable dict.

A step's dict carries "summary" (one line, counts from the step's report) and "level": "success", or "warning"
when the step went through but left something for the user to look at (a pull with boxes it could not read)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from backend.ingest.service import DEFAULT_PROJECT, _project, open_store
from backend.labeling import loop as loop_module
from backend.labeling import sync as sync_module
from backend.labeling.client import LabelStudioClient, connect
from backend.labeling.server import labelstudio_url
from backend.settings import Settings, get_settings
from backend.store.db import session_scope
from backend.store.models import Project


@contextmanager
def labeling_session(
    project_name: str, settings: Settings | None = None
) -> Iterator[tuple[Session, Settings, Project, LabelStudioClient]]:
    """(session, settings, project, client) for one project; the session commits when the block ends."""
    settings = settings or get_settings()
    engine, _ = open_store(settings)
    with connect(settings) as client, session_scope(engine) as session:
        yield session, settings, _project(session, project_name), client


def sync(project: str = DEFAULT_PROJECT, settings: Settings | None = None) -> dict[str, Any]:
    with labeling_session(project, settings) as (session, resolved, target, client):
        report = sync_module.sync_project(session, resolved, target, client)
        return {
            **asdict(report),
            "summary": report.summary(),
            "level": "success",
            "url": _project_url(resolved, report.ls_project_id),
        }


def pull(project: str = DEFAULT_PROJECT, settings: Settings | None = None) -> dict[str, Any]:
    with labeling_session(project, settings) as (session, _resolved, target, client):
        report = sync_module.pull_annotations(session, target, client)
        level = "warning" if report.problems or report.unmapped else "success"
        return {**asdict(report), "summary": report.summary(), "level": level}


def prelabel(
    model: str | Path,
    project: str = DEFAULT_PROJECT,
    *,
    only_unlabeled: bool = True,
    imgsz: int | None = None,
    settings: Settings | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    with labeling_session(project, settings) as (session, resolved, target, client):
        report = sync_module.prelabel(
            session,
            resolved,
            target,
            client,
            model,
            only_unlabeled=only_unlabeled,
            imgsz=imgsz,
            on_progress=on_progress,
        )
        level = "warning" if report.dropped or not report.tasks else "success"
        return {**asdict(report), "summary": report.summary(), "level": level}


def queue(project: str = DEFAULT_PROJECT, limit: int = 20, settings: Settings | None = None) -> dict[str, Any]:
    """The least-confident-first queue with a labeling link per task (no Label Studio request)."""
    settings = settings or get_settings()
    engine, _ = open_store(settings)
    with session_scope(engine) as session:
        target = _project(session, project)
        row = sync_module.labeling_project(session, target)
        base = labelstudio_url(settings)
        items = [
            {**asdict(item), "url": sync_module.task_url(base, row.ls_project_id, item.task_id)}
            for item in sync_module.labeling_queue(session, target, limit)
        ]
        return {"project": project, "ls_project_id": row.ls_project_id, "items": items}


def loop(
    project: str = DEFAULT_PROJECT,
    *,
    retrain_every: int | None = None,
    settings: Settings | None = None,
    **changes: Any,
) -> dict[str, Any]:
    """Changes the loop's settings (when any are given) and returns its status."""
    settings = settings or get_settings()
    engine, _ = open_store(settings)
    with session_scope(engine) as session:
        target = _project(session, project)
        if retrain_every is not None or changes:
            loop_module.configure_loop(session, target, retrain_every=retrain_every, **changes)
        return loop_module.loop_status(session, settings, target)


def loop_start_choices(loop_settings: dict[str, Any] | None, settings: Settings | None = None) -> dict[str, str]:
    """Where a retrain may start (choice → words), for a loop with these settings (`loop.start_choices`)."""
    options = loop_module.LoopSettings.from_dict(loop_settings)
    return loop_module.start_choices(settings or get_settings(), options)


start_choice_of = loop_module.start_choice_of
start_weights_of = loop_module.start_weights_of


def task_link(image_id: int, settings: Settings | None = None) -> str | None:
    """The Label Studio labeling view of one image's task (for "fix this in Label Studio" links), None when the
    image was never synced. Reads only our database."""
    settings = settings or get_settings()
    engine, _ = open_store(settings)
    with session_scope(engine) as session:
        return sync_module.task_links(session, [image_id], labelstudio_url(settings)).get(image_id)


def _project_url(settings: Settings, ls_project_id: int) -> str:
    return f"{labelstudio_url(settings)}/projects/{ls_project_id}/data"
