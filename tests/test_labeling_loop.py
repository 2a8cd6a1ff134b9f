"""The retrain loop without a Label Studio server: off until turned on (a poll then visits nothing and queues
nothing), and where a retrain starts (the project's best finished run, else random; COCO only when its file is on
disk). The loop's retrain itself, against a real server, is in tests/test_labelstudio_sync.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from backend.ingest.service import open_store
from backend.jobs import api as jobs
from backend.jobs import tasks
from backend.labeling import loop, service
from backend.settings import Settings
from backend.store.db import session_scope
from backend.store.images import add_image_bytes
from backend.store.models import LabelingProject, LabelingTask, Project, Run, get_or_create_project
from tests.conftest import encode_image, textured_image
from tests.labelstudio_fixture import free_port


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Storage in a temp folder; Label Studio on a port nothing listens on (a visit to it fails, and says so)."""
    storage = tmp_path / "storage"
    port = str(free_port())
    monkeypatch.setenv("YOLODEX_STORAGE", str(storage))
    monkeypatch.setenv("YOLODEX_LS_PORT", port)
    monkeypatch.delenv("YOLODEX_DATABASE_URL", raising=False)
    monkeypatch.setattr(tasks.huey, "immediate", False)
    return Settings.from_env({"YOLODEX_STORAGE": str(storage), "YOLODEX_LS_PORT": port})


def synced_project(settings: Settings, name: str = "Raccoons") -> None:
    """A project with the row a sync creates for it (`sync._ensure_ls_project`: only the two ids are given)."""
    engine, _ = open_store(settings)
    with session_scope(engine) as session:
        project = get_or_create_project(session, name)
        session.add(LabelingProject(project_id=project.id, ls_project_id=1))


def finished_run(
    settings: Settings,
    name: str,
    best_map: float | None,
    *,
    size: str = "s",
    status: str = "succeeded",
    best: bool = True,
    project: str = "Raccoons",
) -> Path:
    """A run folder as a training leaves it (config.json, metrics.jsonl, best.pt when an epoch was evaluated) and
    its Run row."""
    folder = settings.runs_dir / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train": {"size": size}, "class_names": ["raccoon"]}))
    end = {"event": "train_end", "best_map": best_map, "stopped": "time"}
    (folder / "metrics.jsonl").write_text(json.dumps(end) + "\n")
    if best:
        (folder / "best.pt").write_bytes(b"")
    (folder / "last.pt").write_bytes(b"")
    engine, _ = open_store(settings)
    with session_scope(engine) as session:
        owner = get_or_create_project(session, project)
        session.add(Run(project_id=owner.id, folder=f"runs/{name}", status=status))
    return folder


def start_of(settings: Settings, **options: object) -> loop.StartWeights:
    engine, _ = open_store(settings)
    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == "Raccoons"))
        return loop.resolve_start(session, settings, project, loop.LoopSettings(**options))


def test_a_synced_project_has_the_loop_off_and_a_poll_queues_nothing(settings):
    synced_project(settings)
    status = service.loop("Raccoons", settings=settings)
    assert status["retrain_every"] == 0 and status["plan"].startswith("The loop is off: nothing is trained")

    assert tasks.poll_labeling() == []  # not even visited: Label Studio is not asked for anything
    assert jobs.count_jobs(settings) == 0

    # Once on, the poll visits it (here it finds Label Studio down, says so, and still queues nothing).
    service.loop("Raccoons", retrain_every=3, settings=settings)
    [check] = tasks.poll_labeling()
    assert check["project"] == "Raccoons" and "error" in check
    assert jobs.count_jobs(settings) == 0


def test_the_start_is_the_best_finished_run_else_random_never_missing_weights(settings):
    synced_project(settings)
    assert loop.LoopSettings().start_weights == loop.BEST_RUN
    assert start_of(settings) == loop.StartWeights(
        None, "random initialisation (the project has no finished run of this size yet)"
    )
    # Never a start: a cancelled run, one with no evaluated epoch (no best.pt), another size, another project.
    finished_run(settings, "cancelled", 0.9, status="cancelled")
    finished_run(settings, "no-epoch", 0.0, best=False)
    finished_run(settings, "medium", 0.8, size="m")
    finished_run(settings, "other", 0.95, project="Otters")
    assert start_of(settings).weights is None

    finished_run(settings, "first", 0.2)
    best = finished_run(settings, "second", 0.4)
    finished_run(settings, "third", None)  # not evaluated
    assert start_of(settings) == loop.StartWeights(str(best), "the project's best run second (best mAP50-95 0.400)")
    assert start_of(settings, start_weights=None).weights is None  # random, when asked for

    # COCO: only from a file on this machine; else the best run, and the reason is given.
    coco = start_of(settings, start_weights="coco")
    assert coco.weights == str(best) and "the COCO weights chosen are not on this machine" in coco.note
    assert "coco" not in loop.start_choices(settings, loop.LoopSettings())
    weights = loop.coco_weights_file(settings, "s")
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"")
    assert start_of(settings, start_weights="coco") == loop.StartWeights("coco", "the official COCO weights")
    assert "coco" in loop.start_choices(settings, loop.LoopSettings())

    # A run folder that holds no checkpoint (deleted since it was chosen): the best run, with the reason.
    gone = start_of(settings, start_weights=str(settings.runs_dir / "deleted"))
    assert gone.weights == str(best) and "holds no checkpoint" in gone.note


def test_turning_the_loop_on_counts_from_the_labels_there_are_then(settings):
    """Labels made before the loop was on (or imported with the images) never start a retrain by themselves."""
    synced_project(settings)
    engine, storage = open_store(settings)
    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == "Raccoons"))
        for index in range(3):  # three tasks labeled at the last pull, as a sync of labeled images leaves them
            image = add_image_bytes(session, storage, project, encode_image(textured_image(index)), source="upload")
            session.add(
                LabelingTask(image_id=image.image_id, ls_project_id=1, ls_task_id=10 + index, annotation_id=100 + index)
            )
    status = service.loop("Raccoons", retrain_every=4, settings=settings)
    assert status["labeled"] == 3 and status["annotations_at_retrain"] == 3  # the next retrain at 7, not at 4
    assert status["plan"].startswith("Every 4 new labels: freeze a version, train YOLO-NAS S from random")
    # Changing the count of a loop that is on keeps its count.
    assert service.loop("Raccoons", retrain_every=2, settings=settings)["annotations_at_retrain"] == 3


def test_the_coco_file_the_loop_looks_for_is_the_one_the_download_writes(settings):
    from backend.models.download import OFFICIAL_COCO_WEIGHTS

    for size, source in OFFICIAL_COCO_WEIGHTS.items():
        assert loop.coco_weights_file(settings, size) == settings.weights_dir / source.name
