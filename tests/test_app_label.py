"""The Label page under AppTest: storage in a temp folder, Label Studio never started (a port nothing listens on).

The labeling rows (LabelingProject/LabelingTask) are written straight into the database, as a sync and a pre-label
would leave them, so the queue, the progress and the loop are checked without a server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select
from streamlit.testing.v1 import AppTest

from backend.evaluation.coco_eval import evaluate_detections
from backend.ingest import service as ingest_service
from backend.ingest.starter import STARTER_NAME
from backend.jobs import api as jobs_api
from backend.jobs import tasks as jobs_tasks
from backend.labeling import server as server_module
from backend.labeling import service as labeling_service
from backend.settings import Settings, get_settings
from backend.store.db import init_db, session_scope
from backend.store.models import Annotation, Image, LabelingProject, LabelingTask, Project, ProjectClass, Run
from tests.labelstudio_fixture import free_port

# Absolute: AppTest resolves a relative path against this test file, not the repository root.
PAGE = Path(__file__).resolve().parents[1] / "pages" / "label.py"
LS_PROJECT_ID = 7


@pytest.fixture(scope="module")
def starter_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A storage folder holding the Starter Pokédex (built once: importing 64 images takes about two seconds)."""
    storage = tmp_path_factory.mktemp("starter") / "storage"
    ingest_service.starter(Settings.from_env({"YOLODEX_STORAGE": str(storage)}))
    return storage


@pytest.fixture
def storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, starter_storage: Path) -> Path:
    """A private copy of the starter storage, with the app's settings pointing at it and at a dead LS port."""
    copy = tmp_path / "storage"
    shutil.copytree(starter_storage, copy)
    monkeypatch.setenv("YOLODEX_STORAGE", str(copy))
    monkeypatch.setenv("YOLODEX_LS_PORT", str(free_port()))
    monkeypatch.delenv("YOLODEX_DATABASE_URL", raising=False)
    monkeypatch.delenv("YOLODEX_HOST", raising=False)
    return copy


def run_page(**context: str) -> AppTest:
    app = AppTest.from_file(str(PAGE), default_timeout=30)
    app.context = dict(context)
    app.run()
    assert not app.exception, [exception.value for exception in app.exception]
    return app


def page_text(app: AppTest) -> str:
    parts = [*app.markdown, *app.caption, *app.info, *app.warning, *app.error, *app.success]
    return " ".join(str(element.value) for element in parts)


def table_with(app: AppTest, column: str):
    tables = [element.value for element in app.dataframe if column in element.value.columns]
    assert len(tables) == 1, [list(element.value.columns) for element in app.dataframe]
    return tables[0]


def link_to_label_studio(settings: Settings, unlabeled_count: int = 3, pulled: int = 5) -> dict[str, object]:
    """Marks the first `unlabeled_count` starter images as not labeled (boxes removed) and maps every image to a
    Label Studio task, as a sync plus a pre-label would. The unlabeled tasks get uncertainties None, 0.2, 0.9 in
    image-id order, so the queue's order differs from the id order; `pulled` labeled tasks carry an annotation id.

    Returns:
        {"unlabeled": image ids, "tasks": image id → task id, "uncertainty": image id → uncertainty}.
    """
    engine = init_db(settings.database_url)
    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == STARTER_NAME))
        image_ids = list(session.scalars(select(Image.id).where(Image.project_id == project.id).order_by(Image.id)))
        unlabeled = image_ids[:unlabeled_count]
        session.execute(delete(Annotation).where(Annotation.image_id.in_(unlabeled)))
        for image in session.scalars(select(Image).where(Image.id.in_(unlabeled))):
            image.labeled = False
        session.add(LabelingProject(project_id=project.id, ls_project_id=LS_PROJECT_ID, ls_view_id=3))
        uncertainty = dict(zip(unlabeled, [None, 0.2, 0.9]))
        tasks = {image_id: 100 + position for position, image_id in enumerate(image_ids)}
        pulled_ids = set(image_ids[unlabeled_count:][:pulled])
        for image_id, task_id in tasks.items():
            session.add(
                LabelingTask(
                    image_id=image_id,
                    ls_project_id=LS_PROJECT_ID,
                    ls_task_id=task_id,
                    annotation_id=1000 + task_id if image_id in pulled_ids else None,
                    uncertainty=uncertainty.get(image_id),
                    model_version="yolodex:run/best.pt" if uncertainty.get(image_id) is not None else None,
                )
            )
    engine.dispose()
    return {"unlabeled": unlabeled, "tasks": tasks, "uncertainty": uncertainty}


def perfect_evaluation() -> dict:
    """A real evaluation (as eval.json holds it) of predictions equal to the ground truth: mAP50 1."""
    from tests.test_evaluation import BOX_A, BOX_B, CAT, DOG, detections, make_dataset

    dataset = make_dataset([([BOX_A, BOX_B], [CAT, DOG])])
    return evaluate_detections(dataset, [detections([BOX_A, BOX_B], [0.9, 0.8], [CAT, DOG])]).to_dict()


def test_label_studio_down_shows_the_stopped_state_and_the_start_action(storage: Path):
    runs = storage / "runs"
    starter_config = json.dumps({"class_names": ["circle", "square", "triangle"], "train": {"size": "s"}})
    for name, files in (("first-run", ("best.pt", "model_fp32.onnx")), ("other-project", ("best.pt",))):
        (runs / name).mkdir(parents=True)
        for file in files:
            (runs / name / file).write_bytes(b"")
    (runs / "first-run" / "config.json").write_text(starter_config)
    (runs / "first-run" / "eval.json").write_text(json.dumps(perfect_evaluation()))
    (runs / "unevaluated").mkdir()  # trained elsewhere: weights, never evaluated
    (runs / "unevaluated" / "config.json").write_text(starter_config)
    (runs / "unevaluated" / "best.pt").write_bytes(b"")
    os.utime(runs / "unevaluated" / "best.pt", (1, 1))  # older than first-run's: listed after it
    (runs / "other-project" / "config.json").write_text(json.dumps({"class_names": ["raccoon"]}))
    (runs / "cancelled").mkdir()  # the starter's classes, but cancelled before it learned anything: no model
    (runs / "cancelled" / "config.json").write_text(starter_config)
    (runs / "cancelled" / "metrics.jsonl").write_text(json.dumps({"event": "train_end", "stopped": "cancelled"}))
    (runs / "cancelled" / "last.pt").write_bytes(b"")

    app = run_page()

    assert [element.value for element in app.warning] == [
        "Label Studio is not running. To do: run `yolodex labelstudio start`."
    ]
    assert app.selectbox(key="label_project").value == STARTER_NAME
    assert f"{STARTER_NAME!r} is not in Label Studio yet" in page_text(app)
    # Every button that talks to Label Studio is offered but disabled while it is down.
    for key in ("label_sync", "label_pull", "label_prelabel"):
        assert app.button(key=key).disabled, key
    # The project's trained runs' models only (not another project's, not a run cancelled before it learned), each
    # with its own validation mAP50 (first-run's FP32 model is the export of its evaluated best.pt).
    assert app.selectbox(key="label_model").options == [
        "first-run · FP32 ONNX (model_fp32.onnx, 0.0 MB) · mAP50 1.000",
        "first-run · PyTorch checkpoint (best.pt, 0.0 MB) · mAP50 1.000",
        "unevaluated · PyTorch checkpoint (best.pt, 0.0 MB) · not evaluated",
    ]
    assert not app.get("iframe")
    # The progress still comes from our own database: the starter project is fully labeled.
    assert "64 of 64 images labeled" in app.get("progress")[0].proto.text
    # No credentials file yet, so no password anywhere on the page.
    assert "created when Label Studio starts" in page_text(app)


def test_page_without_projects_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("YOLODEX_STORAGE", str(tmp_path / "empty"))
    monkeypatch.setenv("YOLODEX_LS_PORT", str(free_port()))

    app = run_page()

    assert "No project yet" in page_text(app)
    assert not app.selectbox


def test_queue_least_confident_first_and_per_class_progress(storage: Path):
    settings = get_settings()
    linked = link_to_label_studio(settings)

    app = run_page()

    queue = table_with(app, "uncertainty")
    first, second, third = linked["unlabeled"]  # uncertainties None, 0.2, 0.9
    by_uncertainty = [third, second, first]
    assert list(queue["image_id"]) == by_uncertainty
    assert queue["uncertainty"].iloc[0] == pytest.approx(0.9)
    assert queue["uncertainty"].iloc[1] == pytest.approx(0.2)
    assert queue["uncertainty"].isna().iloc[2]
    assert all(f"/projects/{LS_PROJECT_ID}/data?task=" in url for url in queue["url"])
    assert [int(url.rsplit("=", 1)[1]) for url in queue["url"]] == [linked["tasks"][i] for i in by_uncertainty]

    # Per class: labeled images and boxes, counted here straight from the annotations.
    engine = init_db(settings.database_url)
    with session_scope(engine) as session:
        rows = session.execute(
            select(ProjectClass.name, func.count(func.distinct(Annotation.image_id)), func.count(Annotation.id))
            .join(Annotation, Annotation.class_id == ProjectClass.id)
            .group_by(ProjectClass.name)
        ).all()
    engine.dispose()
    expected = {name: (images, boxes) for name, images, boxes in rows}
    classes = table_with(app, "boxes")
    assert {row.name: (row.images, row.boxes) for row in classes.itertuples()} == expected
    assert "61 of 64 images labeled" in app.get("progress")[0].proto.text
    # The loop reads the labeled count of the last pull (5 tasks carry an annotation id).
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics["Labeled in Label Studio (last pull)"] == "5"
    # Label Studio is down: no iframe, and the new-tab link (disabled) still points at the project's view.
    assert not app.get("iframe")
    link = app.get("link_button")[0].proto
    assert link.url.endswith(f"/projects/{LS_PROJECT_ID}/data?tab=3") and link.disabled


def test_labeling_view_is_embedded_only_on_the_same_hostname(storage: Path, monkeypatch: pytest.MonkeyPatch):
    link_to_label_studio(get_settings())

    def running(settings: Settings, **_: object) -> server_module.ServerStatus:
        url = server_module.labelstudio_url(settings)
        return server_module.ServerStatus("running", url, 1, f"Label Studio is running at {url}.")

    monkeypatch.setattr(server_module, "status", running)  # the page imports it at each run
    port = get_settings().ls_port

    credentials = server_module.load_or_create_credentials(get_settings())

    same_host = run_page(url="http://127.0.0.1:8501/label")
    frames = same_host.get("iframe")
    assert [frame.proto.src for frame in frames] == [f"http://127.0.0.1:{port}/projects/{LS_PROJECT_ID}/data?tab=3"]
    assert not same_host.button(key="label_sync").disabled
    # The login: the email and the login link are shown, the password only once asked for.
    assert credentials.email in page_text(same_host)
    assert f"http://127.0.0.1:{port}/user/login/" in page_text(same_host)
    assert credentials.password not in page_text(same_host) and not same_host.code
    same_host.toggle(key="label_show_password").set_value(True).run()
    assert [block.value for block in same_host.code] == [credentials.password]

    other_site = run_page(url="http://localhost:8501/label")  # localhost and 127.0.0.1 are different sites
    assert not other_site.get("iframe")
    assert "opens in its own tab" in page_text(other_site)
    assert not other_site.get("link_button")[0].proto.disabled


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20"])
def test_password_is_never_shown_when_the_app_listens_beyond_loopback(
    storage: Path, monkeypatch: pytest.MonkeyPatch, host: str
):
    """Issue 19: other machines may reach the page, so it says where the password is instead of showing it."""
    monkeypatch.setenv("YOLODEX_HOST", host)

    def running(settings: Settings, **_: object) -> server_module.ServerStatus:
        url = server_module.labelstudio_url(settings)
        return server_module.ServerStatus("running", url, 1, f"Label Studio is running at {url}.")

    monkeypatch.setattr(server_module, "status", running)
    credentials = server_module.load_or_create_credentials(get_settings())
    path = server_module.credentials_path(get_settings())

    app = run_page(url="http://192.168.1.20:8501/label")
    everything = "\n".join(str(getattr(node, "proto", "")) for node in app._tree)  # every element, any type
    assert credentials.password not in everything
    assert not app.code and not [toggle for toggle in app.toggle if toggle.key == "label_show_password"]
    assert credentials.email in page_text(app)  # the login name and where the password is are still there
    [notice] = [element.value for element in app.info if "password is not shown" in element.value]
    assert str(path) in notice and "0600" in notice and f"YOLODEX_HOST={host}" in notice
    assert json.loads(path.read_text())["password"] == credentials.password  # the login itself is untouched


def finished_run(settings: Settings, name: str, best_map: float, size: str = "s", status: str = "succeeded") -> Path:
    """A run folder of the Starter project as a finished training leaves it (config.json, metrics.jsonl with its
    end, best.pt) and its Run row; the checkpoint's bytes are not read by the page."""
    folder = settings.runs_dir / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train": {"size": size, "imgsz": 320}, "class_names": []}))
    (folder / "metrics.jsonl").write_text(json.dumps({"event": "train_end", "best_map": best_map, "stopped": "time"}))
    (folder / "best.pt").write_bytes(b"")
    engine = init_db(settings.database_url)
    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == STARTER_NAME))
        session.add(Run(project_id=project.id, folder=f"runs/{name}", status=status))
    engine.dispose()
    return folder


def loop_plan(app: AppTest) -> str:
    [plan] = [element.value for element in [*app.caption, *app.info] if "new labels" in str(element.value)]
    return plan


def test_the_loop_is_off_until_turned_on_and_says_what_it_will_do(storage: Path):
    settings = get_settings()
    link_to_label_studio(settings)  # the row a sync creates, with its defaults
    app = run_page()

    # Off after a sync, and it says so, with what it would do once on: the real values, a start that exists.
    assert labeling_service.loop(STARTER_NAME)["retrain_every"] == 0
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics["Next retrain at"] == "off" and metrics["Loop state"] == "off"
    assert loop_plan(app) == (
        "The loop is off: nothing is trained until you turn it on. Once on, every N new labels: freeze a version, "
        "train YOLO-NAS S from random initialisation (the project has no finished run of this size yet) for at most "
        "15 minutes (10 epochs at most), then pre-label the unlabeled images."
    )
    # No COCO weights on this machine: not offered.
    starts = app.selectbox(key=f"label_start_{STARTER_NAME}")
    assert starts.options == [
        "the project's best finished run (random initialisation while there is none)",
        "random initialisation",
    ]

    # Turned on: the next retrain comes after 5 *new* labels (5 are labeled in Label Studio already).
    app.number_input(key=f"label_retrain_every_{STARTER_NAME}").set_value(5)
    app.number_input(key=f"label_epochs_{STARTER_NAME}").set_value(3)
    app.number_input(key=f"label_minutes_{STARTER_NAME}").set_value(20.0)
    app.button(key="label_loop_save").click().run()
    assert not app.exception, [exception.value for exception in app.exception]
    saved = labeling_service.loop(STARTER_NAME)
    assert saved["retrain_every"] == 5 and saved["settings"]["epochs"] == 3
    assert saved["settings"]["time_minutes"] == 20.0 and saved["settings"]["start_weights"] == "best"
    assert saved["settings"]["imgsz"] == 320  # untouched fields keep their values
    assert [element.value for element in app.success] == ["Saved: the loop is on."]
    metrics = {metric.label: metric.value for metric in app.metric}
    assert metrics["Next retrain at"] == "10 labeled" and metrics["Loop state"] == "idle"
    assert loop_plan(app).startswith("Every 5 new labels: freeze a version, train YOLO-NAS S from random")

    # A finished run of the project: the loop starts from the best one (a cancelled run and another size never).
    finished_run(settings, "first", 0.21)
    finished_run(settings, "better", 0.43)
    finished_run(settings, "cancelled", 0.9, status="cancelled")
    finished_run(settings, "medium", 0.8, size="m")
    app = run_page()
    assert loop_plan(app) == (
        "Every 5 new labels: freeze a version, train YOLO-NAS S from the project's best run better (best mAP50-95 "
        "0.430) for at most 20 minutes (3 epochs at most), then pre-label the unlabeled images."
    )

    app.number_input(key=f"label_retrain_every_{STARTER_NAME}").set_value(0)
    app.button(key="label_loop_save").click().run()
    assert labeling_service.loop(STARTER_NAME)["retrain_every"] == 0
    assert {metric.label: metric.value for metric in app.metric}["Next retrain at"] == "off"
    assert loop_plan(app).startswith("The loop is off")


def test_coco_is_a_start_only_when_its_weights_are_on_disk(storage: Path):
    settings = get_settings()
    link_to_label_studio(settings)
    labeling_service.loop(STARTER_NAME, start_weights="coco")  # set earlier (the CLI, or the old default)
    app = run_page()
    assert "train YOLO-NAS S from random initialisation" in loop_plan(app)
    assert "the COCO weights chosen are not on this machine" in loop_plan(app)

    weights = settings.weights_dir / "yolo_nas_s_coco.pth"
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"")  # downloaded earlier: the file is what counts
    app = run_page()
    assert "train YOLO-NAS S from the official COCO weights for at most" in loop_plan(app)
    assert (
        "the official COCO weights (non-commercial licence)" in app.selectbox(key=f"label_start_{STARTER_NAME}").options
    )


def trained_starter_run(folder: Path) -> Path:
    """A run of the starter's classes with trained (evaluated) weights, as the pre-label model list offers."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"class_names": ["circle", "square", "triangle"], "train": {}}))
    (folder / "best.pt").write_bytes(b"")
    return folder


def test_a_queued_pre_label_is_not_shown_as_a_success(storage: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(
        server_module,
        "status",
        lambda settings, **_: server_module.ServerStatus("running", server_module.labelstudio_url(settings), 1, "up"),
    )
    link_to_label_studio(get_settings())
    trained_starter_run(storage / "runs" / "shapes-run")
    monkeypatch.delenv("YOLODEX_QUEUE_IMMEDIATE", raising=False)
    monkeypatch.setattr(jobs_tasks.huey, "immediate", False)  # no worker: the job stays queued

    app = run_page()
    app.button(key="label_prelabel").click().run()
    assert not app.exception, [exception.value for exception in app.exception]
    [job] = jobs_api.list_jobs(get_settings(), kind="labeling_prelabel")
    assert job.state == "queued" and job.started_by == "you"
    assert not [element.value for element in app.success if "Pre-label" in element.value]
    assert [element.value for element in app.info if "Pre-label" in element.value] == [
        f"Pre-label: job {job.id} is queued: follow it on the [Jobs](/jobs?job={job.id}) page"
    ]
    # The banner follows the job: cancelled (here from the Jobs page's API), the next rerun says so.
    jobs_api.cancel(job.id, get_settings())
    app.run()
    assert not [element.value for element in app.info if "Pre-label" in element.value]
    assert [element.value for element in app.warning if "Pre-label" in element.value] == [
        f"Pre-label: job {job.id} is cancelled: see the [Jobs](/jobs?job={job.id}) page"
    ]


def test_buttons_run_the_step_and_show_its_summary_or_its_error(storage: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(
        server_module,
        "status",
        lambda settings, **_: server_module.ServerStatus("running", server_module.labelstudio_url(settings), 1, "up"),
    )
    run_folder = trained_starter_run(storage / "runs" / "shapes-run")
    calls: list[tuple[str, object]] = []

    def fake_sync(project: str, settings: Settings | None = None) -> dict[str, object]:
        calls.append(("sync", project))
        link_to_label_studio(get_settings())  # what a real sync leaves behind: the project is now linked
        return {"summary": "64 images, 64 new tasks"}

    def fake_prelabel(model: Path, project: str, *, settings: Settings | None = None, on_progress=None, **_) -> dict:
        calls.append(("prelabel", Path(model)))
        on_progress(8, 61)
        raise ValueError("the model shares no class with the project")

    # Pre-labeling is a job; the queue runs it inline here, so its failure is known when the page reruns.
    monkeypatch.setenv("YOLODEX_QUEUE_IMMEDIATE", "1")
    monkeypatch.setattr(jobs_tasks.huey, "immediate", True)

    monkeypatch.setattr(labeling_service, "sync", fake_sync)
    monkeypatch.setattr(labeling_service, "prelabel", fake_prelabel)
    app = run_page()
    assert app.button(key="label_pull").disabled  # not synced yet

    app.button(key="label_sync").click().run()
    assert not app.exception, [exception.value for exception in app.exception]
    assert [element.value for element in app.success][-1] == "Sync: 64 images, 64 new tasks"
    assert not app.button(key="label_pull").disabled
    assert table_with(app, "uncertainty")["uncertainty"].iloc[0] == pytest.approx(0.9)  # the rerun shows the queue

    app.button(key="label_prelabel").click().run()
    assert not app.exception, [exception.value for exception in app.exception]
    assert calls == [("sync", STARTER_NAME), ("prelabel", run_folder / "best.pt")]
    assert [element.value for element in app.error] == [
        "Pre-label failed: ValueError: the model shares no class with the project"
    ]
    [job] = jobs_api.list_jobs(get_settings(), kind="labeling_prelabel")
    assert job.state == "failed" and job.params["model"] == str(run_folder / "best.pt")


def test_the_page_never_imports_the_label_studio_sdk(storage: Path):
    """The SDK costs seconds and ~100 MB to import (docs/label_studio.md): the page's reruns read only our database,
    so a fresh process that runs the page, linked project and queue included, twice has still not imported it."""
    link_to_label_studio(get_settings())
    script = (
        "import sys\n"
        "from streamlit.testing.v1 import AppTest\n"
        f"app = AppTest.from_file({str(PAGE)!r}, default_timeout=60)\n"
        "app.run(); app.run()\n"
        "assert not app.exception, [e.value for e in app.exception]\n"
        "assert app.dataframe, 'the queue table is missing'\n"
        "print('SDK imported' if 'label_studio_sdk' in sys.modules else 'SDK not imported')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=PAGE.parents[1], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "SDK not imported"
