"""YOLO-NAS architecture configs: S, M and L are instances of one frozen dataclass (docs/yolo_nas.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BackboneStageConfig:
    num_blocks: int
    hidden_channels: int
    concat_intermediates: bool


@dataclass(frozen=True)
class NeckStageConfig:
    hidden_channels: int
    num_blocks: int


@dataclass(frozen=True)
class YoloNasConfig:
    """Architecture of one YOLO-NAS size. The number of classes is not part of it: see `build_model`."""

    size: str
    backbone: tuple[BackboneStageConfig, ...]  # stage1..stage4
    neck: tuple[NeckStageConfig, ...]  # neck1 (up), neck2 (up), neck3 (down), neck4 (down)
    head_width_mult: float
    reg_max: int = 16
    strides: tuple[int, ...] = (8, 16, 32)

    @property
    def head_inter_channels(self) -> tuple[int, int, int]:
        # Official rule: ceil(int(base · width_mult) / 8) · 8 with bases 128/256/512.
        a, b, c = (math.ceil(int(base * self.head_width_mult) / 8) * 8 for base in (128, 256, 512))
        return a, b, c


def _backbone(*stages: tuple[int, int, bool]) -> tuple[BackboneStageConfig, ...]:
    return tuple(BackboneStageConfig(n, hidden, concat) for n, hidden, concat in stages)


def _neck(*stages: tuple[int, int]) -> tuple[NeckStageConfig, ...]:
    return tuple(NeckStageConfig(hidden, n) for hidden, n in stages)


# (num_blocks, hidden_channels, concat_intermediates) per backbone stage; (hidden_channels, num_blocks) per neck stage.
VARIANTS: dict[str, YoloNasConfig] = {
    "s": YoloNasConfig(
        size="s",
        backbone=_backbone((2, 32, False), (3, 64, False), (5, 96, False), (2, 192, False)),
        neck=_neck((64, 2), (48, 2), (64, 2), (64, 2)),
        head_width_mult=0.5,
    ),
    "m": YoloNasConfig(
        size="m",
        backbone=_backbone((2, 64, True), (3, 128, True), (5, 256, True), (2, 384, False)),
        neck=_neck((192, 2), (64, 3), (192, 2), (256, 3)),
        head_width_mult=0.75,
    ),
    "l": YoloNasConfig(
        size="l",
        backbone=_backbone((2, 96, True), (3, 128, True), (5, 256, True), (2, 512, True)),
        neck=_neck((128, 4), (128, 4), (128, 4), (256, 4)),
        head_width_mult=1.0,
    ),
}


def get_config(size: str) -> YoloNasConfig:
    try:
        return VARIANTS[size.lower()]
    except KeyError:
        raise ValueError(f"unknown YOLO-NAS size {size!r}: choose one of {', '.join(VARIANTS)}") from None
