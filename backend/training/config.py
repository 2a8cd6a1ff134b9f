"""The training configuration: one frozen dataclass, saved resolved as the run's config.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# The fine-tuning recipe's learning rates (docs/training_recipe.md §2), for runs that start from weights.
DEFAULT_LR = {"s": 5e-4, "m": 4e-4, "l": 4e-4}
# From random initialisation twice that: on raccoon (bench/train.py, S at 320, 10 minutes on 2 CPU cores) 1e-3 gave
# mAP50-95 0.231 against 0.193 with 5e-4.
FROM_SCRATCH_LR_FACTOR = 2.0
# The loss's named terms, as every "step" event and metrics.jsonl line carries them (torch-free: the pages read it).
LOSS_TERMS = ("loss", "loss_cls", "loss_iou", "loss_dfl")


class TrainingError(RuntimeError):
    """Training cannot go on; the message says what to try."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run.

    Attributes:
        data: the dataset folder (COCO layout with train.json/val.json, or a YOLO layout) or a COCO json.
        size: "s", "m" or "l".
        imgsz: square input side, a multiple of 32.
        epochs: upper bound on epochs; `time_minutes` and early stopping may end the run sooner.
        batch_size: images per optimizer step; in distributed training the global batch, split evenly over the
            processes (see backend/training/world.py).
        time_minutes: wall-clock budget counted from the first step; the schedule anneals within it.
        weights: None (random initialisation), "coco" (official COCO weights, transferred to our classes), or a
            checkpoint / run folder of an earlier run.
        lr: peak learning rate; None takes the recipe's for the size, doubled when starting from random weights.
        weight_decay: AdamW weight decay on weights (none on biases and BatchNorm).
        warmup_epochs: linear warm-up length in epochs (capped at 1000 steps and at a fifth of the run).
        final_lr_ratio: the cosine ends at this fraction of `lr`.
        ema_decay: the EMA decay reached after its threshold warm-up.
        grad_clip_norm: clip the global gradient norm to this; None disables clipping.
        min_samples: an epoch holds at least this many samples (small datasets are resampled).
        augment: the augmentation pipeline on; off trains on letterboxed images only.
        augment_pipeline: the albumentations pipeline in `A.to_dict` form (backend/data/augment.py); None takes
            the recipe's (`default_pipeline(imgsz, mosaic_prob)`). A run records the one it trains with, so a
            resume uses it; config.json files written before there was one resume with the default.
        mosaic_prob: probability of a mosaic sample in the default pipeline (the recipe: 1.0); a given
            `augment_pipeline` carries its own.
        close_mosaic: the last fraction of the run trains without mosaic (decided at each epoch's start from the
            schedule's progress, by steps or by the time budget: an epoch starting in that fraction has none); 0
            keeps mosaic to the end. A run of n epochs closes at least one only when the fraction exceeds 1/n.
        patience: stop after this many evaluated epochs without a better mAP50-95; None never stops early.
        eval_every: evaluate every this many epochs (and always at the end).
        device: "auto", "cpu", "cuda" or "cuda:N".
        amp: mixed precision (fp16 on CUDA, bf16 on CPUs that have it); None means on where it helps.
        compile: train a `torch.compile`d (inductor) model, its kernels cached in <storage>/cache/inductor so a
            later run of the same model, size and batch starts warm; a compile error trains eagerly. Off by
            default: a cold compile of S costs minutes on a small CPU (docs/training_speed.md).
        num_workers: data-loading processes; None picks from the core count.
        checkpoint_minutes: also write last.pt mid-epoch this often, so a killed run loses little.
        seed: seeds initialisation, sampling and augmentation.
        sync_bn: in distributed training, BatchNorm statistics over the global batch (SyncBN, as the recipe's
            multi-GPU runs); off, each process normalises with its own share. No effect in one process.
    """

    data: str = ""
    size: str = "s"
    imgsz: int = 640
    epochs: int = 100
    batch_size: int = 16
    time_minutes: float | None = None
    weights: str | None = None
    lr: float | None = None
    weight_decay: float = 1e-4
    warmup_epochs: float = 3.0
    final_lr_ratio: float = 0.1
    ema_decay: float = 0.9
    grad_clip_norm: float | None = 10.0
    min_samples: int = 512
    augment: bool = True
    augment_pipeline: dict[str, Any] | None = None
    mosaic_prob: float = 1.0
    close_mosaic: float = 0.0
    patience: int | None = 30
    eval_every: int = 1
    device: str = "auto"
    amp: bool | None = None
    compile: bool = False
    num_workers: int | None = None
    checkpoint_minutes: float = 5.0
    seed: int = 0
    sync_bn: bool = True

    def __post_init__(self) -> None:
        if self.size not in DEFAULT_LR:
            raise ValueError(f"size must be one of s, m, l; got {self.size!r}")
        if self.imgsz <= 0 or self.imgsz % 32:
            raise ValueError(f"imgsz must be a positive multiple of 32 (the model's largest stride), got {self.imgsz}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch size must be at least 1, got {self.epochs} and {self.batch_size}")
        if self.time_minutes is not None and self.time_minutes <= 0:
            raise ValueError(f"time budget must be positive minutes, got {self.time_minutes}")
        if not 0.0 <= self.close_mosaic < 1.0:
            raise ValueError(f"close_mosaic is a fraction of the run in [0, 1), got {self.close_mosaic}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be at least 1, got {self.eval_every}")

    @property
    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR[self.size] * (1.0 if self.weights else FROM_SCRATCH_LR_FACTOR)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Ignores keys it does not know (a config.json written by a newer version still loads)."""
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def with_changes(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)
