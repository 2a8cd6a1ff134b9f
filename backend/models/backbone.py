"""YOLO-NAS backbone: a QARepVGG stem, four CSP stages and SPP (docs/yolo_nas.md §3).

Channels are the same for S/M/L: stem 48 (/2), stages 96 (/4), 192 (/8), 384 (/16), 768 (/32), SPP 768.
"""

from __future__ import annotations

import torch
from torch import nn

from backend.models.blocks import SPP, CSPLayer, QARepVGGBlock
from backend.models.config import BackboneStageConfig

STEM_CHANNELS = 48
STAGE_CHANNELS = (96, 192, 384, 768)


class Stem(nn.Module):
    """One stride-2 QARepVGG block, 3 → 48 channels (official keys `stem.conv.*`)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = QARepVGGBlock(in_channels, out_channels, stride=2, use_identity=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Stage(nn.Module):
    """A stride-2 QARepVGG downsample followed by a CSP layer of QARepVGG bottlenecks."""

    def __init__(self, in_channels: int, out_channels: int, config: BackboneStageConfig):
        super().__init__()
        self.downsample = QARepVGGBlock(in_channels, out_channels, stride=2, use_identity=False)
        self.blocks = CSPLayer(
            out_channels,
            out_channels,
            config.num_blocks,
            config.hidden_channels,
            use_qarepvgg=True,
            concat_intermediates=config.concat_intermediates,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, H, W) → (B, out, H/2, W/2)
        return self.blocks(self.downsample(x))


class Backbone(nn.Module):
    """Returns [c2, c3, c4, c5] = [96 @ H/4, 192 @ H/8, 384 @ H/16, 768 @ H/32]; c5 is SPP(stage4)."""

    def __init__(self, stages: tuple[BackboneStageConfig, ...], in_channels: int = 3):
        super().__init__()
        self.stem = Stem(in_channels, STEM_CHANNELS)
        channels = (STEM_CHANNELS, *STAGE_CHANNELS)
        self.stage1 = Stage(channels[0], channels[1], stages[0])
        self.stage2 = Stage(channels[1], channels[2], stages[1])
        self.stage3 = Stage(channels[2], channels[3], stages[2])
        self.stage4 = Stage(channels[3], channels[4], stages[3])
        self.context_module = SPP(channels[4], channels[4])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c2 = self.stage1(self.stem(x))
        c3 = self.stage2(c2)
        c4 = self.stage3(c3)
        c5 = self.context_module(self.stage4(c4))
        return [c2, c3, c4, c5]
