"""YOLO-NAS PAN neck with an extra finer skip on the up-path (docs/yolo_nas.md §4).

Inputs c2..c5 = (96 @ H/4, 192 @ H/8, 384 @ H/16, 768 @ H/32); outputs p3, p4, p5 = (96 @ H/8, 192 @ H/16,
384 @ H/32) for every size.
"""

from __future__ import annotations

import torch
from torch import nn

from backend.models.blocks import ConvBNReLU, CSPLayer
from backend.models.config import NeckStageConfig


class UpStage(nn.Module):
    """Upsamples x and merges it with a same-resolution skip and a one-level-finer skip (downsampled).

    forward(x, skip1, skip2) → (inter, out): inter = 1x1 conv of x (B, out, h, w), reused by the down path;
    out (B, out, 2h, 2w). Concat order [upsampled inter, reduced skip1, downsampled skip2].
    """

    def __init__(
        self, in_channels: int, skip1_channels: int, skip2_channels: int, out_channels: int, config: NeckStageConfig
    ):
        super().__init__()
        self.reduce_skip1 = ConvBNReLU(skip1_channels, out_channels, 1)
        self.reduce_skip2 = ConvBNReLU(skip2_channels, out_channels, 1)
        self.conv = ConvBNReLU(in_channels, out_channels, 1)
        self.upsample = nn.ConvTranspose2d(out_channels, out_channels, kernel_size=2, stride=2, bias=True)
        self.downsample = ConvBNReLU(out_channels, out_channels, 3, stride=2)
        self.reduce_after_concat = ConvBNReLU(out_channels * 3, out_channels, 1)
        self.blocks = CSPLayer(out_channels, out_channels, config.num_blocks, config.hidden_channels, use_qarepvgg=True)

    def forward(self, x: torch.Tensor, skip1: torch.Tensor, skip2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inter = self.conv(x)
        merged = torch.cat(
            [self.upsample(inter), self.reduce_skip1(skip1), self.downsample(self.reduce_skip2(skip2))], dim=1
        )
        return inter, self.blocks(self.reduce_after_concat(merged))


class DownStage(nn.Module):
    """Stride-2 3x3 conv of x to out/2 channels, concat [x', skip], CSP of plain-conv bottlenecks → out."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, config: NeckStageConfig):
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels // 2, 3, stride=2)
        self.blocks = CSPLayer(
            out_channels // 2 + skip_channels,
            out_channels,
            config.num_blocks,
            config.hidden_channels,
            use_qarepvgg=False,
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # (B, in, 2h, 2w) → (B, out, h, w)
        return self.blocks(torch.cat([self.conv(x), skip], dim=1))


class PANNeck(nn.Module):
    """neck1/neck2 go up (to stride 8), neck3/neck4 come back down (to stride 32)."""

    def __init__(
        self, stages: tuple[NeckStageConfig, ...], in_channels: tuple[int, int, int, int] = (96, 192, 384, 768)
    ):
        super().__init__()
        c2, c3, c4, c5 = in_channels
        self.neck1 = UpStage(c5, c4, c3, 192, stages[0])
        self.neck2 = UpStage(192, c3, c2, 96, stages[1])
        self.neck3 = DownStage(96, 96, 192, stages[2])
        self.neck4 = DownStage(192, 192, 384, stages[3])
        self.out_channels = (96, 192, 384)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        c2, c3, c4, c5 = features
        inter1, x = self.neck1(c5, c4, c3)  # inter1 (B, 192, H/32), x (B, 192, H/16)
        inter2, p3 = self.neck2(x, c3, c2)  # inter2 (B, 96, H/16), p3 (B, 96, H/8)
        p4 = self.neck3(p3, inter2)  # (B, 192, H/16)
        p5 = self.neck4(p4, inter1)  # (B, 384, H/32)
        return [p3, p4, p5]
