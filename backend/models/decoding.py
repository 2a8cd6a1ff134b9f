"""Anchor points and DFL decoding of YOLO-NAS head outputs to boxes (docs/yolo_nas.md §6).

Shared by PyTorch evaluation, the loss (anchor points) and the ONNX export, so every path decodes alike.
"""

from __future__ import annotations

import torch


def feature_sizes(image_size: tuple[int, int], strides: tuple[int, ...]) -> list[tuple[int, int]]:
    """(h, w) of each level for an input of (H, W) pixels, multiples of the largest stride."""
    height, width = image_size
    if height % strides[-1] or width % strides[-1] or height <= 0 or width <= 0:
        raise ValueError(f"input height and width must be positive multiples of {strides[-1]}, got {height}x{width}")
    return [(height // stride, width // stride) for stride in strides]


def make_anchor_points(
    image_size: tuple[int, int], strides: tuple[int, ...], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor points at cell centres, level by level in stride order, row-major within a level.

    Returns:
        anchor_points: (A, 2) x, y in input pixels = (col + 0.5, row + 0.5) · stride.
        stride_tensor: (A, 1) the stride of each anchor.
    """
    points, stride_values = [], []
    for (h, w), stride in zip(feature_sizes(image_size, strides), strides, strict=True):
        ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5
        xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2) * stride)
        stride_values.append(torch.full((h * w, 1), float(stride), device=device))
    return torch.cat(points), torch.cat(stride_values)


def dfl_distances(reg_distri: torch.Tensor) -> torch.Tensor:
    """(B, A, 4·(reg_max+1)) raw bin logits → (B, A, 4) expected l, t, r, b distances in grid units."""
    batch, anchors, channels = reg_distri.shape
    bins = channels // 4
    probabilities = reg_distri.reshape(batch, anchors, 4, bins).softmax(dim=-1)
    # Multiply-and-sum rather than a matmul/conv: it exports to plain ONNX ops every runtime handles.
    projection = torch.arange(bins, device=reg_distri.device, dtype=reg_distri.dtype)
    return (probabilities * projection).sum(dim=-1)


def distances_to_boxes(distances: torch.Tensor, anchor_points: torch.Tensor) -> torch.Tensor:
    """(B, A, 4) ltrb and (A, 2) points, same units → (B, A, 4) xyxy boxes in those units."""
    left_top, right_bottom = distances[..., :2], distances[..., 2:]
    return torch.cat([anchor_points - left_top, anchor_points + right_bottom], dim=-1)


def decode_predictions(
    cls_logits: torch.Tensor, reg_distri: torch.Tensor, image_size: tuple[int, int], strides: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw head outputs → boxes and scores.

    Args:
        cls_logits: (B, A, C) class logits.
        reg_distri: (B, A, 4·(reg_max+1)) DFL bin logits.
        image_size: (H, W) of the network input.

    Returns:
        boxes: (B, A, 4) xyxy in input pixels.
        scores: (B, A, C) sigmoid probabilities.
    """
    anchor_points, stride_tensor = make_anchor_points(image_size, strides, cls_logits.device)
    boxes = distances_to_boxes(dfl_distances(reg_distri), anchor_points / stride_tensor) * stride_tensor
    return boxes, cls_logits.sigmoid()
