"""What a page says about a job it just queued, and a failed job's error in the page's words.

A page that queues a job must not say "done": the job is queued (or, with an immediate queue, already ended). The
outcome dict here is what `app.widgets.run_and_report` shows: `summary` (the job's real state) and `level`
("info" while it waits or runs, "success" once it succeeded, "warning" when it failed or was cancelled).
"""

from __future__ import annotations

from typing import Any

from backend.jobs import api
from backend.settings import Settings

LEVELS = {"queued": "info", "running": "info", "succeeded": "success"}


def submitted(job_id: int, what: str, settings: Settings | None = None) -> dict[str, Any]:
    """The outcome of queueing job `job_id`, read back from its row: {"summary": "job 12 queued: training S at 320
    px on v1", "level": "info", "job_id": 12, "state": "queued"}."""
    job = api.get_job(job_id, settings)
    return {
        "summary": f"job {job.id} {job.state}: {what}",
        "level": LEVELS.get(job.state, "warning"),
        "job_id": job.id,
        "state": job.state,
    }


def error_text(job: api.JobView) -> str | None:
    """A failed job's error without the exception's type name ("WeightsDownloadError: ..."): the words a page
    shows, once."""
    text = job.error or job.message
    if not text:
        return None
    name, separator, rest = text.partition(": ")
    return rest if separator and name.isidentifier() and name[:1].isupper() else text


def cancel_requested(job: api.JobView) -> dict[str, Any]:
    """The outcome of `api.cancel` (the job as it returned it): cancelled at once (a queued job), or asked to stop
    (a running job stops at its next step), or already ended."""
    if job.state == "cancelled":
        return {"summary": f"job {job.id} cancelled", "level": "success", "job_id": job.id, "state": job.state}
    if job.active:
        summary = f"job {job.id} {job.state}: asked to stop, it stops at its next step"
        return {"summary": summary, "level": "info", "job_id": job.id, "state": job.state}
    return {
        "summary": f"job {job.id} had already ended ({job.state})",
        "level": "info",
        "job_id": job.id,
        "state": job.state,
    }
