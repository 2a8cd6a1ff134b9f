"""YOLO txt layout → `DetectionSet`.

The layout (as written by Ultralytics, Roboflow and most labelling tools):
    root/data.yaml           `names: [a, b]` or `names: {0: a, 1: b}` (or root/classes.txt, one name a line)
    root/images/<split>/...  images (any sub-folders)
    root/labels/<split>/...  one `<image stem>.txt` per image, mirroring the image's sub-folder
or the flat single-split form `root/images/` + `root/labels/`.

A label line is `class cx cy w h`, box centre and size normalised 0–1 by the image size *as displayed* (EXIF
orientation applied, as Ultralytics does). A polygon line `class x1 y1 x2 y2 x3 y3 ...` (segmentation exports)
becomes the box around its points. Boxes come out as xyxy original-image pixels.

Rules, counted in the report like the COCO reader's (see `backend.data.coco`): no label file = a background image;
an empty label file = a background image; a line that is not numbers, or has the wrong count = dropped,
"malformed"; boxes clipped/dropped as "degenerate"; missing/corrupt images skipped with the reason; a label
file that cannot be read as text skips its image (training on it as background would teach wrong negatives).
A class index outside the class list is a `DatasetError` naming the file and line. Image ids are numbered from 1
over *all* image files in sorted path order, so an id names the same file whether or not others were skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backend.data.coco import IMAGE_SUFFIXES, clean_box, finish_report, probe_image
from backend.data.records import DatasetError, DetectionSet, ImageRecord, LoadReport

CLASS_FILES = ("data.yaml", "data.yml", "classes.txt")


def load_yolo(root: str | Path, split: str | None = None, *, class_names: Sequence[str] | None = None) -> DetectionSet:
    """Reads one split of a YOLO txt dataset.

    Args:
        root: the dataset folder (holding `images/`, `labels/` and `data.yaml` or `classes.txt`).
        split: the sub-folder of `images/` and `labels/` ("train", "val", ...); None for the flat layout.
        class_names: the class list this split must have (the train split's when reading val/test); required when
            `root` has no class file, and must equal the class file's list when it has one.

    Returns:
        The images kept, in sorted path order, boxes as (N, 4) xyxy original-image pixels; may be empty.

    Raises:
        DatasetError: the images folder or the class list is missing, or a label uses a class index out of range.
    """
    root = Path(root)
    images_dir = root / "images" / split if split else root / "images"
    labels_dir = root / "labels" / split if split else root / "labels"
    if not images_dir.is_dir():
        raise DatasetError(f"YOLO images folder not found: '{images_dir}' (expected {root}/images/<split>/)")
    names = read_yolo_class_names(root)
    if names is None and class_names is None:
        raise DatasetError(
            f"no class list in '{root}': add data.yaml with `names: [...]` or classes.txt with one name a line"
        )
    if names is not None and class_names is not None and list(names) != list(class_names):
        raise DatasetError(f"'{root}' declares classes {names} but {list(class_names)} were expected")
    return load_yolo_folders(images_dir, labels_dir, names if names is not None else list(class_names or []))


def load_yolo_folders(images_dir: str | Path, labels_dir: str | Path, class_names: Sequence[str]) -> DetectionSet:
    """Reads images from `images_dir` and their labels from the mirroring paths under `labels_dir`.

    Args:
        images_dir: the folder of images (searched recursively).
        labels_dir: the folder of `.txt` labels; `labels_dir/<relative image path>.txt`.
        class_names: one name per class index used in the labels.

    Returns:
        The images kept, boxes as (N, 4) xyxy original-image pixels; may be empty. Category ids are 1..C.

    Raises:
        DatasetError: a label uses a class index out of range.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    class_names = list(class_names)
    report = LoadReport()
    image_paths = sorted(
        (path for path in images_dir.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()),
        key=lambda path: path.relative_to(images_dir).as_posix(),
    )
    used_labels: set[Path] = set()
    records: list[ImageRecord] = []
    for image_id, image_path in enumerate(image_paths, start=1):
        relative = image_path.relative_to(images_dir)
        label_path = labels_dir / relative.with_suffix(".txt")
        used_labels.add(label_path)
        lines = _read_label_lines(label_path, relative, report)
        if lines is None:
            continue
        try:
            width, height = probe_image(image_path)
        except (FileNotFoundError, ValueError) as error:
            report.images_skipped.append((relative.as_posix(), str(error)))
            continue
        boxes, labels = [], []
        for line_number, line in lines:
            parsed = _parse_label_line(line, label_path, line_number, len(class_names))
            if parsed is None:
                report.drop_box("malformed")
                continue
            label, (x1, y1, x2, y2) = parsed
            kept = clean_box((x1 * width, y1 * height, x2 * width, y2 * height), width, height, report)
            if kept is not None:
                boxes.append(kept)
                labels.append(label)
        records.append(ImageRecord(image_path, image_id, width, height, np.asarray(boxes), np.asarray(labels)))

    if labels_dir.is_dir():
        unused = [path for path in labels_dir.rglob("*.txt") if path not in used_labels]
        if unused:
            report.warnings.append(f"{len(unused)} label files in '{labels_dir}' have no image, e.g. '{unused[0]}'")
    finish_report(records, report, images_dir)
    category_ids = list(range(1, len(class_names) + 1))
    return DetectionSet(records, class_names, category_ids, report, source=images_dir)


def _read_label_lines(label_path: Path, relative: Path, report: LoadReport) -> list[tuple[int, str]] | None:
    """(line number, text) of the non-blank lines; [] when there is no label file; None (image skipped) when the
    file cannot be read."""
    if not label_path.exists():
        return []
    try:
        text = label_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        report.images_skipped.append((relative.as_posix(), f"label file '{label_path}' cannot be read: {error}"))
        return None
    return [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _parse_label_line(
    line: str, label_path: Path, line_number: int, num_classes: int
) -> tuple[int, tuple[float, float, float, float]] | None:
    """(class index, normalised xyxy) of one label line, or None when it is malformed."""
    tokens = line.split()
    try:
        values = [float(token) for token in tokens]
    except ValueError:
        return None
    if len(values) == 5:
        class_value, cx, cy, w, h = values
        box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)  # a negative w/h reverses it: "degenerate"
    elif len(values) >= 7 and len(values) % 2 == 1:
        class_value, xs, ys = values[0], values[1::2], values[2::2]
        box = (min(xs), min(ys), max(xs), max(ys))
    else:
        return None
    if not math.isfinite(class_value) or class_value != int(class_value):
        return None
    class_index = int(class_value)
    if not 0 <= class_index < num_classes:
        raise DatasetError(
            f"{label_path}:{line_number}: class index {class_index} is out of range: the class list has "
            f"{num_classes} classes (0..{num_classes - 1}); fix the label or add the class to data.yaml/classes.txt"
        )
    return class_index, box


def read_yolo_class_names(root: str | Path) -> list[str] | None:
    """The class list of a YOLO dataset from `data.yaml` (`names:` list or {index: name} dict) or `classes.txt`.

    Returns:
        One name per class index, or None when `root` has neither file.

    Raises:
        DatasetError: the file exists but holds no usable class list.
    """
    root = Path(root)
    for file_name in CLASS_FILES:
        path = root / file_name
        if not path.is_file():
            continue
        if path.suffix == ".txt":
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not names:
                raise DatasetError(f"'{path}' is empty: write one class name a line")
            return names
        return yolo_names_from_yaml(read_yaml(path), path)
    return None


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML file, or DatasetError."""
    import yaml  # PyYAML: only the YOLO layouts need it

    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise DatasetError(f"'{path}' is not valid YAML: {error}") from error
    if not isinstance(content, dict):
        raise DatasetError(f"'{path}' must hold a YAML mapping (names:, train:, val:), got {type(content).__name__}")
    return content


def yolo_names_from_yaml(content: dict[str, Any], path: Path) -> list[str]:
    """The `names:` of a data.yaml: a list, or a dict {0: name, 1: name, ...} with indices 0..C-1."""
    names = content.get("names")
    if isinstance(names, dict):
        try:
            by_index = {int(key): name for key, name in names.items()}
        except (TypeError, ValueError):
            by_index = {}
        if sorted(by_index) != list(range(len(names))):
            keys = list(names)
            raise DatasetError(f"'{path}': `names:` keys must be the class indices 0..{len(names) - 1}, got {keys}")
        names = [by_index[index] for index in range(len(names))]
    if not isinstance(names, list) or not names:
        raise DatasetError(f"'{path}' has no `names:` list of classes (e.g. `names: [cat, dog]`)")
    names = [str(name) for name in names]
    number = content.get("nc")
    if number is not None and number != len(names):
        raise DatasetError(f"'{path}' says nc: {number} but lists {len(names)} names")
    return names
