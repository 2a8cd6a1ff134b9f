"""Sync, pull, pre-label, the least-confident order and the retrain loop against a real Label Studio server.

One server for the whole session (`labelstudio` fixture); each test works in its own yolodex project, so its own
Label Studio project. Annotations are made through the API the way the labeling view saves them (percent boxes
with the original size), never by writing to our store.
"""

from __future__ import annotations

import io
import json
import sqlite3
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from sqlalchemy import select

from backend.ingest.service import open_store
from backend.labeling import loop, service, sync
from backend.labeling.client import (
    LabelStudioAuthError,
    LabelStudioClient,
    LabelStudioNotFound,
    LabelStudioUnavailable,
    LabelStudioValidationError,
    connect,
)
from backend.labeling.convert import IMAGE_ID_KEY
from backend.labeling.server import start, stop
from backend.models import build_model
from backend.models.checkpoints import save_checkpoint
from backend.store.db import session_scope
from backend.store.images import add_image_bytes
from backend.store.models import Annotation, Image, LabelingProject, Project, ensure_class, get_or_create_project
from tests.conftest import encode_image, textured_image
from tests.labelstudio_fixture import free_port

pytestmark = pytest.mark.slow

CLASSES = ("Bulbasaur", "Charmander", "Squirtle")
# Unicode, spaces and a quote: Label Studio URL-encodes them in the task's image URL.
NAMES = ("bulbasaur 0.png", "ゼニガメ squirtle é.png", "char'mander.png", "plain.png", "square.png", "six.png")


def make_project(labelstudio, name: str, count: int = len(NAMES), square_last: bool = True) -> None:
    """A project with CLASSES and `count` distinct images (96x64, the one named square.png 80x80)."""
    engine, storage = open_store(labelstudio.settings)
    with session_scope(engine) as session:
        project = get_or_create_project(session, name)
        for class_name in CLASSES:
            ensure_class(session, project, class_name)
        for index, original in enumerate(NAMES[:count]):
            size = (80, 80) if original == "square.png" and square_last else (96, 64)
            data = encode_image(textured_image(1000 * len(name) + index, size))
            added = add_image_bytes(session, storage, project, data, source="upload", original_name=original)
            assert added.status == "accepted", added.reason


def images_of(labelstudio, name: str) -> dict[str, Image]:
    engine, _ = open_store(labelstudio.settings)
    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == name))
        return {
            image.original_name: image for image in session.scalars(select(Image).where(Image.project_id == project.id))
        }


def rect(label: str, x: float, y: float, w: float, h: float, width: int, height: int, rotation: float = 0.0) -> dict:
    """A result as the labeling view saves it: pixels given here, percent of the original image sent."""
    return {
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "x": 100 * x / width,
            "y": 100 * y / height,
            "width": 100 * w / width,
            "height": 100 * h / height,
            "rotation": rotation,
            "rectanglelabels": [label],
        },
    }


def task_of(client: LabelStudioClient, ls_project_id: int) -> dict[int, dict]:
    """{our image id: task} of a Label Studio project."""
    return {task["data"][IMAGE_ID_KEY]: task for task in client.iter_tasks(ls_project_id)}


def test_sync_twice_creates_no_duplicates_and_serves_unicode_files(labelstudio):
    make_project(labelstudio, "sync-twice", count=4)
    first = service.sync("sync-twice", labelstudio.settings)
    assert first["created_project"] and first["new_tasks"] == 4 and first["tasks"] == 4
    again = service.sync("sync-twice", labelstudio.settings)
    assert again["ls_project_id"] == first["ls_project_id"]
    assert again["new_tasks"] == 0 and again["tasks"] == 4 and again["config"] == "unchanged"

    client = connect(labelstudio.settings)
    tasks = task_of(client, first["ls_project_id"])
    images = images_of(labelstudio, "sync-twice")
    assert sorted(tasks) == sorted(image.id for image in images.values())  # one task per image, our id in each
    for image in images.values():
        url = tasks[image.id]["data"]["image"]
        assert url.startswith("/data/local-files/?d=labelstudio/")
        served = client.fetch(url)
        assert served == (labelstudio.settings.storage / image.path).read_bytes()  # a link, not a copy
        linked = labelstudio.settings.images_dir / "labelstudio" / str(image.project_id) / sync.link_name(image)
        assert linked.stat().st_ino == (labelstudio.settings.storage / image.path).stat().st_ino

    # A new image and a new class: one new task, the config gains the label.
    engine, storage = open_store(labelstudio.settings)
    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == "sync-twice"))
        ensure_class(session, project, "Pikachu")
        add_image_bytes(session, storage, project, encode_image(textured_image(4242)), source="upload")
    third = service.sync("sync-twice", labelstudio.settings)
    assert third["new_tasks"] == 1 and third["tasks"] == 5
    assert third["config"] == "updated" and third["added"] == ["Pikachu"]
    assert "Pikachu" in client.get_project(first["ls_project_id"])["label_config"]


def test_a_two_character_project_with_emoji_names_syncs_and_refusals_are_in_words(labelstudio):
    """Issue 19: an emoji name of 80 characters is 320 bytes (every sync failed with Errno 36), and Label Studio
    refuses a title under 3 characters with a raw 400."""
    long_emoji, not_utf8 = "🐍" * 90 + ".png", "photos/caf\\xe9.png"  # the importer's name for latin-1 bytes
    engine, storage = open_store(labelstudio.settings)
    with session_scope(engine) as session:
        project = get_or_create_project(session, "ab")
        ensure_class(session, project, "Pikachu")
        for index, original in enumerate((long_emoji, not_utf8, "plain.png")):
            data = encode_image(textured_image(7700 + index))
            assert add_image_bytes(session, storage, project, data, source="upload", original_name=original).image_id
    report = service.sync("ab", labelstudio.settings)
    assert report["created_project"] and report["new_tasks"] == 3 and report["tasks"] == 3

    client = connect(labelstudio.settings)
    assert client.get_project(report["ls_project_id"])["title"] == "ab · yolodex"
    tasks = task_of(client, report["ls_project_id"])
    for image in images_of(labelstudio, "ab").values():
        assert len(sync.link_name(image).encode()) <= 255
        assert client.fetch(tasks[image.id]["data"]["image"]) == (storage / image.path).read_bytes()
    assert service.sync("ab", labelstudio.settings)["new_tasks"] == 0  # a second sync finds the same links

    config = client.get_project(report["ls_project_id"])["label_config"]
    with pytest.raises(LabelStudioValidationError) as refused:
        client.create_project("ab", config)
    assert str(refused.value) == "Label Studio needs a project title of at least 3 characters ('ab' has 2)"
    with pytest.raises(LabelStudioValidationError, match=r"^Label Studio refused the labeling configuration: "):
        client.create_project("broken config", "<View><bad")
    assert [p["id"] for p in client.list_projects() if p["title"] in ("ab", "broken config")] == []


def test_pull_matches_label_studios_coco_export_box_for_box(labelstudio):
    make_project(labelstudio, "pull-coco")
    service.sync("pull-coco", labelstudio.settings)
    images = images_of(labelstudio, "pull-coco")
    client = connect(labelstudio.settings)
    engine, _ = open_store(labelstudio.settings)
    with session_scope(engine) as session:
        ls_project_id = session.get(LabelingProject, images[NAMES[0]].project_id).ls_project_id
    tasks = task_of(client, ls_project_id)

    def task_id(name: str) -> int:
        return tasks[images[name].id]["id"]

    W, H = 96, 64
    # Two boxes; then a second, later annotation on the same task with one box: the latest wins.
    client.create_annotation(
        task_id(NAMES[0]), [rect("Bulbasaur", 10, 5, 30, 20, W, H), rect("Squirtle", 50, 30, 40, 30, W, H)]
    )
    client.create_annotation(task_id(NAMES[0]), [rect("Charmander", 12.5, 6.25, 20.5, 10.75, W, H)])
    client.create_annotation(
        task_id(NAMES[1]), [rect("Squirtle", 1, 2, 3, 4, W, H), rect("Bulbasaur", 60, 10, 20, 40, W, H)]
    )
    # A cancelled (skipped) annotation does not label the task.
    client.create_annotation(task_id(NAMES[2]), [rect("Bulbasaur", 5, 5, 10, 10, W, H)], was_cancelled=True)
    # An unknown label next to a good box: the good box is kept, the other reported.
    client.create_annotation(
        task_id(NAMES[3]), [rect("Pikachu", 5, 5, 10, 10, W, H), rect("Charmander", 20, 20, 30, 30, W, H)]
    )
    # A rotated box on the square image: its axis-aligned hull.
    client.create_annotation(task_id("square.png"), [rect("Bulbasaur", 20, 20, 20, 10, 80, 80, rotation=30.0)])
    # A box reaching outside the image: clipped and reported.
    client.create_annotation(task_id("six.png"), [rect("Squirtle", 80, 50, 30, 30, W, H)])

    report = service.pull("pull-coco", labelstudio.settings)
    assert report["labeled"] == 5 and report["tasks"] == 6
    assert report["problems"] == {"unknown label": 1, "clipped": 1}
    assert any("Pikachu" in line for line in report["details"])

    with session_scope(engine) as session:
        ours = {}
        for image in images.values():
            stored = session.get(Image, image.id)
            boxes = session.scalars(select(Annotation).where(Annotation.image_id == image.id)).all()
            ours[image.original_name] = (
                stored.labeled,
                sorted(
                    (CLASSES[box.project_class.index], [box.x1, box.y1, box.x2 - box.x1, box.y2 - box.y1])
                    for box in boxes
                ),
            )
    assert ours[NAMES[2]] == (False, [])
    assert ours[NAMES[0]] == (True, [("Charmander", pytest.approx([12.5, 6.25, 20.5, 10.75]))])
    assert ours["six.png"] == (True, [("Squirtle", pytest.approx([80, 50, 16, 14]))])
    hull = ours["square.png"][1][0][1]
    assert hull[0] == pytest.approx(20 - 10 * np.sin(np.radians(30))) and hull[2] > 20 and hull[3] > 10

    # Label Studio's own COCO export of the same project.
    archive = zipfile.ZipFile(io.BytesIO(client.export_raw(ls_project_id, "COCO")))
    coco = json.loads(archive.read("result.json"))
    categories = {category["id"]: category["name"] for category in coco["categories"]}
    theirs: dict[str, list] = {}
    for coco_image in coco["images"]:
        name = next(
            image.original_name for image in images.values() if sync.link_name(image) in coco_image["file_name"]
        )
        boxes = [
            (categories[a["category_id"]], a["bbox"]) for a in coco["annotations"] if a["image_id"] == coco_image["id"]
        ]
        theirs.setdefault(name, sorted(boxes))  # the newest annotation of a task comes first in the export
    # Where both conventions agree (no clipping, no unknown label), every box is the same to 1e-4 px.
    for name in (NAMES[0], NAMES[1], "square.png"):
        assert [label for label, _ in theirs[name]] == [label for label, _ in ours[name][1]], name
        for (_, mine), (_, lss) in zip(ours[name][1], theirs[name]):
            assert mine == pytest.approx(lss, abs=1e-4), name  # ours pass through float32
    assert ("Pikachu" in {label for label, _ in theirs[NAMES[3]]}) and ours[NAMES[3]][1] == [
        ("Charmander", pytest.approx([20, 20, 30, 30]))
    ]
    assert theirs["six.png"][0][1][2] == pytest.approx(30)  # Label Studio keeps the box outside the image
    assert NAMES[2] not in theirs  # the cancelled annotation is not exported either

    # Deleting the annotation in Label Studio unlabels the image at the next pull.
    for annotation in client.request("GET", f"/api/tasks/{task_id(NAMES[1])}/annotations"):
        client.request("DELETE", f"/api/annotations/{annotation['id']}")
    again = service.pull("pull-coco", labelstudio.settings)
    assert again["unlabeled_again"] == 1 and again["labeled"] == 4
    with session_scope(engine) as session:
        assert not session.get(Image, images[NAMES[1]].id).labeled


def varied_model(path: Path, class_names: tuple[str, ...]) -> Path:
    """A random S checkpoint whose class scores vary from image to image (untrained heads score ~0.01 everywhere)."""
    torch.manual_seed(0)
    model = build_model("s", len(class_names))
    for module in model.modules():
        if hasattr(module, "cls_pred"):
            torch.nn.init.constant_(module.cls_pred.bias, -2.0)
            module.cls_pred.weight.data *= 300
    return save_checkpoint(path, model, class_names=list(class_names), imgsz=64)


def test_prelabel_sends_scored_predictions_and_both_orders_agree(labelstudio, tmp_path):
    make_project(labelstudio, "prelabel")
    service.sync("prelabel", labelstudio.settings)
    images = images_of(labelstudio, "prelabel")
    client = connect(labelstudio.settings)
    engine, _ = open_store(labelstudio.settings)
    with session_scope(engine) as session:
        row = session.get(LabelingProject, images[NAMES[0]].project_id)
        ls_project_id, view_id = row.ls_project_id, row.ls_view_id
    tasks = task_of(client, ls_project_id)
    client.create_annotation(tasks[images[NAMES[0]].id]["id"], [rect("Bulbasaur", 10, 5, 30, 20, 96, 64)])
    service.pull("prelabel", labelstudio.settings)
    # The model knows one class the project lacks: its detections are not sent.
    model = varied_model(tmp_path / "varied.pt", ("Bulbasaur", "Charmander", "Mew"))

    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == "prelabel"))
        report = sync.prelabel(session, labelstudio.settings, project, client, model, box_threshold=0.9)
    assert report.tasks == 5 and report.boxes > 0  # the labeled task is skipped
    assert report.model_version == "yolodex:" + tmp_path.name + "/varied.pt"
    again = service.prelabel(model, "prelabel", settings=labelstudio.settings)
    assert again["replaced"] == 5  # one yolodex prediction per task, never a pile

    tasks = task_of(client, ls_project_id)
    for image_id, task in tasks.items():
        predictions = client.list_predictions(task["id"])
        if image_id == images[NAMES[0]].id:
            assert predictions == []
            continue
        assert len(predictions) == 1 and predictions[0]["model_version"] == again["model_version"]
        for result in predictions[0]["result"]:
            value = result["value"]
            assert result["rectanglelabels" if False else "type"] == "rectanglelabels"
            assert value["rectanglelabels"][0] in ("Bulbasaur", "Charmander")
            assert value["x"] >= 0 and value["x"] + value["width"] <= 100 + 1e-9
            assert value["y"] >= 0 and value["y"] + value["height"] <= 100 + 1e-9
            assert result["original_width"] == 96 or result["original_width"] == 80
    assert client.get_project(ls_project_id)["model_version"] == again["model_version"]

    queue = service.queue("prelabel", limit=10, settings=labelstudio.settings)["items"]
    uncertainties = [item["uncertainty"] for item in queue]
    assert len(queue) == 5 and uncertainties == sorted(uncertainties, reverse=True)
    assert len(set(uncertainties)) == 5  # distinct, so the order below is not a tie-break accident
    # Label Studio's "Least confident first" tab lists the same unlabeled tasks in the same order.
    body = client.request("GET", "/api/tasks", params={"project": ls_project_id, "view": view_id, "fields": "all"})
    assert [task["id"] for task in body["tasks"]] == [item["task_id"] for item in queue]
    assert all(f"/projects/{ls_project_id}/data?task=" in item["url"] for item in queue)
    first = queue[0]
    assert service.task_link(first["image_id"], labelstudio.settings) == first["url"]  # evaluation → fix it here


def test_loop_retrains_once_after_n_annotations_and_survives_a_restart(labelstudio, monkeypatch):
    from backend.jobs import tasks as jobs

    for key, value in (
        ("YOLODEX_STORAGE", str(labelstudio.settings.storage)),
        ("YOLODEX_HOST", "127.0.0.1"),
        ("YOLODEX_LS_PORT", str(labelstudio.settings.ls_port)),
    ):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(jobs.huey, "immediate", True)
    make_project(labelstudio, "loop")
    service.sync("loop", labelstudio.settings)
    service.loop(
        "loop",
        retrain_every=2,
        settings=labelstudio.settings,
        epochs=1,
        imgsz=64,
        batch_size=2,
        min_samples=4,
        start_weights=None,
        time_minutes=None,
    )
    images = images_of(labelstudio, "loop")
    client = connect(labelstudio.settings)
    status = service.loop("loop", settings=labelstudio.settings)
    tasks = task_of(client, status["ls_project_id"])

    def annotate(name: str) -> None:
        client.create_annotation(tasks[images[name].id]["id"], [rect("Squirtle", 20, 10, 40, 30, 96, 64)])

    annotate(NAMES[0])
    [check] = [item for item in jobs.poll_labeling() if item["project"] == "loop"]
    assert not check["started"] and check["labeled"] == 1 and check["due_at"] == 2

    annotate(NAMES[1])
    [check] = [item for item in jobs.poll_labeling() if item["project"] == "loop"]
    assert check["started"] and check["labeled"] == 2  # and, in immediate mode, the retrain already ran
    status = service.loop("loop", settings=labelstudio.settings)
    assert status["state"] == "idle" and "retrained on loop-" in status["last_event"], status["last_event"]
    run_model = Path(status["last_model"])
    assert run_model.is_file() and run_model.parent.parent == labelstudio.settings.runs_dir
    # The new model pre-labeled the four unlabeled tasks.
    version = client.get_project(status["ls_project_id"])["model_version"]
    assert version == sync.model_version_of(run_model)
    predicted = [task for task in client.iter_tasks(status["ls_project_id"]) if task["total_predictions"]]
    assert len(predicted) == 4

    # Nothing new: no second retrain. A retrain already running: none started beside it.
    [check] = [item for item in jobs.poll_labeling() if item["project"] == "loop"]
    assert not check["started"]
    engine, _ = open_store(labelstudio.settings)
    with session_scope(engine) as session:
        session.get(LabelingProject, images[NAMES[0]].project_id).loop_state = "running"
    annotate(NAMES[2])
    annotate(NAMES[3])
    [check] = [item for item in jobs.poll_labeling() if item["project"] == "loop"]
    assert not check["started"] and check["state"] == "running"
    with session_scope(engine) as session:
        assert loop.recover_interrupted(session) >= 1  # what a restarted worker does

    # Label Studio restarts: a poll meanwhile says so and changes nothing; afterwards the loop goes on.
    stop(labelstudio.settings)
    try:
        [check] = [item for item in jobs.poll_labeling() if item["project"] == "loop"]
        assert "not answering" in check["error"] and "yolodex labelstudio start" in check["error"]
    finally:
        start(labelstudio.settings, wait=True)
    [check] = [item for item in jobs.poll_labeling() if item["project"] == "loop"]
    assert check["started"] and check["labeled"] == 4


def loop_env(labelstudio, monkeypatch) -> None:
    """The poll opens the store and Label Studio from the environment, as the worker does; the queue runs inline."""
    from backend.jobs import tasks as jobs

    for key, value in (
        ("YOLODEX_STORAGE", str(labelstudio.settings.storage)),
        ("YOLODEX_HOST", "127.0.0.1"),
        ("YOLODEX_LS_PORT", str(labelstudio.settings.ls_port)),
    ):
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(jobs.huey, "immediate", True)


def test_a_synced_project_has_its_loop_off_and_a_poll_queues_nothing(labelstudio, monkeypatch):
    from backend.jobs import api as jobs_api
    from backend.jobs import tasks as jobs

    loop_env(labelstudio, monkeypatch)
    make_project(labelstudio, "loop-off", count=3)
    service.sync("loop-off", labelstudio.settings)
    status = service.loop("loop-off", settings=labelstudio.settings)
    assert status["retrain_every"] == 0 and status["plan"].startswith("The loop is off")
    tasks = task_of(connect(labelstudio.settings), status["ls_project_id"])
    for task in tasks.values():  # every image labeled in Label Studio: still nothing runs
        connect(labelstudio.settings).create_annotation(task["id"], [rect("Squirtle", 20, 10, 40, 30, 96, 64)])
    assert not [item for item in jobs.poll_labeling() if item["project"] == "loop-off"]
    assert jobs_api.count_jobs(labelstudio.settings, project="loop-off") == 0
    assert service.loop("loop-off", settings=labelstudio.settings)["labeled"] == 0  # not even pulled


def test_a_failed_loop_retrain_leaves_no_run_behind(labelstudio, monkeypatch):
    from backend.jobs import api as jobs_api
    from backend.jobs import tasks as jobs
    from backend.store.models import Run

    loop_env(labelstudio, monkeypatch)
    make_project(labelstudio, "loop-fails", count=3)
    service.sync("loop-fails", labelstudio.settings)
    # The project's only finished run: its best.pt is damaged, so the retrain that starts from it fails at once.
    broken = labelstudio.settings.runs_dir / "loop-fails-broken"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text(json.dumps({"train": {"size": "s"}, "class_names": list(CLASSES)}))
    (broken / "best.pt").write_bytes(b"not a checkpoint")
    engine, _ = open_store(labelstudio.settings)
    with session_scope(engine) as session:
        project_id = session.scalar(select(Project.id).where(Project.name == "loop-fails"))
        session.add(Run(project_id=project_id, folder="runs/loop-fails-broken", status="succeeded"))
    status = service.loop(
        "loop-fails", retrain_every=2, settings=labelstudio.settings, epochs=1, imgsz=64, batch_size=2, min_samples=4
    )
    assert "from the project's best run loop-fails-broken" in status["plan"]
    client = connect(labelstudio.settings)
    for task in list(task_of(client, status["ls_project_id"]).values())[:2]:
        client.create_annotation(task["id"], [rect("Squirtle", 20, 10, 40, 30, 96, 64)])

    [check] = [item for item in jobs.poll_labeling() if item["project"] == "loop-fails"]
    assert check["started"]  # the retrain job ran inline, and failed
    [job] = jobs_api.list_jobs(labelstudio.settings, project="loop-fails", kind="labeling_retrain")
    assert job.state == "failed" and job.started_by == "retrain loop", (job.state, job.error)
    assert "loop-fails-broken" in job.error, job.error  # it failed where meant: loading the start weights
    assert sorted(path.name for path in labelstudio.settings.runs_dir.glob("loop-fails*")) == ["loop-fails-broken"]
    with session_scope(engine) as session:
        folders = list(session.scalars(select(Run.folder).where(Run.project_id == project_id)))
    assert folders == ["runs/loop-fails-broken"]  # the failed retrain's Run row went with its folder
    status = service.loop("loop-fails", settings=labelstudio.settings)
    assert status["state"] == "idle" and status["last_event"].startswith("the retrain failed"), status["last_event"]


def test_down_server_and_wrong_token_say_what_to_do(labelstudio):
    down = LabelStudioClient(f"http://127.0.0.1:{free_port()}", labelstudio.credentials.token)
    with pytest.raises(LabelStudioUnavailable, match="yolodex labelstudio start"):
        down.whoami()
    wrong = LabelStudioClient(labelstudio.url, "0" * 40)
    with pytest.raises(LabelStudioAuthError, match="refused yolodex's token"):
        wrong.list_projects()
    make_project(labelstudio, "unsynced", count=1)
    with pytest.raises(ValueError, match="sync it first"):
        service.pull("unsynced", labelstudio.settings)


def test_boxes_an_image_already_has_become_its_first_annotation(labelstudio):
    make_project(labelstudio, "existing-boxes", count=2)
    images = images_of(labelstudio, "existing-boxes")
    engine, _ = open_store(labelstudio.settings)
    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == "existing-boxes"))
        squirtle = next(item for item in project.classes if item.name == "Squirtle")
        labeled = session.get(Image, images[NAMES[0]].id)
        labeled.labeled = True
        session.add(Annotation(image_id=labeled.id, class_id=squirtle.id, x1=10, y1=5, x2=40, y2=25, source="import"))
    report = service.sync("existing-boxes", labelstudio.settings)
    assert report["labels_sent"] == 1

    tasks = task_of(connect(labelstudio.settings), report["ls_project_id"])
    [annotation] = tasks[images[NAMES[0]].id]["annotations"]
    [result] = annotation["result"]
    assert result["value"]["rectanglelabels"] == ["Squirtle"]
    assert [result["value"][key] for key in ("x", "y", "width", "height")] == pytest.approx(
        [100 * 10 / 96, 100 * 5 / 64, 100 * 30 / 96, 100 * 20 / 64]
    )
    assert tasks[images[NAMES[1]].id]["annotations"] == []  # unlabeled, no boxes: nothing sent
    pulled = service.pull("existing-boxes", labelstudio.settings)
    assert pulled["labeled"] == 1 and pulled["boxes"] == 1  # pulling it back changes nothing


class _CheckedClient:
    """Wraps the real client: at each Label Studio request (and each page of an iterating one) records whether
    `session` had a transaction open and whether another connection could take the SQLite write lock at once."""

    def __init__(self, client: LabelStudioClient, session, database: str):
        self._client, self._session, self._database = client, session, database
        self.calls: list[str] = []
        self.held: list[str] = []

    def _check(self, name: str) -> None:
        self.calls.append(name)
        if self._session.in_transaction():
            self.held.append(f"{name}: transaction open")
        other = sqlite3.connect(self._database, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
        except sqlite3.OperationalError as error:
            self.held.append(f"{name}: {error}")
        finally:
            other.close()

    def _pages(self, name: str, pages):
        while True:
            self._check(name)
            try:
                yield next(pages)
            except StopIteration:
                return

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        if not callable(attribute) or name.startswith("_"):
            return attribute

        def call(*args, **kwargs):
            self._check(name)
            result = attribute(*args, **kwargs)
            return self._pages(name, result) if isinstance(result, Iterator) else result

        return call


def test_no_transaction_stays_open_across_label_studio_requests(labelstudio, tmp_path):
    make_project(labelstudio, "short-transactions", count=3)
    images = images_of(labelstudio, "short-transactions")
    engine, _ = open_store(labelstudio.settings)
    with session_scope(engine) as session:  # one image with a box: the first sync sends it as an annotation
        project = session.scalar(select(Project).where(Project.name == "short-transactions"))
        squirtle = next(item for item in project.classes if item.name == "Squirtle")
        session.get(Image, images[NAMES[0]].id).labeled = True
        session.add(
            Annotation(image_id=images[NAMES[0]].id, class_id=squirtle.id, x1=10, y1=5, x2=40, y2=25, source="import")
        )
    model = varied_model(tmp_path / "varied.pt", CLASSES)

    with connect(labelstudio.settings) as client, session_scope(engine) as session:
        checked = _CheckedClient(client, session, engine.url.database)
        project = session.scalar(select(Project).where(Project.name == "short-transactions"))
        synced = sync.sync_project(session, labelstudio.settings, project, checked)
        pulled = sync.pull_annotations(session, project, checked)
        prelabeled = sync.prelabel(session, labelstudio.settings, project, checked, model)

    assert {"create_project", "create_local_storage", "create_annotation", "export_tasks", "create_prediction"} <= set(
        checked.calls
    )
    assert checked.held == []  # before: the first sync held the write lock from its first flush to its end
    assert (synced.new_tasks, synced.labels_sent, pulled.labeled, prelabeled.tasks) == (3, 1, 1, 2)
    with session_scope(engine) as session:  # what the steps wrote between the requests was committed
        row = session.get(LabelingProject, images[NAMES[0]].project_id)
        assert row.ls_storage_id is not None and row.ls_view_id is not None
        assert session.get(Image, images[NAMES[0]].id).labeled


class _LossyTransport(httpx.BaseTransport):
    """The real transport to the server, except for the POSTs to /api/predictions named in `plan`, in order:
    "lose" sends the post (Label Studio stores it) and then raises as if the connection broke before the answer;
    "refuse" raises a connection error without sending anything. `posts` records the task of every post sent."""

    def __init__(self, plan: list[str]):
        self._inner = httpx.HTTPTransport()
        self._plan = list(plan)
        self.posts: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST" or request.url.path.rstrip("/") != "/api/predictions":
            return self._inner.handle_request(request)
        action = self._plan.pop(0) if self._plan else "send"
        if action == "refuse":
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        self.posts.append(json.loads(request.content)["task"])
        response = self._inner.handle_request(request)
        if action == "lose":
            response.read()
            response.close()
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return response

    def close(self) -> None:
        self._inner.close()


def test_a_prediction_whose_answer_was_lost_is_stored_once(labelstudio, tmp_path):
    """A pre-label whose first post's answer is lost after Label Studio stored it, and whose second post never
    reaches the server: each task still holds exactly one prediction. The SDK's own retry stores the first twice."""
    from label_studio_sdk import LabelStudio

    make_project(labelstudio, "lost-answers", count=3)
    service.sync("lost-answers", labelstudio.settings)
    model = varied_model(tmp_path / "varied.pt", CLASSES)
    engine, _ = open_store(labelstudio.settings)
    lossy = _LossyTransport(["lose", "refuse"])
    token = labelstudio.credentials.token
    client = LabelStudioClient(labelstudio.url, token, httpx_client=httpx.Client(transport=lossy))
    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == "lost-answers"))
        report = sync.prelabel(session, labelstudio.settings, project, client, model)
    assert report.tasks == 3 and lossy._plan == []  # both failures happened
    # One post reached the server per task: the lost one was found and not sent again, the refused one was resent.
    assert len(lossy.posts) == 3 and len(set(lossy.posts)) == 3, lossy.posts
    first = lossy.posts[0]
    client = connect(labelstudio.settings)
    for task in task_of(client, report_ls_project(labelstudio, "lost-answers")).values():
        predictions = client.list_predictions(task["id"])
        assert [p["model_version"] for p in predictions] == [report.model_version], predictions

    # The same lost answer under the SDK's default retries: the task gets a second, identical prediction.
    naive = LabelStudio(
        base_url=labelstudio.url, api_key=token, httpx_client=httpx.Client(transport=_LossyTransport(["lose"]))
    )
    naive.predictions.create(task=first, result=[], score=0.5, model_version="sdk-default-retries")
    stored = [p for p in client.list_predictions(first) if p["model_version"] == "sdk-default-retries"]
    assert len(stored) == 2


def report_ls_project(labelstudio, name: str) -> int:
    engine, _ = open_store(labelstudio.settings)
    with session_scope(engine) as session:
        project_id = session.scalar(select(Project.id).where(Project.name == name))
        return session.get(LabelingProject, project_id).ls_project_id


def test_a_project_deleted_in_label_studio_is_not_found_and_the_next_sync_makes_it_again(labelstudio):
    make_project(labelstudio, "deleted-there", count=2)
    first = service.sync("deleted-there", labelstudio.settings)
    client = connect(labelstudio.settings)
    client.sdk.projects.delete(first["ls_project_id"])  # as a person would in Label Studio
    with pytest.raises(LabelStudioNotFound, match=rf"^Label Studio has no /api/projects/{first['ls_project_id']} "):
        client.get_project(first["ls_project_id"])
    again = service.sync("deleted-there", labelstudio.settings)
    assert again["created_project"] and again["ls_project_id"] != first["ls_project_id"]
    assert again["new_tasks"] == 2 and again["tasks"] == 2
