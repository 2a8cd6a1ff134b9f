"""What the Evaluate page shows, read from an evaluation dict (`EvaluationResult.to_dict()`, i.e. an `eval.json`):
the metric table, per-class AP, PR curves ready to plot, the confusion matrix with its labels, and a flat, paged
list of errors drawn on their images, each linked to its Label Studio task.

Boxes are xyxy in original-image pixels (after EXIF orientation) everywhere, as in the evaluation; `draw_error`
scales them to the thumbnail it draws.

Image ids: a frozen dataset version (`backend.store.versions.freeze_version`) writes each image under its store id,
as the COCO image id AND as the file-name prefix `<id>_<stem>.<ext>`. An error's image is taken to be our `Image`
row only when both agree (`store_image_id`): a dataset folder from elsewhere may reuse small ids, and linking its
errors to unrelated Label Studio tasks would send the user to fix the wrong image.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from backend.processing import load_image
from backend.runs import RunFolder

ERROR_KINDS = ("false_positive", "miss", "wrong_class")
ERROR_LABELS = {"false_positive": "false positive", "miss": "miss", "wrong_class": "wrong class"}
BACKGROUND = "background"
# (metric key, what it means): the rows of the metric table, in pycocotools' summary order.
METRICS = (
    ("mAP50-95", "AP averaged over IoU 0.50:0.95 (the COCO headline)"),
    ("mAP50", "AP at IoU 0.50"),
    ("mAP75", "AP at IoU 0.75"),
    ("mAP_small", "AP on small objects (area < 32²)"),
    ("mAP_medium", "AP on medium objects (32² to 96²)"),
    ("mAP_large", "AP on large objects (area > 96²)"),
    ("AR1", "recall with 1 detection per image"),
    ("AR10", "recall with 10 detections per image"),
    ("AR100", "recall with 100 detections per image"),
    ("AR300", "recall with 300 detections per image"),
    ("recall", "share of the objects found with their right class, at the confusion matrix's score and IoU"),
)
BOX_COLOURS = {"prediction": (230, 40, 40), "ground_truth": (30, 170, 60), "miss": (40, 110, 240)}


def metric_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """The metric table: {"metric", "meaning", "value"} per metric present, value None where undefined."""
    metrics = evaluation.get("metrics") or {}
    known = [key for key, _ in METRICS]
    rows = [{"metric": key, "meaning": meaning, "value": metrics[key]} for key, meaning in METRICS if key in metrics]
    rows += [{"metric": key, "meaning": "", "value": value} for key, value in metrics.items() if key not in known]
    return rows


def per_class_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per class: class, boxes (ground truth), predictions, AP50-95, AP50, AP75 (None without ground truth)."""
    return [
        {
            "class": item["class_name"],
            "boxes": item["gt_count"],
            "predictions": item["prediction_count"],
            "AP50-95": item["AP50-95"],
            "AP50": item["AP50"],
            "AP75": item["AP75"],
        }
        for item in evaluation.get("per_class") or []
    ]


# ----------------------------------------------------------------------------------------------------------------
# PR curves
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PRCurve:
    """One precision-recall curve at one IoU threshold, for plotting.

    Attributes:
        name: the class name, or "all classes" for the mean.
        recall: pycocotools' 101 recall points, up to the highest recall reached (empty when none is).
        precision: interpolated precision at each (the best precision at this recall or higher).
        ap: the area as pycocotools computes it: the mean precision over all 101 points, 0 past the reach.
        operating_point: (recall, precision) of the last point whose score threshold is ≥ `score_threshold`, what
            the confusion matrix counts; None when no point reaches it or the scores are unknown.
    """

    name: str
    recall: list[float]
    precision: list[float]
    ap: float
    operating_point: tuple[float, float] | None = None


def pr_curves(evaluation: dict[str, Any], *, with_mean: bool = True) -> list[PRCurve]:
    """The per-class PR curves of an evaluation (IoU 0.5, as stored in `pr_curves`), classes without ground truth
    left out, and (with `with_mean`) their mean over classes, whose area is mAP50.

    pycocotools keeps the interpolated precision at 101 recall points: 0 past the highest recall a class reaches,
    -1 (None in the JSON) throughout for a class without ground truth. The zero tail is dropped here (the curve ends
    where the detector stops finding objects) but still counts in `ap`, as in pycocotools.
    """
    threshold = evaluation.get("score_threshold")
    curves: list[PRCurve] = []
    full: list[list[float]] = []
    recall_points: list[float] = []
    for item in evaluation.get("pr_curves") or []:
        precision = item["precision"]
        if all(value is None for value in precision):
            continue  # no ground truth of this class: AP is undefined, there is no curve
        recall_points = item["recall"]
        full.append([value or 0.0 for value in precision])
        curves.append(_curve(item["class_name"], recall_points, full[-1], item.get("scores"), threshold))
    if with_mean and len(full) > 1:
        mean = [sum(column) / len(full) for column in zip(*full, strict=True)]
        curves.insert(0, _curve("all classes", recall_points, mean, None, None))
    return curves


def _curve(
    name: str,
    recall: Sequence[float],
    precision: Sequence[float],
    scores: Sequence[float | None] | None,
    threshold: float | None,
) -> PRCurve:
    """A curve from 101-point arrays: precision 0 past the reach, where interpolated precision cannot recover."""
    reach = max((index for index, value in enumerate(precision) if value > 0), default=-1)
    kept = list(range(reach + 1))
    area = sum(precision) / len(precision) if precision else 0.0
    operating = None
    if scores is not None and threshold is not None:
        # Recall grows as the score threshold falls: the last point still at or above the threshold is where the
        # confusion matrix's detector works.
        above = [index for index in kept if (score := scores[index]) is not None and score >= threshold]
        if above:
            operating = (float(recall[above[-1]]), float(precision[above[-1]]))
    return PRCurve(
        name=name,
        recall=[float(recall[index]) for index in kept],
        precision=[float(precision[index]) for index in kept],
        ap=float(area),
        operating_point=operating,
    )


# ----------------------------------------------------------------------------------------------------------------
# Confusion matrix
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ConfusionView:
    """The confusion matrix with its labels.

    Attributes:
        labels: the class names then "background"; rows are ground truth, columns predictions.
        counts: (C+1) x (C+1) counts; last row = false positives (nothing there), last column = misses.
        shares: each row divided by its total (what fraction of that class went where), 0 for an empty row.
        iou_threshold: IoU a prediction needed to match a box.
        score_threshold: lowest score counted as a prediction.
        totals: correct, wrong_class, false_positives, misses.
    """

    labels: list[str]
    counts: list[list[int]]
    shares: list[list[float]]
    iou_threshold: float
    score_threshold: float
    totals: dict[str, int]


def confusion_view(evaluation: dict[str, Any]) -> ConfusionView:
    """The evaluation's confusion matrix (rows ground truth, columns predicted, background last) with labels,
    row shares and totals."""
    labels = [*evaluation["class_names"], BACKGROUND]
    counts = [[int(value) for value in row] for row in evaluation["confusion_matrix"]]
    size = len(labels)
    if len(counts) != size or any(len(row) != size for row in counts):
        raise ValueError(f"the confusion matrix is not {size}x{size} for classes {labels[:-1]}; evaluate again")
    shares = [[value / sum(row) if sum(row) else 0.0 for value in row] for row in counts]
    classes = range(size - 1)
    totals = {
        "correct": sum(counts[index][index] for index in classes),
        "wrong_class": sum(counts[row][column] for row in classes for column in classes if row != column),
        "false_positives": sum(counts[-1][column] for column in classes),
        "misses": sum(counts[row][-1] for row in classes),
    }
    return ConfusionView(
        labels=labels,
        counts=counts,
        shares=shares,
        iou_threshold=float(evaluation.get("iou_threshold", 0.5)),
        score_threshold=float(evaluation.get("score_threshold", 0.0)),
        totals=totals,
    )


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorItem:
    """One error of the detector on one image.

    Attributes:
        kind: "false_positive" (a prediction on nothing), "miss" (a box nobody found) or "wrong_class" (a box found
            and called something else).
        image_id: the image id of the evaluated dataset.
        store_image_id: our `Image` id when the dataset is a frozen version of the store (see the module
            docstring), else None.
        path: the image file.
        box: xyxy original-image pixels: the prediction (false positive, wrong class) or the missed box.
        class_id: the predicted class (false positive, wrong class) or the missed box's class.
        score: the prediction's score; None for a miss.
        gt_box: for a wrong class, the ground-truth box it matched (xyxy original-image pixels).
        gt_class_id: for a wrong class, the true class.
    """

    kind: str
    image_id: int
    store_image_id: int | None
    path: str
    box: tuple[float, float, float, float]
    class_id: int
    score: float | None = None
    gt_box: tuple[float, float, float, float] | None = None
    gt_class_id: int | None = None


_STORE_FILE_NAME = re.compile(r"(\d+)_")


def store_image_id(path: str | Path, image_id: int) -> int | None:
    """Our `Image` id of an evaluated image: its COCO id when its file name starts with `<that id>_` (how
    `freeze_version` names a version's images), else None."""
    match = _STORE_FILE_NAME.match(Path(path).name)
    return image_id if match is not None and int(match.group(1)) == image_id else None


def error_items(evaluation: dict[str, Any], kinds: Iterable[str] = ERROR_KINDS) -> list[ErrorItem]:
    """Every error of the evaluation as one flat list, kind by kind in the order of `kinds`; within a kind, the
    most confident predictions first (the most misleading errors), misses in image order.

    Raises:
        ValueError: an unknown kind.
    """
    kinds = list(kinds)
    unknown = set(kinds) - set(ERROR_KINDS)
    if unknown:
        raise ValueError(f"unknown error kind {', '.join(sorted(unknown))}: use {', '.join(ERROR_KINDS)}")
    found: dict[str, list[ErrorItem]] = {kind: [] for kind in kinds}
    for image in evaluation.get("per_image") or []:
        common = {
            "image_id": int(image["image_id"]),
            "store_image_id": store_image_id(image["path"], int(image["image_id"])),
            "path": image["path"],
        }
        if "false_positive" in found:
            found["false_positive"] += [
                ErrorItem(
                    "false_positive", box=tuple(item["box"]), class_id=item["class_id"], score=item["score"], **common
                )
                for item in image.get("false_positives") or []
            ]
        if "miss" in found:
            found["miss"] += [
                ErrorItem("miss", box=tuple(item["box"]), class_id=item["class_id"], **common)
                for item in image.get("misses") or []
            ]
        if "wrong_class" in found:
            found["wrong_class"] += [
                ErrorItem(
                    "wrong_class",
                    box=tuple(item["box"]),
                    class_id=item["class_id"],
                    score=item["score"],
                    gt_box=tuple(item["gt_box"]),
                    gt_class_id=item["gt_class_id"],
                    **common,
                )
                for item in image.get("wrong_class") or []
            ]
    items: list[ErrorItem] = []
    for kind in kinds:
        # sorted() is stable: equal scores and misses keep the image order.
        items += sorted(found[kind], key=lambda item: -(item.score or 0.0))
    return items


def page_of(items: Sequence[Any], page: int, per_page: int) -> tuple[list[Any], int]:
    """Items of a 1-based page (clamped to the pages there are) and the number of pages (at least 1)."""
    if per_page < 1:
        raise ValueError(f"per_page must be at least 1, got {per_page}")
    pages = max(1, -(-len(items) // per_page))
    page = min(max(page, 1), pages)
    return list(items[(page - 1) * per_page : page * per_page]), pages


def describe_error(item: ErrorItem, class_names: Sequence[str]) -> str:
    """One line for an error: what was predicted or missed, and where."""

    def name(class_id: int | None) -> str:
        return class_names[class_id] if class_id is not None and 0 <= class_id < len(class_names) else f"#{class_id}"

    box = ", ".join(f"{value:.0f}" for value in item.box)
    image = Path(item.path).name
    if item.kind == "false_positive":
        return f"{image}: predicted {name(item.class_id)} ({item.score:.2f}) where there is no object, at [{box}]"
    if item.kind == "miss":
        return f"{image}: missed a {name(item.class_id)} at [{box}]"
    return f"{image}: a {name(item.gt_class_id)} called {name(item.class_id)} ({item.score:.2f}) at [{box}]"


def draw_error(item: ErrorItem, class_names: Sequence[str], max_side: int = 480) -> Image.Image:
    """The error's image (EXIF orientation applied, as the boxes are) scaled to fit `max_side`, with its boxes:
    predictions red (labelled above), the ground truth of a wrong class green (labelled below), a missed box blue.

    Raises:
        FileNotFoundError / backend.processing.ImageLoadError: the image cannot be read.
    """
    picture = Image.fromarray(load_image(item.path))
    scale = min(1.0, max_side / max(picture.size))
    if scale < 1.0:
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
    draw = ImageDraw.Draw(picture)
    width = max(2, round(max(picture.size) / 160))

    def box(xyxy: Sequence[float], colour: tuple[int, int, int], text: str, below: bool = False) -> None:
        corners = [value * scale for value in xyxy]
        draw.rectangle(corners, outline=colour, width=width)
        # A wrong-class prediction and its ground truth nearly coincide: their labels go above and below.
        top = min(corners[3] + 1, picture.height - 12) if below else max(0.0, corners[1] - 12)
        left = corners[0]
        text_box = draw.textbbox((left, top), text)
        draw.rectangle(text_box, fill=colour)
        draw.text((left, top), text, fill=(255, 255, 255))

    def name(class_id: int | None) -> str:
        return class_names[class_id] if class_id is not None and 0 <= class_id < len(class_names) else f"#{class_id}"

    if item.kind == "miss":
        box(item.box, BOX_COLOURS["miss"], f"missed {name(item.class_id)}")
    else:
        if item.gt_box is not None:
            box(item.gt_box, BOX_COLOURS["ground_truth"], f"true {name(item.gt_class_id)}", below=True)
        box(item.box, BOX_COLOURS["prediction"], f"{name(item.class_id)} {item.score or 0.0:.2f}")
    return picture


# ----------------------------------------------------------------------------------------------------------------
# Where an evaluation lives
# ----------------------------------------------------------------------------------------------------------------


def evaluation_file(run_dir: str | Path, model: str | Path, data: str | Path, split: str) -> Path:
    """The JSON file an evaluation of `model` on `data`'s `split` is written to and read from
    (`RunFolder.eval_file`: the run's eval.json for its best.pt on the validation split it trained on, else a file
    in its evals/ folder)."""
    return RunFolder(run_dir).eval_file(model, data, split)
