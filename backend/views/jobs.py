"""The Jobs page's data: a filtered page of jobs as table rows, a job's label and details in words, and the banners
of Cancel and Resume."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from backend.jobs import api as jobs
from backend.settings import Settings

PER_PAGE = 20
ALL = "all"
COLUMNS = [
    "id",
    "kind",
    "project",
    "started by",
    "state",
    "progress",
    "message",
    "duration",
    "ETA",
    "created",
    "started",
    "finished",
]


def when(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def job_duration(job: jobs.JobView) -> str:
    """Queued: how long it has waited; running: how long so far; ended: finished − started."""
    seconds = job.duration_s()
    if seconds is None:
        return "never started"
    return {"queued": f"{duration(seconds)} waiting", "running": f"{duration(seconds)} so far"}.get(
        job.state, duration(seconds)
    )


def table_rows(views: list[jobs.JobView]) -> list[dict[str, Any]]:
    return [
        {
            "id": job.id,
            "kind": job.kind,
            "project": job.project or "",
            "started by": job.started_by,
            "state": job.state,
            "progress": job.progress,
            "message": job.message,
            "duration": job_duration(job),
            "ETA": duration(job.eta_s) if job.active else "",
            "created": when(job.created_at),
            "started": when(job.started_at),
            "finished": when(job.finished_at),
        }
        for job in views
    ]


def job_label(job: jobs.JobView) -> str:
    project = f" · {job.project}" if job.project else ""
    by = "" if job.started_by == jobs.STARTED_BY_USER else f" · by the {job.started_by}"
    return f"{job.id} · {job.kind}{project} · {job.state}{by}"


def chosen(value: str) -> str | None:
    """A filter's choice, None for "all"."""
    return None if value == ALL else value


def page_of_jobs(
    settings: Settings, kind: str | None, state: str | None, project: str | None, page: int
) -> tuple[list[jobs.JobView], int]:
    """The jobs on `page` (1-based) and how many match the filters, newest first."""
    states = None if state is None else (state,)
    total = jobs.count_jobs(settings, kind=kind, project=project, states=states)
    offset = (page - 1) * PER_PAGE
    views = jobs.list_jobs(settings, kind=kind, project=project, states=states, limit=PER_PAGE, offset=offset)
    return views, total


def count(settings: Settings, kind: str | None, state: str | None, project: str | None) -> int:
    states = None if state is None else (state,)
    return jobs.count_jobs(settings, kind=kind, project=project, states=states)


def cancel(settings: Settings, job_id: int) -> dict[str, Any]:
    """Cancels a job; the banner from its state once cancel returned."""
    job = jobs.cancel(job_id, settings)
    if job.state == "cancelled":
        return {"summary": f"job {job.id} is cancelled.", "level": "success"}
    if job.active:
        text = f"job {job.id} is {job.state}, cancel requested: it stops at its next step."
        return {"summary": text, "level": "info"}
    return {"summary": f"job {job.id} had already ended ({job.state}): nothing to cancel.", "level": "warning"}


def resume(settings: Settings, job_id: int) -> dict[str, Any]:
    """Queues a training job that continues the job's run; the banner, with the new job's id."""
    new = jobs.get_job(jobs.resume(job_id, settings), settings)
    level = "info" if new.active else ("success" if new.state == "succeeded" else "warning")
    return {"summary": f"job {new.id} is {new.state}: it continues this training.", "job_id": new.id, "level": level}


def details(job: jobs.JobView) -> str:
    """Who started it, its project, times and duration, and while it runs its worker and last heartbeat."""
    worker = ""
    if job.worker_pid is not None:
        worker = f" · worker pid {job.worker_pid} on {job.worker_host or '?'}"
        if job.state == "running" and job.heartbeat_at is not None:
            silent = (datetime.now(job.heartbeat_at.tzinfo) - job.heartbeat_at).total_seconds()
            worker += f", last heartbeat {max(0, round(silent))} s ago"
    return (
        f"started by {job.started_by} · project {job.project or '—'} · created {when(job.created_at)} · "
        f"started {when(job.started_at) or '—'} · finished {when(job.finished_at) or '—'} · "
        f"duration {job_duration(job)}{worker}"
    )


def progress_text(job: jobs.JobView) -> str:
    eta = f" · ETA {duration(job.eta_s)}" if job.active and job.eta_s is not None else ""
    cancelling = " · cancel requested" if job.cancel_requested and job.active else ""
    return f"job {job.id} {job.state}: {job.message or ''}{eta}{cancelling}"
