"""The jobs API the app and the CLI use: submit a job, read it (state, progress, log tail, metrics), cancel, resume.

A job is a row of the `jobs` table (`backend.store.models.Job`) plus a huey task `run_job(job_id)` that runs it
(`backend.jobs.dispatch` queues it, `backend.jobs.runner` runs it, `backend.jobs.lifecycle` moves it from state to
state, `backend.jobs.kinds` holds what each kind does). The row is the truth the app reads; the queue only carries
the id. States:

    queued ──claim──▶ running ──▶ succeeded | failed | cancelled | interrupted
      └──cancel──▶ cancelled

- cancel, queued: the row becomes "cancelled" at once and the huey task is revoked (a worker that still pops it
  skips it: only a "queued" row can be claimed).
- cancel, running: `cancel_requested` is set; the job sees it at its next step (training and quantization check
  it every step; import, crawl, sync and evaluation finish what they started) and ends "cancelled".
- interrupted: the worker stopped mid-job (SIGTERM, a crash, kill -9, its machine gone). The process running a job
  refreshes the row's `heartbeat_at` every `YOLODEX_JOB_HEARTBEAT_S` seconds [10]; a "running" job whose heartbeat is
  older than `YOLODEX_JOB_STALE_S` seconds [60] is dead, wherever its worker ran, and `interrupt_stale_jobs` marks it
  interrupted. Every worker runs that check every few seconds, and `get_job`/`list_jobs` run it too, so the app shows
  the truth even when no worker is alive. On a SQLite file (one machine) a job whose worker process is alive is alive,
  however old its heartbeat: a long write of another process (an import of a few thousand images is one transaction)
  holds the file's only write lock, and the job's beats and progress wait for it. A starting worker also marks at once
  the "running" jobs of dead processes on its own host. A training job is continued with `resume(job_id)`: a new job,
  which any worker (on any machine sharing the storage and the database) may run. Heartbeats are stamped and judged by
  the database server's clock (PostgreSQL), so machines whose clocks disagree do not kill each other's jobs. Give the
  app and every worker the same two settings, the interval well under the timeout (a third of it at most). A worker
  that is alive after all (its database unreachable for longer than the timeout) finds its job no longer running at
  its next beat and stops it, as if cancelled, without touching the row again.

Who started a job: the params key `started_by` (`STARTED_BY`) names what submitted it when the app did so by itself
("retrain loop": `backend.labeling.loop.STARTED_BY`); a job without it was started by the user (`JobView.started_by`
reads "you"). A job's project is `params["project"]`, else the project of the run or dataset version its params
name (a quantize or evaluate job's run folder, model or data), so every job of a project is listed under it.

Importing this module is cheap: no torch, no streamlit, no huey (the queue is imported when a job is submitted).
Every function takes `settings` (default: the environment's).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update

from backend.files import cut_to_bytes
from backend.jobs.lifecycle import (
    aware,
    heartbeat_clock,
    heartbeat_interval_s,
    interrupt_stale_jobs,
    interrupt_stale_jobs_quietly,
    job_engine,
    pending_progress_path,
    pid_alive,
    request_cancel,
    stale_after_s,
)
from backend.runs import RunFolder
from backend.settings import Settings, get_settings
from backend.store.db import session_scope
from backend.store.models import JOB_KINDS, JOB_STATES, DatasetVersion, Job, JobMetric, Project, Run, utc_now
from backend.training.config import TrainConfig

__all__ = [
    "ACTIVE",
    "JOB_KINDS",
    "JOB_STATES",
    "RESUMABLE",
    "STARTED_BY",
    "STARTED_BY_USER",
    "TERMINAL",
    "JobNotFound",
    "JobView",
    "cancel",
    "continue_training",
    "count_jobs",
    "get_job",
    "heartbeat_clock",
    "heartbeat_interval_s",
    "interrupt_stale_jobs",
    "interrupt_stale_jobs_quietly",
    "job_engine",
    "job_metrics",
    "list_jobs",
    "pid_alive",
    "resume",
    "stale_after_s",
    "submit",
]

ACTIVE = ("queued", "running")
TERMINAL = tuple(state for state in JOB_STATES if state not in ACTIVE)
RESUMABLE = ("interrupted", "cancelled", "failed")
STARTED_BY = "started_by"  # params key: what started a job the user did not (absent: the user)
STARTED_BY_USER = "you"

logger = logging.getLogger(__name__)


class JobNotFound(ValueError):
    """No job has that id."""


@dataclass
class JobView:
    """A job as the app shows it (a snapshot of its row; read it again for fresh values).

    Attributes:
        progress: 0..1, None while unknown. A running job's latest progress and message may come from its pending
            file (`pending_progress_path`) while its row cannot be written.
        message: one line, what it is doing now ("epoch 3/10, step 40/120").
        eta_s: seconds left, when the job can tell.
        result: the JSON result of the backend function (paths, metrics) once it succeeded (or stopped).
        log_tail: its last `context.LOG_TAIL_LINES` log lines, oldest first.
        project: `params["project"]`, else the project of the run or dataset version its params name.
        started_by: "you", or what started it by itself (`params["started_by"]`, e.g. "retrain loop").
        resumed_from: the job this one continues (a resumed training).
        resumed_by: the newest job that continues this one.
    """

    id: int
    kind: str
    params: dict[str, Any]
    state: str
    progress: float | None
    message: str
    eta_s: float | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    result: dict[str, Any] | None
    error: str | None
    traceback: str | None
    log_tail: list[str] = field(default_factory=list)
    cancel_requested: bool = False
    project: str | None = None
    updated_at: datetime | None = None
    worker_pid: int | None = None
    worker_host: str | None = None
    heartbeat_at: datetime | None = None
    resumed_from: int | None = None
    resumed_by: int | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def started_by(self) -> str:
        """ "you" for a job the user started, else what started it ("retrain loop")."""
        return str(self.params.get(STARTED_BY) or STARTED_BY_USER)

    def duration_s(self, now: datetime | None = None) -> float | None:
        """Seconds: queued, how long it has waited so far; running, how long it has run so far; ended, finished −
        started (None for one cancelled before it started)."""
        now = now or datetime.now(UTC)
        if self.state == "queued":
            return _seconds_between(self.created_at, now)
        if self.state == "running":
            return _seconds_between(self.started_at, now)
        return _seconds_between(self.started_at, self.finished_at)

    @property
    def run_dir(self) -> Path | None:
        """The run folder of a training job (absolute), else None."""
        if self.kind != "train":
            return None
        folder = self.params.get("resume") or self.params.get("run_dir")
        return Path(folder) if folder else None

    @property
    def can_resume(self) -> bool:
        """A training that stopped early (interrupted, cancelled, failed), not resumed yet, with a last.pt."""
        run_dir = self.run_dir
        return (
            self.state in RESUMABLE
            and self.resumed_by is None
            and run_dir is not None
            and RunFolder(run_dir).resumable()
        )


# ----------------------------------------------------------------------------------------------------------------
# The database
# ----------------------------------------------------------------------------------------------------------------


def _seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else max(0.0, (end - start).total_seconds())


def _view(job: Job, resumed_by: int | None = None) -> JobView:
    return JobView(
        id=job.id,
        kind=job.kind,
        params=dict(job.params or {}),
        state=job.state,
        progress=job.progress,
        message=job.message or "",
        eta_s=job.eta_s,
        created_at=aware(job.created_at),
        started_at=aware(job.started_at),
        finished_at=aware(job.finished_at),
        result=job.result,
        error=job.error,
        traceback=job.traceback,
        log_tail=list(job.log_tail or []),
        cancel_requested=bool(job.cancel_requested),
        project=job.project,
        updated_at=aware(job.updated_at),
        worker_pid=job.worker_pid,
        worker_host=job.worker_host,
        heartbeat_at=aware(job.heartbeat_at),
        resumed_from=job.resumed_from_id,
        resumed_by=resumed_by,
    )


def _with_pending(view: JobView, settings: Settings) -> JobView:
    if view.state != "running":
        return view
    try:
        pending = json.loads(pending_progress_path(settings, view.id).read_text(encoding="utf-8"))
        progress = pending.get("progress")
        progress = max(float(progress), view.progress or 0.0) if progress is not None else view.progress
        return replace(view, progress=progress, message=str(pending.get("message") or view.message))
    except (OSError, ValueError, TypeError, AttributeError):  # none (the usual case), or half gone: the row's
        return view


def _resumers(session, ids: list[int]) -> dict[int, int]:
    if not ids:
        return {}
    rows = session.execute(
        select(Job.resumed_from_id, func.max(Job.id)).where(Job.resumed_from_id.in_(ids)).group_by(Job.resumed_from_id)
    )
    return {int(source): int(newest) for source, newest in rows}


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def get_job(job_id: int, settings: Settings | None = None) -> JobView:
    """The job `job_id`.

    Raises:
        JobNotFound: no such job (a ValueError).
    """
    interrupt_stale_jobs_quietly(settings)
    with session_scope(job_engine(settings)) as session:
        job = session.get(Job, int(job_id))
        if job is None:
            raise JobNotFound(f"there is no job {job_id}")
        view = _view(job, _resumers(session, [job.id]).get(job.id))
    return _with_pending(view, settings or get_settings())


def _filtered(query, kind: str | None, project: str | None, states: tuple[str, ...] | None = None):
    if kind is not None:
        query = query.where(Job.kind == kind)
    if project is not None:
        query = query.where(Job.project == project)
    if states is not None:
        unknown = sorted(set(states) - set(JOB_STATES))
        if unknown:
            raise ValueError(f"unknown job states {unknown}: use some of {', '.join(JOB_STATES)}")
        query = query.where(Job.state.in_(states))
    return query


def list_jobs(
    settings: Settings | None = None,
    *,
    kind: str | None = None,
    project: str | None = None,
    states: tuple[str, ...] | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[JobView]:
    """Jobs, newest first, optionally of one kind, one project and/or some states (e.g. `ACTIVE`)."""
    interrupt_stale_jobs_quietly(settings)
    with session_scope(job_engine(settings)) as session:
        query = _filtered(select(Job), kind, project, states).order_by(Job.id.desc()).limit(limit).offset(offset)
        jobs = list(session.scalars(query))
        resumers = _resumers(session, [job.id for job in jobs])
        views = [_view(job, resumers.get(job.id)) for job in jobs]
    return [_with_pending(view, settings or get_settings()) for view in views]


def count_jobs(
    settings: Settings | None = None,
    *,
    kind: str | None = None,
    project: str | None = None,
    states: tuple[str, ...] | None = None,
) -> int:
    """How many jobs `list_jobs` would give with the same filters and no limit."""
    with session_scope(job_engine(settings)) as session:
        return int(session.scalar(_filtered(select(func.count()).select_from(Job), kind, project, states)) or 0)


def job_metrics(job_id: int, settings: Settings | None = None, *, since: int = 0) -> list[dict[str, Any]]:
    """The job's metric records after sequence number `since`, in order: {"seq": n, "event": name, **data}.

    Training jobs record "train_start", "step" (thinned to about one a second, and each epoch's last step),
    "epoch", "eval" (the validation metrics, with "epoch"), "checkpoint" and "train_end"; quantize jobs their
    "stage", "scan" and "policy" events. Pass the last `seq` seen as `since` to read only new ones.
    """
    with session_scope(job_engine(settings)) as session:
        rows = session.execute(
            select(JobMetric.seq, JobMetric.event, JobMetric.data)
            .where(JobMetric.job_id == int(job_id), JobMetric.seq > since)
            .order_by(JobMetric.seq)
        )
        return [{**(data or {}), "seq": seq, "event": event} for seq, event, data in rows]


# ----------------------------------------------------------------------------------------------------------------
# Submitting, cancelling, resuming
# ----------------------------------------------------------------------------------------------------------------


def submit(kind: str, params: dict[str, Any], *, settings: Settings | None = None) -> int:
    """Queues a job (params per kind: the module docstring of `backend.jobs.kinds`) and returns its id.

    With an immediate queue (`YOLODEX_QUEUE_IMMEDIATE=1`, tests) the job has run when this returns.

    Raises:
        ValueError: an unknown kind or params that cannot work (the message says which).
    """
    return _submit(kind, params, settings or get_settings())


def _submit(kind: str, params: dict[str, Any], settings: Settings, resumed_from: int | None = None) -> int:
    if kind not in JOB_KINDS:
        raise ValueError(f"unknown job kind {kind!r}: use one of {', '.join(JOB_KINDS)}")
    params = _checked_params(kind, dict(params), settings)
    settings.ensure_dirs()
    engine = job_engine(settings)
    with session_scope(engine, write=True) as session:
        project = params.get("project") or _project_of_paths(session, params, settings)
        job = Job(
            kind=kind,
            params=params,
            project=str(project) if project else None,
            state="queued",
            message="queued",
            log_tail=[],
            resumed_from_id=resumed_from,
        )
        session.add(job)
        session.flush()
        job_id = job.id
    from backend.jobs import dispatch  # huey opens the queue's storage: only when a job is submitted

    try:
        dispatch.enqueue_job(job_id, settings)
    except Exception as error:
        with session_scope(engine, write=True) as session:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "queued")
                .values(state="failed", error=f"could not queue the job: {error}", finished_at=utc_now())
            )
        raise
    return job_id


PROJECT_PATH_KEYS = ("run_dir", "resume", "model")  # params that name a run folder or a file inside one


def _project_of_paths(session, params: dict[str, Any], settings: Settings) -> str | None:
    """The project of the run (a folder named by `run_dir`, `resume` or `model`, or one of its parents up to the
    storage folder) or of the dataset version (`data`) that a job's params name; None when none is ours."""
    storage = settings.storage.resolve()

    def spellings(path: Path) -> list[str]:
        path = path.resolve()
        return [str(path), str(path.relative_to(storage))] if path.is_relative_to(storage) else [str(path)]

    for key in PROJECT_PATH_KEYS:
        if not isinstance(params.get(key), str | Path):
            continue
        path = _absolute(params[key], settings).resolve()
        inside = [folder for folder in path.parents if folder.is_relative_to(storage) and folder != storage]
        for folder in [path, *inside]:
            name = session.scalar(
                select(Project.name).join(Run, Run.project_id == Project.id).where(Run.folder.in_(spellings(folder)))
            )
            if name:
                return str(name)
    if isinstance(params.get("data"), str | Path):
        folder = _absolute(params["data"], settings)
        name = session.scalar(
            select(Project.name)
            .join(DatasetVersion, DatasetVersion.project_id == Project.id)
            .where(DatasetVersion.folder.in_(spellings(folder)))
        )
        if name:
            return str(name)
    return None


def cancel(job_id: int, settings: Settings | None = None) -> JobView:
    """Cancels a job: a queued one at once (revoked), a running one at its next step; a finished one is left as is.

    Raises:
        JobNotFound: no such job.
    """
    settings = settings or get_settings()
    revoked, job = request_cancel(job_engine(settings), int(job_id))
    if job is None:
        raise JobNotFound(f"there is no job {job_id}")
    if revoked and job.task_id:
        from backend.jobs import dispatch  # huey opens the queue's storage: only when a job is revoked

        dispatch.revoke_job(job.task_id, settings)
    return get_job(job_id, settings)


def resume(job_id: int, settings: Settings | None = None) -> int:
    """Continues a stopped training job from its run's last.pt, as a new "train" job; returns the new job's id.

    Raises:
        JobNotFound: no such job.
        ValueError: not a training job, not stopped early, already resumed, or no last.pt to continue from.
    """
    settings = settings or get_settings()
    job = get_job(job_id, settings)
    if job.kind != "train":
        raise ValueError(f"job {job.id} is a {job.kind} job: only training jobs can be resumed")
    if job.state not in RESUMABLE:
        raise ValueError(f"job {job.id} is {job.state}: only an interrupted, cancelled or failed training resumes")
    if job.resumed_by is not None:
        raise ValueError(f"job {job.id} was already resumed by job {job.resumed_by}: resume that one instead")
    if not job.can_resume:
        raise ValueError(f"{job.run_dir} holds no last.pt to continue from: start a new training instead")
    params: dict[str, Any] = {"resume": str(job.run_dir), "project": job.project}
    for key in ("overrides", "gpus", "nproc"):  # gpus/nproc: as many training processes as before
        if job.params.get(key):
            params[key] = job.params[key]
    # A continuation's "more" was turned into the run's totals (config.json) when it started: resuming it goes on to
    # those totals, it does not add the same minutes again.
    overrides = {key: value for key, value in (params.get("overrides") or {}).items() if not key.startswith("more_")}
    params.pop("overrides", None)
    if overrides:
        params["overrides"] = overrides
    return _submit("train", params, settings, resumed_from=job.id)


def continue_training(
    run_dir: str | Path,
    more_minutes: float | None = None,
    more_epochs: int | None = None,
    settings: Settings | None = None,
) -> int:
    """Trains a run that ended (finished, early-stopped, cancelled, or stopped by a failure) for more minutes and/or
    more epochs, as a new "train" job in the same run folder (`training.trainer.resume`'s `more_minutes` /
    `more_epochs`: the schedule over the new totals, patience reset, best.pt replaced only by a better mAP50-95).
    The new job continues the run's newest training job, when there is one. Returns the new job's id.

    Raises:
        ValueError: nothing more asked for, no such run (config.json and last.pt), or a job still training it.
    """
    settings = settings or get_settings()
    if not (more_minutes and more_minutes > 0) and not (more_epochs and more_epochs > 0):
        raise ValueError("say how much longer to train: more minutes and/or more epochs (above 0)")
    folder = _absolute(run_dir, settings)
    if not RunFolder(folder).resumable():
        raise ValueError(f"{folder} holds no run to continue (config.json and last.pt are needed)")
    newest = None
    for job in list_jobs(settings, kind="train", limit=500):  # newest first
        if job.run_dir is not None and job.run_dir.resolve() == folder.resolve():
            if job.active:
                raise ValueError(f"job {job.id} is still training {folder.name}: wait for it, or cancel it first")
            newest = newest or job
    overrides: dict[str, Any] = {}
    if more_minutes and more_minutes > 0:
        overrides["more_minutes"] = float(more_minutes)
    if more_epochs and more_epochs > 0:
        overrides["more_epochs"] = int(more_epochs)
    params: dict[str, Any] = {"resume": str(folder), "overrides": overrides}
    if newest is not None:
        if newest.project:
            params["project"] = newest.project
        for key in ("gpus", "nproc"):  # as many training processes as before
            if newest.params.get(key):
                params[key] = newest.params[key]
    return _submit("train", params, settings, resumed_from=newest.id if newest is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# Params
# ----------------------------------------------------------------------------------------------------------------

_REQUIRED = {
    "import": ("project", "paths"),
    "crawl": ("project",),
    "labeling_sync": ("project",),
    "labeling_prelabel": ("project",),
    "labeling_retrain": ("project",),
    "evaluate": ("model", "data"),
    "quantize": ("run_dir",),
}


def _checked_params(kind: str, params: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Checks what can be checked before queueing and makes paths absolute (the worker may start elsewhere)."""
    missing = [key for key in _REQUIRED.get(kind, ()) if not params.get(key)]
    if missing:
        raise ValueError(f"a {kind} job needs {', '.join(missing)} in its params")
    if STARTED_BY in params and not (isinstance(params[STARTED_BY], str) and params[STARTED_BY].strip()):
        raise ValueError(f'"{STARTED_BY}" names what started the job (e.g. "retrain loop"): a non-empty text')
    if kind == "import" and (isinstance(params["paths"], str) or not isinstance(params["paths"], list | tuple)):
        raise ValueError("an import job's paths must be a list of files or folders")
    if kind == "crawl" and sum(params.get(key) is not None for key in ("query", "urls", "page")) != 1:
        raise ValueError("a crawl job needs exactly one of query, urls or page")
    if kind == "train":
        return _checked_train_params(params, settings)
    return params


def _absolute(path: str | Path, settings: Settings) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else settings.storage / path


def _checked_train_params(params: dict[str, Any], settings: Settings) -> dict[str, Any]:
    if params.get("resume"):
        run_dir = _absolute(params["resume"], settings)
        if not RunFolder(run_dir).resumable():
            raise ValueError(f"{run_dir} holds no run to resume (config.json and last.pt are needed)")
        return {**params, "resume": str(run_dir)}
    config = params.get("config")
    if not isinstance(config, dict) or not config.get("data"):
        raise ValueError('a train job needs "config": a TrainConfig dict whose "data" is a dataset folder')
    data = _absolute(config["data"], settings)
    # Checked here, and queued as TrainConfig's one serialised form (defaults filled in, unknown keys dropped): the
    # job turns it into the dataclass once and records it on the run's row as it is.
    train = TrainConfig.from_dict({**config, "data": str(data)}).to_dict()
    if params.get("run_dir"):
        run_dir = _absolute(params["run_dir"], settings)
    else:
        base = cut_to_bytes(re.sub(r"[^\w.-]+", "_", str(params.get("project") or data.name)).strip("._")[:60], 180)
        base = base or "run"  # at most 180 bytes: the folder name stays under 255 (issue 19)
        run_dir = settings.runs_dir / f"{base}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        suffix = 2
        while run_dir.exists():
            run_dir = run_dir.with_name(f"{run_dir.name.rsplit('~', 1)[0]}~{suffix}")
            suffix += 1
    if RunFolder(run_dir).holds_run():
        raise ValueError(f"{run_dir} already holds a run: resume that job, or train into another folder")
    return {**params, "config": train, "run_dir": str(run_dir)}
