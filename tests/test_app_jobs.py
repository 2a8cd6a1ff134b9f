"""The Jobs page (AppTest) over jobs made through the jobs API: an import that succeeded, one that failed (its error
and traceback shown), a queued job cancelled from the page, and the filters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

import backend.jobs.tasks
from backend.jobs import api as jobs
from backend.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "pages" / "jobs.py")


@pytest.fixture
def storage(tmp_path, monkeypatch) -> Settings:
    folder = tmp_path / "storage"
    monkeypatch.setenv("YOLODEX_STORAGE", str(folder))
    monkeypatch.setenv("YOLODEX_LS_PORT", "1")  # nothing listens there: no Label Studio is ever reached
    return Settings.from_env({"YOLODEX_STORAGE": str(folder)})


@pytest.fixture
def immediate(storage, monkeypatch) -> Settings:
    monkeypatch.setenv("YOLODEX_QUEUE_IMMEDIATE", "1")
    monkeypatch.setattr(backend.jobs.tasks.huey, "immediate", True)
    return storage


@pytest.fixture
def two_images(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for index, colour in enumerate(((200, 30, 30), (30, 200, 30))):
        Image.new("RGB", (64 + 16 * index, 48), colour).save(folder / f"photo{index}.png")
    return folder


def open_page(**query: str) -> AppTest:
    app = AppTest.from_file(PAGE, default_timeout=60)
    for key, value in query.items():
        app.query_params[key] = value
    app.run()
    assert not app.exception, [exception.value for exception in app.exception]
    return app


def texts(app: AppTest) -> str:
    return " ".join(
        str(element.value) for element in [*app.markdown, *app.caption, *app.info, *app.error, *app.warning]
    )


def table(app: AppTest):
    return app.dataframe[0].value


def test_empty_storage_says_what_runs_here(storage):
    app = open_page()
    assert "No job yet" in texts(app)
    assert not app.dataframe


def test_succeeded_import_with_its_parameters_and_result(immediate, two_images):
    job_id = jobs.submit("import", {"project": "Shapes", "paths": [str(two_images)]}, settings=immediate)
    job = jobs.get_job(job_id, immediate)
    assert job.state == "succeeded", job.error

    app = open_page()
    rows = table(app)
    assert list(rows["id"]) == [job_id] and list(rows["kind"]) == ["import"] and list(rows["state"]) == ["succeeded"]
    assert rows.loc[0, "project"] == "Shapes" and rows.loc[0, "progress"] == pytest.approx(job.progress or 0.0)
    assert rows.loc[0, "created"] and rows.loc[0, "started"] and rows.loc[0, "finished"] and not rows.loc[0, "ETA"]
    assert app.query_params["job"] == str(job_id)  # the newest job is selected and remembered
    assert app.subheader[0].value == f"Job {job_id}: import"
    assert f"job {job_id} succeeded" in app.get("progress")[0].proto.text
    params, result = (json.loads(element.value) for element in app.json)
    assert params == {"project": "Shapes", "paths": [str(two_images)]}
    assert result == job.result and result["project"] == "Shapes"
    assert app.button(key="jobs_cancel").disabled and app.button(key="jobs_resume").disabled
    assert not app.error


def test_failed_job_shows_its_error_and_traceback(immediate, two_images):
    good = jobs.submit("import", {"project": "Shapes", "paths": [str(two_images)]}, settings=immediate)
    bad = jobs.submit(
        "evaluate", {"model": str(two_images / "missing.onnx"), "data": str(two_images)}, settings=immediate
    )
    failed = jobs.get_job(bad, immediate)
    assert failed.state == "failed" and failed.error and failed.traceback

    app = open_page(job=str(good))  # another job selected first
    assert app.subheader[0].value == f"Job {good}: import"
    app.selectbox(key="jobs_selected").set_value(bad).run()
    assert app.query_params["job"] == str(bad)
    assert [element.value for element in app.error] == [failed.error]
    assert failed.traceback.strip() in [element.value.strip() for element in app.code]
    assert "Traceback" in failed.traceback

    app = open_page(job=str(bad))  # a reload keeps the selection
    assert app.subheader[0].value == f"Job {bad}: evaluate" and app.error[0].value == failed.error


def test_filters_by_kind_and_state(immediate, two_images):
    jobs.submit("import", {"project": "Shapes", "paths": [str(two_images)]}, settings=immediate)
    bad = jobs.submit(
        "evaluate", {"model": str(two_images / "missing.onnx"), "data": str(two_images)}, settings=immediate
    )
    app = open_page()
    assert list(table(app)["kind"]) == ["evaluate", "import"]  # newest first

    app.selectbox(key="jobs_state").set_value("failed").run()
    assert list(table(app)["id"]) == [bad]
    app.selectbox(key="jobs_state").set_value("all").run()
    app.selectbox(key="jobs_kind").set_value("quantize").run()
    assert "No job matches these filters." in texts(app)
    app.selectbox(key="jobs_kind").set_value("import").run()
    assert list(table(app)["kind"]) == ["import"]
    app.selectbox(key="jobs_project").set_value("Shapes").run()
    assert list(table(app)["project"]) == ["Shapes"]


def test_paging(immediate, two_images):
    ids = [
        jobs.submit("import", {"project": "Shapes", "paths": [str(two_images)]}, settings=immediate) for _ in range(22)
    ]
    app = open_page()
    assert list(table(app)["id"]) == ids[::-1][:20] and "22 jobs; page 1 of 2." in texts(app)
    app.number_input(key="jobs_page").set_value(2).run()
    assert list(table(app)["id"]) == ids[1::-1] and "22 jobs; page 2 of 2." in texts(app)


def test_cancel_a_queued_job_from_the_page(storage, two_images, monkeypatch):
    monkeypatch.delenv("YOLODEX_QUEUE_IMMEDIATE", raising=False)
    monkeypatch.setattr(backend.jobs.tasks.huey, "immediate", False)
    job_id = jobs.submit("import", {"project": "Shapes", "paths": [str(two_images)]}, settings=storage)
    assert jobs.get_job(job_id, storage).state == "queued"  # no worker runs it

    app = open_page()
    assert list(table(app)["state"]) == ["queued"]
    assert f"job {job_id} queued" in app.get("progress")[0].proto.text
    assert not app.button(key="jobs_cancel").disabled and app.button(key="jobs_resume").disabled

    app.button(key="jobs_cancel").click().run()
    assert not app.exception, [exception.value for exception in app.exception]
    assert jobs.get_job(job_id, storage).state == "cancelled"
    assert list(table(app)["state"]) == ["cancelled"]
    assert f"job {job_id} cancelled" in app.get("progress")[0].proto.text
    assert app.button(key="jobs_cancel").disabled


def selector_in_browser(app: AppTest, held: str | None = None) -> str:
    """The text the browser's Job box shows after this run: the value Streamlit sent (`set_value`), else the label
    the browser already held (it keeps its own copy of the selected label), else the default option's."""
    proto = app.selectbox(key="jobs_selected").proto
    if proto.set_value:
        return proto.raw_value
    return held if held is not None else proto.options[proto.default]


def queued(storage: Settings, monkeypatch) -> None:
    monkeypatch.delenv("YOLODEX_QUEUE_IMMEDIATE", raising=False)
    monkeypatch.setattr(backend.jobs.tasks.huey, "immediate", False)


def test_the_selector_shows_the_real_state_after_a_cancel(storage, two_images, monkeypatch):
    queued(storage, monkeypatch)
    job_id = jobs.submit("import", {"project": "Shapes", "paths": [str(two_images)]}, settings=storage)
    app = open_page()
    shown = selector_in_browser(app)
    assert shown == f"{job_id} · import · Shapes · queued"

    app.button(key="jobs_cancel").click().run()
    assert not app.exception, [exception.value for exception in app.exception]
    shown = selector_in_browser(app, shown)
    assert shown == f"{job_id} · import · Shapes · cancelled"
    # The banner says what the cancel did, from the job's state.
    assert [element.value for element in app.success] == [f"Cancel job {job_id}: job {job_id} is cancelled."]

    app.run()  # a plain rerun: nothing changed, the box keeps its label
    assert selector_in_browser(app, shown) == shown and app.selectbox(key="jobs_selected").value == job_id


def test_duration_project_and_who_started_each_job(immediate, two_images, monkeypatch):
    from backend.store.db import init_db, session_scope
    from backend.store.models import Run, get_or_create_project

    done = jobs.get_job(
        jobs.submit("import", {"project": "Shapes", "paths": [str(two_images)]}, settings=immediate), immediate
    )
    run_dir = immediate.runs_dir / "shapes-run"
    run_dir.mkdir(parents=True)
    engine = init_db(immediate.database_url)
    with session_scope(engine) as session:
        project = get_or_create_project(session, "Shapes")
        session.add(Run(project_id=project.id, folder="runs/shapes-run", status="succeeded"))
    engine.dispose()

    queued(immediate, monkeypatch)
    quantize = jobs.submit("quantize", {"run_dir": str(run_dir)}, settings=immediate)  # no project in its params
    retrain = backend.jobs.tasks.labeling_retrain("Shapes")  # what the loop's poll queues
    app = open_page()
    rows = table(app).set_index("id")
    assert list(rows.columns) == [
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
    assert rows.loc[quantize, "project"] == "Shapes" and rows.loc[quantize, "started by"] == "you"
    assert rows.loc[retrain, "project"] == "Shapes" and rows.loc[retrain, "started by"] == "retrain loop"
    assert rows.loc[done.id, "started by"] == "you"
    # Ended: finished − started; queued: how long it has waited so far.
    seconds = round((done.finished_at - done.started_at).total_seconds())
    assert rows.loc[done.id, "duration"] == f"{seconds // 60}:{seconds % 60:02d}"
    assert rows.loc[retrain, "duration"].endswith(" waiting") and rows.loc[quantize, "duration"].endswith(" waiting")
    assert (
        app.selectbox(key="jobs_selected").options[0]
        == f"{retrain} · labeling_retrain · Shapes · queued · by the retrain loop"
    )
    assert "started by retrain loop · project Shapes" in texts(app)

    jobs.cancel(quantize, immediate)  # cancelled before it started: it never ran
    app = open_page(job=str(quantize))
    assert table(app).set_index("id").loc[quantize, "duration"] == "never started"
