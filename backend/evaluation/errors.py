"""Confusion matrix and per-image errors at one score threshold and one IoU threshold.

Boxes are xyxy in original-image pixels everywhere in this module (ground truth from `ImageRecord`, predictions
from `Detections` mapped back to the original image).

Matching, per image: predictions with score ≥ `score_threshold` are taken in order of decreasing score (ties keep
their input order); each one claims the still-unmatched ground-truth box with the highest IoU ≥ `iou_threshold`,
**whatever its class**, so a box that is found but called the wrong name shows up off the diagonal instead of
as a false positive plus a miss. A consequence: when a wrong-class prediction outscores a right-class one on the
same object (class-aware NMS keeps both), the wrong one takes the object and the right one becomes a false
positive. Predictions that claim nothing are false positives; ground truth that nobody claims is missed. The loop
is `evaluation.matching.greedy_match`, shared with the INT8 agreement report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from backend.data.records import DetectionSet, ImageRecord
from backend.evaluation.matching import greedy_match
from backend.processing import Detections, box_iou_numpy


@dataclass
class ImageMatch:
    """The outcome of matching one image's predictions to its ground truth.

    Attributes:
        pairs: (P, 2) int64 (prediction index, ground-truth index) of matched pairs, either class.
        unmatched_predictions: (F,) int64 indices of predictions above the score threshold that matched nothing.
        unmatched_ground_truth: (G,) int64 indices of ground-truth boxes that nothing matched.
    """

    pairs: np.ndarray
    unmatched_predictions: np.ndarray
    unmatched_ground_truth: np.ndarray


def match_image(
    gt_boxes: np.ndarray,
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    *,
    score_threshold: float,
    iou_threshold: float,
) -> ImageMatch:
    """Greedy, class-agnostic matching of one image (see the module docstring for the rule).

    Args:
        gt_boxes: (G, 4) xyxy, original-image pixels.
        pred_boxes: (N, 4) xyxy, same pixel space.
        pred_scores: (N,) scores; predictions below `score_threshold` take no part (neither matched nor listed).
        score_threshold: lowest score that counts as a prediction.
        iou_threshold: lowest IoU that counts as a match.
    """
    kept = np.flatnonzero(pred_scores >= score_threshold)
    order = kept[np.argsort(-pred_scores[kept], kind="stable")]
    ious = box_iou_numpy(pred_boxes[order], gt_boxes)  # (len(order), G)
    match = greedy_match(ious, np.arange(len(order)), iou_threshold)
    return ImageMatch(
        pairs=np.stack([order[match.pairs[:, 0]], match.pairs[:, 1]], axis=1).astype(np.int64).reshape(-1, 2),
        unmatched_predictions=order[~match.rows_taken].astype(np.int64),
        unmatched_ground_truth=np.flatnonzero(~match.columns_taken).astype(np.int64),
    )


def found_share(confusion_matrix: Sequence[Sequence[int]] | np.ndarray) -> float | None:
    """The share of the ground-truth objects the detector found and named right, from a confusion matrix laid out
    as `confusion_and_errors` returns it (rows ground-truth class, background last; columns predicted class,
    background last): the diagonal over all ground truth, i.e. the recall at the matrix's score and IoU thresholds,
    objects of every class counted alike. An object found but called another class is not found. None without
    ground truth."""
    matrix = np.asarray(confusion_matrix, dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 1:
        raise ValueError(f"a confusion matrix is square (classes + background), got shape {matrix.shape}")
    classes = matrix.shape[0] - 1
    ground_truth = int(matrix[:classes].sum())
    return None if ground_truth == 0 else float(np.trace(matrix[:classes, :classes])) / ground_truth


def confusion_and_errors(
    dataset: DetectionSet,
    predictions: Sequence[Detections],
    *,
    score_threshold: float,
    iou_threshold: float,
) -> tuple[np.ndarray, list[dict]]:
    """Confusion matrix and per-image error lists over a whole split.

    Args:
        dataset: ground truth, boxes xyxy in original-image pixels, labels 0..C-1.
        predictions: one `Detections` per record, same order, boxes xyxy in original-image pixels.
        score_threshold: lowest score that counts as a prediction.
        iou_threshold: lowest IoU that counts as a match.

    Returns:
        The (C+1, C+1) int64 confusion matrix (rows: ground-truth class, last row background = false positives;
        columns: predicted class, last column background = misses) and, for every image with at least one error,
        a dict (see `_image_errors`).
    """
    num_classes = dataset.num_classes
    matrix = np.zeros((num_classes + 1, num_classes + 1), dtype=np.int64)
    background = num_classes
    per_image: list[dict] = []
    for record, detections in zip(dataset.records, predictions, strict=True):
        match = match_image(
            record.boxes,
            detections.boxes,
            detections.scores,
            score_threshold=score_threshold,
            iou_threshold=iou_threshold,
        )
        pred_classes = detections.class_ids
        np.add.at(matrix, (record.labels[match.pairs[:, 1]], pred_classes[match.pairs[:, 0]]), 1)
        np.add.at(matrix, (background, pred_classes[match.unmatched_predictions]), 1)
        np.add.at(matrix, (record.labels[match.unmatched_ground_truth], background), 1)
        errors = _image_errors(record, detections, match)
        if errors is not None:
            per_image.append(errors)
    return matrix, per_image


def _image_errors(record: ImageRecord, detections: Detections, match: ImageMatch) -> dict | None:
    """One image's errors as plain Python (boxes xyxy in original-image pixels), or None when it has none."""
    wrong_pairs = [(int(p), int(g)) for p, g in match.pairs if detections.class_ids[p] != record.labels[g]]
    if not (len(match.unmatched_predictions) or len(match.unmatched_ground_truth) or wrong_pairs):
        return None
    # Lists once, then index: per-element numpy access dominates for images with hundreds of false positives.
    pred_boxes, pred_scores = detections.boxes.tolist(), detections.scores.tolist()
    pred_classes, gt_boxes, gt_classes = detections.class_ids.tolist(), record.boxes.tolist(), record.labels.tolist()
    false_positives = [
        {"box": pred_boxes[p], "score": pred_scores[p], "class_id": pred_classes[p]}
        for p in match.unmatched_predictions.tolist()
    ]
    misses = [{"box": gt_boxes[g], "class_id": gt_classes[g]} for g in match.unmatched_ground_truth.tolist()]
    wrong_class = [
        {
            "box": pred_boxes[p],
            "class_id": pred_classes[p],
            "score": pred_scores[p],
            "gt_box": gt_boxes[g],
            "gt_class_id": gt_classes[g],
        }
        for p, g in wrong_pairs
    ]
    num_matched = len(match.pairs)
    return {
        "image_id": int(record.image_id),
        "path": str(record.path),
        "width": int(record.width),
        "height": int(record.height),
        "counts": {
            "ground_truth": len(record.boxes),
            "predictions": num_matched + len(match.unmatched_predictions),
            "true_positives": num_matched - len(wrong_class),
            "false_positives": len(false_positives),
            "misses": len(misses),
            "wrong_class": len(wrong_class),
            "errors": len(false_positives) + len(misses) + len(wrong_class),
        },
        "false_positives": false_positives,
        "misses": misses,
        "wrong_class": wrong_class,
    }
