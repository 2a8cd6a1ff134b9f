"""Detection metrics through pycocotools' COCOeval, plus per-class AP, PR curves, a confusion matrix and
per-image errors, gathered in one JSON-serialisable `EvaluationResult` (a run's `eval.json`).

Boxes: ground truth and predictions come in xyxy original-image pixels; they become COCO `[x, y, w, h]` pixels only
inside `_coco_ground_truth` / `_coco_predictions`, the COCO boundary. Everything in the result is xyxy again.

Max detections: COCOeval's default `maxDets` is [1, 10, 100]; we evaluate at [1, 10, 100, 300] and report AP at
300, as YOLO-NAS validation does (post-processing keeps up to 300 predictions per image, docs/training_recipe.md §3), so
no prediction the model returns is thrown away before scoring. pycocotools applies the cap per image *and per
class*, so with ≤ 300 predictions per image the cap never bites; AP at 100 is the same except in images with more
than 100 predictions of one class. AR is reported at 1, 10, 100 and 300.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backend.data.records import DatasetError, DetectionSet
from backend.evaluation.errors import confusion_and_errors, found_share
from backend.files import atomic_write_json
from backend.processing import Detections

MAX_DETECTIONS = 300
AREA_LABELS = ("all", "small", "medium", "large")  # pycocotools' order of `params.areaRngLbl`
JSON_DIGITS = 4


@dataclass
class EvaluationResult:
    """Everything the evaluation page and `eval.json` show.

    Attributes:
        metrics: "mAP50-95", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large" (AP at `max_detections`),
            "AR1", "AR10", "AR100", "AR300" (AR at that many detections, IoU .50:.95); None where pycocotools
            leaves it undefined (no ground truth of that size, or none at all); and "recall", the share of the
            ground-truth objects found with their right class at `score_threshold` and `iou_threshold` (the
            confusion matrix's diagonal over its ground truth, `errors.found_share`; None without ground truth).
        per_class: one dict per class index: class_id, class_name, category_id, gt_count, prediction_count (all
            predictions, no score threshold), "AP50-95", "AP50", "AP75" (None for a class without ground truth).
        pr_curves: one dict per class index at IoU 0.5: recall (the 101 COCO recall points), precision
            (interpolated, i.e. the best precision at this recall or higher, 0 beyond the highest recall reached;
            None throughout for a class without ground truth) and scores (the score threshold that reaches it).
        confusion_matrix: (C+1, C+1) int64 counts at `score_threshold`/`iou_threshold`; rows = ground-truth class
            (last row background: false positives), columns = predicted class (last column background: misses).
        per_image: one dict per image with at least one error: image_id, path, width, height, counts,
            false_positives [{box, score, class_id}], misses [{box, class_id}], wrong_class [{box, class_id,
            score, gt_box, gt_class_id}]; boxes xyxy in original-image pixels.
        class_names: one name per class index.
        score_threshold: lowest score counted by the confusion matrix and the per-image errors.
        iou_threshold: IoU needed for a match in the confusion matrix and the per-image errors.
        max_detections: pycocotools' largest `maxDets`, at which AP is reported.
        counts: images, ground_truth and predictions in the split.
        summary_text: pycocotools-style summary lines.
        warnings: what the user should know about these numbers (e.g. no ground truth at all).
    """

    metrics: dict[str, float | None]
    per_class: list[dict[str, Any]]
    pr_curves: list[dict[str, Any]]
    confusion_matrix: np.ndarray
    per_image: list[dict[str, Any]]
    class_names: list[str]
    score_threshold: float
    iou_threshold: float
    max_detections: int = MAX_DETECTIONS
    counts: dict[str, int] = field(default_factory=dict)
    summary_text: str = ""
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: floats rounded to 4 decimals, no NaN/inf (they become None)."""
        return _json_ready(
            {
                "metrics": self.metrics,
                "per_class": self.per_class,
                "pr_curves": self.pr_curves,
                "confusion_matrix": self.confusion_matrix.tolist(),
                "per_image": self.per_image,
                "class_names": self.class_names,
                "score_threshold": self.score_threshold,
                "iou_threshold": self.iou_threshold,
                "max_detections": self.max_detections,
                "counts": self.counts,
                "summary_text": self.summary_text,
                "warnings": self.warnings,
            }
        )

    def save_json(self, path: str | Path) -> Path:
        """Writes `to_dict()` atomically (temporary file in the same folder, then rename)."""
        return atomic_write_json(path, self.to_dict(), indent=1)


def load_evaluation(path: str | Path) -> dict[str, Any]:
    """Reads an `eval.json` written by `EvaluationResult.save_json` back as the `to_dict()` dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no evaluation file at {path}: evaluate the run first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a valid evaluation file ({error}); evaluate the run again") from error
    if not isinstance(data, dict) or "metrics" not in data:
        raise ValueError(f"{path} is not an evaluation file (no 'metrics'); evaluate the run again")
    return data


def evaluate_detections(
    dataset: DetectionSet,
    predictions: Sequence[Detections],
    *,
    score_threshold: float = 0.25,
    iou_threshold: float = 0.5,
    max_detections: int = MAX_DETECTIONS,
) -> EvaluationResult:
    """COCO metrics, per-class AP and PR curves, confusion matrix and per-image errors of one split.

    COCOeval ranks all predictions, whatever their score; `score_threshold` and `iou_threshold` only apply to
    the confusion matrix and the per-image errors.

    Without any prediction, AP and AR are 0.0 (None only where there is no ground truth of that size). Without
    any ground truth, AP and AR are undefined: every metric is None, a warning says so, and every prediction above
    `score_threshold` is a false positive.

    Args:
        dataset: ground truth; boxes xyxy in original-image pixels, labels 0..C-1, `category_ids` for COCO.
        predictions: `predictions[i]` belongs to `dataset.records[i]`; boxes xyxy in original-image pixels,
            class ids 0..C-1.
        score_threshold: lowest score counted in the confusion matrix and the per-image errors.
        iou_threshold: IoU needed for a match there.
        max_detections: pycocotools' largest `maxDets` (per image and class), at which AP is reported.

    Raises:
        DatasetError: the dataset cannot be evaluated (no images, duplicate image ids, labels out of range...).
        ValueError: the predictions do not fit the dataset.
    """
    _check_inputs(dataset, predictions, score_threshold, iou_threshold, max_detections)
    coco_eval, summary_text = _run_cocoeval(dataset, predictions, max_detections)
    max_det_index = list(coco_eval.params.maxDets).index(max_detections)
    num_ground_truth = sum(len(record.boxes) for record in dataset.records)
    matrix, per_image = confusion_and_errors(
        dataset, predictions, score_threshold=score_threshold, iou_threshold=iou_threshold
    )
    warnings = []
    if num_ground_truth == 0:
        warnings.append("the split has no ground-truth boxes, so AP and AR are undefined (None); label some objects")
    return EvaluationResult(
        metrics={**_summary_metrics(coco_eval, max_det_index), "recall": found_share(matrix)},
        per_class=_per_class(coco_eval, dataset, predictions, max_det_index),
        pr_curves=_pr_curves(coco_eval, dataset, max_det_index),
        confusion_matrix=matrix,
        per_image=per_image,
        class_names=list(dataset.class_names),
        score_threshold=float(score_threshold),
        iou_threshold=float(iou_threshold),
        max_detections=max_detections,
        counts={
            "images": len(dataset.records),
            "ground_truth": num_ground_truth,
            "predictions": sum(len(detections) for detections in predictions),
        },
        summary_text=summary_text,
        warnings=warnings,
    )


# ----------------------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------------------


def _check_inputs(
    dataset: DetectionSet,
    predictions: Sequence[Detections],
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
) -> None:
    source = dataset.source or "the dataset"
    if not dataset.records:
        raise DatasetError(f"{source} has no images to evaluate; check the split")
    if len(dataset.category_ids) != dataset.num_classes or len(set(dataset.category_ids)) != dataset.num_classes:
        raise DatasetError(
            f"{source}: category ids {dataset.category_ids} must be distinct, one per class {dataset.class_names}"
        )
    image_ids = [record.image_id for record in dataset.records]
    if len(set(image_ids)) != len(image_ids):
        raise DatasetError(f"{source}: image ids repeat; each image needs its own id for COCO evaluation")
    for record in dataset.records:
        if len(record.labels) and not 0 <= record.labels.min() <= record.labels.max() < dataset.num_classes:
            raise DatasetError(
                f"{record.path}: labels {sorted(set(record.labels.tolist()))} outside 0..{dataset.num_classes - 1}"
            )
    if len(predictions) != len(dataset.records):
        raise ValueError(f"{len(predictions)} prediction sets for {len(dataset.records)} images: need one per image")
    for record, detections in zip(dataset.records, predictions, strict=True):
        if len(detections) == 0:
            continue
        if not 0 <= detections.class_ids.min() <= detections.class_ids.max() < dataset.num_classes:
            raise ValueError(
                f"predictions for {record.path}: class ids {sorted(set(detections.class_ids.tolist()))} outside "
                f"0..{dataset.num_classes - 1}; was the model trained on these classes?"
            )
        if not (np.isfinite(detections.boxes).all() and np.isfinite(detections.scores).all()):
            raise ValueError(f"predictions for {record.path}: boxes or scores are not finite")
    if not 0.0 <= score_threshold <= 1.0 or not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"score_threshold {score_threshold} must be in [0, 1] and iou_threshold in (0, 1]")
    if max_detections < 1:
        raise ValueError(f"max_detections must be at least 1, got {max_detections}")


# ----------------------------------------------------------------------------------------------------------------
# The COCO boundary: xyxy original-image pixels → COCO [x, y, w, h] pixels
# ----------------------------------------------------------------------------------------------------------------


def _xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy → (N, 4) float64 COCO [x, y, w, h], same pixel space."""
    boxes = boxes.astype(np.float64)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _coco_images_and_categories(dataset: DetectionSet) -> dict[str, list]:
    images = [
        {"id": int(r.image_id), "width": int(r.width), "height": int(r.height), "file_name": str(r.path)}
        for r in dataset.records
    ]
    categories = [{"id": int(cid), "name": name} for cid, name in zip(dataset.category_ids, dataset.class_names)]
    return {"images": images, "categories": categories}


def _coco_from_annotations(base: dict[str, list], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {**base, "annotations": annotations}
    coco.createIndex()
    return coco


def _coco_ground_truth(dataset: DetectionSet, base: dict[str, list]) -> COCO:
    annotations: list[dict[str, Any]] = []
    for record in dataset.records:
        for box, label in zip(_xyxy_to_xywh(record.boxes).tolist(), record.labels.tolist(), strict=True):
            annotations.append(
                {
                    # ids from 1: COCOeval stores matched ids and treats 0 as "unmatched".
                    "id": len(annotations) + 1,
                    "image_id": int(record.image_id),
                    "category_id": int(dataset.category_ids[label]),
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    return _coco_from_annotations(base, annotations)


def _coco_predictions(dataset: DetectionSet, predictions: Sequence[Detections], base: dict[str, list]) -> COCO:
    # Built directly rather than through COCO.loadRes, which asserts on an empty result list.
    annotations: list[dict[str, Any]] = []
    category_ids = np.asarray(dataset.category_ids, dtype=np.int64)
    for record, detections in zip(dataset.records, predictions, strict=True):
        boxes = _xyxy_to_xywh(detections.boxes).tolist()
        for box, score, category_id in zip(
            boxes, detections.scores.tolist(), category_ids[detections.class_ids].tolist(), strict=True
        ):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(record.image_id),
                    "category_id": category_id,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "score": score,
                    "iscrowd": 0,
                }
            )
    return _coco_from_annotations(base, annotations)


def _run_cocoeval(
    dataset: DetectionSet, predictions: Sequence[Detections], max_detections: int
) -> tuple[COCOeval, str]:
    """Runs COCOeval bbox (IoU .50:.05:.95, 101 recall points) with its prints silenced."""
    base = _coco_images_and_categories(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(_coco_ground_truth(dataset, base), _coco_predictions(dataset, predictions, base), "bbox")
        coco_eval.params.maxDets = sorted({1, 10, 100, max_detections})
        coco_eval.evaluate()
        coco_eval.accumulate()
    # COCOeval.summarize() hard-codes maxDets=100 for its first line, so it cannot describe AP at 300: the same
    # lines are written here from the accumulated arrays.
    return coco_eval, _summary_text(coco_eval, max_detections)


# ----------------------------------------------------------------------------------------------------------------
# Reading COCOeval's arrays: precision (T, R, K, A, M), recall (T, K, A, M), scores (T, R, K, A, M); -1 = undefined
# ----------------------------------------------------------------------------------------------------------------


def _mean_defined(values: np.ndarray) -> float | None:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else None


def _iou_index(coco_eval: COCOeval, iou: float) -> int:
    return int(np.flatnonzero(np.isclose(coco_eval.params.iouThrs, iou))[0])


def _average_precision(
    coco_eval: COCOeval, max_det_index: int, *, iou: float | None = None, area: str = "all", class_index=slice(None)
) -> float | None:
    precision = coco_eval.eval["precision"]
    iou_slice = slice(None) if iou is None else _iou_index(coco_eval, iou)
    return _mean_defined(precision[iou_slice, :, class_index, AREA_LABELS.index(area), max_det_index])


def _average_recall(coco_eval: COCOeval, max_det_index: int, *, area: str = "all") -> float | None:
    return _mean_defined(coco_eval.eval["recall"][:, :, AREA_LABELS.index(area), max_det_index])


def _summary_metrics(coco_eval: COCOeval, max_det_index: int) -> dict[str, float | None]:
    metrics = {
        "mAP50-95": _average_precision(coco_eval, max_det_index),
        "mAP50": _average_precision(coco_eval, max_det_index, iou=0.5),
        "mAP75": _average_precision(coco_eval, max_det_index, iou=0.75),
        "mAP_small": _average_precision(coco_eval, max_det_index, area="small"),
        "mAP_medium": _average_precision(coco_eval, max_det_index, area="medium"),
        "mAP_large": _average_precision(coco_eval, max_det_index, area="large"),
    }
    for index, max_dets in enumerate(coco_eval.params.maxDets):
        metrics[f"AR{max_dets}"] = _average_recall(coco_eval, index)
    return metrics


def _summary_text(coco_eval: COCOeval, max_detections: int) -> str:
    """The lines of `COCOeval.summarize()` with AP and per-size AR at `max_detections`, AR at every maxDets."""
    max_det_index = list(coco_eval.params.maxDets).index(max_detections)
    line = " {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}"
    rows = [(None, "all"), (0.5, "all"), (0.75, "all")] + [(None, area) for area in AREA_LABELS[1:]]
    lines = []
    for iou, area in rows:
        value = _average_precision(coco_eval, max_det_index, iou=iou, area=area)
        iou_text = "0.50:0.95" if iou is None else f"{iou:0.2f}"
        lines.append(line.format("Average Precision", "(AP)", iou_text, area, max_detections, _or_minus_one(value)))
    for index, max_dets in enumerate(coco_eval.params.maxDets):
        value = _average_recall(coco_eval, index)
        lines.append(line.format("Average Recall", "(AR)", "0.50:0.95", "all", max_dets, _or_minus_one(value)))
    for area in AREA_LABELS[1:]:
        value = _average_recall(coco_eval, max_det_index, area=area)
        lines.append(line.format("Average Recall", "(AR)", "0.50:0.95", area, max_detections, _or_minus_one(value)))
    return "\n".join(lines)


def _or_minus_one(value: float | None) -> float:
    return -1.0 if value is None else value


def _per_class(
    coco_eval: COCOeval, dataset: DetectionSet, predictions: Sequence[Detections], max_det_index: int
) -> list[dict[str, Any]]:
    num_classes = dataset.num_classes
    gt_counts = np.zeros(num_classes, dtype=np.int64)
    prediction_counts = np.zeros(num_classes, dtype=np.int64)
    for record, detections in zip(dataset.records, predictions, strict=True):
        gt_counts += np.bincount(record.labels, minlength=num_classes)
        prediction_counts += np.bincount(detections.class_ids, minlength=num_classes)
    # COCOeval sorts params.catIds; column k of its arrays is the k-th smallest category id, not class index k.
    columns = {int(cid): column for column, cid in enumerate(coco_eval.params.catIds)}
    per_class = []
    for class_index, (name, category_id) in enumerate(zip(dataset.class_names, dataset.category_ids, strict=True)):
        column = columns[int(category_id)]
        per_class.append(
            {
                "class_id": class_index,
                "class_name": name,
                "category_id": int(category_id),
                "gt_count": int(gt_counts[class_index]),
                "prediction_count": int(prediction_counts[class_index]),
                "AP50-95": _average_precision(coco_eval, max_det_index, class_index=column),
                "AP50": _average_precision(coco_eval, max_det_index, iou=0.5, class_index=column),
                "AP75": _average_precision(coco_eval, max_det_index, iou=0.75, class_index=column),
            }
        )
    return per_class


def _pr_curves(coco_eval: COCOeval, dataset: DetectionSet, max_det_index: int) -> list[dict[str, Any]]:
    iou = _iou_index(coco_eval, 0.5)
    recall = coco_eval.params.recThrs.tolist()
    columns = {int(cid): column for column, cid in enumerate(coco_eval.params.catIds)}
    curves = []
    for class_index, (name, category_id) in enumerate(zip(dataset.class_names, dataset.category_ids, strict=True)):
        column = columns[int(category_id)]
        precision = coco_eval.eval["precision"][iou, :, column, AREA_LABELS.index("all"), max_det_index]
        scores = coco_eval.eval["scores"][iou, :, column, AREA_LABELS.index("all"), max_det_index]
        curves.append(
            {
                "class_id": class_index,
                "class_name": name,
                "iou_threshold": 0.5,
                "recall": recall,
                "precision": [None if p < 0 else float(p) for p in precision],
                "scores": [None if p < 0 else float(s) for p, s in zip(precision, scores, strict=True)],
            }
        )
    return curves


def _json_ready(value: Any) -> Any:
    """Plain Python for json.dumps: numpy scalars/arrays converted, floats rounded, NaN/inf → None."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        value = float(value)
        return round(value, JSON_DIGITS) if math.isfinite(value) else None
    return value
