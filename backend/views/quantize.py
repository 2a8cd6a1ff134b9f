"""The Quantize page's data and actions: the runs it can quantize (the project's, each with a best.pt), the job it
follows, the form's choices, and queueing or cancelling a quantize job. The report itself is shaped by
`backend.quantization.report_view`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backend import catalog
from backend.jobs import api as jobs
from backend.jobs import outcome
from backend.quantization import report_view
from backend.quantization.pipeline import METHODS, QuantizeOptions
from backend.quantization.ptq import CALIBRATION_METHODS
from backend.settings import Settings
from backend.store.db import session_scope, shared_engine

CALIBRATIONS = list(CALIBRATION_METHODS)
METHOD_HELP = {
    "auto": "selective PTQ; QAT only if it misses the budget",
    "ptq": "selective PTQ only (minutes)",
    "qat": "quantization-aware fine-tuning (as long as a tenth of the training)",
}
METHOD_CAPTIONS = [METHOD_HELP[name] for name in METHODS]


def quantizable_runs(settings: Settings, project: str | None) -> list[catalog.RunInfo]:
    """The trained runs with a best.pt (what a quantization starts from), only `project`'s when one is chosen."""
    runs = [run for run in catalog.trained_runs(settings) if (run.path / "best.pt").is_file()]
    if project is None:
        return runs
    with session_scope(shared_engine(settings.database_url)) as session:
        return catalog.project_runs(session, settings, project, runs)


def followed_job(settings: Settings, run_dir: Path, wanted: str) -> jobs.JobView | None:
    """The quantize job the page follows: the one in its address (`wanted`, a job id or "") when it quantizes this
    run, else this run's newest quantize job, else None."""
    try:
        asked = jobs.get_job(int(wanted), settings) if wanted.isdigit() else None
    except ValueError:  # no such job
        asked = None
    return report_view.pick_job(run_dir, asked, jobs.list_jobs(settings, kind="quantize", limit=20))


def current_job(settings: Settings, job_id: int) -> jobs.JobView:
    """The job as it is now (the progress fragment reads it every 2 s)."""
    return jobs.get_job(job_id, settings)


def submit_quantize(settings: Settings, project: str | None, run: catalog.RunInfo, form: dict[str, Any]) -> dict:
    """Queues a quantize job of `run` with the form's values (`report_view.job_options`); bad options raise here,
    before anything is queued. Returns the outcome of queueing it (`outcome.submitted`)."""
    fields = report_view.job_options(**form)
    QuantizeOptions(**fields)
    params = {"project": project, "run_dir": str(run.path), "options": fields}
    job_id = jobs.submit("quantize", params, settings=settings)
    what = f"quantizing {run.name} ({form['method']}, budget {form['budget']:g} points)"
    return outcome.submitted(job_id, what, settings)


def cancel_quantize(settings: Settings, job_id: int) -> dict[str, Any]:
    """Asks the job to stop; the outcome says whether it was cancelled at once or stops at its next step."""
    return outcome.cancel_requested(jobs.cancel(job_id, settings))


def mtime(path: Path) -> float:
    """A file's modification time, 0 when it is missing: part of the cache keys, so a rewritten file is read again."""
    return path.stat().st_mtime if path.exists() else 0.0
