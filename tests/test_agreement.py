"""FP32-vs-INT8 detection agreement: hand-built detections with known outcomes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.processing import Detections
from backend.quantization.agreement import detection_agreement, match_detections


def dets(*rows: tuple[float, float, float, float, float, int]) -> Detections:
    """(x1, y1, x2, y2, score, class_id) rows → Detections, boxes in original-image pixels."""
    array = np.array(rows, dtype=np.float64).reshape(-1, 6)
    return Detections(boxes=array[:, :4], scores=array[:, 4], class_ids=array[:, 5].astype(np.int64))


IMAGE_A = dets((10, 10, 50, 50, 0.9, 0), (100, 100, 160, 140, 0.8, 1), (200, 20, 240, 80, 0.6, 2))
IMAGE_B = dets((0, 0, 20, 20, 0.7, 0))


def test_identical_detections_agree_fully() -> None:
    report = detection_agreement([IMAGE_A, IMAGE_B, dets()], [IMAGE_A, IMAGE_B, dets()], ["a.jpg", "b.jpg", "c.jpg"])
    assert report["images"] == 3
    assert report["mean_agreement"] == 1.0
    assert report["detections"] == {"matched": 4, "class_changed": 0, "lost": 0, "new": 0}
    assert report["mean_iou"] == pytest.approx(1.0)
    assert report["most_changed"] == []
    assert [entry["image"] for entry in report["per_image"]] == ["a.jpg", "b.jpg", "c.jpg"]
    assert report["per_image"][0]["mean_abs_score_diff"] == 0.0
    json.dumps(report)  # the report is written as JSON


def test_shift_below_iou_threshold_is_lost_plus_new() -> None:
    # 40x40 box shifted by 20 px: IoU = 20*40 / (2*1600 - 800) = 1/3 < 0.5.
    result = match_detections(dets((10, 10, 50, 50, 0.9, 0)), dets((30, 10, 70, 50, 0.9, 0)))
    assert (result.matched, result.class_changed, result.only_reference, result.only_candidate) == (0, 0, 1, 1)
    assert result.agreement == 0.0 and result.mean_iou is None and result.mean_abs_score_diff is None
    # The same shift passes a threshold below 1/3.
    loose = match_detections(dets((10, 10, 50, 50, 0.9, 0)), dets((30, 10, 70, 50, 0.7, 0)), iou_threshold=0.3)
    assert loose.matched == 1 and loose.mean_iou == pytest.approx(1 / 3, abs=1e-6)
    assert loose.mean_abs_score_diff == pytest.approx(0.2, abs=1e-6)


def test_class_flip_counts_as_class_changed() -> None:
    reference = dets((10, 10, 50, 50, 0.9, 0), (100, 100, 150, 150, 0.8, 1))
    candidate = dets((11, 10, 50, 50, 0.85, 3), (100, 100, 150, 150, 0.8, 1))
    result = match_detections(reference, candidate)
    assert (result.matched, result.class_changed, result.only_reference, result.only_candidate) == (1, 1, 0, 0)
    assert result.agreement == 0.5 and result.change == 0.5


def test_same_class_match_wins_over_class_change() -> None:
    # The high-scoring reference overlaps a wrong-class box more, but a same-class box enough: it takes the latter,
    # and the second reference (class 1) can then pair with the class-1 box as a match.
    reference = dets((0, 0, 100, 100, 0.9, 0), (0, 0, 100, 100, 0.5, 1))
    candidate = dets((0, 0, 100, 100, 0.9, 1), (0, 0, 100, 80, 0.9, 0))
    result = match_detections(reference, candidate)
    assert (result.matched, result.class_changed, result.only_reference, result.only_candidate) == (2, 0, 0, 0)
    assert result.mean_iou == pytest.approx((1.0 + 0.8) / 2, abs=1e-6)


def test_low_score_detections_are_ignored() -> None:
    reference = dets((10, 10, 50, 50, 0.9, 0), (300, 300, 340, 340, 0.1, 0))
    candidate = dets((10, 10, 50, 50, 0.9, 0), (500, 500, 540, 540, 0.24, 1))
    result = match_detections(reference, candidate, score_threshold=0.25)
    assert (result.matched, result.class_changed, result.only_reference, result.only_candidate) == (1, 0, 0, 0)
    assert result.agreement == 1.0
    # At threshold 0.05 both extra boxes count: one lost, one new.
    strict = match_detections(reference, candidate, score_threshold=0.05)
    assert (strict.matched, strict.only_reference, strict.only_candidate) == (1, 1, 1)


def test_one_to_one_matching() -> None:
    # Two candidates on one reference box: only one can match; the other is new.
    result = match_detections(dets((0, 0, 10, 10, 0.9, 0)), dets((0, 0, 10, 10, 0.8, 0), (0, 0, 10, 10, 0.9, 0)))
    assert (result.matched, result.only_candidate) == (1, 1)
    assert result.mean_abs_score_diff == pytest.approx(0.0, abs=1e-6)  # equal IoU → the higher-scoring candidate


def test_both_empty_is_full_agreement() -> None:
    result = match_detections(dets(), dets())
    assert result.agreement == 1.0 and result.change == 0.0
    assert result.mean_iou is None and result.mean_abs_score_diff is None
    only_low = match_detections(dets((0, 0, 10, 10, 0.1, 0)), dets())
    assert only_low.agreement == 1.0  # everything below the score threshold


def test_ranking_puts_most_changed_first() -> None:
    unchanged = IMAGE_A
    one_lost = dets((10, 10, 50, 50, 0.9, 0), (100, 100, 160, 140, 0.8, 1))  # 2 of 3 matched
    all_lost = dets()  # 0 of 1 matched
    score_drift = dets((10, 10, 50, 50, 0.5, 0), (100, 100, 160, 140, 0.8, 1))  # 2 of 3 matched, scores moved
    reference = [unchanged, IMAGE_A, IMAGE_B, IMAGE_A]
    candidate = [unchanged, one_lost, all_lost, score_drift]
    report = detection_agreement(reference, candidate, ["same", "one_lost", "all_lost", "drift"], top_k=12)
    assert [entry["image"] for entry in report["most_changed"]] == ["all_lost", "drift", "one_lost"]
    assert report["most_changed"][0]["agreement"] == 0.0
    assert report["detections"] == {"matched": 7, "class_changed": 0, "lost": 3, "new": 0}
    assert report["mean_agreement"] == pytest.approx((1 + 2 / 3 + 0 + 2 / 3) / 4)
    assert [
        entry["image"] for entry in detection_agreement(reference, candidate, list("abcd"), top_k=1)["most_changed"]
    ] == ["c"]


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="one entry per image"):
        detection_agreement([IMAGE_A], [IMAGE_A, IMAGE_B], ["a", "b"])
    with pytest.raises(ValueError, match="one entry per image"):
        detection_agreement([IMAGE_A], [IMAGE_A], ["a", "b"])
    with pytest.raises(ValueError, match="iou_threshold"):
        match_detections(IMAGE_A, IMAGE_A, iou_threshold=0.0)


def test_no_images() -> None:
    report = detection_agreement([], [], [])
    assert report["images"] == 0 and report["mean_agreement"] is None and report["mean_iou"] is None
