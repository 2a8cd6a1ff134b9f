"""Runs one job row in the worker (or inline, with an immediate queue): claim it, call the backend, record the end.

Params per kind (JSON), and the backend function each calls:

- `import`: project, paths → `ingest.service.import_into`
- `crawl`: project, one of query / urls / page, limit, depth, crawl_settings → `ingest.service.crawl_into`
- `labeling_sync`: project → `labeling.service.sync`
- `labeling_prelabel`: project, model (default: the catalog's default model), only_unlabeled, imgsz →
  `labeling.service.prelabel`
- `labeling_retrain`: project → `labeling.loop.run_retrain`
- `train`: project, config (a TrainConfig dict), run_dir; or resume (a run folder) and overrides (`resume`'s
  keyword arguments; more_minutes / more_epochs continue a run that ended: `api.continue_training`) →
  `training.trainer.fit` / `resume`; the run's `Run` row is created or updated
- `evaluate`: model, data, split ("val"), out, imgsz, batch (16), conf (0.25), device → what `yolodex eval` runs
- `quantize`: run_dir, options (QuantizeOptions fields), out → `quantization.pipeline.quantize_run`

What a job reports goes through a `JobContext`: progress, ETA, message, metric events and log lines are buffered
and written in one short transaction at most every `FLUSH_INTERVAL_S` (the app reads while the worker writes; a
fast training loop must not hammer SQLite). The cancel flag is read at most as often. Everything the job's thread
logs (the `backend` loggers at INFO and above) lands in its log tail, beside explicit lines ("epoch 3/10: ...").
Import, crawl and evaluate report done/total as they go (files; hits, URLs or pages; images). While a SQLite file's
write lock is held by a long write (an import is one transaction, the job's own included), the latest progress and
message go to the job's pending file (`api.pending_progress_path`) instead, which the app reads.

While a job runs, a daemon thread (`Heartbeat`) refreshes its row's `heartbeat_at` every
`api.heartbeat_interval_s()` seconds, whatever the job's own thread is doing (a long step, a subprocess): the sign
of life that lets any reader on any machine tell a dead worker's job (`api.interrupt_stale_jobs`). When a beat finds
the row no longer this process's running job (another process judged it dead and marked it interrupted), the job
is told to stop (`JobContext.lose`: its next `stop_requested()` says so) and writes nothing more to its row: its
continuation may already run elsewhere.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from backend.catalog import training_end_text
from backend.files import atomic_write_text
from backend.jobs.api import (
    LOG_TAIL_LINES,
    heartbeat_clock,
    heartbeat_interval_s,
    job_engine,
    pending_progress_path,
    pid_alive,
)
from backend.models.download import WeightsDownloadError
from backend.runs import RunFolder
from backend.settings import Settings
from backend.store.db import database_locked, session_scope
from backend.store.models import DatasetVersion, Job, JobMetric, Project, Run, utc_now

logger = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5  # at most ~2 progress writes a second
STEP_METRIC_INTERVAL_S = 1.0  # a "step" metric row at most this often (and at each epoch's last step)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOCKED_RETRY_S = 1.0  # between two tries of a write that found a SQLite file locked past its busy timeout
LOCKED_GIVE_UP_S = 3600.0  # a write that must land (a job's start and end) waits this long for the lock
LOCKED_FLUSH_WAIT_MS = 200  # a progress write waits this long for a SQLite file's lock, then is put off
LOCKED_FLUSH_BACKOFF_S = 5.0  # and the next one is tried this much later (a job loses about 4% of its time)

T = TypeVar("T")


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


class JobContext:
    """What a running job reports through; every method is cheap (buffered) except `flush`.

    Args:
        engine: the metadata database.
        job_id: the running job's row.
        flush_interval_s: the least time between two writes of progress, metrics and log lines.
        pending_path: where progress and message go while the row cannot be written (`api.pending_progress_path`);
            None: nowhere.
    """

    def __init__(
        self,
        engine: Engine,
        job_id: int,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        pending_path: Path | None = None,
    ):
        self.engine = engine
        self.job_id = job_id
        self.flush_interval_s = flush_interval_s
        self.pending_path = pending_path
        self.pending_at = 0.0  # monotonic time of the last pending-file write; 0: there is none
        self.message_value = ""
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.fields: dict[str, Any] = {}  # progress / eta_s / message waiting to be written
        self.metrics: list[tuple[str, dict[str, Any]]] = []
        self.seq = 0
        self.dirty = False
        self.flushed_at = 0.0
        self.cancel_flag = False
        self.cancel_read_at = 0.0
        self.stop_seen = False  # stop_requested() answered True: the job was asked to stop and knows it
        self.cancelled = False  # the job stopped early on request (set by the kind's runner)
        self.lost = False  # the row was marked interrupted by another process: stop, and leave the row alone
        self.lock_waits = 0  # flushes put off because another process held a SQLite file's write lock
        self.locked_until = 0.0  # no progress write is tried before this (monotonic) time after a put-off one
        self.progress_value = 0.0
        self.training: dict[str, Any] = {}
        self.training_drives_progress = True  # False where training is one stage of a longer job (QAT)
        self.last_step_metric = 0.0
        self.lock = threading.Lock()

    # -- reporting ----------------------------------------------------------------------------------------------

    def progress(self, value: float | None = None, *, eta_s: float | None = None, message: str | None = None) -> None:
        """Sets progress (0..1, never lowered), ETA seconds and the one-line message; written at the next flush."""
        if value is not None and math.isfinite(value):
            self.progress_value = max(self.progress_value, min(1.0, max(0.0, float(value))))
            self.fields["progress"] = self.progress_value
        if eta_s is not None and math.isfinite(eta_s):
            self.fields["eta_s"] = max(0.0, float(eta_s))
        if message is not None:
            self.fields["message"] = self.message_value = message[:500]
        self.dirty = True
        self.flush()

    def progress_of(self, done: int, total: int, what: str) -> None:
        """An `on_progress(done, total)` callback: progress done/total (at most 0.99 until the job ends) and the
        message "<what> done/total"."""
        self.progress(min(done / total, 0.99) if total else None, message=f"{what} {done}/{total}")

    def log(self, line: str) -> None:
        """Appends a line to the job's log tail (and to the worker's log)."""
        with self.lock:
            self.tail.extend(str(line).splitlines() or [""])
            self.dirty = True

    def metric(self, event: str, **data: Any) -> None:
        """Records one metric event (a `job_metrics` row), written at the next flush."""
        with self.lock:
            self.metrics.append((event, _json_ready(data)))
            self.dirty = True

    def flush(self, force: bool = False) -> None:
        """Writes what is buffered in one transaction, unless the last write was under `flush_interval_s` ago."""
        now = time.monotonic()
        if not force and self.dirty and now < self.locked_until:
            self._write_pending(now)
        if not force and (not self.dirty or now - self.flushed_at < self.flush_interval_s or now < self.locked_until):
            return
        with self.lock:
            fields, metrics, tail = dict(self.fields), list(self.metrics), list(self.tail)
            self.fields.clear()
            self.metrics.clear()
            self.dirty = False
        rows = [
            {"job_id": self.job_id, "seq": self.seq + n, "event": event[:32], "data": data, "created_at": utc_now()}
            for n, (event, data) in enumerate(metrics, start=1)
        ]

        def write(session: Session) -> None:
            if rows:
                session.execute(insert(JobMetric), rows)
            # Only while running: a row marked interrupted meanwhile keeps the message that says why.
            session.execute(
                update(Job)
                .where(Job.id == self.job_id, Job.state == "running")
                .values(**fields, log_tail=tail, updated_at=utc_now())
            )
            self.cancel_flag = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))

        try:
            if force:
                write_when_free(self.engine, write, f"job {self.job_id}'s last report")
            else:
                with session_scope(self.engine, busy_timeout_ms=LOCKED_FLUSH_WAIT_MS) as session:
                    write(session)
        except OperationalError as error:
            if force or not database_locked(error):
                raise
            # Another process holds the SQLite file's write lock (a long import): the job goes on, and what was
            # buffered goes with the next flush, in order.
            with self.lock:
                self.metrics[:0] = metrics
                self.fields = {**fields, **self.fields}
                self.dirty = True
            self.locked_until = time.monotonic() + LOCKED_FLUSH_BACKOFF_S
            self._write_pending(time.monotonic())
            if not self.lock_waits:
                logger.warning("job %s: progress not written, the database is locked by another process", self.job_id)
            self.lock_waits += 1
            return
        self.seq += len(rows)
        self.flushed_at = self.cancel_read_at = time.monotonic()
        if self.pending_at and self.pending_path is not None:  # the row is current again
            self.pending_path.unlink(missing_ok=True)
            self.pending_at = 0.0

    def _write_pending(self, now: float) -> None:
        """Progress and message to the pending file, at most every `flush_interval_s`; a failure only loses it."""
        if self.pending_path is None or now - self.pending_at < self.flush_interval_s:
            return
        self.pending_at = now
        try:
            self.pending_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                self.pending_path, json.dumps({"progress": self.progress_value, "message": self.message_value})
            )
        except OSError as error:
            logger.warning("job %s: progress not written to %s (%s)", self.job_id, self.pending_path, error)

    def lose(self) -> None:
        """The row is no longer this job's (marked interrupted elsewhere): the job stops at its next check."""
        self.lost = True

    def stop_requested(self) -> bool:
        """True once the job's cancel flag is set (read from the database at most every `flush_interval_s`), or
        once the job was lost (`lose`)."""
        if self.lost:
            self.stop_seen = True
            return True
        now = time.monotonic()
        if not self.cancel_flag and now - self.cancel_read_at >= self.flush_interval_s:
            with session_scope(self.engine) as session:
                self.cancel_flag = bool(session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))
            self.cancel_read_at = now
        if self.cancel_flag:
            self.stop_seen = True
        return self.cancel_flag

    # -- training events (fit, resume, run_retrain, QAT) ---------------------------------------------------------

    def on_training_event(self, name: str, **data: Any) -> None:
        """The trainer's `on_event`: drives progress/ETA/message and records metrics and log lines."""
        state = self.training
        if name == "train_start":
            state.update(
                epochs=data.get("epochs"),
                steps=data.get("steps_per_epoch"),
                total=data.get("total_steps"),
                budget=data.get("time_budget_s"),
            )
            self.metric(name, **data)
            self.log(
                f"training: {data.get('start')}; {data.get('train_images')} training / "
                f"{data.get('val_images')} validation images, {data.get('epochs')} epochs x "
                f"{data.get('steps_per_epoch')} steps, batch {data.get('batch_size')} on {data.get('device')}"
            )
            self.progress(message="training started")
        elif name == "step":
            self._on_step(data)
        elif name == "epoch":
            self.metric(name, **data)
            val = data.get("val") or {}
            if val:
                self.metric("eval", epoch=data.get("epoch"), **val)
            headline = f", mAP50-95 {val['mAP50-95']:.3f}" if isinstance(val.get("mAP50-95"), float) else ""
            loss = (data.get("train") or {}).get("loss")
            loss_text = f"loss {loss:.4f}" if isinstance(loss, float) else "no step run"
            number = f"epoch {int(data.get('epoch', 0)) + 1}/{state.get('epochs')}"
            if data.get("complete", True):
                self.log(f"{number} done: {loss_text}{headline}")
                self.progress(message=f"{number} done{headline}")
            else:  # a time budget ended it part way: not a whole epoch, and not counted as one
                steps = f"{data.get('steps')} of {data.get('steps_per_epoch')} steps"
                self.log(f"{number} stopped by the time budget after {steps}: {loss_text}{headline}")
                self.progress(message=f"{number} stopped by the time budget after {steps}{headline}")
        elif name in ("checkpoint", "early_stop"):
            self.metric(name, **data)
            self.log(f"{name}: " + ", ".join(f"{key} {value}" for key, value in data.items()))
        elif name == "train_end":
            self.metric(name, **data)
            self.log(f"training ended: {training_end_text(data, state)}")
        else:  # quantization stages and whatever else a backend reports
            self.metric(name, **data)
        self.flush()

    def _on_step(self, data: dict[str, Any]) -> None:
        state = self.training
        step, per_epoch = data.get("step"), data.get("steps_per_epoch") or state.get("steps")
        now = time.monotonic()
        if now - self.last_step_metric >= STEP_METRIC_INTERVAL_S or (per_epoch and step == per_epoch):
            self.metric("step", **data)
            self.last_step_metric = now
        fraction = None
        if state.get("total"):
            fraction = data.get("global_step", 0) / state["total"]
        if state.get("budget"):
            fraction = max(fraction or 0.0, (data.get("elapsed_s") or 0.0) / state["budget"])
        loss = data.get("loss")
        message = f"epoch {int(data.get('epoch', 0)) + 1}/{state.get('epochs')}, step {step}/{per_epoch}"
        if isinstance(loss, float):
            message += f", loss {loss:.4f}"
        if state.get("budget") and isinstance(data.get("elapsed_s"), int | float):
            # A budget usually ends a run before its last epoch: say so while it runs, not only at its end.
            elapsed, budget = float(data["elapsed_s"]), float(state["budget"])
            used = f"{elapsed:.0f} of {budget:g} s" if budget < 120 else f"{elapsed / 60:.1f} of {budget / 60:g} min"
            message += f" · time budget: {used}"
        # Evaluation and saving follow the last step: a training is done only when fit returns.
        if fraction is None or not self.training_drives_progress:
            self.progress(message=message)
        else:
            self.progress(min(fraction, 0.99), eta_s=data.get("eta_s"), message=message)


class _TailHandler(logging.Handler):
    """Copies the records one thread logs into a job's log tail."""

    def __init__(self, context: JobContext, thread_id: int):
        super().__init__(logging.INFO)
        self.context = context
        self.thread_id = thread_id
        self.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread != self.thread_id:
            return  # another thread of this process (the app's, in immediate mode)
        try:
            self.context.log(self.format(record))
        except Exception:
            self.handleError(record)


# ----------------------------------------------------------------------------------------------------------------
# Running a job
# ----------------------------------------------------------------------------------------------------------------


def execute_job(job_id: int, settings: Settings) -> str:
    """Claims the queued job `job_id`, runs it and records how it ended; returns the final state.

    A job that is no longer queued (cancelled meanwhile, or already run) is left alone and its state returned.
    Exceptions are recorded, not raised, except KeyboardInterrupt (the worker stopping): the job is then marked
    interrupted and the interrupt goes on.
    """
    engine = job_engine(settings)

    def claim(session: Session) -> tuple[bool, Job | None]:
        claimed = session.execute(
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
        ).rowcount
        return bool(claimed), session.get(Job, job_id)

    claimed, job = write_when_free(engine, claim, f"job {job_id}'s start")
    if job is None:
        logger.warning("job %s does not exist (a queue left from another database?)", job_id)
        return "missing"
    if not claimed:
        logger.info("job %s is %s: not running it", job_id, job.state)
        return job.state
    kind, params = job.kind, dict(job.params or {})
    context = JobContext(engine, job_id, pending_path=pending_progress_path(settings, job_id))
    heartbeat = Heartbeat(engine, job_id, on_lost=context.lose)
    heartbeat.start()
    handler = _TailHandler(context, threading.get_ident())
    backend_logger = logging.getLogger("backend")
    old_level = backend_logger.level
    if backend_logger.getEffectiveLevel() > logging.INFO:
        backend_logger.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    context.log(f"job {job_id}: {kind} {json.dumps(params, default=str)[:400]}")
    try:
        result = RUNNERS[kind](params, settings, context)
    except KeyboardInterrupt:
        _finish(context, "interrupted", message="the worker stopped mid-job: resume it or start it again")
        raise
    except Exception as error:
        text = f"{type(error).__name__}: {error}"
        if context.stop_seen:
            _finish(context, "cancelled", message=f"cancelled ({error})", error=text)
        else:
            logger.exception("job %s (%s) failed", job_id, kind)
            _finish(context, "failed", message=str(error)[:500], error=text, trace=traceback.format_exc())
    else:
        if context.cancelled:
            _finish(context, "cancelled", message="cancelled", result=result)
        else:
            context.progress(1.0, eta_s=0.0)
            _finish(context, "succeeded", message=_summary(result), result=result)
    finally:
        heartbeat.stop()
        logging.getLogger().removeHandler(handler)
        backend_logger.setLevel(old_level)
    with session_scope(engine) as session:
        return session.scalar(select(Job.state).where(Job.id == job_id)) or "missing"


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
                session.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.state == "running", Job.worker_pid == os.getpid())
                    .values(heartbeat_at=heartbeat_clock(self.engine))
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


def _finish(
    context: JobContext,
    state: str,
    *,
    message: str,
    result: Any = None,
    error: str | None = None,
    trace: str | None = None,
) -> None:
    context.log(f"job {state}: {message}")
    context.flush(force=True)
    values: dict[str, Any] = {"state": state, "message": message, "finished_at": utc_now(), "updated_at": utc_now()}
    if state != "succeeded":
        values["eta_s"] = None
    if result is not None:
        values["result"] = _json_ready(result if isinstance(result, dict) else {"value": result})
    if error is not None:
        values["error"], values["traceback"] = error, trace
    # Only a running job ends: one a restarted worker already marked interrupted keeps that state.
    write_when_free(
        context.engine,
        lambda session: session.execute(
            update(Job).where(Job.id == context.job_id, Job.state == "running").values(**values)
        ),
        f"job {context.job_id}'s end",
    )


def _summary(result: Any) -> str:
    if isinstance(result, dict):
        if isinstance(result.get("summary"), str):
            return result["summary"][:500]
        if "best_map" in result:
            return training_end_text(result)
    return "done"


def _json_ready(value: Any) -> Any:
    """`value` with Paths, numpy scalars and other objects made JSON-serialisable (the round trip checks it)."""

    def default(item: Any) -> Any:
        if hasattr(item, "item") and callable(item.item):
            return item.item()  # numpy scalars
        if hasattr(item, "tolist"):
            return item.tolist()
        return str(item)

    return json.loads(json.dumps(value, default=default, allow_nan=True))


# ----------------------------------------------------------------------------------------------------------------
# Interrupted jobs
# ----------------------------------------------------------------------------------------------------------------


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
        changed = session.execute(
            update(Job)
            .where(*condition)
            .values(state="interrupted", message=reason, eta_s=None, finished_at=utc_now(), updated_at=utc_now())
        ).rowcount
        job = session.get(Job, job_id)
        folder = job.params.get("resume") or job.params.get("run_dir") if job is not None else None
        if changed and job is not None and job.kind == "train" and folder:
            _set_run_status(session, settings, Path(folder), "interrupted")
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


# ----------------------------------------------------------------------------------------------------------------
# One runner per kind: (params, settings, context) -> JSON-ready result
# ----------------------------------------------------------------------------------------------------------------


def _run_import(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    from backend.ingest.service import import_into

    # import_into is one transaction over every path: a cancel lets it finish (half an import is worse). On SQLite
    # that transaction holds the write lock, so its progress reaches the app through the pending file.
    context.progress(message=f"importing {len(params['paths'])} path(s)")
    return import_into(
        list(params["paths"]),
        params["project"],
        settings,
        on_progress=lambda done, total: context.progress_of(done, total, "imported files"),
    )


def _run_crawl(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    from backend.ingest.crawl import CrawlSettings
    from backend.ingest.service import crawl_into

    crawl_settings = CrawlSettings(**params["crawl_settings"]) if params.get("crawl_settings") else None
    context.progress(message="crawling")
    result = crawl_into(
        project=params["project"],
        query=params.get("query"),
        limit=int(params.get("limit", 50)),
        urls=params.get("urls"),
        page=params.get("page"),
        depth=int(params.get("depth", 1)),
        crawl_settings=crawl_settings,
        settings=settings,
        stop_requested=context.stop_requested,  # each image is committed as it comes: a cancel keeps them
        on_progress=lambda done, total: context.progress_of(done, total, "crawled"),
    )
    context.cancelled = bool(result.get("cancelled"))
    return result


def _run_labeling_sync(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    from backend.labeling import service

    context.progress(message="syncing with Label Studio")
    return service.sync(params["project"], settings)


def _run_labeling_prelabel(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    from backend.labeling import service

    model = params.get("model")
    if not model:
        from backend.catalog import best_model, project_runs, trained_runs

        with session_scope(job_engine(settings)) as session:
            runs = project_runs(session, settings, params["project"], trained_runs(settings))
        chosen = best_model(runs)
        if chosen is None:
            raise ValueError(
                f"no trained model of project {params['project']!r} to pre-label with: train one first, or give a model"
            )
        model = str(chosen.model.path)

    def on_progress(done: int, total: int) -> None:
        context.progress(done / total if total else 1.0, message=f"pre-labeled {done}/{total} tasks")

    context.progress(0.0, message=f"pre-labeling with {Path(model).name}")
    return service.prelabel(
        model,
        params["project"],
        only_unlabeled=bool(params.get("only_unlabeled", True)),
        imgsz=params.get("imgsz"),
        settings=settings,
        on_progress=on_progress,
    )


def _run_labeling_retrain(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    from backend.jobs.tasks import huey
    from backend.labeling.loop import run_retrain
    from backend.labeling.service import labeling_session

    project_name = params["project"]
    context.progress(0.0, message="retraining on the labeled images")
    with (
        huey.lock_task(f"labeling-retrain-{project_name}"),
        labeling_session(project_name, settings) as (session, resolved, project, client),
    ):
        result = run_retrain(
            session,
            resolved,
            project,
            client,
            on_event=context.on_training_event,
            stop_requested=context.stop_requested,
        )
        return {**result.__dict__, "run_dir": str(result.run_dir)}


def _run_train(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    from backend.training.config import TrainConfig
    from backend.training.launch import resume, train

    # gpus N (one process per GPU) or nproc N (on the config's device, gloo on a CPU); 1 trains in this process
    processes = int(params.get("gpus") or params.get("nproc") or 1)
    gpus = bool(params.get("gpus"))
    resuming = bool(params.get("resume"))
    run_dir = Path(params["resume"] if resuming else params["run_dir"])
    if resuming:
        config = RunFolder(run_dir).train()
    else:
        config = TrainConfig.from_dict(params["config"]).to_dict()
    engine = job_engine(settings)
    run_id = write_when_free(
        engine,
        lambda session: _start_run(session, settings, params.get("project"), run_dir, config, context.job_id),
        f"job {context.job_id}'s run row",
    )
    if run_id is None:
        context.log("no project matches this dataset: the run is not listed in the project's runs")
    status = "failed"
    try:
        if resuming:
            context.log(f"resuming {run_dir} from its last.pt")
            result = resume(
                run_dir,
                processes=processes,
                gpus=gpus,
                on_event=context.on_training_event,
                stop_requested=context.stop_requested,
                **(params.get("overrides") or {}),
            )
        else:
            result = train(
                TrainConfig.from_dict(config),
                run_dir,
                processes=processes,
                gpus=gpus,
                on_event=context.on_training_event,
                stop_requested=context.stop_requested,
            )
        status = "cancelled" if result.stopped == "cancelled" else "succeeded"
        context.cancelled = result.stopped == "cancelled"
        if resuming:  # a continuation wrote its new totals there: the end is counted against them
            config = RunFolder(run_dir).train()
        end = {**result.to_dict(), "epochs": config.get("epochs"), "time_budget_s": _budget_s(config)}
        return {**end, "run_id": run_id, "summary": training_end_text(end)}
    except WeightsDownloadError as error:
        status = "failed"
        raise WeightsDownloadError(_weights_advice(error)) from error
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    except Exception:
        status = "cancelled" if context.stop_seen else "failed"
        raise
    finally:
        if not context.lost:  # a lost job's run may already go on elsewhere: its status is not ours to set
            write_when_free(
                engine,
                lambda session: _set_run_status(session, settings, run_dir, status),
                f"job {context.job_id}'s run status",
            )


def _budget_s(config: dict[str, Any]) -> float | None:
    minutes = config.get("time_minutes")
    return float(minutes) * 60 if minutes else None


def _weights_advice(error: WeightsDownloadError) -> str:
    """The start weights' download failure in words for wherever the job is shown (the Train page, the Jobs page,
    `yolodex jobs`): what failed and what to do instead, without the CLI's "run the command again"."""
    if error.destination is None:
        return str(error)
    return (
        f"The start weights {error.destination.name} are not on this machine and could not be downloaded "
        f"({error.reason}). Start the training again with other start weights (random initialisation or an earlier "
        f"run), or put the file at {error.destination} first."
    )


def _relative(path: Path, settings: Settings) -> str:
    path = path.resolve()
    return str(path.relative_to(settings.storage)) if path.is_relative_to(settings.storage) else str(path)


def _start_run(
    session, settings: Settings, project_name: str | None, run_dir: Path, config: dict[str, Any], job_id: int
) -> int | None:
    """The run's `Run` row (created, or found by folder when resuming), now "running"; None without a project."""
    # Write first, so this transaction holds the write lock before it reads (see api.cancel).
    session.execute(update(Job).where(Job.id == job_id).values(updated_at=utc_now()))
    folder = _relative(run_dir, settings)
    run = session.scalar(select(Run).where(Run.folder == folder).order_by(Run.id.desc()))
    if run is None:
        data_folder = _relative(Path(config.get("data", "")), settings) if config.get("data") else None
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
            config={"train": config, "origin": "job", "job_id": job_id},
        )
        session.add(run)
    run.status = "running"
    session.flush()
    return run.id


def _set_run_status(session, settings: Settings, run_dir: Path, status: str) -> None:
    session.execute(update(Run).where(Run.folder == _relative(run_dir, settings)).values(status=status))


def _run_evaluate(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    from backend.run_evaluation import evaluate_run

    evaluation = evaluate_run(
        params["model"],
        params["data"],
        params.get("split") or "val",
        imgsz=params.get("imgsz"),
        batch=int(params.get("batch", 16)),
        conf=float(params.get("conf", 0.25)),
        device=params.get("device") or settings.device,
        out=params.get("out"),
        on_start=lambda text: context.progress(0.0, message=text),
        on_progress=lambda done, total: context.progress_of(done, total, "evaluated images"),
    )
    context.log(f"{evaluation.model} on {params['data']} [{evaluation.split}]: {evaluation.summary}")
    return evaluation.to_dict()


QUANTIZE_STAGES = {
    "export": 0.05,
    "calibrate": 0.15,
    "scan": 0.3,
    "policy": 0.6,
    "qat": 0.65,
    "measure": 0.9,
    "done": 1.0,
}


def _run_quantize(params: dict[str, Any], settings: Settings, context: JobContext) -> dict[str, Any]:
    from backend.quantization.pipeline import QuantizeCancelled, QuantizeOptions, quantize_run

    options = dict(params.get("options") or {})
    context.training_drives_progress = False
    if options.get("scan_layers") is not None:
        options["scan_layers"] = tuple(options["scan_layers"])

    def on_event(name: str, **data: Any) -> None:
        if name == "stage":
            stage = data.get("stage")
            context.log(f"quantize: {stage}" + (f" ({data['calibration']})" if data.get("calibration") else ""))
            context.progress(QUANTIZE_STAGES.get(stage), message=f"quantize: {stage}")
        elif name == "scan" and data.get("total"):
            fraction = QUANTIZE_STAGES["scan"] + 0.3 * data["done"] / data["total"]
            context.progress(fraction, message=f"sensitivity scan: layer {data['done']}/{data['total']}")
        if name in ("train_start", "step", "epoch", "train_end"):
            context.on_training_event(name, **data)  # QAT: its own messages; progress stays at the QAT stage
            return
        context.metric(name, **data)
        context.flush()

    try:
        return quantize_run(
            params["run_dir"],
            params.get("out"),
            QuantizeOptions(**options),
            on_event=on_event,
            stop_requested=context.stop_requested,
        )
    except QuantizeCancelled:
        context.cancelled = True
        return {"run_dir": params["run_dir"], "cancelled": True}


RUNNERS: dict[str, Callable[[dict[str, Any], Settings, JobContext], dict[str, Any]]] = {
    "import": _run_import,
    "crawl": _run_crawl,
    "labeling_sync": _run_labeling_sync,
    "labeling_prelabel": _run_labeling_prelabel,
    "labeling_retrain": _run_labeling_retrain,
    "train": _run_train,
    "evaluate": _run_evaluate,
    "quantize": _run_quantize,
}
