"""Dataset versions: freeze into our dataset-folder contract, group-aware split, exports and class statistics."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from sqlalchemy import select

from backend.data.folders import load_dataset
from backend.store.db import init_db, session_scope
from backend.store.images import add_image_bytes
from backend.store.models import Annotation, DatasetVersion, Image, Project, ensure_class, get_or_create_project
from backend.store.versions import class_stats, export_coco, export_yolo, freeze_version
from tests.conftest import encode_image as encode
from tests.conftest import textured_image


def textured(seed: int, size: tuple[int, int] = (128, 96)) -> np.ndarray:
    return textured_image(seed, size)


@pytest.fixture
def project_env(tmp_path: Path):
    """A project with 2 classes and 12 labeled images (the first three near-duplicate copies of one photo), all
    called "IMG_0001" as two cameras would name them, plus one unlabeled image and one prediction-only image."""
    engine = init_db(f"sqlite:///{tmp_path / 'yolodex.db'}")
    storage = tmp_path / "storage"
    with session_scope(engine) as session:
        project = get_or_create_project(session, "Starter Pokédex")
        classes = [ensure_class(session, project, name)[0] for name in ("Bulbasaur", "Charmander")]
        base = textured(100)
        payloads = [encode(base), encode(cv2.resize(base, (100, 75)), "JPEG", quality=75), encode(base, "BMP")]
        payloads += [encode(textured(seed)) for seed in range(9)]
        for index, data in enumerate(payloads):
            result = add_image_bytes(session, storage, project, data, source="upload", original_name="IMG_0001.png")
            image = session.get(Image, result.image_id)
            image.labeled = True
            if index % 4 != 3:  # every fourth image is a labeled background
                box_class = classes[index % 2]
                session.add(
                    Annotation(image_id=image.id, class_id=box_class.id, x1=4, y1=5, x2=44, y2=35, source="import")
                )
        unlabeled = add_image_bytes(session, storage, project, encode(textured(50)), source="crawl")
        predicted = add_image_bytes(session, storage, project, encode(textured(51)), source="crawl")
        session.add(
            Annotation(
                image_id=predicted.image_id,
                class_id=classes[0].id,
                x1=0,
                y1=0,
                x2=9,
                y2=9,
                source="prediction",
                score=0.4,
            )
        )
    yield engine, storage, unlabeled.image_id, predicted.image_id
    engine.dispose()


def test_freeze_writes_a_dataset_folder_that_load_dataset_reads(project_env) -> None:
    engine, storage, unlabeled_id, predicted_id = project_env
    with session_scope(engine) as session:
        project = get_or_create_project(session, "Starter Pokédex")
        version = freeze_version(session, storage, project, "v1", (0.5, 0.25, 0.25), seed=0)
        folder = storage / version.folder
        groups = {image.id: image.near_group for image in session.scalars(select(Image))}
    splits = load_dataset(folder)
    assert set(splits) == {"train", "val", "test"}
    assert splits["train"].class_names == ["Bulbasaur", "Charmander"]
    ids = {split: {record.image_id for record in dataset.records} for split, dataset in splits.items()}
    everything = set().union(*ids.values())
    assert len(everything) == 12 and unlabeled_id not in everything and predicted_id not in everything
    near = {image_id for image_id, group in groups.items() if group is not None}
    assert len(near) == 3 and sum(bool(near & members) for members in ids.values()) == 1  # one split holds them
    assert sum(len(dataset.records) for dataset in splits.values()) == 12
    assert sum(int(dataset.report.boxes) for dataset in splits.values()) == 9
    record = next(r for dataset in splits.values() for r in dataset.records if len(r.boxes))
    assert record.boxes[0].tolist() == [4, 5, 44, 35]  # xyxy original-image pixels, through COCO [x, y, w, h]
    names = sorted(path.name for path in (folder / "images").iterdir())
    assert len(names) == len(set(names)) == 12 and all(name.endswith("_IMG_0001.png") for name in names[:1])
    assert version.counts["splits"]["train"]["images"] == len(ids["train"])
    assert not list(folder.parent.glob(".v1.tmp-*"))


def test_freeze_is_seeded_and_refuses_to_overwrite(project_env) -> None:
    engine, storage, *_ = project_env
    with session_scope(engine) as session:
        project = get_or_create_project(session, "Starter Pokédex")
        first = freeze_version(session, storage, project, "a", seed=7)
        second = freeze_version(session, storage, project, "b", seed=7)
        with pytest.raises(ValueError, match="already exists"):
            freeze_version(session, storage, project, "a", seed=1)
        with pytest.raises(ValueError, match="version name"):
            freeze_version(session, storage, project, "../escape")
    for split in ("train", "val"):
        one = json.loads((storage / first.folder / f"{split}.json").read_text())
        two = json.loads((storage / second.folder / f"{split}.json").read_text())
        assert one["images"] == two["images"] and one["annotations"] == two["annotations"]


def test_exports_read_back_with_unique_names(project_env, tmp_path: Path) -> None:
    engine, storage, *_ = project_env
    with session_scope(engine) as session:
        project = get_or_create_project(session, "Starter Pokédex")
        version = freeze_version(session, storage, project, "v1", seed=0)
    yolo = load_dataset(export_yolo(storage, version, tmp_path / "yolo"))
    frozen = load_dataset(storage / version.folder)
    assert yolo["train"].class_names == ["Bulbasaur", "Charmander"]
    for split in ("train", "val"):
        assert len(yolo[split]) == len(frozen[split])
        yolo_boxes = np.concatenate([r.boxes for r in yolo[split].records] + [np.zeros((0, 4), np.float32)])
        frozen_boxes = np.concatenate([r.boxes for r in frozen[split].records] + [np.zeros((0, 4), np.float32)])
        np.testing.assert_allclose(yolo_boxes, frozen_boxes, atol=1e-3)
    assert len({path.name for path in (tmp_path / "yolo" / "labels").rglob("*.txt")}) == 12
    coco = load_dataset(export_coco(storage, version, tmp_path / "coco"))
    assert {split: len(dataset) for split, dataset in coco.items()} == {split: len(frozen[split]) for split in frozen}
    assert sum(dataset.report.boxes for dataset in coco.values()) == 9
    assert sorted(path.name for path in (tmp_path / "coco").glob("*.json")) == ["train.json", "val.json"]


@pytest.mark.parametrize("fractions", [(0.5, 0.25, 0.25), (0.75, 0.25)])
def test_coco_export_writes_standard_per_split_files_that_pycocotools_loads(project_env, tmp_path, fractions) -> None:
    engine, storage, *_ = project_env
    with session_scope(engine) as session:
        project = get_or_create_project(session, "Starter Pokédex")
        version = freeze_version(session, storage, project, "v1", fractions, seed=0)
        counts = version.counts["splits"]
    out = export_coco(storage, version, tmp_path / "coco")
    expected = ["train", "val", "test"][: len(fractions)]
    assert sorted(path.stem for path in out.glob("*.json")) == sorted(expected)
    image_ids: set[int] = set()
    for split in expected:
        coco = COCO(str(out / f"{split}.json"))
        assert len(coco.getImgIds()) == counts[split]["images"] and len(coco.getAnnIds()) == counts[split]["boxes"]
        assert [category["name"] for category in coco.loadCats(coco.getCatIds())] == ["Bulbasaur", "Charmander"]
        for image in coco.loadImgs(coco.getImgIds()):
            assert (out / "images" / image["file_name"]).is_file()
            assert "split" not in image  # no key of our own
        image_ids |= set(coco.getImgIds())
    assert len(image_ids) == 12  # every labeled image once, in one split
    assert len(list((out / "images").iterdir())) == 12


def test_class_stats_for_a_project_and_a_version(project_env) -> None:
    engine, storage, *_ = project_env
    with session_scope(engine) as session:
        project = get_or_create_project(session, "Starter Pokédex")
        version = freeze_version(session, storage, project, "v1", seed=0)
        project_stats = class_stats(session, project)
        version_stats = class_stats(session, version)
    # The project counts every image (14), predictions excluded; the version only the 12 labeled ones.
    assert (project_stats["images"], project_stats["boxes"], project_stats["images_without_boxes"]) == (14, 9, 5)
    assert (version_stats["images"], version_stats["boxes"], version_stats["images_without_boxes"]) == (12, 9, 3)
    per_class = {entry["name"]: (entry["images"], entry["boxes"]) for entry in version_stats["classes"]}
    assert per_class == {"Bulbasaur": (6, 6), "Charmander": (3, 3)}
    # A 40x30 box has sqrt(area) 34.6 px: the "32-64" bin.
    bin_index = version_stats["box_size_bins"].index("32-64")
    assert version_stats["box_size_histogram"]["Bulbasaur"][bin_index] == 6
    assert set(version_stats["split_stats"]) == {"train", "val"}
    json.dumps(version_stats)


def labeled_project(session, storage: Path, name: str, first_seed: int):
    project = get_or_create_project(session, name)
    (pika, _) = ensure_class(session, project, "Pika")
    for seed in range(first_seed, first_seed + 3):
        result = add_image_bytes(session, storage, project, encode(textured(seed)), source="upload")
        session.get(Image, result.image_id).labeled = True
        session.add(Annotation(image_id=result.image_id, class_id=pika.id, x1=4, y1=5, x2=44, y2=35, source="import"))
    return project


def test_version_names_that_would_share_a_folder_are_refused_with_the_reason(tmp_path: Path) -> None:
    """Projects "coll/x" and "coll_x" both keep their versions in datasets/coll_x/: before, freezing "v1" in the
    second said "version 'v1' already exists in project 'coll_x'", which it did not."""
    engine = init_db(f"sqlite:///{tmp_path / 'yolodex.db'}")
    storage = tmp_path / "storage"
    with session_scope(engine) as session:
        first = freeze_version(session, storage, labeled_project(session, storage, "coll/x", 300), "v1")
        folder, files = storage / first.folder, sorted(path.name for path in (storage / first.folder).rglob("*"))
    with session_scope(engine) as session:
        second = labeled_project(session, storage, "coll_x", 400)
        with pytest.raises(ValueError) as refused:
            freeze_version(session, storage, second, "v1")
        message = str(refused.value)
        assert "already exists in project" not in message
        assert "'v1' of project 'coll_x'" in message and "same folder (datasets/coll_x/v1)" in message
        assert "version 'v1' of project 'coll/x'" in message and "choose another version name" in message
        other = freeze_version(session, storage, second, "v2")  # another name is fine
    # Nothing stored before is touched: coll/x's v1 keeps its folder and files, and is still the only v1.
    assert sorted(path.name for path in folder.rglob("*")) == files
    assert load_dataset(folder)["train"].class_names == ["Pika"]
    assert (storage / other.folder).is_dir() and other.folder == "datasets/coll_x/v2"
    with session_scope(engine) as session:
        names = session.execute(select(DatasetVersion.name, Project.name).join(Project)).all()
        assert sorted(names) == [("v1", "coll/x"), ("v2", "coll_x")]
    # A folder left without a version (say, from an earlier database) is named as such.
    (storage / "datasets" / "coll_x" / "v3").mkdir()
    with session_scope(engine) as session, pytest.raises(ValueError, match="already exists though no version uses"):
        freeze_version(session, storage, get_or_create_project(session, "coll_x"), "v3")
    engine.dispose()
