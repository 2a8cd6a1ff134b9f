"""yolodex on PostgreSQL: the Alembic schema, ingest → freeze → a training job run by a real worker process, and
Label Studio keeping its own data in PostgreSQL, started in the foreground as a container would, with a real sync
and pull through `YOLODEX_LS_URL`.

One PostgreSQL server for the session (`postgres_server`, tests/postgres_fixture.py); each test gets fresh
databases. The store tests of tests/test_store.py also run on PostgreSQL (its `engine` fixture).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text

from backend.data.synthetic import generate_synthetic_dataset
from backend.ingest.service import freeze, open_store
from backend.jobs import api
from backend.labeling import server, service
from backend.labeling.client import connect
from backend.settings import Settings
from backend.store.db import alembic_config, init_db, make_engine, session_scope
from backend.store.models import Annotation, Base, DatasetVersion, Image, JobMetric, Project, Run
from tests.labelstudio_fixture import free_port
from tests.test_jobs import REPO_ROOT, TINY, start_worker, stop_worker, wait_for
from tests.test_labelstudio_sync import CLASSES, images_of, make_project, rect, task_of


def test_a_long_lived_process_keeps_one_connection_pool_per_database(tmp_path, postgres_url) -> None:
    """The app and the workers call `open_store` for every action and poll (the labeling poll every minute): each
    call reuses this process's engine, so connections to the server do not pile up until a garbage collection."""
    settings = replace(Settings.from_env({"YOLODEX_STORAGE": str(tmp_path / "storage")}), database_url=postgres_url)
    watcher = make_engine(postgres_url)
    try:

        def connections() -> int:
            with watcher.connect() as connection:
                query = (
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                return int(connection.execute(text(query)).scalar_one())

        engines = set()
        for _ in range(30):
            engine, _storage = open_store(settings)
            engines.add(id(engine))
            with session_scope(engine) as session:
                session.execute(select(func.count()).select_from(Project))
        assert connections() <= engine.pool.size(), connections()  # 15 here with an engine per call
        assert len(engines) == 1 and api.job_engine(settings) is engine
    finally:
        watcher.dispose()


def test_migrations_build_the_schema_on_postgresql_and_match_the_models(postgres_url) -> None:
    engine = init_db(postgres_url)
    try:
        with session_scope(engine) as session:
            session.add(Project(name="kept"))
        init_db(engine)  # a second run must neither fail nor touch the data
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        with engine.connect() as connection:
            assert connection.dialect.name == "postgresql"
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == head
            assert connection.execute(text("SELECT name FROM projects")).scalars().all() == ["kept"]
            # Types, nullability, indexes and constraints as PostgreSQL reports them: autogenerate finds nothing.
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            assert {"jobs", "job_metrics", "labeling_tasks"} <= set(inspect(connection).get_table_names())
    finally:
        engine.dispose()
    # The libpq spellings of the URL reach the same database through psycopg 3 (psycopg2 is not installed).
    for scheme in ("postgresql", "postgres"):
        engine = init_db(postgres_url.replace("postgresql+psycopg", scheme, 1))
        try:
            assert engine.dialect.driver == "psycopg"
            with engine.connect() as connection:
                assert connection.execute(text("SELECT name FROM projects")).scalars().all() == ["kept"]
        finally:
            engine.dispose()


# ----------------------------------------------------------------------------------------------------------------
# Ingest → freeze → train, the jobs run by a real worker on PostgreSQL
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_import_freeze_and_train_job_through_a_real_worker_on_postgresql(tmp_path, postgres_url) -> None:
    storage = tmp_path / "storage"
    env = {key: value for key, value in os.environ.items() if not key.startswith("YOLODEX_")}
    env.update(
        YOLODEX_STORAGE=str(storage),
        YOLODEX_DATABASE_URL=postgres_url,
        YOLODEX_DEVICE="cpu",
        YOLODEX_QUEUE_URL=f"sqlite:///{storage / 'queue.db'}",
        OMP_NUM_THREADS="2",
        PYTHONPATH=str(REPO_ROOT),
    )
    settings = Settings.from_env(env)
    data = generate_synthetic_dataset(tmp_path / "shapes", num_train=8, num_val=2, image_size=(96, 96), seed=5)
    log = tmp_path / "worker.log"
    worker = start_worker(env, log)
    try:

        def finished(job_id: int) -> bool:
            if worker.poll() is not None:
                raise AssertionError(f"the worker exited ({worker.returncode}):\n{log.read_text()[-3000:]}")
            return api.get_job(job_id, settings).state in ("succeeded", "failed", "cancelled", "interrupted")

        imported = api.submit("import", {"project": "shapes", "paths": [str(data)]}, settings=settings)
        wait_for(lambda: finished(imported), 120, "the import job", interval=0.2)
        job = api.get_job(imported, settings)
        assert job.state == "succeeded", (job.error, job.traceback)
        assert job.result["counts"]["accepted"] == 10

        version = freeze("shapes", "v1", settings=settings)
        assert sum(split["images"] for split in version["counts"]["splits"].values()) == 10

        params = {"project": "shapes", "config": {"data": version["folder"], **TINY}, "run_dir": "runs/pg"}
        trained = api.submit("train", params, settings=settings)
        wait_for(lambda: finished(trained), 300, "the training job", interval=0.5)
        job = api.get_job(trained, settings)
        assert job.state == "succeeded", (job.error, job.traceback, log.read_text()[-3000:])
        assert job.worker_pid not in (None, os.getpid()) and job.started_at <= job.finished_at
        assert (settings.runs_dir / "pg" / "best.pt").is_file()
    finally:
        stop_worker(worker, signal.SIGTERM)

    # Everything the worker wrote is in PostgreSQL: no SQLite metadata file appeared beside the queue.
    assert not (storage / "yolodex.db").exists()
    engine = init_db(postgres_url)
    try:
        with session_scope(engine) as session:
            project = session.scalar(select(Project).where(Project.name == "shapes"))
            images = session.scalar(select(func.count()).select_from(Image).where(Image.project_id == project.id))
            boxes = session.scalar(select(func.count()).select_from(Annotation).join(Image))
            assert images == 10 and boxes > 0
            events = session.scalars(select(JobMetric.event).where(JobMetric.job_id == trained).order_by(JobMetric.seq))
            events = list(events)
            assert events[0] == "train_start" and events[-1] == "train_end" and {"step", "epoch", "eval"} <= set(events)
            run = session.scalar(select(Run).where(Run.folder == "runs/pg"))
            frozen = session.scalar(select(DatasetVersion).where(DatasetVersion.name == "v1"))
            assert (run.status, run.dataset_version_id, run.config["job_id"]) == ("succeeded", frozen.id, trained)
    finally:
        engine.dispose()


# ----------------------------------------------------------------------------------------------------------------
# Label Studio on PostgreSQL, run in the foreground, reached through YOLODEX_LS_URL
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_label_studio_on_postgresql_in_the_foreground_syncs_and_pulls_through_its_url(
    tmp_path, postgres_server
) -> None:
    ls_database = postgres_server.create_database("labelstudio_test")
    metadata_url = postgres_server.url(postgres_server.create_database())
    storage, port = tmp_path / "storage", free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("YOLODEX_")}
    env.update(
        YOLODEX_STORAGE=str(storage),
        YOLODEX_HOST="127.0.0.1",
        YOLODEX_LS_PORT=str(port),
        YOLODEX_DATABASE_URL=metadata_url,
        PYTHONPATH=str(REPO_ROOT),
        YOLODEX_LS_DATABASE_URL=postgres_server.url(ls_database, "postgresql"),
    )
    settings = Settings.from_env(env)
    # The app's side, as in compose: Label Studio is external, called at its URL (another port would be wrong).
    app = Settings.from_env({**env, "YOLODEX_LS_URL": f"http://127.0.0.1:{port}", "YOLODEX_LS_PORT": str(free_port())})
    assert server.api_url(app) == f"http://127.0.0.1:{port}"
    output = tmp_path / "labelstudio.out"
    command = [sys.executable, "-m", "backend.labeling.server", "start", "--foreground"]
    with output.open("wb") as sink:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def up() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"Label Studio exited ({process.returncode}):\n{output.read_text()[-3000:]}")
            return server.status(app, timeout=5.0).ok

        wait_for(up, 420, "Label Studio's first start on PostgreSQL", interval=1.0)
        state = server.status(settings)
        assert state.state == "running" and state.pid is not None  # ours: the state file names its pid
        assert server.start(app).state == "running"  # external: nothing is spawned
        assert server.stop(app) is False and server.status(app).ok  # ... and nothing is stopped

        make_project(SimpleNamespace(settings=app), "pg-sync", count=3)
        report = service.sync("pg-sync", app)
        assert report["new_tasks"] == 3
        client = connect(app)
        tasks = task_of(client, report["ls_project_id"])
        images = images_of(SimpleNamespace(settings=app), "pg-sync")
        first = next(image for image in images.values() if image.width == 96)
        client.create_annotation(tasks[first.id]["id"], [rect(CLASSES[1], 10, 5, 30, 20, 96, 64)])
        pulled = service.pull("pg-sync", app)
        assert pulled["labeled"] == 1 and pulled["tasks"] == 3

        engine, _ = open_store(app)
        with session_scope(engine) as session:
            (box,) = session.scalars(select(Annotation).where(Annotation.image_id == first.id)).all()
            assert (box.source, box.project_class.name) == ("labelstudio", CLASSES[1])
            assert [box.x1, box.y1, box.x2, box.y2] == pytest.approx([10, 5, 40, 25], abs=1e-3)
            assert session.get(Image, first.id).labeled
        engine.dispose()

        # Label Studio's tasks and annotation live in its PostgreSQL database, not in a SQLite file.
        with psycopg.connect(postgres_server.url(ls_database, "postgresql")) as connection:
            assert connection.execute("SELECT count(*) FROM task").fetchone()[0] == 3
            assert connection.execute("SELECT count(*) FROM task_completion").fetchone()[0] == 1
        assert not (server.data_dir(settings) / "label_studio.sqlite3").exists()
        # A new credentials file over data that kept the old login (a storage restored without it): repair writes
        # the new login into Label Studio's PostgreSQL database.
        server.credentials_path(settings).unlink()
        server.load_or_create_credentials(settings)
        assert server.status(settings).action == server.REPAIR_ACTION
        server.repair_credentials(settings)
        assert server.status(settings).ok and server.status(app).ok
        state_file = server.state_path(settings).read_text()
        assert json.loads(state_file)["pid"] == state.pid

        process.send_signal(signal.SIGTERM)  # what `docker stop` sends to a container's main process
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    log = output.read_text()
    assert "PostgreSQL database 'labelstudio_test'" in log
    for secret_file in (log, state_file):
        assert postgres_server.password not in secret_file
    assert not server.state_path(settings).exists()  # the foreground run cleans up after itself
    gone = server.status(app)
    assert gone.state == "stopped" and "YOLODEX_LS_URL" in gone.message
    assert not server._health(settings, 2.0)  # the Label Studio child went with it
