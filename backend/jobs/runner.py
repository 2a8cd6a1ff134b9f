"""Runs one job row in the worker (or inline, with an immediate queue): claim it, call its kind's handler
(`backend.jobs.kinds`), record how it ended.

While the handler runs, the job's heartbeat thread keeps its row alive (`lifecycle.Heartbeat`) and its thread's log
records go to its log tail (`context.TailHandler`). A job another process marked interrupted meanwhile is told to
stop (`JobContext.lose`) and its end is not written: its continuation may already run elsewhere.
"""

from __future__ import annotations

import json
import logging
import threading
import traceback
from typing import Any

from backend.catalog import training_end_text
from backend.jobs import lifecycle
from backend.jobs.context import JobContext, TailHandler, json_ready
from backend.jobs.kinds import HANDLERS
from backend.settings import Settings
from backend.store.models import utc_now

logger = logging.getLogger(__name__)


def execute_job(job_id: int, settings: Settings) -> str:
    """Claims the queued job `job_id`, runs it and records how it ended; returns the final state.

    A job that is no longer queued (cancelled meanwhile, or already run) is left alone and its state returned.
    Exceptions are recorded, not raised, except KeyboardInterrupt (the worker stopping): the job is then marked
    interrupted and the interrupt goes on.
    """
    engine = lifecycle.job_engine(settings)
    claimed, job = lifecycle.claim(engine, job_id)
    if job is None:
        logger.warning("job %s does not exist (a queue left from another database?)", job_id)
        return "missing"
    if not claimed:
        logger.info("job %s is %s: not running it", job_id, job.state)
        return job.state
    kind, params = job.kind, dict(job.params or {})
    context = JobContext(engine, job_id, pending_path=lifecycle.pending_progress_path(settings, job_id))
    heartbeat = lifecycle.Heartbeat(engine, job_id, on_lost=context.lose)
    heartbeat.start()
    handler = TailHandler(context, threading.get_ident())
    backend_logger = logging.getLogger("backend")
    old_level = backend_logger.level
    if backend_logger.getEffectiveLevel() > logging.INFO:
        backend_logger.setLevel(logging.INFO)
    logging.getLogger().addHandler(handler)
    context.log(f"job {job_id}: {kind} {json.dumps(params, default=str)[:400]}")
    try:
        result = HANDLERS[kind](params, settings, context)
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
    return lifecycle.job_state(engine, job_id)


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
        values["result"] = json_ready(result if isinstance(result, dict) else {"value": result})
    if error is not None:
        values["error"], values["traceback"] = error, trace
    # Only a running job ends: one a restarted worker already marked interrupted keeps that state.
    lifecycle.end(context.engine, context.job_id, values)


def _summary(result: Any) -> str:
    if isinstance(result, dict):
        if isinstance(result.get("summary"), str):
            return result["summary"][:500]
        if "best_map" in result:
            return training_end_text(result)
    return "done"
