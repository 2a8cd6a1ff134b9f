"""The training engine: `train_one_epoch`, `evaluate` and `fit`, plain functions reporting through one callback.

`on_event(name, **data)` receives "train_start", "step" (each loss term, lr, images/s, ETA), "epoch" (train means,
validation metrics), "checkpoint", "early_stop" and "train_end"; `fit` also appends every event to the run's
metrics.jsonl, so a background job can relay progress and a later reader can plot the run.

A run folder (docs/contracts.md §4): config.json, metrics.jsonl, last.pt, best.pt, eval.json.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from backend.data.records import DetectionSet
from backend.evaluation.coco_eval import EvaluationResult, evaluate_detections
from backend.models.checkpoints import save_checkpoint, save_inference_checkpoint
from backend.models.yolo_nas import YoloNAS
from backend.processing import (
    Detections,
    LetterboxInfo,
    PostprocessConfig,
    boxes_to_original,
    letterbox,
    load_image,
    postprocess_torch,
)
from backend.training.config import LOSS_TERMS, TrainingError
from backend.training.ema import ModelEMA
from backend.training.loss import YoloNASLoss
from backend.training.schedule import WarmupCosineSchedule
from backend.training.world import World

logger = logging.getLogger(__name__)

EventCallback = Callable[..., None]
# Validation post-processing of the YOLO-NAS recipes (docs/training_recipe.md §3): a low score threshold so
# the PR curve reaches high recall, class-aware NMS at 0.7, at most 300 boxes per image.
EVAL_POSTPROCESS = PostprocessConfig(conf_threshold=0.01, iou_threshold=0.7, top_k=1000, max_detections=300)
EVAL_CACHE_BYTES = 1 << 30


def ignore_event(name: str, **data: Any) -> None:
    del name, data


# ----------------------------------------------------------------------------------------------------------------
# Devices and precision
# ----------------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} asked for, but torch sees no CUDA GPU: use --device cpu or auto")
    return device


def autocast_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """fp16 on CUDA; bf16 on CPUs with native bf16 (AVX-512 BF16 / AMX, where it trains ~3x faster); else None."""
    if amp is False:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    if amp:
        logger.warning("this CPU has no native bf16: mixed precision is off")
    return None


COMPILE_BACKEND = "inductor"


def compile_model(model: nn.Module, cache_dir: Path, backend: str | Callable | None = None) -> nn.Module:
    """`torch.compile(model)` with inductor's kernel cache in `cache_dir` (where the environment does not choose
    another), so a later run of the same graph starts warm. Compilation happens at the first forward and backward;
    if it fails there, dynamo logs it and that code runs eagerly (`suppress_errors`), so a run never dies of it."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch._dynamo.config.suppress_errors = True
    try:
        return cast(nn.Module, torch.compile(model, backend=backend or COMPILE_BACKEND))
    except Exception as error:  # an unusable backend: train eagerly, as the docstring says
        logger.warning("torch.compile is not usable here (%s): training eagerly", error)
        return model


def use_channels_last(device: torch.device, dtype: torch.dtype | None) -> bool:
    """NHWC activations and weights: oneDNN's NHWC convolutions on every CPU (fp32 included: on a 2-core AVX2 CPU
    a 1.55x faster forward and a 1.11x faster step than NCHW, docs/training_speed.md), cuDNN's with reduced
    precision on CUDA."""
    return device.type == "cpu" or dtype is not None


# ----------------------------------------------------------------------------------------------------------------
# One epoch
# ----------------------------------------------------------------------------------------------------------------


class Clock:
    """Training seconds, carried across resumes, counted only while `fit` runs (from the first step)."""

    def __init__(self, offset_s: float = 0.0, budget_s: float | None = None):
        self.offset_s = offset_s
        self.budget_s = budget_s
        self._started: float | None = None

    def start(self) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        return self.offset_s + (time.perf_counter() - self._started if self._started is not None else 0.0)

    @property
    def out_of_time(self) -> bool:
        return self.budget_s is not None and self.elapsed_s >= self.budget_s


@dataclass
class StepContext:
    """What `train_one_epoch` needs besides the model and the data."""

    loss_fn: YoloNASLoss
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosineSchedule
    ema: ModelEMA | None
    device: torch.device
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    grad_clip_norm: float | None = 10.0
    clock: Clock = field(default_factory=Clock)
    on_event: EventCallback = ignore_event
    stop_requested: Callable[[], bool] | None = None
    # Called after every step with (step_in_epoch); `fit` uses it for time-based mid-epoch checkpoints.
    after_step: Callable[[int], None] | None = None
    # The training processes (DDP): losses, elapsed time and the stop flag are shared over them every step.
    world: World = field(default_factory=World)


def images_to_input(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """(B, 3, H, W) uint8 RGB → float32 in [0, 1] on `device` (converted there: a quarter of the bytes to move)."""
    images = images.to(device, non_blocking=True).float().div_(255.0)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def train_one_epoch(
    model: nn.Module, batches: Sequence[dict] | Any, context: StepContext, *, epoch: int, first_step: int = 0
) -> dict[str, Any]:
    """Trains on `batches` (from `backend.data.loader.collate_detections`), one optimizer step each.

    Args:
        batches: an iterable of dicts with `images` (B, 3, H, W) uint8, `gt_boxes` (B, M, 4) xyxy in input pixels,
            `gt_labels` (B, M), `gt_mask` (B, M).
        epoch: 0-based, for the events.
        first_step: steps of this epoch already done (a resumed run skips that many batches).

    Returns:
        {"steps": steps done in this epoch (first_step included), "stopped": None | "time" | "cancelled",
         and the mean of each loss term over the steps run here}.
    """
    model.train()
    channels_last = use_channels_last(context.device, context.dtype)
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    steps, ran, stopped = first_step, 0, None
    total = len(batches) if hasattr(batches, "__len__") else None
    rate = None  # images/s, smoothed
    iterator = itertools.islice(iter(batches), first_step, None)
    for batch in iterator:
        context.clock.start()
        started = time.perf_counter()
        images = images_to_input(batch["images"], context.device, channels_last)
        targets = [batch[key].to(context.device, non_blocking=True) for key in ("gt_boxes", "gt_labels", "gt_mask")]
        values, stop = _optimizer_step(model, images, targets, context)
        if not math.isfinite(values["loss"]):
            raise TrainingError(
                f"the loss became {values['loss']} at epoch {epoch + 1}, step {steps + 1} "
                f"(cls {values['loss_cls']:.4g}, iou {values['loss_iou']:.4g}, dfl {values['loss_dfl']:.4g}). "
                "Try a lower learning rate (--lr), turning mixed precision off (--no-amp), or check the labels "
                "for boxes far outside their images; resume from last.pt after changing it."
            )
        steps += 1
        ran += 1
        for key in LOSS_TERMS:
            sums[key] += values[key]
        seconds = time.perf_counter() - started
        batch_size = images.shape[0] * context.world.size  # the global batch
        rate = batch_size / seconds if rate is None else 0.9 * rate + 0.1 * batch_size / seconds
        lr = context.optimizer.param_groups[0]["lr"]
        context.on_event(
            "step",
            epoch=epoch,
            step=steps,
            steps_per_epoch=total,
            global_step=context.scheduler.steps_done,
            lr=lr,
            images_per_s=rate,
            elapsed_s=context.clock.elapsed_s,
            eta_s=_eta(context, rate, batch_size),
            **values,
        )
        if context.after_step is not None:
            context.after_step(steps)
        if stop is not None:
            stopped = stop
            break
    means = {key: value / ran for key, value in sums.items()} if ran else {}
    return {"steps": steps, "stopped": stopped, **means}


def _optimizer_step(
    model: nn.Module, images: torch.Tensor, targets: list[torch.Tensor], context: StepContext
) -> tuple[dict[str, float], str | None]:
    """One optimizer step on `model` (a YoloNAS, or one in DistributedDataParallel).

    Returns:
        The loss terms of the global batch (the mean over the processes of each one's share; not finite: no step
        was taken), and None, "time" or "cancelled": whether the run stops after this step, decided alike on every
        process.
    """
    gt_boxes, gt_labels, gt_mask = targets
    world = context.world
    with torch.autocast(context.device.type, dtype=context.dtype or torch.float32, enabled=context.dtype is not None):
        cls_logits, reg_distri = model(images)  # (B, A, C), (B, A, 68)
    # The loss casts to float32 itself: assignment and the log/exp terms stay out of reduced precision.
    losses = context.loss_fn(cls_logits, reg_distri, gt_boxes, gt_labels, gt_mask, tuple(images.shape[2:]))
    # Shared before the backward pass: a non-finite loss on any process stops every one (none waits in DDP's
    # gradient all-reduce for a process that left).
    terms = world.mean(torch.stack([losses[key].detach() for key in LOSS_TERMS])).tolist()
    values = dict(zip(LOSS_TERMS, terms, strict=True))
    if not math.isfinite(values["loss"]):
        return values, None
    context.optimizer.zero_grad(set_to_none=True)
    if context.scaler is not None:
        context.scaler.scale(losses["loss"]).backward()
        context.scaler.unscale_(context.optimizer)
    else:
        losses["loss"].backward()
    if context.grad_clip_norm:
        nn.utils.clip_grad_norm_(model.parameters(), context.grad_clip_norm, foreach=True)
    if context.scaler is not None:
        context.scaler.step(context.optimizer)
        context.scaler.update()
    else:
        context.optimizer.step()
    # The lr schedule and the stopping rules run on the slowest process's clock and anyone's stop request (rank 0
    # holds it): every process takes the same lr and stops after the same step.
    asked = context.stop_requested is not None and context.stop_requested()
    elapsed_s, asked_anywhere = world.maximum([context.clock.elapsed_s, float(asked)])
    context.scheduler.step(elapsed_s)
    if context.ema is not None:
        context.ema.update(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)
    if context.clock.budget_s is not None and elapsed_s >= context.clock.budget_s:
        return values, "time"
    return values, "cancelled" if asked_anywhere else None


def _eta(context: StepContext, rate: float | None, batch_size: int) -> float | None:
    """Seconds left: the steps left at the current speed, or the time budget left, whichever comes first."""
    if not rate:
        return None
    scheduler = context.scheduler
    by_steps = max(0, scheduler.total_steps - scheduler.steps_done) * batch_size / rate
    if context.clock.budget_s is None:
        return by_steps
    return max(0.0, min(by_steps, context.clock.budget_s - context.clock.elapsed_s))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


class EvalImages:
    """The validation images letterboxed once (kept in memory while they fit in `cache_bytes`), in record order."""

    def __init__(self, dataset: DetectionSet, imgsz: int, cache_bytes: int = EVAL_CACHE_BYTES):
        self.dataset = dataset
        self.imgsz = imgsz
        self.cache = len(dataset) * imgsz * imgsz * 3 <= cache_bytes
        self._items: dict[int, tuple[np.ndarray, LetterboxInfo]] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int) -> tuple[np.ndarray, LetterboxInfo]:
        """(imgsz, imgsz, 3) uint8 letterboxed RGB and its mapping back to the original image."""
        if index in self._items:
            return self._items[index]
        item = letterbox(load_image(self.dataset.records[index].path), (self.imgsz, self.imgsz))
        if self.cache:
            self._items[index] = item
        return item


@torch.no_grad()
def predict_images(
    model: YoloNAS,
    images: EvalImages,
    *,
    device: torch.device,
    batch_size: int = 16,
    postprocess: PostprocessConfig = EVAL_POSTPROCESS,
    dtype: torch.dtype | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Detections]:
    """Detections for every image, boxes (N, 4) xyxy in original-image pixels, through the shared post-processing;
    `on_progress(images done, images)` after each batch."""
    was_training = model.training
    model.eval()
    predictions: list[Detections] = []
    for start in range(0, len(images), batch_size):
        items = [images.get(index) for index in range(start, min(start + batch_size, len(images)))]
        batch = torch.from_numpy(np.stack([image for image, _ in items])).permute(0, 3, 1, 2)
        inputs = images_to_input(batch, device, use_channels_last(device, dtype))
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            boxes, scores = model.predict_boxes(inputs)  # (B, A, 4) xyxy input px, (B, A, C)
        for found, (_, info) in zip(postprocess_torch(boxes.float(), scores.float(), postprocess), items, strict=True):
            predictions.append(Detections(boxes_to_original(found.boxes, info), found.scores, found.class_ids))
        if on_progress is not None:
            on_progress(len(predictions), len(images))
    model.train(was_training)
    return predictions


def evaluate(
    model: YoloNAS,
    images: EvalImages,
    *,
    device: torch.device,
    batch_size: int = 16,
    score_threshold: float = 0.25,
    dtype: torch.dtype | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvaluationResult:
    """COCO mAP (pycocotools) of `model` on `images.dataset`, evaluated on a fused copy (same outputs, faster).

    `score_threshold` applies to the confusion matrix and the per-image errors only; mAP uses every detection above
    the recipe's 0.01. `on_progress(images predicted, images)` after each batch (the scoring after the last one is
    short).
    """
    fused = copy.deepcopy(model).eval().fuse() if model.fusion == "none" else model
    predictions = predict_images(
        fused, images, device=device, batch_size=batch_size, dtype=dtype, on_progress=on_progress
    )
    return evaluate_detections(images.dataset, predictions, score_threshold=score_threshold)


def headline_map(result: EvaluationResult) -> float:
    value = result.metrics.get("mAP50-95")
    return float(value) if value is not None else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG's state in tensors and plain values (checkpoints are read with weights_only=True)."""
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(
    path: Path,
    model: YoloNAS,
    context: StepContext,
    *,
    class_names: list[str],
    imgsz: int,
    epoch: int,
    step_in_epoch: int,
    progress: dict[str, Any],
    train_config: dict[str, Any],
) -> Path:
    """last.pt: the model, its EMA, optimizer, scheduler, scaler, epoch position and RNG state (all that resuming
    needs; best.pt, the weights alone, is `write_best`'s).

    `epoch` is the epoch in progress (or the next one when `step_in_epoch` is 0) and `step_in_epoch` the optimizer
    steps of it already done.
    """
    return save_checkpoint(
        path,
        model,
        class_names=class_names,
        imgsz=imgsz,
        ema=context.ema.module if context.ema is not None else None,
        ema_state=context.ema.state_dict() if context.ema is not None else None,
        optimizer=context.optimizer.state_dict(),
        scheduler=context.scheduler.state_dict(),
        scaler=context.scaler.state_dict() if context.scaler is not None else None,
        epoch=epoch,
        step_in_epoch=step_in_epoch,
        rng=rng_state(),
        metrics=progress,
        train_config=train_config,
    )


def write_best(
    path: Path,
    model: YoloNAS,
    context: StepContext,
    *,
    class_names: list[str],
    imgsz: int,
    epoch: int,
    progress: dict[str, Any],
    train_config: dict[str, Any],
    evaluation: dict[str, Any],
) -> Path:
    """best.pt: the evaluated weights (the EMA's when there is one) and what inference and a report need: the model
    config, class names, imgsz, the epoch, the run's progress and this evaluation's headline metrics. No optimizer
    or raw model (those are last.pt's): 76 MB for S instead of 256 MB."""
    evaluated = cast(YoloNAS, context.ema.module if context.ema is not None else model)
    return save_inference_checkpoint(
        path,
        evaluated,
        class_names=class_names,
        imgsz=imgsz,
        weights="ema" if context.ema is not None else "model",
        epoch=epoch,
        step_in_epoch=0,
        metrics=progress,
        train_config=train_config,
        evaluation=evaluation,
    )


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as file:
        file.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
