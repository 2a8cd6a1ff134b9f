"""YOLO-NAS S/M/L in plain PyTorch (Deci AI, 2023; super-gradients' Apache-2.0 reference).

Architecture facts: docs/yolo_nas.md. `state_dict()` keys and shapes equal the official model's, so
official checkpoints load unchanged. The model returns raw head outputs; `decoding.py` turns them into boxes.
"""

from __future__ import annotations

import torch
from torch import nn

from backend.models.backbone import Backbone
from backend.models.blocks import FusionState, QARepVGGBlock
from backend.models.config import YoloNasConfig, get_config
from backend.models.decoding import decode_predictions
from backend.models.heads import NDFLHeads
from backend.models.neck import PANNeck


class YoloNAS(nn.Module):
    """YOLO-NAS detector.

    forward(images (B, 3, H, W) RGB in [0, 1], H and W multiples of 32) → (cls_logits (B, A, C),
    reg_distri (B, A, 68)), the same in train and eval mode; A = H·W·(1/64 + 1/256 + 1/1024).
    """

    def __init__(self, config: YoloNasConfig, num_classes: int = 80):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.config = config
        self.num_classes = num_classes
        self.backbone = Backbone(config.backbone)
        self.neck = PANNeck(config.neck)
        self.heads = NDFLHeads(self.neck.out_channels, config.head_inter_channels, num_classes, config.reg_max)

    @property
    def strides(self) -> tuple[int, ...]:
        return self.config.strides

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = images.shape[-2:]
        if images.ndim != 4 or images.shape[1] != 3 or height % 32 or width % 32:
            raise ValueError(
                f"expected images of shape (B, 3, H, W) with H and W multiples of 32, got {tuple(images.shape)}: "
                "letterbox them with backend.processing first"
            )
        return self.heads(self.neck(self.backbone(images)))

    def predict_boxes(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) → boxes (B, A, 4) xyxy in input pixels, scores (B, A, C) sigmoid."""
        cls_logits, reg_distri = self(images)
        return decode_predictions(cls_logits, reg_distri, (images.shape[-2], images.shape[-1]), self.strides)

    @property
    def fusion(self) -> FusionState:
        """ "none", "partial" or "full": the state of the QARepVGG blocks (all share it)."""
        return next(m.fusion for m in self.modules() if isinstance(m, QARepVGGBlock))

    def fuse(self, full: bool = False) -> YoloNAS:
        """Re-parameterises every QARepVGG block in place (partial keeps post_bn and stays trainable)."""
        for module in self.modules():
            if isinstance(module, QARepVGGBlock):
                module.fuse(full=full)
        return self


def build_model(size: str | YoloNasConfig, num_classes: int = 80) -> YoloNAS:
    """A randomly initialised YOLO-NAS of size "s", "m" or "l" (or a config) with `num_classes` classes."""
    config = size if isinstance(size, YoloNasConfig) else get_config(size)
    return YoloNAS(config, num_classes)
