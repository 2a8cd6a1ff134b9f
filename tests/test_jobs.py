"""Background jobs: the jobs table's state machine, progress and metrics, cancel (queued and running), failures,
resume, and one real huey worker killed mid-training and restarted.

Most tests run the queue in immediate mode (the job runs inline in `submit`); a running job is cancelled from the
test's thread while `submit` runs the training in another. Trainings are the smallest that work (imgsz 64, a few
steps of batch 2).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from backend.data.synthetic import generate_synthetic_dataset
from backend.ingest.service import freeze
from backend.jobs import api, dispatch, kinds, runner, tasks
from backend.jobs import context as job_context
from backend.settings import Settings
from backend.store import db
from backend.store.db import session_scope
from backend.store.models import Job, Run

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = {"imgsz": 64, "epochs": 1, "batch_size": 2, "min_samples": 4, "num_workers": 0, "device": "cpu"}


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Polls `condition` until it returns something truthy (returned); fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def make_settings(root: Path) -> Settings:
    return Settings.from_env({"YOLODEX_STORAGE": str(root / "storage"), "YOLODEX_DEVICE": "cpu"})


@pytest.fixture
def immediate(monkeypatch) -> None:
    monkeypatch.setattr(tasks.huey, "immediate", True)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[tuple[Settings, str]]:
    """A storage folder with project "shapes" (imported through an import job) and its frozen version "v1"."""
    root = tmp_path_factory.mktemp("jobs")
    settings = make_settings(root)
    data = generate_synthetic_dataset(root / "shapes", num_train=8, num_val=2, image_size=(96, 96), seed=5)
    saved = tasks.huey.immediate
    tasks.huey.immediate = True
    try:
        job_id = api.submit("import", {"project": "shapes", "paths": [str(data)]}, settings=settings)
    finally:
        tasks.huey.immediate = saved
    job = api.get_job(job_id, settings)
    assert job.state == "succeeded", (job.error, job.traceback)
    assert job.result["counts"]["accepted"] == 10 and job.progress == 1.0 and job.project == "shapes"
    version = freeze("shapes", "v1", settings=settings)
    yield settings, version["folder"]
    shutil.rmtree(root, ignore_errors=True)  # the module's runs and checkpoints, about 1 GB


def train_params(data: str, run_dir: Path, **changes: Any) -> dict[str, Any]:
    return {"project": "shapes", "config": {"data": data, **TINY, **changes}, "run_dir": str(run_dir)}


# ----------------------------------------------------------------------------------------------------------------
# Immediate queue
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_job_succeeds_with_metrics_progress_run_row_then_evaluates_and_quantizes(store, immediate, monkeypatch):
    settings, data = store
    run_dir = settings.runs_dir / "ok"
    job_id = api.submit("train", train_params(data, run_dir), settings=settings)
    job = api.get_job(job_id, settings)
    assert job.state == "succeeded", (job.error, job.traceback)
    assert job.progress == 1.0 and job.eta_s == 0.0 and not job.active and not job.can_resume
    assert job.started_at <= job.finished_at and job.worker_pid == os.getpid()
    assert job.result["stopped"] == "epochs" and job.result["run_dir"] == str(run_dir)
    assert (run_dir / "best.pt").is_file()
    metrics = api.job_metrics(job_id, settings)
    events = [record["event"] for record in metrics]
    assert events[0] == "train_start" and events[-1] == "train_end"
    assert {"step", "epoch", "eval"} <= set(events)
    assert [record["seq"] for record in metrics] == list(range(1, len(metrics) + 1))
    steps = [record for record in metrics if record["event"] == "step"]
    assert steps[-1]["step"] == steps[-1]["steps_per_epoch"]  # an epoch's last step is always kept
    assert all(isinstance(record["loss"], float) for record in steps)
    assert "mAP50-95" in next(record for record in metrics if record["event"] == "eval")
    assert api.job_metrics(job_id, settings, since=metrics[-2]["seq"]) == metrics[-1:]
    assert any(line.startswith(("epoch 1/1: loss", "epoch 1/1 done: loss")) for line in job.log_tail), job.log_tail
    # The Run row: the project, the dataset version it trained on, the folder relative to storage.
    with session_scope(api.job_engine(settings)) as session:
        run = session.get(Run, job.result["run_id"])
        assert (run.folder, run.status, run.config["job_id"]) == ("runs/ok", "succeeded", job_id)
        assert run.dataset_version_id is not None
    assert api.list_jobs(settings, kind="train", project="shapes")[0].id == job_id
    assert api.count_jobs(settings, kind="train") >= 1 and api.count_jobs(settings, kind="crawl") == 0

    out = settings.storage / "evals" / "ok.json"
    params = {"model": str(run_dir), "data": data, "split": "val", "out": str(out)}
    evaluation = api.get_job(api.submit("evaluate", params, settings=settings), settings)
    assert evaluation.state == "succeeded", (evaluation.error, evaluation.traceback)
    assert out.is_file() and "mAP50-95" in evaluation.result["metrics"]
    assert evaluation.project == "shapes"  # from the run its model is in: the params name no project

    # Quantize, cancelled once the export stage began: the pipeline stops before its next stage.
    def stop_after_export(context: job_context.JobContext) -> bool:
        context.stop_seen = context.progress_value >= kinds.QUANTIZE_STAGES["export"]
        return context.stop_seen

    monkeypatch.setattr(job_context.JobContext, "stop_requested", stop_after_export)
    params = {"run_dir": str(run_dir), "options": {"method": "ptq", "calib_images": 2}, "out": str(tmp_out(run_dir))}
    quantize = api.get_job(api.submit("quantize", params, settings=settings), settings)
    assert quantize.state == "cancelled", (quantize.error, quantize.traceback)
    assert quantize.project == "shapes"
    assert quantize.result == {"run_dir": str(run_dir), "cancelled": True}
    assert [m["stage"] for m in api.job_metrics(quantize.id, settings) if m["event"] == "stage"] == ["export"]
    assert (tmp_out(run_dir) / "model_fp32.onnx").is_file()


def tmp_out(run_dir: Path) -> Path:
    return run_dir.parent / f"{run_dir.name}_int8"


def test_failure_records_the_error_and_the_traceback(tmp_path, immediate):
    settings = make_settings(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    job = api.get_job(api.submit("train", {"config": {"data": str(empty), **TINY}}, settings=settings), settings)
    assert job.state == "failed" and job.progress is None and job.result is None
    assert job.error.startswith("DatasetError") and str(empty) in job.error
    assert "Traceback" in job.traceback and "load_splits" in job.traceback
    assert job.message and not job.can_resume
    assert job.run_dir.parent == settings.runs_dir  # a run folder was chosen for it


def test_log_lines_of_the_jobs_thread_only_land_in_its_tail(tmp_path, immediate, monkeypatch):
    settings = make_settings(tmp_path)

    def noisy(params, _settings, context):
        logging.getLogger("backend.noisy").info("working on %s", params["model"])
        other = threading.Thread(target=lambda: logging.getLogger("backend.noisy").warning("another thread"))
        other.start()
        other.join()
        raise ValueError("the model file is broken")

    monkeypatch.setitem(kinds.HANDLERS, "evaluate", noisy)
    job = api.get_job(api.submit("evaluate", {"model": "m.pt", "data": "d"}, settings=settings), settings)
    assert job.state == "failed" and job.error == "ValueError: the model file is broken"
    assert "in noisy" in job.traceback
    assert any("INFO backend.noisy: working on m.pt" in line for line in job.log_tail), job.log_tail
    assert not any("another thread" in line for line in job.log_tail)


def test_progress_writes_are_throttled(tmp_path):
    settings = make_settings(tmp_path)
    engine = api.job_engine(settings)
    with session_scope(engine) as session:
        job = Job(kind="train", params={}, state="running", message="", log_tail=[])
        session.add(job)
        session.flush()
        job_id = job.id
    writes = []

    def count(_conn, _cursor, statement, *_args) -> None:
        if statement.lstrip().upper().startswith(("UPDATE JOBS", "INSERT INTO JOB_METRICS")):
            writes.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        context = job_context.JobContext(engine, job_id)
        context.on_training_event("train_start", epochs=1, steps_per_epoch=500, total_steps=500, time_budget_s=None)
        started = time.monotonic()
        for step in range(1, 501):
            context.on_training_event(
                "step", epoch=0, step=step, steps_per_epoch=500, global_step=step, loss=1.0, eta_s=10.0, elapsed_s=1.0
            )
        elapsed = time.monotonic() - started
        context.flush(force=True)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    # At most one write per flush interval (plus the first and the forced last), never one per step.
    assert len(writes) <= 2 * (elapsed / job_context.FLUSH_INTERVAL_S + 3), (len(writes), elapsed)
    view = api.get_job(job_id, settings)
    assert view.progress == 0.99 and view.message.startswith("epoch 1/1, step 500/500")
    steps = [record for record in api.job_metrics(job_id, settings) if record["event"] == "step"]
    assert 1 <= len(steps) <= elapsed / job_context.STEP_METRIC_INTERVAL_S + 2 and steps[-1]["step"] == 500


def test_a_locked_database_puts_progress_off_and_the_jobs_end_waits_for_the_lock(tmp_path):
    """Another process holds the SQLite file's write lock (a long import). The job's progress writes give up at
    once and go with a later flush, in order (the job is not stalled for the busy timeout, nor failed); its end
    waits for the lock and lands."""
    settings = make_settings(tmp_path)
    engine = api.job_engine(settings)
    with session_scope(engine) as session:
        job = Job(kind="train", params={}, state="running", message="", log_tail=[], worker_pid=os.getpid())
        session.add(job)
        session.flush()
        job_id = job.id
    context = job_context.JobContext(engine, job_id, flush_interval_s=0.0)
    writer = sqlite3.connect(
        settings.database_url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False
    )
    writer.execute("BEGIN IMMEDIATE")
    released = threading.Event()

    def release() -> None:
        writer.rollback()
        writer.close()
        released.set()

    # Released by a timer, so a progress write that waited for the lock (the usual 10 s) would land and not be put off.
    timer = threading.Timer(job_context.LOCKED_FLUSH_WAIT_MS / 1000 * 15, release)
    timer.start()
    try:
        context.metric("stage", n=1)
        context.progress(0.25, message="first")
        assert context.lock_waits == 1 and not released.is_set()
        context.metric("stage", n=2)
        context.progress(0.5, message="second")  # not even tried: the next try is LOCKED_FLUSH_BACKOFF_S away
        assert context.lock_waits == 1 and context.locked_until > time.monotonic()
        assert api.job_metrics(job_id, settings) == [] and api.get_job(job_id, settings).progress is None

        runner._finish(context, "succeeded", message="done")  # waits for the lock
        assert released.is_set()
    finally:
        timer.join()
    job = api.get_job(job_id, settings)
    assert job.state == "succeeded" and job.progress == 0.5 and job.message == "done"
    metrics = [(m["seq"], m["event"], m["n"]) for m in api.job_metrics(job_id, settings)]
    assert metrics == [(1, "stage", 1), (2, "stage", 2)]
    context.metric("after", n=3)
    context.flush(force=True)
    assert [m["seq"] for m in api.job_metrics(job_id, settings)] == [1, 2, 3]


def test_cancel_of_a_queued_job_revokes_it_and_it_never_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("YOLODEX_QUEUE_IMMEDIATE", raising=False)
    settings = make_settings(tmp_path)
    assert settings.queue_url != dispatch.QUEUE_URL and not tasks.huey.immediate
    ran = []
    monkeypatch.setitem(kinds.HANDLERS, "labeling_sync", lambda *args: ran.append(args) or {})
    first = api.submit("labeling_sync", {"project": "p"}, settings=settings)
    second = api.submit("labeling_sync", {"project": "p"}, settings=settings)
    queue, _ = dispatch.queue_for(settings)
    assert queue.pending_count() == 2 and api.get_job(first, settings).state == "queued"

    job = api.cancel(first, settings)
    assert job.state == "cancelled" and job.cancel_requested and job.finished_at is not None
    assert api.cancel(first, settings).state == "cancelled"  # a second cancel changes nothing
    # What a worker does: pop each task and execute it. The revoked one is skipped, the other runs.
    for _ in range(2):
        queue.execute(queue.dequeue())
    assert len(ran) == 1
    assert api.get_job(first, settings).started_at is None and api.get_job(first, settings).state == "cancelled"
    assert api.get_job(second, settings).state == "succeeded"
    with pytest.raises(ValueError, match="only training jobs"):
        api.resume(second, settings)
    with pytest.raises(api.JobNotFound):
        api.get_job(10_000, settings)
    with pytest.raises(ValueError, match="unknown job kind"):
        api.submit("dance", {}, settings=settings)
    with pytest.raises(ValueError, match="needs project"):
        api.submit("labeling_sync", {}, settings=settings)


def test_a_job_without_a_project_takes_its_runs_or_datasets_and_says_who_started_it(tmp_path, monkeypatch):
    """Quantize and evaluate jobs name a run folder, a model file in one, or a dataset version, not a project: the
    job's project is theirs. Jobs the app queues by itself say so (`started_by`); the user's read "you"."""
    from backend.store.models import DatasetVersion, get_or_create_project

    monkeypatch.delenv("YOLODEX_QUEUE_IMMEDIATE", raising=False)
    monkeypatch.setattr(tasks.huey, "immediate", False)  # no worker: the jobs stay queued
    settings = make_settings(tmp_path)
    settings.ensure_dirs()
    with session_scope(api.job_engine(settings)) as session:
        owner = get_or_create_project(session, "Raccoons")
        session.add(Run(project_id=owner.id, folder="runs/raccoons-1", status="succeeded"))
        session.add(
            DatasetVersion(
                project_id=owner.id,
                name="v1",
                seed=0,
                train_fraction=0.8,
                val_fraction=0.2,
                folder="datasets/raccoons/v1",
            )
        )
    run_dir = settings.runs_dir / "raccoons-1"
    (run_dir / "export").mkdir(parents=True)

    quantize = api.get_job(api.submit("quantize", {"run_dir": str(run_dir)}, settings=settings), settings)
    assert quantize.project == "Raccoons" and "project" not in quantize.params and quantize.started_by == "you"
    for model in (run_dir, run_dir / "best.pt", run_dir / "export" / "model.onnx"):
        params = {"model": str(model), "data": str(tmp_path / "elsewhere")}
        assert api.get_job(api.submit("evaluate", params, settings=settings), settings).project == "Raccoons", model
    data_only = {"model": str(tmp_path / "model.onnx"), "data": str(settings.storage / "datasets/raccoons/v1")}
    assert api.get_job(api.submit("evaluate", data_only, settings=settings), settings).project == "Raccoons"
    elsewhere = {"model": str(tmp_path / "model.onnx"), "data": str(tmp_path / "data")}
    assert api.get_job(api.submit("evaluate", elsewhere, settings=settings), settings).project is None
    assert api.list_jobs(settings, project="Raccoons", kind="evaluate")[0].kind == "evaluate"

    monkeypatch.setenv("YOLODEX_STORAGE", str(settings.storage))  # the poll queues with the environment's settings
    retrain = api.get_job(tasks.labeling_retrain("Raccoons"), settings)
    assert retrain.started_by == "retrain loop" and retrain.params["started_by"] == "retrain loop"
    with pytest.raises(ValueError, match="started_by"):
        api.submit("labeling_sync", {"project": "Raccoons", "started_by": ""}, settings=settings)


@pytest.mark.slow
def test_cancel_of_a_running_training_keeps_a_checkpoint_and_resume_continues(store, immediate):
    settings, data = store
    run_dir = settings.runs_dir / "cancelled"
    submitted: dict[str, Any] = {}

    def submit() -> None:
        submitted["id"] = api.submit("train", train_params(data, run_dir, min_samples=16), settings=settings)

    last_before = max((job.id for job in api.list_jobs(settings, limit=1)), default=0)
    worker = threading.Thread(target=submit)
    worker.start()
    try:
        job_id = wait_for(lambda: newest_job_after(settings, last_before), 30, "the job").id
        # Cancelled as soon as it runs: the flag is read at most every half second, and checked after each step.
        wait_for(lambda: api.get_job(job_id, settings).state == "running", 60, "the job to start", interval=0.02)
        view = api.cancel(job_id, settings)
        assert view.state == "running" and view.cancel_requested and view.message.startswith("cancelling")
    finally:
        worker.join(timeout=300)
    job = api.get_job(job_id, settings)
    assert submitted["id"] == job_id and job.state == "cancelled", (job.error, job.traceback)
    assert job.result["stopped"] == "cancelled" and job.result["epochs_done"] == 0
    assert (run_dir / "last.pt").is_file() and job.can_resume
    steps_before = max(m["step"] for m in api.job_metrics(job_id, settings) if m["event"] == "step")
    assert steps_before < 8  # stopped within the epoch of 8 steps

    new_id = api.resume(job_id, settings)
    resumed = api.get_job(new_id, settings)
    assert resumed.state == "succeeded", (resumed.error, resumed.traceback)
    assert resumed.resumed_from == job_id and resumed.params["resume"] == str(run_dir)
    assert api.get_job(job_id, settings).resumed_by == new_id and not api.get_job(job_id, settings).can_resume
    with pytest.raises(ValueError, match="already resumed"):
        api.resume(job_id, settings)
    start = next(m for m in api.job_metrics(new_id, settings) if m["event"] == "train_start")
    assert start["start"].startswith("resumed from last.pt")
    steps = [m["step"] for m in api.job_metrics(new_id, settings) if m["event"] == "step"]
    assert steps[-1] == 8 and min(steps) > steps_before  # it went on where it stopped
    with session_scope(api.job_engine(settings)) as session:
        runs = session.scalars(select(Run).where(Run.folder == "runs/cancelled")).all()
        assert [run.status for run in runs] == ["succeeded"]  # one row, updated by both jobs


def newest_job_after(settings: Settings, job_id: int) -> api.JobView | None:
    newest = api.list_jobs(settings, limit=1)
    return newest[0] if newest and newest[0].id > job_id else None


# ----------------------------------------------------------------------------------------------------------------
# A real worker
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def worker_env(tmp_path) -> Iterator[dict[str, str]]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("YOLODEX_")}
    storage = tmp_path / "storage"
    env.update(
        YOLODEX_STORAGE=str(storage),
        YOLODEX_QUEUE_URL=f"sqlite:///{storage / 'queue.db'}",
        YOLODEX_DEVICE="cpu",
        OMP_NUM_THREADS="2",
        PYTHONPATH=str(REPO_ROOT),
    )
    yield env


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    consumer = Path(sys.executable).with_name("huey_consumer")
    with log.open("ab") as output:
        return subprocess.Popen(
            [str(consumer), "backend.jobs.tasks.huey", "-k", "process", "-w", "1", "-m", "1"],
            cwd=REPO_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_worker(process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)  # the consumer and its worker process: both die, as in a crash
    process.wait(timeout=30)


@pytest.mark.slow
def test_real_worker_killed_mid_training_leaves_it_interrupted_and_resume_finishes_it(tmp_path, worker_env):
    settings = Settings.from_env(worker_env)
    data = generate_synthetic_dataset(tmp_path / "shapes", num_train=8, num_val=2, image_size=(96, 96), seed=5)
    log = tmp_path / "worker.log"
    worker = start_worker(worker_env, log)
    try:

        def state_of(job_id: int, *states: str) -> bool:
            if worker.poll() is not None:
                raise AssertionError(f"the worker exited ({worker.returncode}):\n{log.read_text()[-3000:]}")
            return api.get_job(job_id, settings).state in states

        first = api.submit("import", {"project": "shapes", "paths": [str(data)]}, settings=settings)
        wait_for(lambda: state_of(first, "succeeded", "failed"), 120, "the import job", interval=0.2)
        assert api.get_job(first, settings).state == "succeeded", api.get_job(first, settings).traceback

        # Mid-epoch checkpoints after every step (checkpoint_minutes 0), so a kill loses at most one step.
        params = {"config": {"data": str(data), **TINY, "min_samples": 16, "checkpoint_minutes": 0.0}}
        job_id = api.submit("train", params, settings=settings)
        run_dir = api.get_job(job_id, settings).run_dir
        wait_for(lambda: (run_dir / "last.pt").is_file(), 180, "the first mid-epoch checkpoint", interval=0.02)
        running = api.get_job(job_id, settings)
        assert running.state == "running" and running.worker_pid not in (None, worker.pid)
        stop_worker(worker)
        assert api.get_job(job_id, settings).state == "running"  # nobody has noticed yet

        worker = start_worker(worker_env, log)
        wait_for(lambda: state_of(job_id, "interrupted"), 120, "the restarted worker's recovery", interval=0.2)
        job = api.get_job(job_id, settings)
        assert job.can_resume and job.finished_at is not None and "worker stopped" in job.message

        new_id = api.resume(job_id, settings)
        wait_for(lambda: state_of(new_id, "succeeded", "failed", "cancelled"), 300, "the resumed job", interval=0.5)
        resumed = api.get_job(new_id, settings)
        assert resumed.state == "succeeded", (resumed.error, resumed.traceback, log.read_text()[-3000:])
        assert resumed.result["epochs_done"] == 1 and (job.run_dir / "best.pt").is_file()
        assert resumed.worker_pid != running.worker_pid
    finally:
        stop_worker(worker, signal.SIGTERM)


@pytest.mark.slow
def test_a_real_workers_training_outlives_another_processs_long_write_on_sqlite(tmp_path, worker_env, monkeypatch):
    """The default set-up on one machine: one worker, one SQLite file, and meanwhile a long write in another
    process (`yolodex import` of a few thousand images is one transaction: about 40 ms an image here). It holds the
    file's only write lock past the stale timeout and past SQLite's busy timeout, so the training's heartbeats fail
    and its progress is put off. The app keeps reading, sees the job running all along (its worker's process is
    alive on this host), and the job ends succeeded once the lock is gone."""
    fast = {"YOLODEX_JOB_HEARTBEAT_S": "0.2", "YOLODEX_JOB_STALE_S": "1"}
    for name, value in fast.items():
        monkeypatch.setenv(name, value)  # the test process judges with the worker's settings
    env = {**worker_env, **fast}
    settings = Settings.from_env(env)
    data = generate_synthetic_dataset(tmp_path / "shapes", num_train=8, num_val=2, image_size=(96, 96), seed=5)
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:
        params = {"config": {"data": str(data), **TINY, "epochs": 2, "min_samples": 16}}
        job_id = api.submit("train", params, settings=settings)

        def training_steps() -> bool:
            if worker.poll() is not None:
                raise AssertionError(f"the worker exited ({worker.returncode}):\n{log.read_text()[-3000:]}")
            return any(metric["event"] == "step" for metric in api.job_metrics(job_id, settings))

        wait_for(training_steps, 180, "the training's first steps", interval=0.1)
        writer = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"), isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # the import's transaction, held past SQLite's busy timeout
        try:
            held_until = time.monotonic() + db.SQLITE_BUSY_TIMEOUT_MS / 1000 + 2.0
            seen = []
            while time.monotonic() < held_until:
                seen.append(api.get_job(job_id, settings))
                time.sleep(0.1)
        finally:
            writer.rollback()
            writer.close()
        assert {job.state for job in seen} == {"running"}, [job.message for job in seen]
        # The beats did wait: judged by its heartbeat alone, the job would have looked dead.
        silent_s = (datetime.now(UTC) - seen[-1].heartbeat_at.replace(tzinfo=UTC)).total_seconds()
        assert silent_s > 2 * api.stale_after_s(), silent_s

        wait_for(lambda: api.get_job(job_id, settings).state not in api.ACTIVE, 300, "the training's end", interval=0.3)
        job = api.get_job(job_id, settings)
        assert job.state == "succeeded", (job.message, job.error, log.read_text()[-3000:])
        assert job.result["epochs_done"] == 2
        # The heartbeats gave up on the lock and the training went on: its progress was put off, not failed.
        assert "heartbeat failed" in log.read_text() and "progress not written" in log.read_text()
    finally:
        stop_worker(worker, signal.SIGTERM)
