"""The Evaluate page's data and actions: the runs it can evaluate (the project's, each with a checkpoint), a run's
model files, the datasets it can be evaluated on, the evaluation job it follows, queueing one, and the Label Studio
links of the errors shown. The evaluation file itself is shaped by `backend.evaluation.report` and
`backend.evaluation.view`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backend import catalog
from backend.evaluation import report, view
from backend.jobs import api as jobs
from backend.jobs import outcome
from backend.labeling.server import labelstudio_url
from backend.labeling.sync import task_links
from backend.settings import Settings
from backend.store.db import session_scope, shared_engine
from backend.training import presets


def evaluable_runs(settings: Settings, project: str | None) -> list[catalog.RunInfo]:
    """The trained runs with a checkpoint (a run cancelled before its first one has nothing to evaluate), only
    `project`'s when one is chosen."""
    runs = [run for run in catalog.trained_runs(settings) if run.model("checkpoint") is not None]
    if project is None:
        return runs
    with session_scope(shared_engine(settings.database_url)) as session:
        return catalog.project_runs(session, settings, project, runs)


def model_files(run: catalog.RunInfo) -> list[Path]:
    """The run's files that can be evaluated (`view.MODEL_FILES` that exist), checkpoints first."""
    return [run.path / name for name in view.MODEL_FILES if (run.path / name).is_file()]


def dataset_choices(
    settings: Settings, project: str | None, run: catalog.RunInfo
) -> tuple[list[tuple[str, Path]], int]:
    """(name, folder) of each dataset the run can be evaluated on: the project's frozen versions, and the run's own
    dataset first when it is none of them; and the index of the one it was trained on (`view.dataset_choices`)."""
    versions: list[presets.VersionChoice] = []
    if project:
        with session_scope(shared_engine(settings.database_url)) as session:
            versions = presets.frozen_versions(session, settings.storage, project)
    trained_on = Path(str(run.config.get("data", "")))
    return view.dataset_choices(trained_on, [(version.name, version.folder) for version in versions])


def followed_job(settings: Settings, wanted: str, out: Path) -> jobs.JobView | None:
    """The evaluation job in the page's address (`wanted`, a job id or "") when it writes `out`, the file of the
    current choice; None when there is none or it evaluated another choice."""
    try:
        job = jobs.get_job(int(wanted), settings) if wanted.isdigit() else None
    except ValueError:  # no such job
        return None
    return job if job is not None and job.params.get("out") == str(out) else None


def current_job(settings: Settings, job_id: int) -> jobs.JobView:
    """The job as it is now (the progress fragment reads it every 2 s)."""
    return jobs.get_job(job_id, settings)


def progress_text(job: jobs.JobView) -> str:
    """The progress bar's line: "evaluation job 7 running: 40/100 images" (a failure's error is shown apart)."""
    message = "" if job.state == "failed" else f": {job.message or ''}"
    return f"evaluation job {job.id} {job.state}{message}"


def submit_evaluation(
    settings: Settings, project: str | None, run: catalog.RunInfo, model: Path, data: Path, split: str, out: Path
) -> dict[str, Any]:
    """Queues an "evaluate" job of `model` on `data`'s `split`, written to `out`; the outcome of queueing it."""
    params = {"project": project, "model": str(model), "data": str(data), "split": split, "out": str(out)}
    job_id = jobs.submit("evaluate", params, settings=settings)
    return outcome.submitted(job_id, f"evaluating {run.name}'s {model.name} on {data.name} [{split}]", settings)


def error_links(settings: Settings, items: list[report.ErrorItem]) -> dict[int, str]:
    """{our image id: its Label Studio task URL} for the errors' images that were synced (one query)."""
    with session_scope(shared_engine(settings.database_url)) as session:
        return task_links(session, [item.store_image_id for item in items], labelstudio_url(settings))
