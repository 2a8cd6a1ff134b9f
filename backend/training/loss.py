"""The YOLO-NAS training loss: PP-YOLOE's loss as YOLO-NAS configures it.

PP-YOLOE (Xu et al., arXiv 2203.16250): task-aligned assignment (TOOD, arXiv 2108.07755), varifocal
classification loss (VarifocalNet, arXiv 2008.13367), GIoU (Rezatofighi et al., arXiv 1902.09630) and distribution
focal loss (Generalized Focal Loss, arXiv 2006.04388), all normalised by the sum of soft scores. Weights, constants
and every rule follow docs/training_recipe.md §1.

Box spaces: gts come in as xyxy in input pixels (the letterboxed network input); the assigner works in pixels;
GIoU and DFL are computed in grid units (pixels / stride of each anchor's level), as the head predicts them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from backend.models.decoding import dfl_distances, distances_to_boxes, make_anchor_points
from backend.training.assigner import TaskAlignedAssigner

VARIFOCAL_ALPHA = 0.75
VARIFOCAL_GAMMA = 2.0
GIOU_EPS = 1e-10


def giou_loss(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, eps: float = GIOU_EPS) -> torch.Tensor:
    """1 − GIoU per box pair.

    Args:
        pred_boxes: (N, 4) xyxy.
        target_boxes: (N, 4) xyxy, same units.

    Returns:
        (N,) loss in [0, 2].
    """
    top_left = torch.maximum(pred_boxes[:, :2], target_boxes[:, :2])
    bottom_right = torch.minimum(pred_boxes[:, 2:], target_boxes[:, 2:])
    overlap = (bottom_right - top_left).clamp(min=0).prod(-1)
    pred_area = (pred_boxes[:, 2:] - pred_boxes[:, :2]).prod(-1)
    target_area = (target_boxes[:, 2:] - target_boxes[:, :2]).prod(-1)
    union = pred_area + target_area - overlap + eps
    enclosing = (
        torch.maximum(pred_boxes[:, 2:], target_boxes[:, 2:]) - torch.minimum(pred_boxes[:, :2], target_boxes[:, :2])
    ).prod(-1) + eps
    giou = overlap / union - (enclosing - union) / enclosing
    return 1.0 - giou


def distribution_focal_loss(bin_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DFL: cross-entropy towards the two bins that bracket each continuous target, mean over the 4 sides.

    Args:
        bin_logits: (N, 4, reg_max + 1) raw logits per side (l, t, r, b).
        targets: (N, 4) distances in grid units, already clipped to [0, reg_max − 0.01].

    Returns:
        (N,) loss per box.
    """
    bins = bin_logits.shape[-1]
    left = targets.floor().long()
    right = left + 1
    weight_left = right.to(targets.dtype) - targets
    weight_right = targets - left.to(targets.dtype)
    log_probs = bin_logits.reshape(-1, bins).log_softmax(dim=-1)
    loss_left = -log_probs.gather(1, left.reshape(-1, 1)).reshape(targets.shape) * weight_left
    loss_right = -log_probs.gather(1, right.reshape(-1, 1)).reshape(targets.shape) * weight_right
    return (loss_left + loss_right).mean(dim=-1)


def dfl_targets(points: torch.Tensor, boxes: torch.Tensor, reg_max: int) -> torch.Tensor:
    """Distances from anchor points to the edges of their target boxes, clipped to what the bins can express.

    Args:
        points: (N, 2) anchor points in grid units.
        boxes: (N, 4) xyxy target boxes in grid units.
        reg_max: the largest bin; the upper clip is reg_max − 0.01 so the right bin (⌊y⌋ + 1) still exists.

    Returns:
        (N, 4) l, t, r, b in [0, reg_max − 0.01] grid units.
    """
    distances = torch.cat([points - boxes[:, :2], boxes[:, 2:] - points], dim=-1)
    return distances.clamp(0.0, reg_max - 0.01)


class YoloNASLoss(nn.Module):
    """Varifocal + 2.5·GIoU + 0.5·DFL with task-aligned assignment, normalised by S = max(1, Σ soft scores).

    Args:
        num_classes: C.
        strides: strides of the head levels, in the order the anchors are concatenated.
        reg_max: the largest DFL bin (reg_max + 1 bins per side).
        cls_weight, iou_weight, dfl_weight: weights of the three terms.
        assigner: defaults to TaskAlignedAssigner(topk=13, alpha=1.0, beta=6.0, eps=1e-9).
        distributed: under DDP (one slice of the global batch per process): S is all-reduced over the default
            process group, clamped to 1 and divided by the number of processes (docs/training_recipe.md §1). DDP's
            gradient average of the processes' losses is then the single-process gradient of the global batch,
            Σ_r ∇sums_r / S.
            (super-gradients clamps after dividing, max(S/N, 1): a batch with S < N then differs.)
    """

    def __init__(
        self,
        num_classes: int,
        strides: tuple[int, ...] = (8, 16, 32),
        reg_max: int = 16,
        cls_weight: float = 1.0,
        iou_weight: float = 2.5,
        dfl_weight: float = 0.5,
        assigner: TaskAlignedAssigner | None = None,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        self.distributed = distributed
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.reg_max = reg_max
        self.cls_weight = cls_weight
        self.iou_weight = iou_weight
        self.dfl_weight = dfl_weight
        self.assigner = assigner if assigner is not None else TaskAlignedAssigner()
        self._anchor_cache: dict[tuple[tuple[int, int], torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def anchors(self, image_size: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, 2) anchor points in input pixels and (A, 1) strides, cached per (image size, device)."""
        key = ((int(image_size[0]), int(image_size[1])), torch.device(device))
        if key not in self._anchor_cache:
            self._anchor_cache[key] = make_anchor_points(key[0], self.strides, device)
        return self._anchor_cache[key]

    def forward(
        self,
        cls_logits: torch.Tensor,
        reg_distri: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_mask: torch.Tensor,
        image_size: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        """Loss of one batch.

        Args:
            cls_logits: (B, A, C) raw class logits (any float dtype; computed in float32).
            reg_distri: (B, A, 4·(reg_max + 1)) raw DFL bin logits, side-major (l, t, r, b).
            gt_boxes: (B, M, 4) xyxy in input pixels; M may be 0.
            gt_labels: (B, M) int64 classes in [0, C); any value on padding rows.
            gt_mask: (B, M) bool, True for real gts.
            image_size: (H, W) of the network input in pixels.

        Returns:
            `loss` (scalar to backprop) = `loss_cls` + `loss_iou` + `loss_dfl` (each weighted and divided by S),
            and `assigned_scores_sum` (Σ soft scores of this batch before the max(1, ·) clamp, detached). Under
            `distributed` the terms are this process's share: their mean over the processes is the global
            batch's loss.
        """
        device = cls_logits.device
        # AMP: the head may run in fp16/bf16; p², BCE and the IoU^6 alignment need float32 range and precision.
        with torch.autocast(device_type=device.type, enabled=False):
            cls_logits = cls_logits.float()
            reg_distri = reg_distri.float()
            gt_boxes = gt_boxes.float().to(device)
            gt_labels = gt_labels.long().to(device)
            gt_mask = gt_mask.bool().to(device)
            anchor_points, stride_tensor = self.anchors(image_size, device)
            self._check_inputs(cls_logits, reg_distri, gt_boxes, gt_labels, gt_mask, anchor_points.shape[0])

            anchor_points_grid = anchor_points / stride_tensor  # (A, 2) grid units
            pred_boxes_grid = distances_to_boxes(dfl_distances(reg_distri), anchor_points_grid)  # (B, A, 4) grid

            assignment = self.assigner.assign(
                cls_logits.detach().sigmoid(),
                pred_boxes_grid.detach() * stride_tensor,
                anchor_points,
                gt_labels,
                gt_boxes,
                gt_mask,
                self.num_classes,
            )
            soft_scores = assignment.scores  # (B, A, C)

            # Varifocal: negatives down-weighted by 0.75·p², positives weighted by their soft target q.
            probabilities = cls_logits.sigmoid()
            one_hot = F.one_hot(assignment.labels, self.num_classes + 1)[..., : self.num_classes].float()
            weight = VARIFOCAL_ALPHA * probabilities.pow(VARIFOCAL_GAMMA) * (1.0 - one_hot) + soft_scores * one_hot
            bce = F.binary_cross_entropy_with_logits(cls_logits, soft_scores, reduction="none")
            cls_sum = (bce * weight).sum()

            scores_sum = soft_scores.sum()
            normaliser = scores_sum.clamp(min=1.0)
            if self.distributed and dist.is_initialized():
                global_sum = scores_sum.detach().clone()
                dist.all_reduce(global_sum, op=dist.ReduceOp.SUM)
                normaliser = global_sum.clamp(min=1.0) / dist.get_world_size()

            # Box terms on positives only, in grid units; an empty selection sums to 0 and keeps the graph.
            foreground = assignment.foreground  # (B, A)
            box_weight = soft_scores.sum(-1)[foreground]  # (P,)
            strides = stride_tensor.expand(foreground.shape[0], -1, -1)[foreground]  # (P, 1)
            target_boxes_grid = assignment.boxes[foreground] / strides  # (P, 4)
            iou_sum = (giou_loss(pred_boxes_grid[foreground], target_boxes_grid) * box_weight).sum()

            points = anchor_points_grid.expand(foreground.shape[0], -1, -1)[foreground]  # (P, 2)
            target_distances = dfl_targets(points, target_boxes_grid, self.reg_max)  # (P, 4) grid units
            bin_logits = reg_distri[foreground].reshape(-1, 4, self.reg_max + 1)
            dfl_sum = (distribution_focal_loss(bin_logits, target_distances) * box_weight).sum()

            loss_cls = self.cls_weight * cls_sum / normaliser
            loss_iou = self.iou_weight * iou_sum / normaliser
            loss_dfl = self.dfl_weight * dfl_sum / normaliser
            return {
                "loss": loss_cls + loss_iou + loss_dfl,
                "loss_cls": loss_cls,
                "loss_iou": loss_iou,
                "loss_dfl": loss_dfl,
                "assigned_scores_sum": scores_sum.detach(),
            }

    def _check_inputs(
        self,
        cls_logits: torch.Tensor,
        reg_distri: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_mask: torch.Tensor,
        num_anchors: int,
    ) -> None:
        batch = cls_logits.shape[0]
        if cls_logits.shape != (batch, num_anchors, self.num_classes):
            raise ValueError(
                f"cls_logits has shape {tuple(cls_logits.shape)}, expected ({batch}, {num_anchors}, "
                f"{self.num_classes}): check num_classes and that image_size is the size the model was run at"
            )
        if reg_distri.shape != (batch, num_anchors, 4 * (self.reg_max + 1)):
            raise ValueError(
                f"reg_distri has shape {tuple(reg_distri.shape)}, expected ({batch}, {num_anchors}, "
                f"{4 * (self.reg_max + 1)}): check reg_max and image_size"
            )
        num_gts = gt_boxes.shape[1] if gt_boxes.dim() == 3 else -1
        if (
            gt_boxes.shape != (batch, num_gts, 4)
            or gt_labels.shape != (batch, num_gts)
            or gt_mask.shape
            != (
                batch,
                num_gts,
            )
        ):
            raise ValueError(
                f"targets must be gt_boxes (B, M, 4), gt_labels (B, M), gt_mask (B, M) with B = {batch}; got "
                f"{tuple(gt_boxes.shape)}, {tuple(gt_labels.shape)}, {tuple(gt_mask.shape)}"
            )
        if num_gts and bool(((gt_labels < 0) | (gt_labels >= self.num_classes))[gt_mask].any()):
            raise ValueError(
                f"gt_labels must lie in [0, {self.num_classes}) for every real box; check the dataset's class map"
            )
