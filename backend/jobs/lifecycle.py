"""A job's life in the jobs table: claimed, kept alive by heartbeats, ended, or found dead and marked interrupted.

States (`backend.jobs.api` tells the whole story):

    queued ──claim──▶ running ──▶ succeeded | failed | cancelled | interrupted
      └──cancel──▶ cancelled

Every transition is one conditional UPDATE, so two processes racing for a row (a worker claiming it, the app
cancelling it, a watchdog judging it dead) never both win. While a job runs, a daemon thread (`Heartbeat`)
refreshes its row's `heartbeat_at` every `heartbeat_interval_s()` seconds, whatever the job's own thread is doing:
the sign of life that lets any reader on any machine tell a dead worker's job (`interrupt_stale_jobs`). When a beat
finds the row no longer this process's running job (another process judged it dead and marked it interrupted), the
job is told to stop (`on_lost`) and writes nothing more to its row: its continuation may already run elsewhere.

Importing this module is cheap (no torch, no huey): the app reads jobs through it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Engine, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from backend.settings import Settings, get_settings
from backend.store.db import database_locked, session_scope, shared_engine
from backend.store.models import Job, utc_now
from backend.store.runs import set_run_status

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_S = 10.0
DEFAULT_STALE_S = 60.0
LOCKED_RETRY_S = 1.0  # between two tries of a write that found a SQLite file locked past its busy timeout
LOCKED_GIVE_UP_S = 3600.0  # a write that must land (a job's start and end) waits this long for the lock

T = TypeVar("T")


def job_engine(settings: Settings | None = None) -> Engine:
    """The metadata database's engine, migrated once per process (`db.shared_engine`: pages poll jobs every second
    or two)."""
    return shared_engine((settings or get_settings()).database_url)


def aware(moment: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every stored one is UTC (models.utc_now).
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def pending_progress_path(settings: Settings, job_id: int) -> Path:
    """Where a running job puts its latest progress and message while its row cannot be written: on a SQLite file
    a long write holds the one write lock (an import is one transaction, so an import job's own rows wait for its
    end), and the app would otherwise see no movement until then. Removed at the job's next written report."""
    return settings.logs_dir / "jobs" / f"{job_id}.progress.json"


def write_when_free(engine: Engine, write: Callable[[Session], T], what: str) -> T:
    """Runs `write` in one transaction; while a SQLite file's write lock is held by another process past the busy
    timeout (a long import is one transaction), tries again every `LOCKED_RETRY_S` for up to `LOCKED_GIVE_UP_S`.

    For the writes a job must not lose to a busy database: its claim, its end, its run's status.
    """
    deadline = time.monotonic() + LOCKED_GIVE_UP_S
    warned = False
    while True:
        try:
            with session_scope(engine) as session:
                return write(session)
        except OperationalError as error:
            if not database_locked(error) or time.monotonic() > deadline:
                raise
            if not warned:
                logger.warning("%s waits for the database: another process holds its write lock", what)
                warned = True
            time.sleep(LOCKED_RETRY_S)


def claim(engine: Engine, job_id: int) -> tuple[bool, Job | None]:
    """Makes the queued job `job_id` this process's running job; returns (whether it did, the row as it is now).

    A job no longer queued (cancelled meanwhile, or already run) is not claimed.
    """

    def write(session: Session) -> tuple[bool, Job | None]:
        claimed = cast(
            CursorResult,
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "queued")
                .values(
                    state="running",
                    started_at=utc_now(),
                    worker_host=socket.gethostname(),
                    worker_pid=os.getpid(),
                    heartbeat_at=heartbeat_clock(engine),
                    message="starting",
                    updated_at=utc_now(),
                )
            ),
        ).rowcount
        return bool(claimed), session.get(Job, job_id)

    return write_when_free(engine, write, f"job {job_id}'s start")


def end(engine: Engine, job_id: int, values: dict[str, Any]) -> None:
    """Ends a running job with `values` (its state, message, result...); one a restarted worker already marked
    interrupted keeps that state."""
    write_when_free(
        engine,
        lambda session: session.execute(update(Job).where(Job.id == job_id, Job.state == "running").values(**values)),
        f"job {job_id}'s end",
    )


def request_cancel(engine: Engine, job_id: int) -> tuple[bool, Job | None]:
    """Cancels a queued job at once ("cancelled") or asks a running one to stop at its next step
    (`cancel_requested`, which its runner polls); a finished one is left as is.

    Returns:
        (whether a queued job was cancelled: its queue task is then to be revoked, the row as it is now; None when
        there is no such job).
    """
    with session_scope(engine, write=True) as session:
        # Writes first: in WAL mode a transaction that read before another connection's commit cannot write any
        # more ("database is locked" at once, whatever the busy timeout). Conditional UPDATEs: a worker may claim
        # the job at the same moment, and exactly one of us wins.
        revoked = cast(
            CursorResult,
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "queued")
                .values(
                    state="cancelled",
                    cancel_requested=True,
                    finished_at=utc_now(),
                    message="cancelled before it started",
                )
            ),
        ).rowcount
        if not revoked:
            session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "running")
                .values(cancel_requested=True, message="cancelling: stops at the next step")
            )
        return bool(revoked), session.get(Job, job_id)


def job_state(engine: Engine, job_id: int) -> str:
    """The job's state now; "missing" when there is no such row."""
    with session_scope(engine) as session:
        return session.scalar(select(Job.state).where(Job.id == job_id)) or "missing"


def heartbeat_interval_s() -> float:
    """Seconds between two heartbeats of a running job (`YOLODEX_JOB_HEARTBEAT_S`, default 10)."""
    return _seconds("YOLODEX_JOB_HEARTBEAT_S", DEFAULT_HEARTBEAT_S)


def stale_after_s() -> float:
    """Seconds without a heartbeat after which a running job counts as dead (`YOLODEX_JOB_STALE_S`, default 60)."""
    return _seconds("YOLODEX_JOB_STALE_S", DEFAULT_STALE_S)


def _seconds(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name}={text!r} is not a number of seconds > 0: fix it or unset it for {default:g}.")
    return value


def heartbeat_clock(engine: Engine) -> Any:
    """What a heartbeat stamps: the database server's clock where the database is a server (`now()`), so workers
    on machines whose clocks disagree are all judged by one clock; this machine's for a SQLite file (one machine)."""
    return utc_now() if engine.dialect.name == "sqlite" else func.now()


class Heartbeat:
    """Refreshes a running job's `heartbeat_at` every `interval_s` from a daemon thread, until `stop()`.

    Beats only while the row is "running" in this process (a job marked interrupted meanwhile stays so): the first
    beat that finds it otherwise calls `on_lost` and ends the thread. A failed beat (the database briefly locked or
    unreachable) is logged and retried at the next one.
    """

    def __init__(
        self,
        engine: Engine,
        job_id: int,
        interval_s: float | None = None,
        on_lost: Callable[[], None] | None = None,
    ):
        self.engine, self.job_id, self.on_lost = engine, job_id, on_lost
        self.interval_s = interval_s if interval_s is not None else heartbeat_interval_s()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"job-{job_id}-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=max(5.0, 2 * self.interval_s))

    def beat(self) -> bool:
        """One heartbeat now; returns whether the row was still this process's running job."""
        with session_scope(self.engine) as session:
            return bool(
                cast(
                    CursorResult,
                    session.execute(
                        update(Job)
                        .where(Job.id == self.job_id, Job.state == "running", Job.worker_pid == os.getpid())
                        .values(heartbeat_at=heartbeat_clock(self.engine))
                    ),
                ).rowcount
            )

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                if self.beat():
                    continue
                with session_scope(self.engine) as session:
                    state = session.scalar(select(Job.state).where(Job.id == self.job_id))
            except Exception as error:  # the next beat retries; a job must not die of its heartbeat
                reason = getattr(error, "orig", None) or error  # the driver's words, without the SQL
                logger.warning("job %s: heartbeat failed (%s); retrying in %g s", self.job_id, reason, self.interval_s)
                continue
            if state == "interrupted" and not self._stopped.is_set():  # not its own end (succeeded, failed, ...)
                logger.warning("job %s was marked interrupted by another process: stopping it", self.job_id)
                if self.on_lost is not None:
                    self.on_lost()
            return


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): trust kill(0)


def _silent_s(row: tuple, now: datetime) -> float:
    """Seconds since a running job's last heartbeat (or its start, before the first beat); 0 when unknown."""
    _job_id, _host, _pid, beat, started = row
    last = aware(beat or started)
    return (now - last).total_seconds() if last is not None else 0.0


def interrupt_stale_jobs(settings: Settings | None = None, *, now: datetime | None = None) -> list[int]:
    """Marks "running" jobs whose worker stopped beating as interrupted; returns their ids.

    A job is stale when its last heartbeat (or, before the first one, its start) is older than `stale_after_s()`,
    measured by the clock that stamps heartbeats (`heartbeat_clock`) unless `now` is given. This works across
    machines: it reads only the database. The one exception is a SQLite file (one machine), where a job whose
    worker process is alive on this host (`pid_alive`) is alive: its beats may be waiting for the file's single
    write lock (another process's long import), and the process table is the better witness. Cheap when nothing
    runs (one query on an indexed column), so readers call it freely.
    """
    settings = settings or get_settings()
    limit = stale_after_s()
    engine = job_engine(settings)
    # A plain read: no write lock, so a reader never waits behind a long import on a SQLite file (BEGIN IMMEDIATE
    # would). `mark_interrupted` writes only if the heartbeat is still the one read here.
    with session_scope(engine) as session:
        rows = session.execute(
            select(Job.id, Job.worker_host, Job.worker_pid, Job.heartbeat_at, Job.started_at).where(
                Job.state == "running"
            )
        ).all()
        if rows and now is None and engine.dialect.name != "sqlite":
            now = aware(session.scalar(select(func.now())))
    now = now or datetime.now(UTC)
    # On a SQLite file, any long write (an import) holds the only write lock and a live job's beats wait for it:
    # there (one machine) a job of this host is alive while its process is. A server database locks rows, and a
    # job's beats wait for nobody: its heartbeat alone says.
    host = socket.gethostname() if engine.dialect.name == "sqlite" else None
    stale = [
        row
        for row in rows
        if _silent_s(row, now) > limit
        and not (host and row.worker_host == host and row.worker_pid and pid_alive(row.worker_pid))
    ]
    if not stale:
        return []
    marked = []
    for job_id, host, pid, beat, started in stale:
        last = aware(beat or started)
        reason = (
            f"interrupted: its worker (pid {pid} on {host}) stopped sending heartbeats "
            f"{_silent_s((job_id, host, pid, beat, started), now):.0f} s ago (last at {last:%Y-%m-%d %H:%M:%S} UTC); "
            "resume it or start it again"
        )
        # Only if the heartbeat is still the one read: a worker that beat meanwhile is alive after all.
        if mark_interrupted(job_id, settings, reason, heartbeat_at=beat):
            marked.append(job_id)
    return marked


def interrupt_stale_jobs_quietly(settings: Settings | None) -> None:
    """`interrupt_stale_jobs` for readers and starting tasks: a database that cannot take the mark now (a SQLite
    file whose write lock another process holds past the busy timeout) must not fail the read or the task; the
    next reader or a worker's watchdog marks the job."""
    try:
        interrupt_stale_jobs(settings)
    except OperationalError as error:
        logger.warning("could not mark silent jobs interrupted now (the database is busy): %s", error.orig or error)


_ANY_HEARTBEAT = object()


def mark_interrupted(job_id: int, settings: Settings, reason: str, *, heartbeat_at: Any = _ANY_HEARTBEAT) -> bool:
    """Marks a running job interrupted (its worker stopped); returns whether it was running.

    Args:
        heartbeat_at: when given, only if the row's heartbeat is still this value (None: it never beat), so a
            worker that beat since the caller read the row is not declared dead.
    """
    engine = job_engine(settings)
    condition = [Job.id == job_id, Job.state == "running"]
    if heartbeat_at is not _ANY_HEARTBEAT:
        condition.append(Job.heartbeat_at.is_(None) if heartbeat_at is None else Job.heartbeat_at == heartbeat_at)
    with session_scope(engine) as session:
        changed = cast(
            CursorResult,
            session.execute(
                update(Job)
                .where(*condition)
                .values(state="interrupted", message=reason, eta_s=None, finished_at=utc_now(), updated_at=utc_now())
            ),
        ).rowcount
        job = session.get(Job, job_id)
        folder = job.params.get("resume") or job.params.get("run_dir") if job is not None else None
        if changed and job is not None and job.kind == "train" and folder:
            set_run_status(session, settings, Path(folder), "interrupted")
    return bool(changed)


def recover_dead_jobs(settings: Settings) -> list[int]:
    """Marks "running" jobs of this host whose worker process is gone as interrupted; returns their ids.

    Jobs of other hosts are left alone (their processes cannot be checked from here).
    """
    engine = job_engine(settings)
    host = socket.gethostname()
    with session_scope(engine) as session:
        rows = session.execute(select(Job.id, Job.worker_host, Job.worker_pid).where(Job.state == "running")).all()
    dead = [job_id for job_id, job_host, pid in rows if job_host == host and (pid is None or not pid_alive(pid))]
    return [
        job_id
        for job_id in dead
        if mark_interrupted(job_id, settings, "interrupted: its worker stopped (resume it or start it again)")
    ]
