"""Greedy one-to-one matching of boxes by IoU, shared by the error analysis (predictions → ground truth,
`evaluation/errors.py`) and the INT8 agreement report (FP32 → INT8 detections, `quantization/agreement.py`).

Greedy, not optimal: rows are visited in the order given (the callers pass decreasing score) and each takes the best
column still free, as COCO's evaluation does for one image and category. An optimal assignment
(`scipy.optimize.linear_sum_assignment`) would maximise the total IoU instead, which can pair a high-scoring
prediction with a worse box so that a lower-scoring one gets the better box: the reports would then disagree with
the COCO matching behind the mAP they sit next to. So the loop is ours; it is O(rows x columns) numpy per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class GreedyMatch:
    """The outcome of `greedy_match`.

    Attributes:
        pairs: (P, 2) int64 (row, column) pairs, in the order they were made.
        rows_taken: (R,) bool, rows paired by this call or before it.
        columns_taken: (C,) bool, columns paired by this call or before it.
    """

    pairs: np.ndarray
    rows_taken: np.ndarray
    columns_taken: np.ndarray


def greedy_match(
    ious: np.ndarray,
    row_order: np.ndarray,
    iou_threshold: float,
    *,
    allowed: np.ndarray | None = None,
    column_rank: np.ndarray | None = None,
    rows_taken: np.ndarray | None = None,
    columns_taken: np.ndarray | None = None,
) -> GreedyMatch:
    """Each row, in `row_order`, takes the free column with the highest IoU >= `iou_threshold`.

    Args:
        ious: (R, C) IoU of every row box with every column box.
        row_order: the rows to visit, first first (usually by decreasing score); rows not listed take nothing.
        iou_threshold: lowest IoU that counts as a match.
        allowed: optional (R, C) bool, pairs that may be made at all (e.g. same class only).
        column_rank: optional (C,) int, the tie-break among columns of equal IoU: lowest rank wins (default: lowest
            column index).
        rows_taken: optional (R,) bool of rows already paired (a second pass); copied, not changed.
        columns_taken: optional (C,) bool of columns already paired; copied, not changed.
    """
    num_rows, num_columns = ious.shape
    rows_taken = np.zeros(num_rows, dtype=bool) if rows_taken is None else rows_taken.copy()
    columns_taken = np.zeros(num_columns, dtype=bool) if columns_taken is None else columns_taken.copy()
    rank = np.arange(num_columns) if column_rank is None else np.asarray(column_rank)
    pairs: list[tuple[int, int]] = []
    for row in np.asarray(row_order, dtype=np.int64):
        if rows_taken[row]:
            continue
        free = ~columns_taken & (ious[row] >= iou_threshold)
        if allowed is not None:
            free &= allowed[row]
        if not free.any():
            continue
        best_iou = ious[row][free].max()
        ties = np.flatnonzero(free & (ious[row] == best_iou))
        column = int(ties[np.argmin(rank[ties])])
        rows_taken[row] = columns_taken[column] = True
        pairs.append((int(row), column))
    return GreedyMatch(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), rows_taken, columns_taken)
