"""How far INT8 detections agree with FP32 detections, image by image, for the quantization report.

mAP says how both models do against the labels; this says how often the INT8 model still gives the *same answer* as
the FP32 one (the reference), and which validation images changed most, so a user can look at them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from backend.evaluation.matching import greedy_match
from backend.processing import Detections, box_iou_numpy


@dataclass(frozen=True)
class ImageAgreement:
    """The comparison of one image's reference (FP32) and candidate (INT8) detections.

    Attributes:
        matched: pairs with IoU >= the threshold and the same class.
        class_changed: pairs with IoU >= the threshold but different classes (neither lost nor new).
        only_reference: reference detections the candidate lost.
        only_candidate: candidate detections the reference does not have (new).
        mean_iou: mean IoU of the matched pairs; None without matches.
        mean_abs_score_diff: mean |reference score - candidate score| of the matched pairs; None without matches.
        agreement: matched / (matched + class_changed + only_reference + only_candidate); 1.0 when both are empty.
    """

    matched: int
    class_changed: int
    only_reference: int
    only_candidate: int
    mean_iou: float | None
    mean_abs_score_diff: float | None
    agreement: float

    @property
    def change(self) -> float:
        """1 - agreement: the share of detections (counted per pair or unpaired box) that changed, in [0, 1]."""
        return 1.0 - self.agreement

    @property
    def disagreements(self) -> int:
        """class_changed + only_reference + only_candidate."""
        return self.class_changed + self.only_reference + self.only_candidate

    def ranking_key(self) -> tuple[float, int, float]:
        """Sort key, larger = more changed: change, then the number of disagreements, then the score drift."""
        return self.change, self.disagreements, self.mean_abs_score_diff or 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly, with the report's names: lost = only_reference, new = only_candidate."""
        return {
            "matched": self.matched,
            "class_changed": self.class_changed,
            "lost": self.only_reference,
            "new": self.only_candidate,
            "mean_iou": self.mean_iou,
            "mean_abs_score_diff": self.mean_abs_score_diff,
            "agreement": self.agreement,
            "change": self.change,
        }


def match_detections(
    reference: Detections,
    candidate: Detections,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.25,
) -> ImageAgreement:
    """Pairs one image's reference and candidate detections one to one and counts what changed.

    Both sets must be in the same box space (original-image pixels, xyxy, in the report). Detections with score <
    `score_threshold` are dropped first. Matching is greedy: reference detections by decreasing score (equal scores:
    lower index first) each take the unpaired same-class candidate with the highest IoU >= `iou_threshold` (equal
    IoU: higher candidate score, then lower index). Then the reference detections still unpaired, in the same order,
    take the unpaired candidate of any class with the highest IoU >= `iou_threshold`: those pairs are
    `class_changed`. A same-class match therefore always wins over a class change. Both passes are
    `evaluation.matching.greedy_match`, the matcher of the error analysis.

    Args:
        reference: the FP32 model's detections of the image.
        candidate: the INT8 model's detections of the same image, same box space.
        iou_threshold: a pair needs IoU >= this, in (0, 1].
        score_threshold: detections below this score are ignored, in [0, 1].

    Returns:
        The image's counts, mean IoU and score drift of the matched pairs, and agreement.
    """
    _check_thresholds(iou_threshold, score_threshold)
    ref_keep = reference.scores >= score_threshold
    cand_keep = candidate.scores >= score_threshold
    ref_boxes, ref_scores = reference.boxes[ref_keep], reference.scores[ref_keep]  # (R, 4) xyxy, (R,)
    ref_classes = reference.class_ids[ref_keep]
    cand_boxes, cand_scores = candidate.boxes[cand_keep], candidate.scores[cand_keep]  # (C, 4) xyxy, (C,)
    cand_classes = candidate.class_ids[cand_keep]

    ious = box_iou_numpy(ref_boxes, cand_boxes).astype(np.float64)  # (R, C)
    same_class = ref_classes[:, None] == cand_classes[None, :]  # (R, C)
    ref_order = np.argsort(-ref_scores, kind="stable")
    # Candidate preference on equal IoU: higher score, then lower index.
    cand_rank = np.empty(len(cand_scores), dtype=np.int64)
    cand_rank[np.argsort(-cand_scores, kind="stable")] = np.arange(len(cand_scores))

    same = greedy_match(ious, ref_order, iou_threshold, allowed=same_class, column_rank=cand_rank)
    changed = greedy_match(
        ious,
        ref_order,
        iou_threshold,
        column_rank=cand_rank,
        rows_taken=same.rows_taken,
        columns_taken=same.columns_taken,
    )
    ref_paired, cand_paired = changed.rows_taken, changed.columns_taken
    matched_ious = [float(ious[r, c]) for r, c in same.pairs]
    score_diffs = [abs(float(ref_scores[r]) - float(cand_scores[c])) for r, c in same.pairs]
    class_changed = len(changed.pairs)

    matched = len(matched_ious)
    only_reference = int((~ref_paired).sum())
    only_candidate = int((~cand_paired).sum())
    total = matched + class_changed + only_reference + only_candidate
    return ImageAgreement(
        matched=matched,
        class_changed=class_changed,
        only_reference=only_reference,
        only_candidate=only_candidate,
        mean_iou=float(np.mean(matched_ious)) if matched else None,
        mean_abs_score_diff=float(np.mean(score_diffs)) if matched else None,
        agreement=matched / total if total else 1.0,
    )


def detection_agreement(
    reference: Sequence[Detections],
    candidate: Sequence[Detections],
    image_ids: Sequence[str],
    iou_threshold: float = 0.5,
    score_threshold: float = 0.25,
    top_k: int = 12,
) -> dict[str, Any]:
    """Agreement of candidate (INT8) with reference (FP32) detections over a set of images, JSON-serialisable.

    Args:
        reference: per image, the FP32 model's detections (original-image pixels, xyxy).
        candidate: per image, the INT8 model's detections, same images in the same order and box space.
        image_ids: per image, its path or id as the report shows it.
        iou_threshold: as in `match_detections`.
        score_threshold: as in `match_detections`.
        top_k: how many of the most changed images to list.

    Returns:
        {"iou_threshold", "score_threshold", "images", "mean_agreement" (mean over images; None without images),
        "detections": {"matched", "class_changed", "lost", "new"} totals, "mean_iou" (over all matched pairs; None
        without any), "per_image": [{"image", "matched", "class_changed", "lost", "new", "mean_iou",
        "mean_abs_score_diff", "agreement", "change"}] in input order, "most_changed": up to `top_k` of those
        entries with change > 0, most changed first (by change = 1 - agreement, then the number of disagreements,
        then the mean score drift of the matched pairs; equal keys keep input order)}.

    Raises:
        ValueError: the three sequences differ in length, or a threshold or `top_k` is out of range.
    """
    if not len(reference) == len(candidate) == len(image_ids):
        raise ValueError(
            f"reference ({len(reference)}), candidate ({len(candidate)}) and image_ids ({len(image_ids)}) must have "
            "one entry per image, in the same order: run both models on the same image list"
        )
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    _check_thresholds(iou_threshold, score_threshold)

    results = [
        match_detections(ref, cand, iou_threshold=iou_threshold, score_threshold=score_threshold)
        for ref, cand in zip(reference, candidate)
    ]
    per_image = [{"image": str(image), **result.to_dict()} for image, result in zip(image_ids, results)]
    changed = [index for index, result in enumerate(results) if result.change > 0]
    changed.sort(key=lambda index: results[index].ranking_key(), reverse=True)  # stable: ties keep input order
    matched = sum(result.matched for result in results)
    iou_sum = sum(result.mean_iou * result.matched for result in results if result.mean_iou is not None)
    return {
        "iou_threshold": float(iou_threshold),
        "score_threshold": float(score_threshold),
        "images": len(results),
        "mean_agreement": float(np.mean([result.agreement for result in results])) if results else None,
        "detections": {
            "matched": matched,
            "class_changed": sum(result.class_changed for result in results),
            "lost": sum(result.only_reference for result in results),
            "new": sum(result.only_candidate for result in results),
        },
        "mean_iou": iou_sum / matched if matched else None,
        "per_image": per_image,
        "most_changed": [per_image[index] for index in changed[:top_k]],
    }


def _check_thresholds(iou_threshold: float, score_threshold: float) -> None:
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
