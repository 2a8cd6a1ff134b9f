"""Dataset versions: freeze the project's annotations and a group-aware split into an immutable folder, export it,
and count what it holds.

A version folder is OUR dataset-folder contract, what `yolodex train --data <folder>` and
`backend.data.folders.load_dataset` read: `images/` (hard links into the content store, copies across file
systems), `train.json`, `val.json` (and `test.json` when the test fraction is above 0), COCO detection JSON with
boxes `[x, y, w, h]` in original-image pixels after EXIF orientation and category ids = class index + 1. Image
file names are `<image id>_<original stem>.<ext>`: unique even when two sources used the same name, and still
readable. The folder is written under a temporary name and renamed into place, so it exists whole or not at all,
and is never written again.

What a version holds: images with status ok or near_duplicate that a person labeled (`Image.labeled`, or any
ground-truth box); boxes from imports and Label Studio, never model predictions.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from backend.data.coco import write_coco
from backend.data.folders import load_dataset
from backend.data.records import DetectionSet, ImageRecord, LoadReport
from backend.data.split import check_fractions, group_split
from backend.files import atomic_write_text, cut_to_bytes
from backend.store.models import (
    GROUND_TRUTH_SOURCES,
    Annotation,
    DatasetVersion,
    Image,
    Project,
    ProjectClass,
    project_classes,
)

# sqrt(box area) bin edges in pixels (COCO calls < 32 small and < 96 medium); the last bin is open-ended.
BOX_SIZE_EDGES = (0, 16, 32, 64, 96, 128, 256, 512)
_VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def box_size_labels() -> list[str]:
    """Labels of the box-size bins: "0-16", ..., "512+"."""
    upper = [*BOX_SIZE_EDGES[1:], None]
    return [f"{low}-{high}" if high is not None else f"{low}+" for low, high in zip(BOX_SIZE_EDGES, upper)]


def _size_bin(width: float, height: float) -> int:
    side = math.sqrt(max(width, 0.0) * max(height, 0.0))
    index = 0
    for position, edge in enumerate(BOX_SIZE_EDGES):
        if side >= edge:
            index = position
    return index


def safe_name(text: str, fallback: str = "item") -> str:
    """A file-system-safe form of `text`: letters (any script), digits, '.', '-', '_'; at most 60 characters and 180
    bytes of UTF-8 (a file name's limit is 255 bytes, and 60 letters of some scripts are 240; docs/odd_inputs.md)."""
    cleaned = re.sub(r"[^\w.-]+", "_", text, flags=re.UNICODE).strip("._")
    return cut_to_bytes(cleaned[:60], 180) or fallback


def version_folder(storage: Path, version: DatasetVersion) -> Path:
    """The absolute folder of a version."""
    return storage / version.folder


# ----------------------------------------------------------------------------------------------------------------
# Freezing
# ----------------------------------------------------------------------------------------------------------------


def freeze_version(
    session: Session,
    storage: Path,
    project: Project,
    name: str,
    fractions: Sequence[float] = (0.8, 0.2),
    seed: int = 0,
) -> DatasetVersion:
    """Freezes the project's labeled images, their boxes and a seeded group-aware split into a new version.

    Near-duplicate groups (`Image.near_group`) stay inside one split (`backend.data.split.group_split`).

    Args:
        session: the open session (the caller commits; the folder is in place once this returns).
        storage: the storage folder; the version goes to `storage/datasets/<project>/<name>/`.
        project: the project to freeze.
        name: the version's name: letters, digits, '.', '-', '_' (e.g. "v1"), unique in the project.
        fractions: (train, val) or (train, val, test), summing to 1.
        seed: the split's seed.

    Returns:
        The new `DatasetVersion` (flushed), its `counts` holding per-split counts and `class_stats`.

    Raises:
        ValueError: a bad name or fractions, a name already used, no class, or no labeled image.
    """
    values = check_fractions(fractions)
    relative = _new_version_folder(session, storage, project, name)
    classes, images = _freezable_content(session, project)
    boxes = ground_truth_boxes(session, [image.id for image in images])
    split_of, split_names = _split_images(images, values, seed)

    final = storage / relative
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        records = _write_images_and_splits(temporary, storage, images, boxes, split_of, split_names, classes)
        counts = _version_counts(records, [project_class.name for project_class in classes])
        atomic_write_text(temporary / "version.json", _json({"name": name, "seed": seed, "fractions": values} | counts))
        version = DatasetVersion(
            project_id=project.id,
            name=name,
            seed=seed,
            train_fraction=values[0],
            val_fraction=values[1],
            test_fraction=values[2] if len(values) == 3 else 0.0,
            folder=relative.as_posix(),
            counts=counts,
        )
        with session.begin_nested():
            session.add(version)
            session.flush()
        os.rename(temporary, final)  # atomic; fails if another freeze took the name meanwhile
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return version


def _new_version_folder(session: Session, storage: Path, project: Project, name: str) -> Path:
    """The folder, relative to `storage`, of a new version `name` of `project`.

    Raises:
        ValueError: the name is malformed, already used in the project, or its folder already exists.
    """
    if not _VERSION_NAME.fullmatch(name):
        raise ValueError(f"version name {name!r}: use 1-64 letters, digits, '.', '-' or '_', starting with a letter")
    taken = session.scalar(
        select(DatasetVersion.id).where(DatasetVersion.project_id == project.id, DatasetVersion.name == name)
    )
    relative = Path("datasets") / safe_name(project.name, f"project_{project.id}") / name
    if taken is not None:
        raise ValueError(f"version {name!r} already exists in project {project.name!r}: choose another name")
    if (storage / relative).exists():
        raise ValueError(_folder_taken_reason(session, project, name, relative))
    return relative


def _freezable_content(session: Session, project: Project) -> tuple[list[ProjectClass], list[Image]]:
    """The project's classes and its labeled images, the two things a version cannot be without.

    Raises:
        ValueError: the project has no class, or no labeled image.
    """
    classes = project_classes(session, project)
    if not classes:
        raise ValueError(f"project {project.name!r} has no classes: add classes and label some images first")
    images = _labeled_images(session, project)
    if not images:
        raise ValueError(f"project {project.name!r} has no labeled images to freeze: label some images first")
    return classes, images


def _split_images(images: list[Image], values: tuple[float, ...], seed: int) -> tuple[dict[Hashable, str], list[str]]:
    """({image id: split}, the splits to write), near-duplicate groups kept together.

    val.json is always written (the dataset-folder contract); test.json only when a test share was asked for.

    Raises:
        ValueError: the split left train empty.
    """
    split_of = group_split(
        [image.id for image in images], {image.id: image.near_group for image in images}, values, seed
    )
    split_names = ["train", "val", "test"] if len(values) == 3 and values[2] > 0 else ["train", "val"]
    if not any(split == "train" for split in split_of.values()):
        raise ValueError("the split left train empty: lower the val/test fractions")
    return split_of, split_names


def _write_images_and_splits(
    folder: Path,
    storage: Path,
    images: list[Image],
    boxes: dict[int, list[tuple[list[float], int]]],
    split_of: dict[Hashable, str],
    split_names: list[str],
    classes: list[ProjectClass],
) -> dict[str, list[ImageRecord]]:
    """Links the images into `folder/images/` under `<image id>_<stem>.<ext>` and writes one COCO file per split.

    Returns:
        {split: its records}, the input of the version's counts.
    """
    label_of_class = {project_class.id: project_class.index for project_class in classes}
    images_dir = folder / "images"
    images_dir.mkdir(parents=True)
    records: dict[str, list[ImageRecord]] = {split: [] for split in split_names}
    for image in images:
        file_name = f"{image.id}_{safe_name(Path(image.original_name or 'image').stem, 'image')}.{image.format}"
        _link_or_copy(storage / image.path, images_dir / file_name)
        image_boxes = boxes.get(image.id, [])
        records[split_of[image.id]].append(
            ImageRecord(
                images_dir / file_name,
                image.id,
                image.width,
                image.height,
                np.asarray([box for box, _ in image_boxes]),
                np.asarray([label_of_class[class_id] for _, class_id in image_boxes]),
            )
        )
    class_names = [project_class.name for project_class in classes]
    category_ids = [project_class.index + 1 for project_class in classes]
    for split, split_records in records.items():
        dataset = DetectionSet(split_records, class_names, category_ids, LoadReport())
        write_coco(dataset, folder / f"{split}.json", images_root=images_dir)
    return records


def _folder_taken_reason(session: Session, project: Project, name: str, relative: Path) -> str:
    """Why version `name` cannot have the folder `relative`, which exists though the project has no such version.

    Two project names can map to one folder ("coll/x" and "coll_x" both to datasets/coll_x/, `safe_name`), and on a
    case-insensitive file system two version names can too ("V1" and "v1").
    """
    owner = session.execute(
        select(DatasetVersion.name, Project.name)
        .join(Project, Project.id == DatasetVersion.project_id)
        .where(func.lower(DatasetVersion.folder) == relative.as_posix().lower())
    ).first()
    if owner is None:
        return (
            f"version {name!r} of project {project.name!r} would be stored in {relative.as_posix()}, a folder that "
            "already exists though no version uses it (left from an earlier database?): move that folder away, or "
            "choose another name"
        )
    other_version, other_project = owner
    return (
        f"version {name!r} of project {project.name!r} would be stored in the same folder ({relative.as_posix()}) as "
        f"the existing version {other_version!r} of project {other_project!r} (folder names keep only letters, "
        "digits, '.', '-' and '_'): choose another version name"
    )


def _labeled_images(session: Session, project: Project) -> list[Image]:
    has_ground_truth = exists().where(Annotation.image_id == Image.id, Annotation.source.in_(GROUND_TRUTH_SOURCES))
    return list(
        session.scalars(
            select(Image)
            .where(
                Image.project_id == project.id,
                Image.status.in_(("ok", "near_duplicate")),
                Image.labeled.is_(True) | has_ground_truth,
            )
            .order_by(Image.id)
        )
    )


def ground_truth_boxes(session: Session, image_ids: list[int]) -> dict[int, list[tuple[list[float], int]]]:
    """{image id: [(xyxy original-image pixels, class id)]} for ground-truth annotations."""
    boxes: dict[int, list[tuple[list[float], int]]] = {}
    for chunk_start in range(0, len(image_ids), 500):  # bounded IN lists
        chunk = image_ids[chunk_start : chunk_start + 500]
        rows = session.execute(
            select(Annotation.image_id, Annotation.x1, Annotation.y1, Annotation.x2, Annotation.y2, Annotation.class_id)
            .where(Annotation.image_id.in_(chunk), Annotation.source.in_(GROUND_TRUTH_SOURCES))
            .order_by(Annotation.id)
        )
        for image_id, x1, y1, x2, y2, class_id in rows:
            boxes.setdefault(image_id, []).append(([x1, y1, x2, y2], class_id))
    return boxes


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # no extra disk; the content store never rewrites a file
    except OSError:
        shutil.copy2(source, target)


def _json(payload: Any) -> str:
    return json.dumps(payload, indent=2, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------


def _stats(class_names: list[str], images: Iterable[tuple[list[int], list[tuple[float, float]]]]) -> dict[str, Any]:
    """Images and boxes per class, box-size histogram per class, images without boxes.

    Args:
        class_names: one name per class index.
        images: per image, (its boxes' class indices, their (width, height) in original-image pixels).
    """
    num_bins = len(BOX_SIZE_EDGES)
    per_class: list[dict[str, Any]] = [
        {"index": index, "name": name, "images": 0, "boxes": 0} for index, name in enumerate(class_names)
    ]
    histogram = [[0] * num_bins for _ in class_names]
    total_images = without_boxes = total_boxes = 0
    for labels, sizes in images:
        total_images += 1
        if not labels:
            without_boxes += 1
        for label in set(labels):
            per_class[label]["images"] += 1
        for label, (width, height) in zip(labels, sizes):
            per_class[label]["boxes"] += 1
            histogram[label][_size_bin(width, height)] += 1
            total_boxes += 1
    return {
        "images": total_images,
        "boxes": total_boxes,
        "images_without_boxes": without_boxes,
        "classes": per_class,
        "box_size_bins": box_size_labels(),
        "box_size_histogram": {name: counts for name, counts in zip(class_names, histogram)},
    }


def _version_counts(records: dict[str, list[ImageRecord]], class_names: list[str]) -> dict[str, Any]:
    def per_image(split_records: list[ImageRecord]) -> Iterable[tuple[list[int], list[tuple[float, float]]]]:
        for record in split_records:
            sizes = [(float(x2 - x1), float(y2 - y1)) for x1, y1, x2, y2 in record.boxes.tolist()]
            yield record.labels.tolist(), sizes

    splits = {split: _stats(class_names, per_image(split_records)) for split, split_records in records.items()}
    everything = [record for split_records in records.values() for record in split_records]
    return {
        "classes": list(class_names),
        "splits": {split: {"images": stats["images"], "boxes": stats["boxes"]} for split, stats in splits.items()},
        "stats": _stats(class_names, per_image(everything)),
        "split_stats": splits,
    }


def class_stats(session: Session, target: Project | DatasetVersion) -> dict[str, Any]:
    """Class statistics as plain data for the app's charts.

    For a project: its current images (status ok or near_duplicate) and ground-truth boxes. For a version: what was
    frozen (read from the version's counts, so later labeling does not change it), plus "split_stats" per split.

    Returns:
        {"images", "boxes", "images_without_boxes", "classes": [{"index", "name", "images", "boxes"}],
        "box_size_bins": ["0-16", ...] (sqrt(box area) in original-image pixels),
        "box_size_histogram": {class name: [count per bin]}}.
    """
    if isinstance(target, DatasetVersion):
        counts = target.counts or {}
        return dict(counts.get("stats", {})) | {"split_stats": counts.get("split_stats", {})}
    classes = project_classes(session, target)
    label_of_class = {project_class.id: project_class.index for project_class in classes}
    image_ids = list(
        session.scalars(
            select(Image.id)
            .where(Image.project_id == target.id, Image.status.in_(("ok", "near_duplicate")))
            .order_by(Image.id)
        )
    )
    boxes = ground_truth_boxes(session, image_ids)

    def per_image() -> Iterable[tuple[list[int], list[tuple[float, float]]]]:
        for image_id in image_ids:
            image_boxes = boxes.get(image_id, [])
            yield (
                [label_of_class[class_id] for _, class_id in image_boxes],
                [(box[2] - box[0], box[3] - box[1]) for box, _ in image_boxes],
            )

    return _stats([project_class.name for project_class in classes], per_image())


# ----------------------------------------------------------------------------------------------------------------
# Exports
# ----------------------------------------------------------------------------------------------------------------


def _version_splits(storage: Path, version: DatasetVersion) -> dict[str, DetectionSet]:
    return load_dataset(version_folder(storage, version))


def export_coco(storage: Path, version: DatasetVersion, out_dir: Path) -> Path:
    """Writes the version in the standard per-split COCO layout: `train.json`, `val.json` and, when the version has
    a test split, `test.json`, with the images copied (or hard-linked) to `images/` beside them.

    Each file is plain COCO detection JSON (images, annotations, categories, info, licenses), as pycocotools'
    COCO() and the usual tools load one split: `file_name` is relative to `images/`, boxes are `[x, y, w, h]`
    original-image pixels, category ids = class index + 1, image ids are the store's (unique across the splits),
    annotation ids count from 1 in each file. `load_dataset(out_dir)` reads the splits back, and importing the
    folder (or its zip) imports every split.

    Returns:
        The output folder.
    """
    out_dir = Path(out_dir)
    source_folder = version_folder(storage, version)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        split_file = source_folder / f"{split}.json"
        if not split_file.is_file():
            continue
        content = json.loads(split_file.read_text(encoding="utf-8"))
        content["info"] = {"description": f"yolodex dataset version {version.name}, {split} split"}
        content.setdefault("licenses", [])
        for entry in content["images"]:
            _link_or_copy_if_missing(source_folder / "images" / entry["file_name"], images_dir / entry["file_name"])
        atomic_write_text(out_dir / f"{split}.json", _json(content))
    return out_dir


def export_yolo(storage: Path, version: DatasetVersion, out_dir: Path) -> Path:
    """Writes the version in the YOLO txt layout: `images/<split>/`, `labels/<split>/<stem>.txt`, `data.yaml`.

    Label lines are `class cx cy w h`, normalised to the image size after EXIF orientation (as Ultralytics reads
    them). File names are the version's (`<image id>_<stem>.<ext>`), so two sources' "IMG_0001.jpg" never collide.

    Returns:
        The output folder.
    """
    out_dir = Path(out_dir)
    splits = _version_splits(storage, version)
    class_names = splits["train"].class_names
    for split, dataset in splits.items():
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        (out_dir / "labels" / split).mkdir(parents=True, exist_ok=True)
        for record in dataset.records:
            _link_or_copy_if_missing(record.path, out_dir / "images" / split / record.path.name)
            lines = []
            for (x1, y1, x2, y2), label in zip(record.boxes.tolist(), record.labels.tolist()):
                cx, cy = (x1 + x2) / 2 / record.width, (y1 + y2) / 2 / record.height
                w, h = (x2 - x1) / record.width, (y2 - y1) / record.height
                lines.append(f"{label} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            atomic_write_text(
                out_dir / "labels" / split / f"{record.path.stem}.txt", "".join(f"{line}\n" for line in lines)
            )
    yaml_lines = ["path: .", *(f"{split}: images/{split}" for split in splits), "names:"]
    yaml_lines += [f"  {index}: {_yaml_string(name)}" for index, name in enumerate(class_names)]
    atomic_write_text(out_dir / "data.yaml", "\n".join(yaml_lines) + "\n")
    return out_dir


def _yaml_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a valid YAML double-quoted scalar


def _link_or_copy_if_missing(source: Path, target: Path) -> None:
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(source, target)
