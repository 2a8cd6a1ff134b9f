"""Task-aligned label assignment for YOLO-NAS training.

Follows TOOD (Feng et al., "TOOD: Task-aligned One-stage Object Detection", ICCV 2021, arXiv 2108.07755) as used
by PP-YOLOE (Xu et al., arXiv 2203.16250) and configured by YOLO-NAS: top-k 13, alpha 1, beta 6, from the first
epoch (no ATSS warm-up). The exact rules are in docs/training_recipe.md §1.

Everything here works in input pixels (the letterboxed network input, not the original image), with boxes xyxy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Assignment:
    """Training targets for every anchor of a batch.

    Attributes:
        labels: (B, A) int64 class index per anchor; `num_classes` marks background.
        boxes: (B, A, 4) xyxy in input pixels, the assigned gt box (meaningless where not foreground).
        scores: (B, A, C) soft classification targets: one-hot(label) × normalised alignment, 0 for background.
        foreground: (B, A) bool, anchors assigned to a gt.
    """

    labels: torch.Tensor
    boxes: torch.Tensor
    scores: torch.Tensor
    foreground: torch.Tensor


def pairwise_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of every pair within each image.

    Args:
        boxes1: (B, M, 4) xyxy.
        boxes2: (B, A, 4) xyxy, same units as boxes1.

    Returns:
        (B, M, A) IoU; degenerate boxes count as area 0.
    """
    # Coordinate by coordinate rather than on stacked (B, M, A, 2) pairs: a third of the memory traffic at M ~ 100.
    x1a, y1a, x2a, y2a = (boxes1[..., i : i + 1] for i in range(4))  # each (B, M, 1)
    x1b, y1b, x2b, y2b = (boxes2[..., i].unsqueeze(1) for i in range(4))  # each (B, 1, A)
    overlap_w = (torch.minimum(x2a, x2b) - torch.maximum(x1a, x1b)).clamp_(min=0)
    overlap_h = (torch.minimum(y2a, y2b) - torch.maximum(y1a, y1b)).clamp_(min=0)
    overlap = overlap_w.mul_(overlap_h)  # (B, M, A)
    area1 = (x2a - x1a).clamp(min=0) * (y2a - y1a).clamp(min=0)
    area2 = (x2b - x1b).clamp(min=0) * (y2b - y1b).clamp(min=0)
    return overlap / (area1 + area2 - overlap + eps)


def points_inside_boxes(points: torch.Tensor, boxes: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Which points lie strictly inside which boxes.

    Args:
        points: (A, 2) x, y.
        boxes: (B, M, 4) xyxy, same units as points.

    Returns:
        (B, M, A) bool, True where the smallest of the point's l, t, r, b distances to the box edges exceeds eps.
    """
    x, y = points[:, 0], points[:, 1]  # (A,)
    x1, y1, x2, y2 = (boxes[..., i : i + 1] for i in range(4))  # each (B, M, 1)
    # min(l, t, r, b) > eps, without materialising the (B, M, A, 4) distances.
    return ((x - x1) > eps) & ((y - y1) > eps) & ((x2 - x) > eps) & ((y2 - y) > eps)


class TaskAlignedAssigner:
    """TOOD's task-aligned assigner as YOLO-NAS configures it (docs/training_recipe.md §1).

    For each gt j and anchor i: t_ij = s_ij^alpha · IoU_ij^beta, with s the predicted probability of gt j's class
    and IoU against the anchor's predicted box. An anchor is a candidate for gt j only if its point lies strictly
    inside the gt box. Each gt takes its top-k candidates over all levels jointly; an anchor claimed by several
    gts keeps the claimant with the highest IoU. Soft targets are t_ij / max_i t_ij · max_i IoU_ij (max over the
    gt's positives), then the max over gts per anchor.

    No parameters and no gradient: `assign` runs under torch.no_grad().
    """

    def __init__(self, topk: int = 13, alpha: float = 1.0, beta: float = 6.0, eps: float = 1e-9) -> None:
        self.topk = topk
        self.alpha = alpha
        self.beta = beta
        self.eps = eps

    @torch.no_grad()
    def assign(
        self,
        pred_scores: torch.Tensor,
        pred_boxes: torch.Tensor,
        anchor_points: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_mask: torch.Tensor,
        num_classes: int,
    ) -> Assignment:
        """Assign each anchor a gt (or background) and a soft score.

        Args:
            pred_scores: (B, A, C) sigmoid class probabilities.
            pred_boxes: (B, A, 4) predicted boxes, xyxy in input pixels.
            anchor_points: (A, 2) anchor centres x, y in input pixels.
            gt_labels: (B, M) int64 class per gt; any value on padding rows.
            gt_boxes: (B, M, 4) xyxy in input pixels; M may be 0.
            gt_mask: (B, M) bool, True for real gts, False for padding rows.
            num_classes: C; also the background label.

        Returns:
            The per-anchor `Assignment` (boxes in input pixels).
        """
        batch, num_anchors, _ = pred_scores.shape
        num_gts = gt_boxes.shape[1]
        device = pred_scores.device
        if num_gts == 0:
            return Assignment(
                labels=torch.full((batch, num_anchors), num_classes, dtype=torch.long, device=device),
                boxes=torch.zeros((batch, num_anchors, 4), dtype=pred_boxes.dtype, device=device),
                scores=torch.zeros_like(pred_scores),
                foreground=torch.zeros((batch, num_anchors), dtype=torch.bool, device=device),
            )

        gt_mask = gt_mask.bool()
        # Padding rows may carry any label (e.g. -1): gather with a safe index, they are masked out below.
        safe_labels = torch.where(gt_mask, gt_labels, torch.zeros_like(gt_labels)).long()

        ious = pairwise_iou(gt_boxes, pred_boxes)  # (B, M, A)
        class_scores = pred_scores.gather(2, safe_labels.unsqueeze(1).expand(batch, num_anchors, num_gts))  # (B,A,M)
        alignment = class_scores.transpose(1, 2).pow(self.alpha) * ious.pow(self.beta)  # (B, M, A)

        inside = points_inside_boxes(anchor_points, gt_boxes, self.eps) & gt_mask.unsqueeze(-1)  # (B, M, A)
        # Rank candidates above every non-candidate so that, when fewer than k points lie inside a box, all of
        # them are kept even if their alignment underflowed to 0 (SG leaves that tie to torch.topk's whim).
        ranking = torch.where(inside, alignment, torch.full_like(alignment, -1.0))
        topk_index = ranking.topk(min(self.topk, num_anchors), dim=-1).indices  # (B, M, k)
        in_topk = torch.zeros_like(inside).scatter_(-1, topk_index, True)
        claimed = in_topk & inside  # (B, M, A)

        # One gt per anchor: the claimant whose box best overlaps the anchor's predicted box. SG takes the argmax
        # over all gts of the image, which can hand an anchor to a gt it is not inside; we only pick among claimants.
        foreground = claimed.any(dim=1)  # (B, A)
        # max(...).indices, not argmax: on CPU argmax over a strided dim is ~15x slower. Ties → the first gt.
        best_gt = torch.where(claimed, ious, torch.full_like(ious, -1.0)).max(dim=1).indices  # (B, A)
        positive = torch.zeros_like(claimed).scatter_(1, best_gt.unsqueeze(1), True) & foreground.unsqueeze(1)

        labels = safe_labels.gather(1, best_gt)
        labels = torch.where(foreground, labels, torch.full_like(labels, num_classes))
        boxes = gt_boxes.gather(1, best_gt.unsqueeze(-1).expand(batch, num_anchors, 4))

        alignment = alignment * positive
        max_alignment = alignment.amax(dim=-1, keepdim=True)  # (B, M, 1)
        max_iou = (ious * positive).amax(dim=-1, keepdim=True)  # (B, M, 1)
        normalised = (alignment / (max_alignment + self.eps) * max_iou).amax(dim=1)  # (B, A)
        one_hot = torch.nn.functional.one_hot(labels, num_classes + 1)[..., :num_classes].to(pred_scores.dtype)
        scores = one_hot * normalised.unsqueeze(-1)
        return Assignment(labels=labels, boxes=boxes, scores=scores, foreground=foreground)

    __call__ = assign
