"""COCO detection JSON ⇄ `DetectionSet`, and the per-image and per-box checks every reader shares.

COCO boxes are `[x, y, w, h]` in pixels of the image *as displayed* (EXIF orientation applied, as
`backend.processing.load_image` returns it). They become xyxy original-image pixels on reading and go back to
`[x, y, w, h]` only when writing. Category ids (any ints, usually from 1) map to contiguous class indices 0..C-1
sorted by category id; `DetectionSet.category_ids` keeps the originals so that writing restores them.

What happens to bad records (counted in `DetectionSet.report`, never a crash):
    * an image file that is missing, unreadable or not an image: skipped (`images_skipped`, with the reason),
      its annotations dropped as "image skipped";
    * a box reaching outside the image: clipped to it (`boxes_clipped`);
    * a box with NaN/infinite/negative size, or under 1 px wide or tall after clipping: dropped, "degenerate";
    * a bbox that is not 4 numbers, or an annotation without bbox/category_id/image_id: dropped, "malformed";
    * `iscrowd: 1`: dropped, "crowd" (a crowd region marks many objects at once; we train on single objects);
    * an annotation whose `image_id` names no image: dropped, "orphan".
What stops loading with a `DatasetError`: a missing or malformed JSON file, missing "images"/"annotations"/
"categories", a category id used by an annotation but not declared, duplicate category ids or names, and (when
`class_names` is given) categories whose names differ from it.

An annotation file whose images are all unusable gives an *empty* set (with the reasons in its report) rather
than an error: whether that is fatal is the caller's choice (`load_dataset` refuses an empty train split).

The JSON is read here rather than through `pycocotools.coco.COCO` (which the evaluation uses): COCO() indexes a file
as it is, with no check of image files, box bounds, crowd flags or orphans, and stops on the first malformed entry
with an assert or KeyError, where a user's export should lose one annotation and say why. The files written
(`write_coco`) are plain COCO that COCO() loads (tested).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from backend.data.records import DatasetError, DetectionSet, ImageRecord, LoadReport
from backend.files import atomic_write_text

# File suffixes we treat as images when listing folders (YOLO layouts); Pillow reads all of them.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Boxes narrower or shorter than this (in pixels, after clipping) carry no learnable object.
MIN_BOX_SIZE = 1.0
# Coordinates converted from normalised values or rounded JSON overshoot the image edge by float round-off;
# such excursions are clipped without being reported as "clipped" boxes.
CLIP_TOLERANCE = 0.01
# EXIF orientations 5-8 rotate by 90°, so the displayed width is the stored height.
_ORIENTATIONS_SWAPPING_SIZE = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------------------------------------------
# Shared checks (the YOLO reader uses these too)
# ----------------------------------------------------------------------------------------------------------------


def probe_image(path: Path) -> tuple[int, int]:
    """Checks that an image file decodes and returns its size as displayed.

    The pixels are decoded, not just the header, so truncated and corrupt files are caught here rather than in
    the middle of training. JPEGs are decoded at 1/8 scale (libjpeg DCT scaling via Pillow's `draft`): every
    entropy-coded byte is still read, so truncation is still detected, at about 60% of a full decode's cost.

    Args:
        path: the image file.

    Returns:
        (width, height) in pixels after EXIF orientation, i.e. the size `backend.processing.load_image` returns.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded as an image; the message says why.
    """
    if not path.is_file():
        raise FileNotFoundError("file not found" if not path.exists() else "not a file")
    try:
        with Image.open(path) as image:
            width, height = image.size  # the stored size: draft() below shrinks image.size
            if image.format == "JPEG":
                image.draft(image.mode, (1, 1))
            image.load()
            orientation = _exif_orientation(image)
    except UnidentifiedImageError as error:
        raise ValueError("not an image Pillow can read (cannot identify image file)") from error
    except _DECODE_ERRORS as error:
        raise ValueError(f"cannot decode the image ({error or type(error).__name__})") from error
    if width <= 0 or height <= 0:
        raise ValueError(f"the image has no pixels ({width}x{height})")
    if orientation in _ORIENTATIONS_SWAPPING_SIZE:
        return height, width
    return width, height


def _exif_orientation(image: Image.Image) -> int:
    # load_image ignores unreadable EXIF (keeping the stored orientation); do the same so sizes agree.
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:
        return 1


def clean_box(box_xyxy: Sequence[float], width: int, height: int, report: LoadReport) -> list[float] | None:
    """Clips one box to the image and drops it if nothing usable is left, counting both in `report`.

    Args:
        box_xyxy: x1, y1, x2, y2 in original-image pixels (may reach outside the image).
        width: image width in pixels (after EXIF orientation).
        height: image height in pixels (after EXIF orientation).
        report: receives `boxes_clipped` and `boxes_dropped["degenerate"]`.

    Returns:
        The clipped xyxy box in original-image pixels, or None when it was dropped.
    """
    x1, y1, x2, y2 = (float(value) for value in box_xyxy)
    if not all(math.isfinite(value) for value in (x1, y1, x2, y2)) or x2 < x1 or y2 < y1:
        report.drop_box("degenerate")
        return None
    clipped = [min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height)]
    if clipped[2] - clipped[0] < MIN_BOX_SIZE or clipped[3] - clipped[1] < MIN_BOX_SIZE:
        report.drop_box("degenerate")
        return None
    if max(abs(a - b) for a, b in zip(clipped, (x1, y1, x2, y2))) > CLIP_TOLERANCE:
        report.boxes_clipped += 1
    return clipped


def finish_report(records: list[ImageRecord], report: LoadReport, source: Path) -> None:
    """Fills the kept-image counts of `report` and warns when nothing usable is left."""
    report.images = len(records)
    report.boxes = sum(len(record.boxes) for record in records)
    report.background_images = sum(1 for record in records if len(record.boxes) == 0)
    if not records:
        report.warnings.append(f"{source} has no usable images ({len(report.images_skipped)} skipped)")


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def load_coco(
    annotation_path: str | Path, images_dir: str | Path, *, class_names: Sequence[str] | None = None
) -> DetectionSet:
    """Reads a COCO detection JSON and checks every image it lists.

    Args:
        annotation_path: the COCO JSON ("images", "annotations", "categories").
        images_dir: the folder that `file_name`s are relative to.
        class_names: the class list this split must have (the train split's, when reading val/test). Labels then
            index this list, whatever the order of category ids in this file.

    Returns:
        The images kept, in the JSON's order, with boxes as (N, 4) xyxy in original-image pixels (after EXIF
        orientation). May be empty; `report` says why (see the module docstring for every rule).

    Raises:
        DatasetError: the file is missing or malformed, a category is undeclared or duplicated, or the category
            names differ from `class_names`.
    """
    annotation_path, images_dir = Path(annotation_path), Path(images_dir)
    content = _read_json(annotation_path)
    report = LoadReport()
    names, category_ids = _read_categories(content["categories"], annotation_path, class_names, report)
    label_of_category = {category_id: label for label, category_id in enumerate(category_ids)}

    images = _read_image_entries(content["images"], report)
    boxes_by_image = _read_annotations(content["annotations"], annotation_path, label_of_category, images, report)

    records: list[ImageRecord] = []
    for image_id, entry in images.items():
        file_name = entry["file_name"]
        raw_boxes = boxes_by_image.get(image_id, [])
        try:
            width, height = probe_image(images_dir / file_name)
        except (FileNotFoundError, ValueError) as error:
            report.images_skipped.append((file_name, str(error)))
            for _ in raw_boxes:
                report.drop_box("image skipped")
            continue
        _check_recorded_size(entry, width, height, report)
        boxes, labels = [], []
        for box_xyxy, label in raw_boxes:
            kept = clean_box(box_xyxy, width, height, report)
            if kept is not None:
                boxes.append(kept)
                labels.append(label)
        records.append(
            ImageRecord(images_dir / file_name, image_id, width, height, np.asarray(boxes), np.asarray(labels))
        )

    finish_report(records, report, annotation_path)
    return DetectionSet(records, names, category_ids, report, source=annotation_path)


def _read_json(annotation_path: Path) -> dict[str, Any]:
    if not annotation_path.is_file():
        raise DatasetError(f"COCO annotation file not found: '{annotation_path}'")
    try:
        content = json.loads(annotation_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"'{annotation_path}' is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
            "re-export the annotations as COCO JSON"
        ) from error
    except UnicodeDecodeError as error:
        raise DatasetError(f"'{annotation_path}' is not UTF-8 text: is it really a COCO JSON file?") from error
    if not isinstance(content, dict):
        raise DatasetError(f"'{annotation_path}' holds a JSON {type(content).__name__}, not a COCO object")
    missing = [key for key in ("images", "annotations", "categories") if key not in content]
    if missing:
        raise DatasetError(
            f"'{annotation_path}' is not a COCO detection file: it has no {', '.join(repr(k) for k in missing)} "
            "(a COCO file has 'images', 'annotations' and 'categories' lists)"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(content[key], list):
            raise DatasetError(f"'{annotation_path}': '{key}' must be a list, got {type(content[key]).__name__}")
    return content


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_categories(
    categories: list[Any], annotation_path: Path, class_names: Sequence[str] | None, report: LoadReport
) -> tuple[list[str], list[int]]:
    """Returns (class names, category ids), one per class index: sorted by category id, or in the order of
    `class_names` when given."""
    name_by_id: dict[int, str] = {}
    for position, category in enumerate(categories):
        if (
            not isinstance(category, dict)
            or not _is_int(category.get("id"))
            or not isinstance(category.get("name"), str)
        ):
            raise DatasetError(
                f"'{annotation_path}': categories[{position}] must have an integer 'id' and a string 'name', "
                f"got {category!r}"
            )
        if category["id"] in name_by_id:
            raise DatasetError(f"'{annotation_path}': category id {category['id']} is declared twice")
        name_by_id[category["id"]] = category["name"]
    category_ids = sorted(name_by_id)
    names = [name_by_id[category_id] for category_id in category_ids]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DatasetError(f"'{annotation_path}': category names {duplicates} are used by more than one id")
    if class_names is None:
        return names, category_ids

    expected = list(class_names)
    if set(names) != set(expected):
        missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
        raise DatasetError(
            f"'{annotation_path}' has different classes from the train split: missing {missing}, extra {extra}; "
            "every split must declare the same categories"
        )
    if names != expected:
        report.warnings.append(
            f"categories are ordered {names} here but {expected} in the train split; labels follow the train split"
        )
    id_by_name = {name: category_id for category_id, name in name_by_id.items()}
    return expected, [id_by_name[name] for name in expected]


def _read_image_entries(entries: list[Any], report: LoadReport) -> dict[int, dict[str, Any]]:
    """Returns the usable image entries by id, in file order; the others go to `report.images_skipped`."""
    images: dict[int, dict[str, Any]] = {}
    for position, entry in enumerate(entries):
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        if not isinstance(file_name, str) or not file_name:
            report.images_skipped.append((f"images[{position}]", "the entry has no 'file_name'"))
            continue
        image_id = entry.get("id")
        if not _is_int(image_id):
            report.images_skipped.append((file_name, f"the image id must be an integer, got {image_id!r}"))
        elif image_id in images:
            first = images[image_id]["file_name"]
            report.images_skipped.append((file_name, f"image id {image_id} is already used by '{first}'"))
        else:
            images[image_id] = entry
    return images


def _read_annotations(
    annotations: list[Any],
    annotation_path: Path,
    label_of_category: dict[int, int],
    images: dict[int, dict[str, Any]],
    report: LoadReport,
) -> dict[int, list[tuple[list[float], int]]]:
    """Returns the unclipped boxes ((x1, y1, x2, y2) original-image pixels, label) of each image id."""
    boxes_by_image: dict[int, list[tuple[list[float], int]]] = {}
    for position, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            report.drop_box("malformed")
            continue
        annotation_name = f"annotation id {annotation['id']}" if "id" in annotation else f"annotations[{position}]"
        category_id = annotation.get("category_id")
        if category_id is not None and (not _is_int(category_id) or category_id not in label_of_category):
            raise DatasetError(
                f"'{annotation_path}': {annotation_name} uses category_id {category_id!r}, which is not among the "
                f"declared categories {sorted(label_of_category)}; add it to 'categories' or fix the annotation"
            )
        bbox = annotation.get("bbox")
        if (
            category_id is None
            or not _is_int(annotation.get("image_id"))
            or not isinstance(bbox, list | tuple)
            or len(bbox) != 4
            or not all(isinstance(value, Real) and not isinstance(value, bool) for value in bbox)
        ):
            report.drop_box("malformed")
        elif annotation["image_id"] not in images:
            report.drop_box("orphan")
        elif annotation.get("iscrowd", 0):
            report.drop_box("crowd")
        else:
            x, y, w, h = (float(value) for value in bbox)
            box_xyxy = [x, y, x + w, y + h]
            boxes_by_image.setdefault(annotation["image_id"], []).append((box_xyxy, label_of_category[category_id]))
    return boxes_by_image


def _check_recorded_size(entry: dict[str, Any], width: int, height: int, report: LoadReport) -> None:
    recorded = (entry.get("width"), entry.get("height"))
    if recorded == (None, None) or recorded == (width, height):
        return
    message = (
        f"'{entry['file_name']}': the JSON says {recorded[0]}x{recorded[1]} but the image is {width}x{height} "
        "(as displayed); using the file's size"
    )
    if recorded == (height, width):
        message += " (the JSON probably ignored the EXIF orientation; boxes are taken to be in the displayed frame)"
    report.warnings.append(message)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def write_coco(dataset: DetectionSet, path: str | Path, *, images_root: str | Path | None = None) -> Path:
    """Writes a split as a COCO detection JSON, atomically (a reader never sees half a file).

    Boxes go from xyxy original-image pixels to COCO `[x, y, w, h]` pixels, rounded to 1/1000 px. Category ids
    come from `dataset.category_ids`; annotation ids are numbered from 1; `iscrowd` is 0.

    Args:
        dataset: the split to write.
        path: the JSON file to (over)write.
        images_root: `file_name`s are written relative to this folder; by default, just the image's file name.

    Returns:
        The path written.

    Raises:
        ValueError: an image is not inside `images_root`.
    """
    path = Path(path)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for record in dataset.records:
        if images_root is None:
            file_name = record.path.name
        else:
            try:
                file_name = record.path.relative_to(images_root).as_posix()
            except ValueError as error:
                raise ValueError(f"'{record.path}' is not inside images_root '{images_root}'") from error
        images.append(
            {"id": int(record.image_id), "file_name": file_name, "width": record.width, "height": record.height}
        )
        for box, label in zip(record.boxes.tolist(), record.labels.tolist()):
            x, y = round(box[0], 3), round(box[1], 3)
            w, h = round(box[2] - box[0], 3), round(box[3] - box[1], 3)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(record.image_id),
                    "category_id": int(dataset.category_ids[label]),
                    "bbox": [x, y, w, h],
                    "area": round(w * h, 3),
                    "iscrowd": 0,
                }
            )
    categories = [
        {"id": int(category_id), "name": name, "supercategory": "object"}
        for category_id, name in zip(dataset.category_ids, dataset.class_names)
    ]
    # pycocotools' loadRes copies "info"/"licenses" in some versions; harmless to always have them.
    content = {
        "info": {"description": "written by yolodex"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    atomic_write_text(path, json.dumps(content, indent=1, ensure_ascii=False) + "\n")
    return path
