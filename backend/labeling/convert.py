"""Label Studio task/annotation/prediction JSON ⇄ our boxes, with nothing dropped silently.

Two box conventions meet here, and only here (architecture: "Label Studio percent at its boundary only"):

* ours: xyxy in original-image pixels after EXIF orientation, x2/y2 being the right/bottom pixel edges
  (`backend.data.records`);
* Label Studio 1.23.2 (`"type": "rectanglelabels"` results, docs/label_studio.md): `value.x`, `value.y` (the top-left
  corner) and `value.width`, `value.height` in percent of the original image, whose size the result carries as
  `original_width`/`original_height`; `value.rotation` in degrees, clockwise, about that top-left corner. Browsers
  apply EXIF orientation before Label Studio measures the image, so its "original" size is our after-EXIF size.

Pixels from percent are computed as `percent * size / 100`, the arithmetic (and so the rounding) of Label Studio's
own COCO export (label_studio_sdk.converter `convert_to_coco`, which does not round), so that `to_coco_like` can be
compared with that export box for box. Image sizes are always `(width, height)` in this module.

Pulling (`ls_result_to_box`, `pick_annotation`, `task_boxes`): a rotated rectangle becomes its axis-aligned hull;
a box reaching outside the image is clipped and reported ("clipped", kept); everything else that cannot become a
box is a `Problem` with its reason: "unknown label", "no original size", "size mismatch", "outside image",
"degenerate", "malformed", "not a rectangle", plus "no image id" for a task without our image id.
Pushing (`boxes_to_ls_results`): Label Studio stores whatever it is sent (docs/label_studio.md: an unknown label,
a box at x=109 % were accepted), so boxes are validated and clipped here and what was dropped is counted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from numbers import Real
from typing import Any

import numpy as np

from backend.data.coco import CLIP_TOLERANCE, MIN_BOX_SIZE
from backend.labeling.config import CONTROL_NAME, OBJECT_NAME

# task["data"][IMAGE_ID_KEY] is our `images.id` (an int), set when a task is created or imported for an image.
IMAGE_ID_KEY = "yolodex_image_id"
RECTANGLE_TYPE = "rectanglelabels"

UNCERTAINTY_KINDS = ("least_confident", "margin")

_EARLIEST = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class LsBox:
    """One Label Studio rectangle converted to our convention.

    Attributes:
        box: x1, y1, x2, y2 in original-image pixels (after EXIF orientation), clipped to the image, float64.
        label: the label value as Label Studio has it.
        label_index: its class index 0..C-1.
        clipped: the box reached outside the image (by more than `CLIP_TOLERANCE` px) and was clipped.
        rotated: the rectangle had a rotation and `box` is the axis-aligned hull of it.
        result_id: the result's `id` (None for results created through the API without one).
    """

    box: tuple[float, float, float, float]
    label: str
    label_index: int
    clipped: bool = False
    rotated: bool = False
    result_id: str | None = None


@dataclass(frozen=True)
class Problem:
    """Something about a task or result the user should hear about.

    Attributes:
        reason: a short, stable key ("unknown label", "no original size", "clipped", ...) to count by.
        detail: one sentence saying what was found and what to do.
        result_id: the Label Studio result it concerns, when there is one.
        kept: True when the box was still kept (e.g. "clipped"), False when it was left out.
    """

    reason: str
    detail: str
    result_id: str | None = None
    kept: bool = False


BoxOrProblem = LsBox | Problem


@dataclass
class TaskBoxes:
    """The boxes of one Label Studio task, from its chosen annotation (see `pick_annotation`).

    Attributes:
        task_id: Label Studio's task id.
        image_id: our image id from `task["data"][IMAGE_ID_KEY]` (None when missing: see `problems`).
        annotation_id: the annotation used; None when the task has no usable annotation (not labeled yet). An
            annotation with no boxes is a labeled background image: `annotation_id` set, zero boxes.
        image_size: (width, height) the percent values were converted with, None when no box needed one.
        boxes: (N, 4) float32 xyxy in original-image pixels (after EXIF orientation), clipped to the image.
        labels: (N,) int64 class indices 0..C-1.
        problems: everything left out or changed, one entry per result (plus task-level ones).
    """

    task_id: int | None
    image_id: int | None
    annotation_id: int | None
    image_size: tuple[int, int] | None
    boxes: np.ndarray
    labels: np.ndarray
    problems: list[Problem] = field(default_factory=list)

    @property
    def labeled(self) -> bool:
        return self.annotation_id is not None


@dataclass
class LsResults:
    """Results ready to send to Label Studio as a prediction (or pre-annotation), and what was cleaned.

    Attributes:
        results: rectanglelabels result dicts (percent of the original image, see the module docstring).
        clipped: boxes that reached outside the image and were clipped before sending.
        dropped: boxes left out, by reason ("non-finite", "unknown label", "degenerate", "outside image").
    """

    results: list[dict[str, Any]]
    clipped: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


# ----------------------------------------------------------------------------------------------------------------
# Pull: Label Studio → our boxes
# ----------------------------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A finite float from a JSON number, else None (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _size(width: Any, height: Any) -> tuple[int, int] | None:
    """(width, height) when both are positive finite numbers, else None."""
    width_value, height_value = _number(width), _number(height)
    if width_value is None or height_value is None or width_value <= 0 or height_value <= 0:
        return None
    return round(width_value), round(height_value)


def rotated_hull(x: float, y: float, width: float, height: float, rotation_degrees: float) -> tuple[float, ...]:
    """The axis-aligned hull of a rectangle rotated about its top-left corner (docs/label_studio.md).

    Args:
        x, y: the top-left corner in pixels (the rotation centre).
        width, height: the rectangle's size in pixels before rotation.
        rotation_degrees: clockwise on screen (y points down), Label Studio's `value.rotation`.

    Returns:
        x1, y1, x2, y2 of the hull in the same pixel space.
    """
    theta = math.radians(rotation_degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    corners_x = (x, x + width * cos, x + width * cos - height * sin, x - height * sin)
    corners_y = (y, y + width * sin, y + width * sin + height * cos, y + height * cos)
    return min(corners_x), min(corners_y), max(corners_x), max(corners_y)


def ls_result_to_box(
    result: Mapping[str, Any], image_size: tuple[int, int] | None, class_names: Sequence[str]
) -> BoxOrProblem:
    """Converts one Label Studio result to an xyxy pixel box, or says why it cannot.

    Args:
        result: a result dict of an annotation or prediction: `value.x/y/width/height` in percent of the original
            image (top-left corner), `value.rotation` in degrees clockwise about that corner, `original_width` /
            `original_height` in pixels.
        image_size: (width, height) of our image after EXIF orientation, or None. Used when the result has no
            original size; when both exist and differ the box is a "size mismatch" problem, because percent
            values of a differently oriented image (EXIF) would land in the wrong place.
        class_names: the project's classes; a label not among them is an "unknown label" problem.

    Returns:
        An `LsBox` (xyxy in original-image pixels after EXIF orientation, clipped to the image; a rotated
        rectangle becomes its axis-aligned hull) or a `Problem` (box not kept).
    """
    result_id = result.get("id")
    result_id = None if result_id is None else str(result_id)
    rectangle = _labeled_rectangle(result, class_names, result_id)
    if isinstance(rectangle, Problem):
        return rectangle
    size = _result_size(result, image_size, result_id)
    if isinstance(size, Problem):
        return size
    label, (x_pct, y_pct, w_pct, h_pct, rotation) = rectangle
    width, height = size

    # Same arithmetic as Label Studio's COCO export: percent * size / 100.
    x = x_pct * width / 100
    y = y_pct * height / 100
    w = w_pct * width / 100
    h = h_pct * height / 100
    if w < MIN_BOX_SIZE or h < MIN_BOX_SIZE:
        return Problem("degenerate", f"box of {w:.2f}x{h:.2f} px is too small to train on", result_id)
    rotated = rotation % 360 != 0
    x1, y1, x2, y2 = rotated_hull(x, y, w, h, rotation) if rotated else (x, y, x + w, y + h)
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        return Problem(
            "outside image",
            f"box [{x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}] lies outside the {width}x{height} image",
            result_id,
        )
    clipped_box = (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))
    if clipped_box[2] - clipped_box[0] < MIN_BOX_SIZE or clipped_box[3] - clipped_box[1] < MIN_BOX_SIZE:
        return Problem("degenerate", "less than 1 px of the box lies inside the image", result_id)
    clipped = max(abs(a - b) for a, b in zip(clipped_box, (x1, y1, x2, y2))) > CLIP_TOLERANCE
    return LsBox(clipped_box, label, class_names.index(label), clipped, rotated, result_id)


def _labeled_rectangle(
    result: Mapping[str, Any], class_names: Sequence[str], result_id: str | None
) -> tuple[str, tuple[float, float, float, float, float]] | Problem:
    """A rectangle result's label (one of `class_names`) and its x, y, width, height (percent of the original
    image) and rotation (degrees), or why it is not one."""
    result_type = result.get("type")
    if result_type != RECTANGLE_TYPE:
        return Problem("not a rectangle", f"result of type {result_type!r} is not a labeled rectangle", result_id)
    value = result.get("value")
    if not isinstance(value, Mapping):
        return Problem("malformed", "rectangle result without a 'value' object", result_id)
    labels = value.get(RECTANGLE_TYPE)
    if not isinstance(labels, list) or not labels:
        return Problem("malformed", "rectangle without a label: choose a label for it in Label Studio", result_id)
    label = str(labels[0])
    if label not in class_names:
        return Problem(
            "unknown label",
            f"label {label!r} is not a class of this project ({', '.join(class_names)}): add the class or relabel "
            "the box",
            result_id,
        )
    x_pct, y_pct, w_pct, h_pct = (_number(value.get(key)) for key in ("x", "y", "width", "height"))
    rotation = _number(value.get("rotation", 0) or 0)
    if x_pct is None or y_pct is None or w_pct is None or h_pct is None or rotation is None:
        return Problem("malformed", f"rectangle with missing or non-finite coordinates: {dict(value)!r}", result_id)
    return label, (x_pct, y_pct, w_pct, h_pct, rotation)


def _result_size(
    result: Mapping[str, Any], image_size: tuple[int, int] | None, result_id: str | None
) -> tuple[int, int] | Problem:
    """The (width, height) in pixels a result's percent values refer to: its original size, else our image's;
    a Problem when they differ (see `ls_result_to_box`) or neither is known."""
    original_size = _size(result.get("original_width"), result.get("original_height"))
    if original_size is not None and image_size is not None and tuple(image_size) != original_size:
        return Problem(
            "size mismatch",
            f"Label Studio measured the image as {original_size[0]}x{original_size[1]} but it is "
            f"{image_size[0]}x{image_size[1]} here (EXIF orientation, or a changed file?): check the image",
            result_id,
        )
    if original_size is not None:
        return original_size
    if image_size is None:
        return Problem(
            "no original size",
            "result has no original_width/original_height and the image size is unknown: pass the image size",
            result_id,
        )
    return image_size[0], image_size[1]


def _timestamp(value: Any) -> datetime:
    """An ISO timestamp as an aware datetime (naive ones taken as UTC); missing or unreadable → the earliest."""
    if not isinstance(value, str):
        return _EARLIEST
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return _EARLIEST
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _sortable_id(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def pick_annotation(task: Mapping[str, Any]) -> dict[str, Any] | None:
    """The annotation of a task whose boxes count: the latest completed, not cancelled one.

    Cancelled ("skipped") annotations (`was_cancelled`, or the older `skipped`) are excluded. Of the rest, the one
    with the latest `updated_at` wins (an edit makes an annotation current), ties broken by the larger `id` (the
    later created). Label Studio keeps drafts outside `annotations`, so every annotation listed is submitted.

    Returns:
        The annotation dict, or None when the task has none left (not labeled yet).
    """
    candidates: list[Mapping[str, Any]] = [
        annotation
        for annotation in task.get("annotations") or []
        if isinstance(annotation, Mapping) and not annotation.get("was_cancelled") and not annotation.get("skipped")
    ]
    if not candidates:
        return None
    latest = max(candidates, key=lambda item: (_timestamp(item.get("updated_at")), _sortable_id(item.get("id"))))
    return dict(latest)


def _task_image_id(task: Mapping[str, Any]) -> int | None:
    data = task.get("data")
    raw = data.get(IMAGE_ID_KEY) if isinstance(data, Mapping) else None
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().isdigit():
        return int(raw)
    return None


def _convert_task(
    task: Mapping[str, Any], class_names: Sequence[str], image_size: tuple[int, int] | None
) -> tuple[dict[str, Any] | None, list[LsBox], list[Problem], tuple[int, int] | None]:
    """(chosen annotation, kept boxes, problems, size used) of one task; shared by `task_boxes`/`to_coco_like`."""
    annotation = pick_annotation(task)
    kept: list[LsBox] = []
    problems: list[Problem] = []
    size_used: tuple[int, int] | None = None
    results: list[Any] = []
    if annotation is not None:
        raw_results = annotation.get("result")
        if isinstance(raw_results, list):
            results = raw_results
        else:
            problems.append(Problem("malformed", f"annotation {annotation.get('id')} has no result list"))
    for result in results:
        if not isinstance(result, Mapping):
            problems.append(Problem("malformed", f"result {result!r} is not an object"))
            continue
        converted = ls_result_to_box(result, image_size, class_names)
        if isinstance(converted, Problem):
            problems.append(converted)
            continue
        kept.append(converted)
        size_used = _size(result.get("original_width"), result.get("original_height")) or image_size
        if converted.clipped:
            problems.append(
                Problem("clipped", "box reached outside the image and was clipped to it", converted.result_id, True)
            )
        if len(result["value"][RECTANGLE_TYPE]) > 1:
            problems.append(
                Problem(
                    "several labels",
                    f"box has labels {result['value'][RECTANGLE_TYPE]!r}; the first one was used",
                    converted.result_id,
                    True,
                )
            )
    return annotation, kept, problems, size_used


def task_boxes(
    task: Mapping[str, Any], class_names: Sequence[str], image_size: tuple[int, int] | None = None
) -> TaskBoxes:
    """The boxes of one Label Studio task (export or API JSON), from its latest completed annotation.

    Args:
        task: `{"id", "data": {..., IMAGE_ID_KEY: our image id}, "annotations": [...]}` as Label Studio 1.23.2
            returns it; results in percent of the original image (see the module docstring).
        class_names: the project's classes in class-index order.
        image_size: (width, height) of our image after EXIF orientation, when known: used for results without an
            original size and checked against those with one.

    Returns:
        `TaskBoxes` with xyxy boxes in original-image pixels (after EXIF orientation) and every problem found;
        nothing is dropped without a `Problem`.
    """
    annotation, kept, problems, size_used = _convert_task(task, class_names, image_size)
    image_id = _task_image_id(task)
    if image_id is None:
        problems.insert(
            0,
            Problem("no image id", f"task {task.get('id')} has no data.{IMAGE_ID_KEY}: it was not created by a sync"),
        )
    task_id = task.get("id")
    annotation_id = None if annotation is None else annotation.get("id")
    return TaskBoxes(
        task_id=task_id if isinstance(task_id, int) else None,
        image_id=image_id,
        # A task whose chosen annotation has no id (hand-made JSON) is still labeled: use -1 rather than None.
        annotation_id=None if annotation is None else (annotation_id if isinstance(annotation_id, int) else -1),
        image_size=size_used,
        boxes=np.asarray([item.box for item in kept], dtype=np.float32).reshape(-1, 4),
        labels=np.asarray([item.label_index for item in kept], dtype=np.int64).reshape(-1),
        problems=problems,
    )


def to_coco_like(tasks: Iterable[Mapping[str, Any]], class_names: Sequence[str]) -> dict[int, dict[str, Any]]:
    """Our conversion of a project, shaped for a box-for-box comparison with Label Studio's COCO export.

    Label Studio's COCO export (SDK converter) differs from this in ways a comparison must allow for: it numbers
    images 0.. in export order (match by file name or order, not by id); it writes one image entry per
    non-cancelled annotation, newest `created_at` first, where we keep only the latest (so compare tasks with one
    annotation, or LS's first entry of a task); it neither clips nor drops boxes (ours are clipped and problems are
    left out); it computes the hull of a rotated box in percent space, which equals ours only for square images;
    and it adds unknown labels as new categories where we report them. It does not round: bboxes are floats
    `percent * size / 100`, as here.

    Args:
        tasks: Label Studio tasks (JSON export or API), results in percent of the original image.
        class_names: the project's classes.

    Returns:
        {task id: {"image_id": our id or None, "annotation_id": id or None, "width", "height" (None if unknown),
        "boxes": [(category name, [x, y, w, h] in original-image pixels, float)], "problems": [Problem, ...]}}.
    """
    converted: dict[int, dict[str, Any]] = {}
    for task in tasks:
        annotation, kept, problems, size_used = _convert_task(task, class_names, None)
        boxes = [
            (item.label, [item.box[0], item.box[1], item.box[2] - item.box[0], item.box[3] - item.box[1]])
            for item in kept
        ]
        task_id = task.get("id")
        if not isinstance(task_id, int):
            raise ValueError(f"a Label Studio task without an integer id: {task_id!r}")
        converted[task_id] = {
            "image_id": _task_image_id(task),
            "annotation_id": None if annotation is None else annotation.get("id"),
            "width": None if size_used is None else size_used[0],
            "height": None if size_used is None else size_used[1],
            "boxes": boxes,
            "problems": problems,
        }
    return converted


# ----------------------------------------------------------------------------------------------------------------
# Push: our boxes → Label Studio predictions
# ----------------------------------------------------------------------------------------------------------------


def boxes_to_ls_results(
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray | None,
    image_size: tuple[int, int],
    class_names: Sequence[str],
    from_name: str = CONTROL_NAME,
    to_name: str = OBJECT_NAME,
    id_prefix: str = "yolodex",
) -> LsResults:
    """Turns detections into Label Studio rectangle results, cleaned first because Label Studio checks nothing.

    Args:
        boxes: (N, 4) xyxy in original-image pixels (after EXIF orientation), e.g. `postprocess_to_original`.
        labels: (N,) class indices 0..C-1.
        scores: (N,) confidences, or None (pre-annotations without scores).
        image_size: (width, height) of the image after EXIF orientation: the percent base and the clip bounds.
        class_names: the project's classes (the label values in the config).
        from_name: the RectangleLabels control name in the project's config.
        to_name: the Image object name in the project's config.
        id_prefix: result ids are `f"{id_prefix}-{k}"`, k = 0.. over the kept boxes, so unique within the list.

    Returns:
        `LsResults`: results with `value.x/y/width/height` in percent of the original image, rotation 0,
        `original_width/original_height`, and `score` when scores were given; plus what was clipped and dropped.
        A box with a non-finite coordinate or score is dropped as "non-finite", a label outside 0..C-1 as "unknown
        label", a box with x2 < x1 or y2 < y1 or under 1 px inside the image as "degenerate", one entirely outside
        as "outside image"; a box reaching outside is clipped.

    Raises:
        ValueError: arrays of different lengths or an image size that is not two positive integers.
    """
    boxes_array, labels_array, scores_array, (width, height) = _checked_detections(boxes, labels, scores, image_size)
    cleaned = LsResults(results=[])
    for index, (x1, y1, x2, y2) in enumerate(boxes_array.tolist()):
        score = None if scores_array is None else float(scores_array[index])
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or (score is not None and not math.isfinite(score)):
            cleaned.drop("non-finite")
            continue
        label = labels_array[index]
        if not isinstance(label, (int, np.integer)) or not 0 <= int(label) < len(class_names):
            cleaned.drop("unknown label")
            continue
        if x2 < x1 or y2 < y1:
            cleaned.drop("degenerate")
            continue
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            cleaned.drop("outside image")
            continue
        box = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
        if box[2] - box[0] < MIN_BOX_SIZE or box[3] - box[1] < MIN_BOX_SIZE:
            cleaned.drop("degenerate")
            continue
        if max(abs(a - b) for a, b in zip(box, (x1, y1, x2, y2))) > CLIP_TOLERANCE:
            cleaned.clipped += 1
        result_id = f"{id_prefix}-{len(cleaned.results)}"
        result = _rectangle_result(result_id, box, (width, height), class_names[int(label)], from_name, to_name)
        if score is not None:
            result["score"] = score
        cleaned.results.append(result)
    return cleaned


def _checked_detections(
    boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray | None, image_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[int, int]]:
    """`boxes_to_ls_results`' arrays as (N, 4) float64, (N,), (N,) float64 or None, and its image size, checked."""
    boxes_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels_array = np.asarray(labels).reshape(-1)
    scores_array = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(labels_array) != len(boxes_array) or (scores_array is not None and len(scores_array) != len(boxes_array)):
        raise ValueError(
            f"{len(boxes_array)} boxes, {len(labels_array)} labels and "
            f"{'no' if scores_array is None else len(scores_array)} scores: give one label (and score) per box"
        )
    size = _size(*image_size) if len(image_size) == 2 else None
    if size is None or tuple(image_size) != size:
        raise ValueError(f"image size {image_size!r} must be (width, height) in whole pixels, both positive")
    return boxes_array, labels_array, scores_array, size


def _rectangle_result(
    result_id: str,
    box: tuple[float, float, float, float],
    size: tuple[int, int],
    label: str,
    from_name: str,
    to_name: str,
) -> dict[str, Any]:
    """One rectanglelabels result of `box` (xyxy original-image pixels, inside the image of `size` (width,
    height)): value in percent of the original image, rotation 0."""
    (x1, y1, x2, y2), (width, height) = box, size
    return {
        "id": result_id,
        "from_name": from_name,
        "to_name": to_name,
        "type": RECTANGLE_TYPE,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "x": 100 * x1 / width,
            "y": 100 * y1 / height,
            "width": 100 * (x2 - x1) / width,
            "height": 100 * (y2 - y1) / height,
            "rotation": 0,
            RECTANGLE_TYPE: [label],
        },
    }


def task_uncertainty(scores: Sequence[float] | np.ndarray, kind: str = "least_confident") -> float:
    """How unsure the model is about an image, in [0, 1]; label the highest first.

    Kinds:
        * "least_confident": 1 - the highest detection score.
        * "margin": 1 - the smallest margin over the detections. With (N, C) per-class scores a box's margin is
          its top class score minus the runner-up; with (N,) scores (one per kept detection, as
          `backend.processing` returns them) each box is the two-way choice object vs nothing, margin |2s - 1|.
          (The gap between two *different* boxes' scores says nothing about either box, so it is not used.)

    An image with no detection counts as 1.0, the most uncertain: that is where missed objects hide (a young model
    misses far more than it mislabels), and if it is truly background the user confirms it with one click.

    Args:
        scores: (N,) per-detection scores, or (N, C) per-class scores for "margin"; values in [0, 1].
        kind: "least_confident" or "margin".
    """
    if kind not in UNCERTAINTY_KINDS:
        raise ValueError(f"unknown uncertainty kind {kind!r}: use one of {UNCERTAINTY_KINDS}")
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        return 1.0
    if not np.isfinite(values).all():
        raise ValueError("scores contain NaN or infinity: check the model outputs")
    if kind == "least_confident":
        return float(np.clip(1.0 - values.max(), 0.0, 1.0))
    if values.ndim == 1:
        margins = np.abs(2.0 * values - 1.0)
    elif values.ndim == 2 and values.shape[1] >= 2:
        ordered = np.sort(values, axis=1)
        margins = ordered[:, -1] - ordered[:, -2]
    else:
        raise ValueError(f"margin needs (N,) or (N, C>=2) scores, got shape {values.shape}")
    return float(np.clip(1.0 - margins.min(), 0.0, 1.0))
