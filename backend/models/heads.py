"""YOLO-NAS NDFL heads: per level a 1x1 stem, one 3x3 conv per branch, class and DFL-distance predictors.

docs/yolo_nas.md §5. The heads return raw logits only; decoding lives in `decoding.py`.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from backend.models.blocks import HeadConvBNReLU

CLASS_PRIOR_PROBABILITY = 0.01


class DFLHead(nn.Module):
    """One level: (B, in, h, w) → reg logits (B, 4·(reg_max+1), h, w), class logits (B, num_classes, h, w)."""

    def __init__(self, in_channels: int, inter_channels: int, num_classes: int, reg_max: int):
        super().__init__()
        self.stem = HeadConvBNReLU(in_channels, inter_channels, 1)
        self.cls_convs = nn.Sequential(HeadConvBNReLU(inter_channels, inter_channels, 3))
        self.reg_convs = nn.Sequential(HeadConvBNReLU(inter_channels, inter_channels, 3))
        self.cls_pred = nn.Conv2d(inter_channels, num_classes, 1)
        self.reg_pred = nn.Conv2d(inter_channels, 4 * (reg_max + 1), 1)
        # Every anchor starts predicting "object" with probability 0.01, as in the official init (focal-loss prior).
        nn.init.constant_(
            cast(torch.Tensor, self.cls_pred.bias), -math.log((1 - CLASS_PRIOR_PROBABILITY) / CLASS_PRIOR_PROBABILITY)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        return self.reg_pred(self.reg_convs(x)), self.cls_pred(self.cls_convs(x))


class NDFLHeads(nn.Module):
    """Three heads for strides 8, 16, 32, outputs flattened and concatenated level by level.

    forward(features) → (cls_logits (B, A, C), reg_distri (B, A, 4·(reg_max+1))), A = Σ h·w over the levels in
    stride order, row-major within a level; the last axis of reg_distri is side-major (l, t, r, b × bins).
    """

    def __init__(
        self, in_channels: tuple[int, ...], inter_channels: tuple[int, ...], num_classes: int, reg_max: int = 16
    ):
        super().__init__()
        self.head1 = DFLHead(in_channels[0], inter_channels[0], num_classes, reg_max)
        self.head2 = DFLHead(in_channels[1], inter_channels[1], num_classes, reg_max)
        self.head3 = DFLHead(in_channels[2], inter_channels[2], num_classes, reg_max)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cls_levels, reg_levels = [], []
        for head, feature in zip((self.head1, self.head2, self.head3), features, strict=True):
            reg, cls = head(feature)
            reg_levels.append(reg.flatten(2).permute(0, 2, 1))  # (B, h·w, 68)
            cls_levels.append(cls.flatten(2).permute(0, 2, 1))  # (B, h·w, C)
        return torch.cat(cls_levels, dim=1), torch.cat(reg_levels, dim=1)
