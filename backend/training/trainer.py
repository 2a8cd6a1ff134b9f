"""`fit` and `resume`: a whole training run in a run folder, built from the engine's plain functions.

Run folder: config.json (the resolved TrainConfig, classes and data report), metrics.jsonl (every event, one JSON
object per line), last.pt (every epoch and every `checkpoint_minutes` mid-epoch: all that resuming needs), best.pt
(the best validation mAP50-95: the EMA weights and what inference needs, no optimizer), eval.json (the full
evaluation of best.pt on the validation split). Before anything is written the run checks that its dataset has boxes
to learn from and that the run folder's disk has room for the checkpoints (`checkpoint_sizes`).

With a `World` of several processes (DDP, started by `backend.training.launch`) every process trains on its slice
of each global batch; rank 0 alone writes the run folder, evaluates and reports events (`backend.training.world`).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.data.augment import AugmentationError, pipeline_to_dict, training_pipeline
from backend.data.folders import load_dataset
from backend.data.loader import TrainDataset, make_train_loader, set_loader_epoch
from backend.data.records import DatasetError, DetectionSet, LoadReport
from backend.files import atomic_write_json
from backend.models.checkpoints import (
    CheckpointError,
    checkpoint_sizes,
    ensure_room,
    extract_state_dict,
    infer_architecture,
    load_weights,
    read_checkpoint,
    state_dict_fusion,
)
from backend.models.download import OFFICIAL_COCO_WEIGHTS, fetch_weights
from backend.models.yolo_nas import YoloNAS, build_model
from backend.settings import get_settings
from backend.training.config import TrainConfig
from backend.training.continuation import continued_config, prepare_checkpoint
from backend.training.ema import ModelEMA
from backend.training.engine import (
    Clock,
    EvalImages,
    EventCallback,
    StepContext,
    TrainingError,
    _ignore_event,
    append_jsonl,
    autocast_dtype,
    compile_model,
    evaluate,
    headline_map,
    resolve_device,
    restore_rng_state,
    train_one_epoch,
    use_channels_last,
    write_best,
    write_checkpoint,
)
from backend.training.loss import YoloNASLoss
from backend.training.schedule import WarmupCosineSchedule, build_optimizer
from backend.training.world import World, wrap_model

logger = logging.getLogger(__name__)

VAL_HOLDOUT_FRACTION = 0.2
MAX_WARMUP_STEPS = 1000  # the recipe's LinearBatchLRWarmup length


@dataclass
class FitResult:
    """How a run ended.

    Attributes:
        stopped: "epochs" (all done), "time" (the budget ran out), "early_stop" (patience), or "cancelled".
        epochs_done: whole epochs trained.
        partial_steps: steps of the next epoch trained when the time budget or a cancel ended it part way.
        steps_per_epoch: steps in one epoch.
    """

    run_dir: Path
    stopped: str
    epochs_done: int
    best_map: float
    best_epoch: int | None
    elapsed_s: float
    partial_steps: int = 0
    steps_per_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "run_dir": str(self.run_dir)}


def fit(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    on_event: EventCallback | None = None,
    stop_requested: Callable[[], bool] | None = None,
    world: World | None = None,
) -> FitResult:
    """Trains a new run in `run_dir` (created; refused if it already holds a run: resume that one instead).

    `world`: this process among distributed training processes (see `backend.training.world`); None is one
    process. Only rank 0's `on_event` is called.
    """
    run_dir = Path(run_dir)
    world = world or World()
    if (run_dir / "last.pt").exists() or (run_dir / "config.json").exists():
        raise TrainingError(
            f"{run_dir} already holds a run: resume it (yolodex train --resume {run_dir}) or pick another --out"
        )
    world.barrier()  # every process has looked before rank 0 writes config.json
    return _run(config, run_dir, None, on_event or _ignore_event, stop_requested, world)


def resume(
    run_dir: str | Path,
    *,
    on_event: EventCallback | None = None,
    stop_requested: Callable[[], bool] | None = None,
    world: World | None = None,
    more_minutes: float | None = None,
    more_epochs: int | None = None,
    **overrides: Any,
) -> FitResult:
    """Continues a run from its last.pt, where it stopped (mid-epoch included), with any number of processes.

    `overrides` may change what does not alter the data order: epochs, time_minutes, patience, device, amp,
    num_workers, checkpoint_minutes, eval_every, sync_bn.

    `more_minutes` / `more_epochs` continue a run that ended (finished, early-stopped, cancelled) for that much
    longer: new totals, the lr schedule over them and a fresh early-stopping patience (`continuation`); config.json
    then records the new totals, so the run's pages count against them and a later resume goes on to them.
    """
    run_dir = Path(run_dir)
    world = world or World()
    config_path = run_dir / "config.json"
    saved, config = read_run_config(run_dir)
    allowed = {"epochs", "time_minutes", "patience", "device", "amp", "num_workers", "checkpoint_minutes", "eval_every",
               "sync_bn", "compile"}  # fmt: skip
    unknown = set(overrides) - allowed
    if unknown:
        raise TrainingError(f"cannot change {', '.join(sorted(unknown))} when resuming; start a new run instead")
    config = config.with_changes(**{key: value for key, value in overrides.items() if value is not None})
    checkpoint = _read_last(run_dir, saved)
    if more_minutes is not None or more_epochs is not None:  # 0 is refused there, not taken as "no more"
        continued = continued_config(config, checkpoint, more_minutes, more_epochs)
        checkpoint = prepare_checkpoint(checkpoint, config, continued)
        if world.is_main:
            history = [*saved.get("continued", []), {"epochs_done": int(checkpoint["epoch"]),
                       "more_minutes": more_minutes, "more_epochs": more_epochs}]  # fmt: skip
            totals = {"epochs": continued.epochs, "time_minutes": continued.time_minutes}
            atomic_write_json(config_path, {**saved, "train": {**saved["train"], **totals}, "continued": history})
        config = continued
    else:
        ended = _ended(config, checkpoint)
        if ended:
            best = (checkpoint.get("metrics") or {}).get("best_map")
            best_text = f", best mAP50-95 {best:.3f}" if isinstance(best, float) and best >= 0 else ""
            raise RunFinished(
                f"{run_dir} is finished ({ended}{best_text}): there is nothing left to resume. To train it longer, "
                "continue it with more epochs or minutes"
            )
    return _run(config, run_dir, checkpoint, on_event or _ignore_event, stop_requested, world)


def read_run_config(run_dir: Path) -> tuple[dict[str, Any], TrainConfig]:
    """A resumable run's config.json (as saved) and its TrainConfig; refused unless last.pt is there too."""
    config_path = run_dir / "config.json"
    if not config_path.is_file() or not (run_dir / "last.pt").is_file():
        raise TrainingError(f"{run_dir} holds no run to resume (config.json and last.pt are needed)")
    saved = json.loads(config_path.read_text())
    return saved, TrainConfig.from_dict(saved["train"])


class RunFinished(TrainingError):
    """A plain resume of a run that already ended (all its epochs, its time budget, or early stopping)."""


def _ended(config: TrainConfig, checkpoint: dict[str, Any]) -> str | None:
    """Why the run of `checkpoint` (its last.pt) is over under `config`, in words; None when it has steps left."""
    metrics = checkpoint.get("metrics") or {}
    done = int(checkpoint["epoch"])
    if done >= config.epochs:
        return f"{done} of {config.epochs} epochs trained"
    if config.time_minutes is not None and float(metrics.get("elapsed_s") or 0.0) >= config.time_minutes * 60:
        return f"its {config.time_minutes:g}-minute time budget is spent, after {done} whole epochs"
    if config.patience is not None and int(metrics.get("bad_epochs") or 0) >= config.patience:
        return f"stopped early after {done} epochs: no better mAP50-95 for {config.patience} evaluated epochs"
    return None


def _read_last(run_dir: Path, saved: dict[str, Any]) -> dict[str, Any]:
    """The run's last.pt; when it is damaged, an error that says so and offers the run's best.pt if that is intact
    (best.pt holds the weights but not the optimizer and position: a new run starts from it)."""
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    try:
        return read_checkpoint(last_path)
    except CheckpointError as error:
        cause = _first_line(error.__cause__ or error)
        damaged = f"{last_path} is damaged ({cause}), so the run cannot resume where it stopped"
    try:
        best = read_checkpoint(best_path)
        extract_state_dict(best)
    except CheckpointError:
        raise CheckpointError(f"{damaged}, and there is no intact best.pt beside it: start a new run") from None
    train = saved.get("train") or {}
    epoch = best.get("epoch")
    at = f" (epoch {epoch})" if isinstance(epoch, int) else ""
    raise DamagedLastCheckpoint(
        f"{damaged}; {best_path} is intact{at}: start a new run from its weights (the same data, size "
        f"{str(train.get('size')).upper()} and imgsz {train.get('imgsz')}, with {best_path} as the start weights)",
        best=best_path,
        train=train,
    )


class DamagedLastCheckpoint(CheckpointError):
    """A run's last.pt that cannot be read, beside an intact best.pt (`best`); `train`: the run's TrainConfig dict."""

    def __init__(self, message: str, *, best: Path, train: dict[str, Any]):
        super().__init__(message)
        self.best, self.train = best, train


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


# ----------------------------------------------------------------------------------------------------------------


def load_splits(
    data: str | Path, seed: int, *, allow_empty_val: bool = False
) -> tuple[DetectionSet, DetectionSet, list[str]]:
    """Train and validation sets of a dataset path; without a val split, a seeded fifth of train is held out.

    With `allow_empty_val` (quantization: calibration needs only training images), a dataset too small to hold an
    image out gets an empty validation set instead of an error.
    """
    splits = load_dataset(data)
    train_set = splits["train"]
    notes = []
    val_set = splits.get("val")
    if (val_set is None or len(val_set) == 0) and allow_empty_val and len(train_set) < 2:
        val_set = DetectionSet([], train_set.class_names, train_set.category_ids, LoadReport(images=0))
        notes.append(f"{data}: no validation split, and too few training images to hold one out")
    elif val_set is None or len(val_set) == 0:
        train_set, val_set = _holdout(train_set, seed)
        notes.append(f"no validation split: {len(val_set)} training images held out for validation (seed {seed})")
    if len(train_set) == 0:
        raise DatasetError(f"{data}: the training split has no usable images")
    return train_set, val_set, notes


def require_boxes(data: str | Path, train_set: DetectionSet) -> None:
    """Refuses a training split without a single box (all dropped while loading, or none labelled): training on it
    would end at mAP 0 and look like a success. The error gives the loading report's counts."""
    if sum(len(record.boxes) for record in train_set.records):
        return
    report = train_set.report
    dropped = sum(report.boxes_dropped.values())
    if dropped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(report.boxes_dropped.items()))
        raise DatasetError(
            f"{data}: all {dropped} boxes of the training split were dropped while loading ({reasons}; "
            f"{report.images} images kept): there is nothing to learn from. Fix the boxes (a degenerate box has no "
            "width or height) and train again"
        )
    raise DatasetError(f"{data}: the training split's {report.images} images have no boxes: label some first")


def _holdout(dataset: DetectionSet, seed: int) -> tuple[DetectionSet, DetectionSet]:
    if len(dataset) < 2:
        raise DatasetError(f"{dataset.source}: at least 2 images are needed to hold one out for validation")
    order = np.random.default_rng(seed).permutation(len(dataset))
    count = max(1, round(len(dataset) * VAL_HOLDOUT_FRACTION))
    held = set(order[:count].tolist())

    def subset(keep: bool) -> DetectionSet:
        records = [record for index, record in enumerate(dataset.records) if (index in held) != keep]
        boxes = [len(record.boxes) for record in records]
        counts = {"images": len(records), "boxes": sum(boxes), "background_images": boxes.count(0)}
        # What loading fixed, dropped and skipped stays with the training part (it is the split's loading report:
        # config.json must say what was dropped); the held-out part counts only its images and boxes.
        report = replace(dataset.report, **counts) if keep else LoadReport(**counts)
        return DetectionSet(records, dataset.class_names, dataset.category_ids, report, dataset.source)

    return subset(True), subset(False)


def run_checkpoint(path: str | Path) -> Path:
    """The checkpoint a path stands for: a file as given; a run folder's best.pt, else its last.pt (else best.pt,
    so that a missing file is reported under its expected name)."""
    path = Path(path)
    if not path.is_dir():
        return path
    return next((path / name for name in ("best.pt", "last.pt") if (path / name).is_file()), path / "best.pt")


def load_start_weights(model: YoloNAS, weights: str) -> str:
    """Loads "coco" (official COCO weights, class predictors re-initialised for our classes) or an earlier run's
    checkpoint (its EMA weights; a run folder means its best.pt) into the unfused `model`. Returns what was loaded."""
    if weights == "coco":
        path = fetch_weights(OFFICIAL_COCO_WEIGHTS[model.config.size], get_settings().weights_dir, progress=False)
    else:
        path = run_checkpoint(weights)
    state_dict, _, entry = extract_state_dict(read_checkpoint(path))
    if state_dict_fusion(state_dict) != "none":
        raise CheckpointError(f"{path} holds fused (deployment) weights: training needs an unfused checkpoint")
    size, num_classes = infer_architecture(state_dict)
    if size != model.config.size:
        raise CheckpointError(f"{path} holds YOLO-NAS {size.upper()} weights; this run trains {model.config.size}")
    skipped = load_weights(model, state_dict, allow_class_transfer=True)
    transfer = f", class predictors re-initialised ({num_classes} → {model.num_classes} classes)" if skipped else ""
    return f"{path} ({entry}){transfer}"


def default_num_workers(processes: int = 1) -> int:
    """Loader processes per training process, sharing the cores with `processes` training processes."""
    # One loader process on a 2-core machine: augmentation overlaps the step without starving the model's threads.
    return min(4, max(0, (os.cpu_count() or 1) // processes - 1))


def usable_num_workers(requested: int | None, processes: int = 1) -> int:
    """Loader processes to use: `requested` (None: `default_num_workers(processes)`), or 0 in a daemonic process.

    A daemonic process may not start children ("daemonic processes are not allowed to have children"), and the job
    worker's processes (`huey_consumer -k process`) are daemonic: there the loader runs in the training process.
    """
    workers = default_num_workers(processes) if requested is None else requested
    if workers and multiprocessing.current_process().daemon:
        logger.info("a daemonic process (a job worker) cannot start loader processes: loading in-process")
        return 0
    return workers


@dataclass
class _Session:
    """Everything a run needs, built by `_prepare` (fresh or restored from last.pt)."""

    config: TrainConfig
    run_dir: Path
    model: YoloNAS  # unwrapped: saved, evaluated
    train_model: torch.nn.Module  # what trains: `model`, or `model` in DistributedDataParallel
    context: StepContext
    loader: torch.utils.data.DataLoader
    eval_images: EvalImages
    class_names: list[str]
    progress: dict[str, Any]
    start_epoch: int
    first_step: int
    emit: EventCallback

    @property
    def evaluated_model(self) -> YoloNAS:
        return self.context.ema.module if self.context.ema is not None else self.model

    def save(self, name: str, epoch: int, step_in_epoch: int) -> None:
        if not self.context.world.is_main:
            return
        self.progress["elapsed_s"] = self.context.clock.elapsed_s
        write_checkpoint(
            self.run_dir / name, self.model, self.context, class_names=self.class_names, imgsz=self.config.imgsz,
            epoch=epoch, step_in_epoch=step_in_epoch, progress=self.progress, train_config=self.config.to_dict(),
        )  # fmt: skip

    def save_best(self, epoch: int, evaluation: dict[str, Any]) -> None:
        if not self.context.world.is_main:
            return
        self.progress["elapsed_s"] = self.context.clock.elapsed_s
        write_best(
            self.run_dir / "best.pt", self.model, self.context, class_names=self.class_names,
            imgsz=self.config.imgsz, epoch=epoch, progress=self.progress, train_config=self.config.to_dict(),
            evaluation=evaluation,
        )  # fmt: skip


def _prepare(
    config: TrainConfig,
    run_dir: Path,
    checkpoint: dict[str, Any] | None,
    emit: EventCallback,
    stop_requested: Callable[[], bool] | None,
    world: World,
) -> _Session:
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    train_set, val_set, notes = load_splits(config.data, config.seed)
    require_boxes(config.data, train_set)
    class_names = train_set.class_names
    if world.is_main:
        _ensure_checkpoint_room(run_dir, config.size, len(class_names))
    device = world.device if world.device is not None else resolve_device(config.device)
    dtype = autocast_dtype(device, config.amp)

    model = build_model(config.size, len(class_names))
    start = "random initialisation"
    if checkpoint is None and config.weights:
        start = load_start_weights(model, config.weights)
    model.to(device)
    if use_channels_last(device, dtype):
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config.peak_lr, config.weight_decay)
    # Only rank 0 evaluates and saves: the EMA lives there (every rank's weights are the same after each step).
    ema = ModelEMA(model, config.ema_decay) if config.ema_decay > 0 and world.is_main else None
    train_model = wrap_model(model, world, config.sync_bn)  # after the EMA copy: that one keeps plain BatchNorm
    if config.compile:  # the forward (and its backward) compiled; `model` stays the plain module that is saved
        train_model = compile_model(train_model, get_settings().storage / "cache" / "inductor")

    augment = None
    if config.augment:
        try:
            augment = training_pipeline(config.augment_pipeline, config.imgsz, config.mosaic_prob)
        except AugmentationError as error:
            raise TrainingError(f"augmentation pipeline: {error}") from error
        if checkpoint is None:  # config.json records the pipeline itself, so a resume trains with the same one
            config = config.with_changes(augment_pipeline=pipeline_to_dict(augment))
    dataset = TrainDataset(train_set.records, config.imgsz, augment, seed=config.seed)
    dataset.preload()
    workers = usable_num_workers(config.num_workers, world.size)
    try:
        loader = make_train_loader(
            dataset, config.batch_size, min_samples=config.min_samples, num_workers=workers, seed=config.seed,
            rank=world.rank, world_size=world.size,
        )  # fmt: skip
    except ValueError as error:
        raise TrainingError(str(error)) from error
    total_steps = config.epochs * len(loader)
    warmup_steps = min(round(config.warmup_epochs * len(loader)), MAX_WARMUP_STEPS, total_steps // 5)
    budget_s = config.time_minutes * 60 if config.time_minutes else None
    scheduler = WarmupCosineSchedule(
        optimizer, config.peak_lr, warmup_steps, total_steps, config.final_lr_ratio, time_budget_s=budget_s
    )
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    progress: dict[str, Any] = {"best_map": -1.0, "best_epoch": None, "bad_epochs": 0, "elapsed_s": 0.0}
    start_epoch, first_step = 0, 0
    if checkpoint is not None:
        start_epoch, first_step = _restore(checkpoint, model, optimizer, scheduler, scaler, ema, progress)
        scheduler.total_steps, scheduler.time_budget_s = total_steps, budget_s
        start = f"resumed from last.pt at epoch {start_epoch + 1}, step {first_step}"
    elif world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            run_dir / "config.json",
            {"train": config.to_dict(), "class_names": class_names, "start": start, "notes": notes,
             "data": {"train": train_set.report.to_dict(), "val": val_set.report.to_dict(),
                      "train_images": len(train_set), "val_images": len(val_set)}},
        )  # fmt: skip
    loss_fn = YoloNASLoss(len(class_names), strides=model.strides, distributed=world.distributed)
    context = StepContext(
        loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
        ema=ema, device=device, dtype=dtype, scaler=scaler, grad_clip_norm=config.grad_clip_norm,
        clock=Clock(progress["elapsed_s"], budget_s), on_event=emit, stop_requested=stop_requested, world=world,
    )  # fmt: skip
    emit(
        "train_start", run_dir=str(run_dir), start=start, device=str(device), precision=str(dtype or "float32"),
        train_images=len(train_set), val_images=len(val_set), class_names=class_names, epochs=config.epochs,
        steps_per_epoch=len(loader), total_steps=total_steps, warmup_steps=warmup_steps,
        batch_size=config.batch_size, num_workers=workers, time_budget_s=budget_s, notes=notes,
        processes=world.size, sync_bn=config.sync_bn and world.distributed,
    )  # fmt: skip
    return _Session(
        config=config, run_dir=run_dir, model=model, train_model=train_model, context=context, loader=loader,
        eval_images=EvalImages(val_set, config.imgsz), class_names=class_names, progress=progress,
        start_epoch=start_epoch, first_step=first_step, emit=emit,
    )  # fmt: skip


def _run(
    config: TrainConfig,
    run_dir: Path,
    checkpoint: dict[str, Any] | None,
    on_event: EventCallback,
    stop_requested: Callable[[], bool] | None,
    world: World,
) -> FitResult:
    def emit(name: str, **data: Any) -> None:
        if not world.is_main:
            return
        append_jsonl(run_dir / "metrics.jsonl", {"event": name, "time": round(time.time(), 3), **data})
        on_event(name, **data)

    session = _prepare(config, run_dir, checkpoint, emit, stop_requested, world)
    context, progress, loader = session.context, session.progress, session.loader
    position = {"epoch": session.start_epoch, "saved_at": time.perf_counter()}

    def checkpoint_mid_epoch(step_in_epoch: int) -> None:
        # Rank 0's clock alone decides: only it writes, and no other rank needs to wait for it.
        if world.is_main and time.perf_counter() - position["saved_at"] >= config.checkpoint_minutes * 60:
            session.save("last.pt", position["epoch"], step_in_epoch)
            position["saved_at"] = time.perf_counter()
            emit("checkpoint", path=str(run_dir / "last.pt"), epoch=position["epoch"], step_in_epoch=step_in_epoch)

    context.after_step = checkpoint_mid_epoch
    stopped, first_step = "epochs", session.first_step
    completed = session.start_epoch  # whole epochs trained: every count shown to the user comes from this one
    partial = 0  # steps of the epoch after those, when the run ended in its middle
    try:
        for epoch in range(session.start_epoch, config.epochs):
            position["epoch"] = epoch
            set_loader_epoch(loader, epoch)
            mosaic = context.scheduler.progress() < 1.0 - config.close_mosaic
            loader.dataset.set_mosaic(mosaic)
            summary = train_one_epoch(session.train_model, loader, context, epoch=epoch, first_step=first_step)
            first_step = 0
            if summary["stopped"] == "cancelled":
                session.save("last.pt", epoch, summary["steps"])
                stopped, partial = "cancelled", summary["steps"]
                break
            metrics = None
            evaluate_now = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
            if world.is_main and (evaluate_now or summary["stopped"] == "time"):
                metrics = _evaluate_epoch(session, epoch)
            finished = summary["stopped"] is None
            session.save("last.pt", epoch + 1 if finished else epoch, 0 if finished else summary["steps"])
            # A time budget may end an epoch part way: that epoch is reported with its steps, and not counted.
            complete = finished or summary["steps"] >= len(loader)
            completed, partial = (epoch + 1, 0) if complete else (epoch, summary["steps"])
            emit(
                "epoch", epoch=epoch, train={key: value for key, value in summary.items() if key.startswith("loss")},
                val=metrics, best_map=progress["best_map"], best_epoch=progress["best_epoch"],
                lr=context.optimizer.param_groups[0]["lr"], elapsed_s=context.clock.elapsed_s,
                complete=complete, steps=summary["steps"], steps_per_epoch=len(loader), epochs_done=completed,
                mosaic=mosaic and config.augment and config.mosaic_prob > 0,
            )  # fmt: skip
            if summary["stopped"] == "time":
                stopped = "time"
                break
            # Rank 0 decides (it evaluated); the others wait here for its evaluation and checkpoint.
            patience_over = config.patience is not None and progress["bad_epochs"] >= config.patience
            if world.broadcast_flag(patience_over):
                stopped = "early_stop"
                emit("early_stop", epoch=epoch, patience=config.patience, best_epoch=progress["best_epoch"])
                break
    except torch.OutOfMemoryError as error:
        if world.distributed:  # probing smaller batches on one process would leave the others waiting
            raise TrainingError(
                f"a GPU ran out of memory at the global batch {config.batch_size} ({config.batch_size // world.size} "
                f"per GPU), imgsz {config.imgsz}, YOLO-NAS {config.size.upper()}: rerun with a smaller --batch"
            ) from error
        advice = _out_of_memory_advice(config, session.model, context.loss_fn, context.device, context.dtype)
        raise TrainingError(advice) from error
    finally:
        if loader.num_workers and getattr(loader, "_iterator", None) is not None:
            loader._iterator._shutdown_workers()  # persistent workers: stop them with the run
    result = FitResult(
        run_dir=run_dir, stopped=stopped, epochs_done=completed,
        best_map=max(0.0, progress["best_map"]), best_epoch=progress["best_epoch"],
        elapsed_s=context.clock.elapsed_s, partial_steps=partial, steps_per_epoch=len(loader),
    )  # fmt: skip
    # What the run was asked for, beside what it did: "1 of 30 epochs: the 5-minute time budget ended the run".
    emit("train_end", **result.to_dict(), epochs=config.epochs, time_budget_s=context.clock.budget_s)
    return result


def _evaluate_epoch(session: _Session, epoch: int) -> dict[str, Any]:
    """Evaluates the (EMA) model; a better mAP50-95 writes best.pt and eval.json. Returns the headline metrics."""
    context, progress = session.context, session.progress
    result = evaluate(session.evaluated_model, session.eval_images, device=context.device,
                      batch_size=session.config.batch_size)  # fmt: skip
    score = headline_map(result)
    if score > progress["best_map"]:
        progress.update(best_map=score, best_epoch=epoch, bad_epochs=0)
        session.save_best(epoch + 1, dict(result.metrics))
        result.save_json(session.run_dir / "eval.json")
    else:
        progress["bad_epochs"] += 1
    return dict(result.metrics)


def _ensure_checkpoint_room(run_dir: Path, size: str, num_classes: int) -> None:
    """Refuses a run whose folder's disk cannot hold its checkpoints at their largest: last.pt and best.pt, and a
    new last.pt written beside the old one before it replaces it (`atomic_save`), less what they hold already."""
    last, best = checkpoint_sizes(size, num_classes)
    present = sum((run_dir / name).stat().st_size for name in ("last.pt", "best.pt") if (run_dir / name).is_file())
    ensure_room(run_dir, 2 * last + best - present, f"this run's checkpoints (last.pt and best.pt of YOLO-NAS "
                f"{size.upper()})")  # fmt: skip


def _restore(
    checkpoint: dict[str, Any],
    model: YoloNAS,
    optimizer: torch.optim.Optimizer,
    scheduler: WarmupCosineSchedule,
    scaler: torch.amp.GradScaler | None,
    ema: ModelEMA | None,
    progress: dict[str, Any],
) -> tuple[int, int]:
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    if ema is not None and checkpoint.get("ema") is not None:
        ema.module.load_state_dict(checkpoint["ema"])
        ema.load_state_dict(checkpoint["ema_state"])
    progress.update(checkpoint.get("metrics") or {})
    restore_rng_state(checkpoint["rng"])
    return int(checkpoint["epoch"]), int(checkpoint["step_in_epoch"])


def _out_of_memory_advice(
    config: TrainConfig, model: YoloNAS, loss_fn: YoloNASLoss, device: torch.device, dtype: torch.dtype | None
) -> str:
    """The error for a CUDA out-of-memory: names the largest halved batch size that runs one step here."""
    fitting = fitting_batch_size(model, loss_fn, config.imgsz, config.batch_size // 2, device, dtype)
    advice = f"rerun with --batch {fitting}" if fitting else "even batch 1 does not fit: try a smaller --imgsz/--size"
    return (
        f"the GPU ran out of memory at batch {config.batch_size}, imgsz {config.imgsz}, YOLO-NAS "
        f"{config.size.upper()}: {advice}"
    )


def fitting_batch_size(
    model: YoloNAS, loss_fn: YoloNASLoss, imgsz: int, start: int, device: torch.device, dtype: torch.dtype | None
) -> int:
    """The largest of start, start/2, ... , 1 for which one forward+backward step fits in memory (0 if none)."""
    batch = start
    while batch >= 1:
        try:
            images = torch.rand(batch, 3, imgsz, imgsz, device=device)
            boxes = torch.tensor([[[0.0, 0.0, imgsz / 2, imgsz / 2]]], device=device).repeat(batch, 1, 1)
            labels = torch.zeros(batch, 1, dtype=torch.long, device=device)
            mask = torch.ones(batch, 1, dtype=torch.bool, device=device)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                outputs = model(images)
            loss_fn(*outputs, boxes, labels, mask, (imgsz, imgsz))["loss"].backward()
            model.zero_grad(set_to_none=True)
            return batch
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            batch //= 2
    return 0
