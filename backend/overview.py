"""The workflow at a glance (the Home page): each step's state for one project and the next thing to do."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from backend.catalog import project_runs, trained_runs
from backend.ingest.starter import STARTER_NAME
from backend.settings import Settings
from backend.store.db import session_scope, shared_engine
from backend.store.models import DatasetVersion, Image, Job, LabelingProject, Project, Run, project_classes

CURRENT_STATUSES = ("ok", "near_duplicate")


@dataclass(frozen=True)
class Step:
    """One workflow step.

    Attributes:
        name: "Ingest", "Label", "Dataset version", "Train", "INT8", "Pokédex".
        page: the page that does it (its url path).
        done: whether the step has produced what the next one needs.
        detail: one line with the step's numbers.
        todo: what to do there when it is not done (empty when done).
    """

    name: str
    page: str
    done: bool
    detail: str
    todo: str = ""


def workflow_steps(session: Session, settings: Settings, project: Project) -> list[Step]:
    """The steps for `project`, in workflow order. Runs are the project's (`catalog.project_runs`) with trained
    weights (`catalog.trained_runs`: a run cancelled before it learned anything does not count)."""
    images = session.scalar(
        select(func.count())
        .select_from(Image)
        .where(Image.project_id == project.id, Image.status.in_(CURRENT_STATUSES))
    )
    labeled = session.scalar(
        select(func.count())
        .select_from(Image)
        .where(Image.project_id == project.id, Image.status.in_(CURRENT_STATUSES), Image.labeled.is_(True))
    )
    versions = session.scalar(
        select(func.count()).select_from(DatasetVersion).where(DatasetVersion.project_id == project.id)
    )
    synced = session.get(LabelingProject, project.id) is not None
    names = [item.name for item in project_classes(session, project)]
    trained = project_runs(session, settings, project.name, trained_runs(settings))
    int8 = [run for run in trained if run.model("int8")]
    images, labeled, versions = int(images or 0), int(labeled or 0), int(versions or 0)
    return [
        Step(
            "Ingest",
            "datasets",
            images > 0,
            f"{images} images, {len(names)} classes",
            "upload photos or a zip, or crawl the web, on the Datasets page",
        ),
        Step(
            "Label",
            "label",
            labeled > 0,
            f"{labeled} of {images} labeled" + (" · in Label Studio" if synced else ""),
            "sync the project to Label Studio and draw boxes, least confident first",
        ),
        Step(
            "Dataset version",
            "datasets",
            versions > 0,
            f"{versions} frozen versions",
            "freeze the labeled images into a version on the Datasets page",
        ),
        Step(
            "Train",
            "train",
            bool(trained),
            f"{len(trained)} trained runs",
            "train YOLO-NAS on a version on the Train page",
        ),
        Step("INT8", "quantize", bool(int8), f"{len(int8)} INT8 models", "quantize the best run on the Quantize page"),
        Step("Pokédex", "pokedex", bool(int8 or trained), "try the best model on a photo", "train a model first"),
    ]


def project_steps(settings: Settings, project_name: str) -> list[Step]:
    """`workflow_steps` of the project named `project_name`, in a session of their own (the Home page's call)."""
    with session_scope(shared_engine(settings.database_url)) as session:
        project = session.scalars(select(Project).where(Project.name == project_name)).one()
        return workflow_steps(session, settings, project)


def next_step(steps: list[Step]) -> Step | None:
    """The first step not done yet (None when all are)."""
    return next((step for step in steps if not step.done), None)


def project_names(engine: Engine) -> list[str]:
    """Every project's name, oldest first."""
    with session_scope(engine) as session:
        return list(session.scalars(select(Project.name).order_by(Project.id)))


def last_worked_on(engine: Engine) -> str | None:
    """`last_active_project` in a session of its own."""
    with session_scope(engine) as session:
        return last_active_project(session)


def last_active_project(session: Session) -> str | None:
    """The project the user last worked on: the newest of its creation, its last added image, its last frozen
    version, its last run and its last job. The demo project (the Starter Pokédex) only when it is the only one.
    None when there is no project."""
    activity: dict[str, datetime] = {}

    def note(rows) -> None:
        for name, when in rows:
            if name is not None and when is not None:
                when = when if when.tzinfo else when.replace(tzinfo=UTC)  # SQLite returns naive UTC times
                activity[name] = max(activity.get(name, when), when)

    note(session.execute(select(Project.name, Project.created_at)))
    for model, column in ((Image, Image.added_at), (DatasetVersion, DatasetVersion.created_at), (Run, Run.created_at)):
        note(
            session.execute(
                select(Project.name, func.max(column))
                .join(model, model.project_id == Project.id)
                .group_by(Project.name)
            )
        )
    note(session.execute(select(Job.project, func.max(Job.created_at)).group_by(Job.project)))
    if not activity:
        return None
    own = [name for name in activity if name != STARTER_NAME] or list(activity)
    return max(own, key=lambda name: activity[name])
