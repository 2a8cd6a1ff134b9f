"""The greedy IoU matcher shared by the error analysis and the INT8 agreement report."""

from __future__ import annotations

import numpy as np

from backend.evaluation.errors import match_image
from backend.evaluation.matching import greedy_match


def test_rows_take_columns_in_the_given_order_not_by_best_iou() -> None:
    # Row 0 comes first and takes column 0 (0.8) although row 1 overlaps it more (0.9): greedy by row order, as COCO
    # matches by score. Row 1 then falls back to column 1; row 2 has nothing free above the threshold.
    ious = np.array([[0.8, 0.6], [0.9, 0.55], [0.7, 0.0]])
    match = greedy_match(ious, np.array([0, 1, 2]), 0.5)
    assert match.pairs.tolist() == [[0, 0], [1, 1]]
    assert match.rows_taken.tolist() == [True, True, False]
    # The other order gives another answer: the order is the rule, not a detail.
    assert greedy_match(ious, np.array([1, 0, 2]), 0.5).pairs.tolist() == [[1, 0], [0, 1]]


def test_greedy_is_not_the_optimal_assignment() -> None:
    # The optimal (max total IoU) assignment would pair 0→1 and 1→0; greedy lets row 0 take its best and row 1 lose.
    ious = np.array([[0.8, 0.6], [0.7, 0.0]])
    match = greedy_match(ious, np.array([0, 1]), 0.5)
    assert match.pairs.tolist() == [[0, 0]]
    assert match.columns_taken.tolist() == [True, False]


def test_threshold_allowed_mask_tie_rank_and_a_second_pass() -> None:
    ious = np.array([[0.6, 0.6, 0.49], [0.6, 0.6, 0.9]])
    assert greedy_match(ious, np.array([0, 1]), 0.5).pairs.tolist() == [[0, 0], [1, 2]]  # equal IoU: lowest index
    ranked = greedy_match(ious, np.array([0, 1]), 0.5, column_rank=np.array([2, 0, 1]))
    assert ranked.pairs.tolist() == [[0, 1], [1, 2]]  # equal IoU: lowest rank
    allowed = np.array([[False, True, True], [True, False, False]])
    first = greedy_match(ious, np.array([0, 1]), 0.5, allowed=allowed)
    assert first.pairs.tolist() == [[0, 1], [1, 0]]
    # A second pass over what the first left: row 1 is taken, so only row 0 could move, and it is taken too.
    second = greedy_match(ious, np.array([0, 1]), 0.5, rows_taken=first.rows_taken, columns_taken=first.columns_taken)
    assert second.pairs.tolist() == []
    assert first.rows_taken.tolist() == [True, True]  # the inputs are copied, not changed


def test_match_image_visits_predictions_by_decreasing_score() -> None:
    gt_boxes = np.array([[0.0, 0.0, 10.0, 10.0]], dtype=np.float32)
    pred_boxes = np.array([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0]], dtype=np.float32)  # IoU 1.0 and 0.8
    match = match_image(gt_boxes, pred_boxes, np.array([0.6, 0.9]), score_threshold=0.25, iou_threshold=0.5)
    assert match.pairs.tolist() == [[1, 0]]  # the higher score wins the object, not the better box
    assert match.unmatched_predictions.tolist() == [0]
    assert match.unmatched_ground_truth.tolist() == []
