"""What a running job reports through (`JobContext`): progress, ETA, message, metric events and log lines.

They are buffered and written in one short transaction at most every `FLUSH_INTERVAL_S` (the app reads while the
worker writes; a fast training loop must not hammer SQLite). The cancel flag is read at most as often. Everything
the job's thread logs (the `backend` loggers at INFO and above) lands in its log tail (`TailHandler`), beside
explicit lines ("epoch 3/10: ..."). While a SQLite file's write lock is held by a long write (an import is one
transaction, the job's own included), the latest progress and message go to the job's pending file
(`lifecycle.pending_progress_path`) instead, which the app reads.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from backend.catalog import training_end_text
from backend.files import atomic_write_text
from backend.jobs.lifecycle import write_when_free
from backend.store.db import database_locked, session_scope
from backend.store.models import Job, JobMetric, utc_now

logger = logging.getLogger(__name__)

LOG_TAIL_LINES = 200
FLUSH_INTERVAL_S = 0.5  # at most ~2 progress writes a second
STEP_METRIC_INTERVAL_S = 1.0  # a "step" metric row at most this often (and at each epoch's last step)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOCKED_FLUSH_WAIT_MS = 200  # a progress write waits this long for a SQLite file's lock, then is put off
LOCKED_FLUSH_BACKOFF_S = 5.0  # and the next one is tried this much later (a job loses about 4% of its time)


class JobContext:
    """What a running job reports through; every method is cheap (buffered) except `flush`.

    Args:
        engine: the metadata database.
        job_id: the running job's row.
        flush_interval_s: the least time between two writes of progress, metrics and log lines.
        pending_path: where progress and message go while the row cannot be written (`lifecycle.pending_progress_path`);
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
            self.metrics.append((event, json_ready(data)))
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


class TailHandler(logging.Handler):
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


def json_ready(value: Any) -> Any:
    """`value` with Paths, numpy scalars and other objects made JSON-serialisable (the round trip checks it)."""

    def default(item: Any) -> Any:
        if hasattr(item, "item") and callable(item.item):
            return item.item()  # numpy scalars
        if hasattr(item, "tolist"):
            return item.tolist()
        return str(item)

    return json.loads(json.dumps(value, default=default, allow_nan=True))
