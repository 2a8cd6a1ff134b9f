"""Jobs on a Redis queue with two real workers: jobs are shared between them, and a worker killed mid-training
(its whole process group, as when its machine dies) leaves the job "interrupted" through the heartbeat, detected by
the surviving worker, which then runs the resumed job to the end. Also the heartbeat's rules without a queue.

The workers share the storage folder and a PostgreSQL database with the test, as workers on several machines share
a mount and a database server (a SQLite file cannot be shared between machines, and two workers writing one SQLite
file at once make each other fail with "database is locked"). Heartbeats are fast here (every 0.5 s, stale after
4 s) so the test need not wait a minute.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from backend.data.synthetic import generate_synthetic_dataset
from backend.jobs import api, lifecycle, runner
from backend.jobs import context as job_context
from backend.settings import Settings
from backend.store import db
from backend.store.db import session_scope
from backend.store.models import Job
from tests.redis_fixture import flush_redis
from tests.test_jobs import REPO_ROOT, TINY, make_settings, start_worker, stop_worker, wait_for

READY = re.compile(r"worker process \S+:(\d+) is ready and takes jobs")


@pytest.fixture
def redis_env(tmp_path, redis_server, postgres_url, monkeypatch) -> dict[str, str]:
    flush_redis(redis_server)
    env = {key: value for key, value in os.environ.items() if not key.startswith("YOLODEX_")}
    env.update(
        YOLODEX_STORAGE=str(tmp_path / "storage"),
        YOLODEX_QUEUE_URL=redis_server,
        YOLODEX_DEVICE="cpu",
        YOLODEX_DATABASE_URL=postgres_url,
        YOLODEX_JOB_HEARTBEAT_S="0.5",
        YOLODEX_JOB_STALE_S="4",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO_ROOT),
    )
    # The test process reads the same heartbeat settings as the workers.
    monkeypatch.setenv("YOLODEX_JOB_HEARTBEAT_S", "0.5")
    monkeypatch.setenv("YOLODEX_JOB_STALE_S", "4")
    return env


def consumer_of(workers: list, pid: int | None):
    """The consumer whose process group holds `pid` (a huey worker process is its consumer's child)."""
    group = os.getpgid(pid) if pid else None
    return next((worker for worker in workers if worker.pid == group), None)


def ready_consumers(workers: list, log) -> set:
    """The consumers whose worker process has logged that it is ready (its start-up hooks ran; next, the queue)."""
    pids = {int(pid) for pid in READY.findall(log.read_text(errors="replace"))} if log.is_file() else set()
    return {consumer_of(workers, pid) for pid in pids if api.pid_alive(pid)} - {None}


def state_in_db(settings: Settings, job_id: int) -> tuple[str, str]:
    """The row as stored, read without the API (whose readers would mark a stale job themselves)."""
    with session_scope(api.job_engine(settings)) as session:
        return tuple(session.execute(select(Job.state, Job.message).where(Job.id == job_id)).one())


@pytest.mark.slow
def test_two_workers_share_jobs_and_one_resumes_what_a_killed_one_left(tmp_path, redis_env):
    settings = Settings.from_env(redis_env)
    assert settings.queue_url.startswith("redis://")
    log = tmp_path / "workers.log"
    workers = [start_worker(redis_env, log), start_worker(redis_env, log)]
    try:

        def ended(job_id: int) -> bool:
            for worker in workers:
                if worker.poll() is not None and worker.returncode != -signal.SIGKILL:
                    raise AssertionError(f"a worker exited ({worker.returncode}):\n{log.read_text()[-3000:]}")
            return api.get_job(job_id, settings).state in api.TERMINAL

        # Shared: imports submitted together are taken by both workers. Both must be waiting on the queue first, or
        # the one that started sooner takes all six before the other has imported torch (as on a busy CI machine).
        # Redis hands each job to the worker that has waited longest, so two waiting workers share them.
        wait_for(lambda: ready_consumers(workers, log) == set(workers), 120, "both workers to be ready", interval=0.2)
        data = generate_synthetic_dataset(tmp_path / "shapes", num_train=6, num_val=2, image_size=(64, 64), seed=3)
        imports = [
            api.submit("import", {"project": f"p{n}", "paths": [str(data)]}, settings=settings) for n in range(6)
        ]
        for job_id in imports:
            wait_for(lambda job_id=job_id: ended(job_id), 120, f"import job {job_id}", interval=0.2)
        jobs = [api.get_job(job_id, settings) for job_id in imports]
        assert [job.state for job in jobs] == ["succeeded"] * 6, [(job.error, job.traceback) for job in jobs]
        runners = {consumer_of(workers, job.worker_pid) for job in jobs}
        assert runners == set(workers), [job.worker_pid for job in jobs]

        # Killed mid-training: checkpoints after every step, so the resumed job continues from the last one.
        params = {"project": "p0", "config": {"data": str(data), **TINY, "min_samples": 24, "checkpoint_minutes": 0.0}}
        job_id = api.submit("train", params, settings=settings)
        run_dir = api.get_job(job_id, settings).run_dir
        wait_for(lambda: (run_dir / "last.pt").is_file(), 180, "the first mid-epoch checkpoint", interval=0.02)
        running = api.get_job(job_id, settings)
        assert running.state == "running" and running.heartbeat_at is not None
        victim = consumer_of(workers, running.worker_pid)
        survivor = next(worker for worker in workers if worker is not victim)
        stop_worker(victim)  # SIGKILL to its process group: no handler runs, the row stays "running"
        assert state_in_db(settings, job_id)[0] == "running"

        # The surviving worker's watchdog notices the silence (the test only reads the table).
        wait_for(lambda: state_in_db(settings, job_id)[0] == "interrupted", 60, "the watchdog", interval=0.2)
        message = state_in_db(settings, job_id)[1]
        assert "stopped sending heartbeats" in message and f"pid {running.worker_pid}" in message
        assert api.get_job(job_id, settings).can_resume

        new_id = api.resume(job_id, settings)
        wait_for(lambda: ended(new_id), 300, "the resumed job", interval=0.5)
        resumed = api.get_job(new_id, settings)
        assert resumed.state == "succeeded", (resumed.error, resumed.traceback, log.read_text()[-3000:])
        assert consumer_of(workers, resumed.worker_pid) is survivor
        assert resumed.result["epochs_done"] == 1 and (run_dir / "best.pt").is_file()
        start = next(m for m in api.job_metrics(new_id, settings) if m["event"] == "train_start")["start"]
        assert start.startswith("resumed from last.pt"), start  # continued from the checkpoint
    finally:
        for worker in workers:
            stop_worker(worker, signal.SIGTERM)


def running_row(settings: Settings, **values) -> int:
    with session_scope(api.job_engine(settings)) as session:
        job = Job(kind="train", params={}, state="running", worker_host="elsewhere", worker_pid=4242, **values)
        session.add(job)
        session.flush()
        return job.id


def test_a_silent_job_is_interrupted_and_a_beating_one_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLODEX_JOB_STALE_S", "30")
    settings = make_settings(tmp_path)
    now = datetime.now(UTC)
    silent = running_row(settings, started_at=now - timedelta(minutes=5), heartbeat_at=now - timedelta(seconds=31))
    beating = running_row(settings, started_at=now - timedelta(minutes=5), heartbeat_at=now - timedelta(seconds=5))
    never = running_row(settings, started_at=now - timedelta(seconds=40))  # started, never beat: its start counts

    assert api.list_jobs(settings, states=api.ACTIVE) and api.interrupt_stale_jobs(settings, now=now) == []
    # get_job and list_jobs check too (the first reader marks them): the app shows the truth with no worker.
    assert {job.id: job.state for job in api.list_jobs(settings)} == {
        silent: "interrupted",
        beating: "running",
        never: "interrupted",
    }
    job = api.get_job(silent, settings)
    assert "pid 4242 on elsewhere" in job.message and job.finished_at is not None
    assert [job.id for job in api.list_jobs(settings, states=("running",))] == [beating]
    assert api.count_jobs(settings, states=("running",)) == 1 and api.count_jobs(settings, states=api.TERMINAL) == 2
    with pytest.raises(ValueError, match="unknown job states"):
        api.list_jobs(settings, states=("sleeping",))

    # A beat between the read and the mark keeps the job alive (the mark is conditional on the beat read).
    stale_beat = now - timedelta(seconds=60)
    racing = running_row(settings, started_at=now - timedelta(minutes=5), heartbeat_at=stale_beat)
    with session_scope(api.job_engine(settings)) as session:
        session.execute(update(Job).where(Job.id == racing).values(heartbeat_at=now))
    assert not lifecycle.mark_interrupted(racing, settings, "dead?", heartbeat_at=stale_beat)
    assert api.get_job(racing, settings).state == "running"


def test_a_local_live_worker_is_not_judged_by_its_heartbeat_and_a_locked_database_fails_no_reader(
    tmp_path, monkeypatch
):
    """One machine, one SQLite file: another process's long write (an import of a few thousand images is one
    transaction) holds the only write lock, so a live job's beats wait. The process table says it is alive: no
    reader marks it. A job of a dead process of this host is marked, but a reader that cannot take the write lock
    answers all the same (the mark waits for a later reader)."""
    monkeypatch.setenv("YOLODEX_JOB_STALE_S", "30")
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)  # the engine is made below: readers give up quickly
    settings = make_settings(tmp_path)
    old = datetime.now(UTC) - timedelta(minutes=5)
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    host = socket.gethostname()
    alive = running_row(settings, started_at=old, heartbeat_at=old)
    dead = running_row(settings, started_at=old, heartbeat_at=old)
    with session_scope(api.job_engine(settings)) as session:
        session.execute(update(Job).where(Job.id == alive).values(worker_host=host, worker_pid=os.getpid()))
        session.execute(update(Job).where(Job.id == dead).values(worker_host=host, worker_pid=exited.pid))

    writer = sqlite3.connect(settings.database_url.removeprefix("sqlite:///"), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # what an import in another process holds until it commits
    try:
        assert {job.id: job.state for job in api.list_jobs(settings)} == {alive: "running", dead: "running"}
        assert api.get_job(dead, settings).state == "running"
        with pytest.raises(OperationalError, match="locked"):
            api.interrupt_stale_jobs(settings)  # the mark itself does need the lock
    finally:
        writer.rollback()
        writer.close()
    assert {job.id: job.state for job in api.list_jobs(settings)} == {alive: "running", dead: "interrupted"}
    assert f"pid {exited.pid} on {host}" in api.get_job(dead, settings).message


def test_the_heartbeat_thread_beats_while_the_job_runs_and_stops_after(tmp_path, monkeypatch):
    settings = make_settings(tmp_path)
    job_id = running_row(settings, started_at=datetime.now(UTC))
    with session_scope(api.job_engine(settings)) as session:
        session.execute(update(Job).where(Job.id == job_id).values(worker_pid=os.getpid()))
    heartbeat = lifecycle.Heartbeat(api.job_engine(settings), job_id, interval_s=0.05)
    heartbeat.start()
    first = wait_for(lambda: api.get_job(job_id, settings).heartbeat_at, 10, "a first beat", interval=0.02)
    wait_for(lambda: api.get_job(job_id, settings).heartbeat_at > first, 10, "a second beat", interval=0.02)
    heartbeat.stop()
    assert not heartbeat._thread.is_alive()
    # A row that is no longer this process's running job ends the thread by itself.
    assert lifecycle.mark_interrupted(job_id, settings, "stopped")
    assert not heartbeat.beat()


def test_a_live_worker_whose_job_was_marked_interrupted_stops_it_and_leaves_the_row(tmp_path):
    settings = make_settings(tmp_path)
    engine = api.job_engine(settings)
    job_id = running_row(settings, started_at=datetime.now(UTC))
    with session_scope(engine) as session:
        session.execute(update(Job).where(Job.id == job_id).values(worker_pid=os.getpid()))
    context = job_context.JobContext(engine, job_id, flush_interval_s=0.0)
    heartbeat = lifecycle.Heartbeat(engine, job_id, interval_s=0.05, on_lost=context.lose)
    heartbeat.start()
    try:
        assert not context.stop_requested()
        # Another machine judged it dead (say this one's database link was down longer than the timeout).
        assert lifecycle.mark_interrupted(job_id, settings, "interrupted: silent")
        wait_for(context.stop_requested, 10, "the job told to stop", interval=0.02)
        context.progress(0.5, message="still training")  # what the job's thread writes before it sees the stop
        context.flush(force=True)
        assert api.get_job(job_id, settings).message == "interrupted: silent"
    finally:
        heartbeat.stop()

    # Its own end (succeeded) is not a loss.
    ended = running_row(settings, started_at=datetime.now(UTC))
    with session_scope(engine) as session:
        session.execute(update(Job).where(Job.id == ended).values(worker_pid=os.getpid()))
    context = job_context.JobContext(engine, ended)
    heartbeat = lifecycle.Heartbeat(engine, ended, interval_s=0.05, on_lost=context.lose)
    heartbeat.start()
    runner._finish(context, "succeeded", message="done")
    wait_for(lambda: not heartbeat._thread.is_alive(), 10, "the heartbeat thread to end", interval=0.02)
    assert not context.lost and api.get_job(ended, settings).state == "succeeded"


def test_heartbeats_follow_the_database_clock_not_a_skewed_machine_clock(tmp_path, postgres_url, monkeypatch):
    monkeypatch.setenv("YOLODEX_JOB_STALE_S", "60")
    settings = replace(make_settings(tmp_path), database_url=postgres_url)
    engine = api.job_engine(settings)
    job_id = running_row(settings, started_at=datetime.now(UTC))
    with session_scope(engine) as session:
        session.execute(update(Job).where(Job.id == job_id).values(worker_pid=os.getpid()))
    # This worker's clock is two hours behind: stamping its own time would make its live job look dead at once.
    behind = datetime.now(UTC) - timedelta(hours=2)
    monkeypatch.setattr(api, "utc_now", lambda: behind)
    monkeypatch.setattr(runner, "utc_now", lambda: behind)
    assert lifecycle.Heartbeat(engine, job_id).beat()
    beat = api.get_job(job_id, settings).heartbeat_at
    assert abs((beat - datetime.now(UTC)).total_seconds()) < 60, beat  # the server's clock
    assert api.interrupt_stale_jobs(settings) == [] and api.get_job(job_id, settings).state == "running"


def test_bad_heartbeat_settings_say_what_to_do(monkeypatch):
    monkeypatch.setenv("YOLODEX_JOB_STALE_S", "soon")
    with pytest.raises(ValueError, match="YOLODEX_JOB_STALE_S='soon' is not a number of seconds"):
        api.stale_after_s()
    monkeypatch.setenv("YOLODEX_JOB_HEARTBEAT_S", "")
    assert api.heartbeat_interval_s() == lifecycle.DEFAULT_HEARTBEAT_S
