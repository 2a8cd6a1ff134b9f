"""The `Run` rows of training runs: created when a training job starts, their status kept as the job goes.

A run's folder is stored relative to the storage folder when it lies inside it (absolute otherwise), so a storage
folder moved whole keeps its runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from backend.settings import Settings
from backend.store.models import DatasetVersion, Project, Run


def stored_folder(path: Path, settings: Settings) -> str:
    """How a folder is written in the database: relative to the storage folder when inside it, else absolute."""
    path = path.resolve()
    return str(path.relative_to(settings.storage)) if path.is_relative_to(settings.storage) else str(path)


def start_run(
    session: Session,
    settings: Settings,
    project_name: str | None,
    run_dir: Path,
    train: dict[str, Any],
    job_id: int,
) -> int | None:
    """The run's `Run` row (created, or found by folder when resuming), now "running"; None without a project.

    Args:
        project_name: the job's project; None takes the project of the dataset version `train["data"]` names.
        train: the run's TrainConfig as a dict (recorded on a new row, with the job that started it).
    """
    folder = stored_folder(run_dir, settings)
    run = session.scalar(select(Run).where(Run.folder == folder).order_by(Run.id.desc()))
    if run is None:
        data_folder = stored_folder(Path(train["data"]), settings) if train.get("data") else None
        version = (
            session.scalar(select(DatasetVersion).where(DatasetVersion.folder == data_folder)) if data_folder else None
        )
        project = session.scalar(select(Project).where(Project.name == project_name)) if project_name else None
        if project is None and version is not None:
            project = session.get(Project, version.project_id)
        if project is None:
            return None
        if version is not None and version.project_id != project.id:
            version = None
        run = Run(
            project_id=project.id,
            dataset_version_id=version.id if version else None,
            folder=folder,
            config={"train": train, "origin": "job", "job_id": job_id},
        )
        session.add(run)
    run.status = "running"
    session.flush()
    return run.id


def set_run_status(session: Session, settings: Settings, run_dir: Path, status: str) -> None:
    """Sets the status of the run rows of `run_dir` (running, succeeded, failed, cancelled, interrupted)."""
    session.execute(update(Run).where(Run.folder == stored_folder(run_dir, settings)).values(status=status))
