"""`fit` and `resume`: a whole training run in a run folder, built from the engine's plain functions; `fine_tune`:
the same loop on a given model and given splits, in memory (quantization-aware training runs through it).

Run folder: config.json (the resolved TrainConfig, classes and data report), metrics.jsonl (every event, one JSON
object per line), last.pt (every epoch and every `checkpoint_minutes` mid-epoch: all that resuming needs), best.pt
(the best validation mAP50-95: the EMA weights and what inference needs, no optimizer), eval.json (the full
evaluation of best.pt on the validation split). Before anything is written the run checks that its dataset has boxes
to learn from and that the run folder's disk has room for the checkpoints (`checkpoint_sizes`).

With a `World` of several processes (DDP, started by `backend.training.launch`) every process trains on its slice
of each global batch; rank 0 alone writes the run folder, evaluates and reports events (`backend.training.world`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from backend.data.augment import AugmentationError, pipeline_to_dict, training_pipeline
from backend.data.folders import load_dataset
from backend.data.loader import TrainDataset, make_train_loader, set_loader_epoch
from backend.data.records import DatasetError, DetectionSet, LoadReport
from backend.evaluation.coco_eval import EvaluationResult
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
from backend.runs import RunFolder
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
    append_jsonl,
    autocast_dtype,
    compile_model,
    evaluate,
    headline_map,
    ignore_event,
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
    if RunFolder(run_dir).holds_run():
        raise TrainingError(
            f"{run_dir} already holds a run: resume it (yolodex train --resume {run_dir}) or pick another --out"
        )
    world.barrier()  # every process has looked before rank 0 writes config.json
    return _run(config, run_dir, None, on_event or ignore_event, stop_requested, world)


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
    saved, config = read_run_config(run_dir)
    allowed = {
        "epochs",
        "time_minutes",
        "patience",
        "device",
        "amp",
        "num_workers",
        "checkpoint_minutes",
        "eval_every",
        "sync_bn",
        "compile",
    }
    unknown = set(overrides) - allowed
    if unknown:
        raise TrainingError(f"cannot change {', '.join(sorted(unknown))} when resuming; start a new run instead")
    config = config.with_changes(**{key: value for key, value in overrides.items() if value is not None})
    checkpoint = _read_last(run_dir, saved)
    if more_minutes is not None or more_epochs is not None:  # 0 is refused there, not taken as "no more"
        continued = continued_config(config, checkpoint, more_minutes, more_epochs)
        checkpoint = prepare_checkpoint(checkpoint, config, continued)
        if world.is_main:
            history = [
                *saved.get("continued", []),
                {"epochs_done": int(checkpoint["epoch"]), "more_minutes": more_minutes, "more_epochs": more_epochs},
            ]
            totals = {"epochs": continued.epochs, "time_minutes": continued.time_minutes}
            RunFolder(run_dir).write_config({**saved, "train": {**saved["train"], **totals}, "continued": history})
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
    return _run(config, run_dir, checkpoint, on_event or ignore_event, stop_requested, world)


def read_run_config(run_dir: Path) -> tuple[dict[str, Any], TrainConfig]:
    """A resumable run's config.json (as saved) and its TrainConfig; refused unless last.pt is there too."""
    folder = RunFolder(run_dir)
    if not folder.resumable():
        raise TrainingError(f"{run_dir} holds no run to resume (config.json and last.pt are needed)")
    saved = folder.read_config()
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
        images, box_count, background = len(records), sum(boxes), boxes.count(0)
        # What loading fixed, dropped and skipped stays with the training part (it is the split's loading report:
        # config.json must say what was dropped); the held-out part counts only its images and boxes.
        if keep:
            report = replace(dataset.report, images=images, boxes=box_count, background_images=background)
        else:
            report = LoadReport(images=images, boxes=box_count, background_images=background)
        return DetectionSet(records, dataset.class_names, dataset.category_ids, report, dataset.source)

    return subset(True), subset(False)


def run_checkpoint(path: str | Path) -> Path:
    """The checkpoint a path stands for: a file as given; a run folder's best.pt, else its last.pt (else best.pt,
    so that a missing file is reported under its expected name)."""
    path = Path(path)
    if not path.is_dir():
        return path
    return RunFolder(path).checkpoint()


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
    """Everything a run's loop needs: built by `_prepare` for a run folder (fresh or restored from last.pt), or by
    `fine_tune` for a given model kept in memory (`run_dir` None: nothing is written; the best state is kept in
    `best_state`)."""

    config: TrainConfig
    run_dir: Path | None
    model: YoloNAS  # unwrapped: saved, evaluated
    train_model: torch.nn.Module  # what trains: `model`, or `model` in DistributedDataParallel
    context: StepContext
    loader: torch.utils.data.DataLoader
    eval_images: EvalImages | None  # None: nothing to evaluate on (in memory only)
    class_names: list[str]
    progress: dict[str, Any]
    start_epoch: int
    first_step: int
    emit: EventCallback
    history: list[dict[str, Any]] = field(default_factory=list)  # per epoch: epoch, steps, train, val
    best_state: dict[str, torch.Tensor] | None = None  # in memory: the best weights so far

    @property
    def evaluated_model(self) -> YoloNAS:
        return cast(YoloNAS, self.context.ema.module) if self.context.ema is not None else self.model

    def save(self, name: str, epoch: int, step_in_epoch: int) -> None:
        if self.run_dir is None or not self.context.world.is_main:
            return
        self.progress["elapsed_s"] = self.context.clock.elapsed_s
        write_checkpoint(
            self.run_dir / name,
            self.model,
            self.context,
            class_names=self.class_names,
            imgsz=self.config.imgsz,
            epoch=epoch,
            step_in_epoch=step_in_epoch,
            progress=self.progress,
            train_config=self.config.to_dict(),
        )

    def keep_best(self, epoch: int | None, result: EvaluationResult | None) -> None:
        """Records the model after `epoch` (None: before training) as the best so far: best.pt and eval.json in a
        run folder, a copy of its weights in memory."""
        if self.run_dir is None:
            self.best_state = {key: value.detach().clone() for key, value in self.evaluated_model.state_dict().items()}
            return
        if not self.context.world.is_main or result is None or epoch is None:
            return
        self.progress["elapsed_s"] = self.context.clock.elapsed_s
        write_best(
            self.run_dir / "best.pt",
            self.model,
            self.context,
            class_names=self.class_names,
            imgsz=self.config.imgsz,
            epoch=epoch + 1,
            progress=self.progress,
            train_config=self.config.to_dict(),
            evaluation=dict(result.metrics),
        )
        result.save_json(self.run_dir / "eval.json")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare(
    config: TrainConfig,
    run_dir: Path,
    checkpoint: dict[str, Any] | None,
    emit: EventCallback,
    stop_requested: Callable[[], bool] | None,
    world: World,
) -> _Session:
    seed_everything(config.seed)
    train_set, val_set, notes = load_splits(config.data, config.seed)
    require_boxes(config.data, train_set)
    class_names = train_set.class_names
    if world.is_main:
        _ensure_checkpoint_room(run_dir, config.size, len(class_names))
    model = build_model(config.size, len(class_names))
    start = "random initialisation"
    if checkpoint is None and config.weights:
        start = load_start_weights(model, config.weights)
    augment = _augmentation(config)
    if augment is not None and checkpoint is None:  # config.json records the pipeline itself, so a resume uses it
        config = config.with_changes(augment_pipeline=pipeline_to_dict(augment))
    session = _assemble(config, model, augment, train_set, val_set, run_dir, emit, stop_requested, world)
    if checkpoint is not None:
        scheduler = session.context.scheduler
        total_steps, budget_s = scheduler.total_steps, scheduler.time_budget_s
        session.start_epoch, session.first_step = _restore(checkpoint, session)
        scheduler.total_steps, scheduler.time_budget_s = total_steps, budget_s
        session.context.clock.offset_s = session.progress["elapsed_s"]
        start = f"resumed from last.pt at epoch {session.start_epoch + 1}, step {session.first_step}"
    elif world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "train": train_set.report.to_dict(),
            "val": val_set.report.to_dict(),
            "train_images": len(train_set),
            "val_images": len(val_set),
        }
        record = {"train": config.to_dict(), "class_names": class_names, "start": start, "notes": notes, "data": data}
        RunFolder(run_dir).write_config(record)
    _emit_start(session, len(train_set), len(val_set), start=start, run_dir=str(run_dir), notes=notes)
    return session


def _augmentation(config: TrainConfig) -> Any:
    """The run's albumentations pipeline (None when augmentation is off)."""
    if not config.augment:
        return None
    try:
        return training_pipeline(config.augment_pipeline, config.imgsz, config.mosaic_prob)
    except AugmentationError as error:
        raise TrainingError(f"augmentation pipeline: {error}") from error


def _assemble(
    config: TrainConfig,
    model: YoloNAS,
    augment: Any,
    train_set: DetectionSet,
    val_set: DetectionSet,
    run_dir: Path | None,
    emit: EventCallback,
    stop_requested: Callable[[], bool] | None,
    world: World,
) -> _Session:
    """The model on its device (wrapped for DDP, compiled if asked), the loader, optimizer, schedule and EMA."""
    device = world.device if world.device is not None else resolve_device(config.device)
    dtype = autocast_dtype(device, config.amp)
    model.to(device)
    if use_channels_last(device, dtype):
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack the keyword
    optimizer = build_optimizer(model, config.peak_lr, config.weight_decay)
    # Only rank 0 evaluates and saves: the EMA lives there (every rank's weights are the same after each step).
    ema = ModelEMA(model, config.ema_decay) if config.ema_decay > 0 and world.is_main else None
    train_model = wrap_model(model, world, config.sync_bn)  # after the EMA copy: that one keeps plain BatchNorm
    if config.compile:  # the forward (and its backward) compiled; `model` stays the plain module that is saved
        train_model = compile_model(train_model, get_settings().storage / "cache" / "inductor")
    dataset = TrainDataset(train_set.records, config.imgsz, augment, seed=config.seed)
    dataset.preload()
    workers = usable_num_workers(config.num_workers, world.size)
    try:
        loader = make_train_loader(
            dataset,
            config.batch_size,
            min_samples=config.min_samples,
            num_workers=workers,
            seed=config.seed,
            rank=world.rank,
            world_size=world.size,
        )
    except ValueError as error:
        raise TrainingError(str(error)) from error
    total_steps = config.epochs * len(loader)
    warmup_steps = min(round(config.warmup_epochs * len(loader)), MAX_WARMUP_STEPS, total_steps // 5)
    budget_s = config.time_minutes * 60 if config.time_minutes else None
    scheduler = WarmupCosineSchedule(
        optimizer, config.peak_lr, warmup_steps, total_steps, config.final_lr_ratio, time_budget_s=budget_s
    )
    context = StepContext(
        loss_fn=YoloNASLoss(model.num_classes, strides=model.strides, distributed=world.distributed),
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ema,
        device=device,
        dtype=dtype,
        scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None,
        grad_clip_norm=config.grad_clip_norm,
        clock=Clock(0.0, budget_s),
        on_event=emit,
        stop_requested=stop_requested,
        world=world,
    )
    return _Session(
        config=config,
        run_dir=run_dir,
        model=model,
        train_model=train_model,
        context=context,
        loader=loader,
        eval_images=EvalImages(val_set, config.imgsz) if len(val_set) or run_dir is not None else None,
        class_names=train_set.class_names,
        progress={"best_map": -1.0, "best_epoch": None, "bad_epochs": 0, "elapsed_s": 0.0},
        start_epoch=0,
        first_step=0,
        emit=emit,
    )


def _emit_start(session: _Session, train_images: int, val_images: int, **details: Any) -> None:
    config, context, loader = session.config, session.context, session.loader
    scheduler = context.scheduler
    details.setdefault("precision", str(context.dtype or "float32"))
    session.emit(
        "train_start",
        device=str(context.device),
        train_images=train_images,
        val_images=val_images,
        class_names=session.class_names,
        epochs=config.epochs,
        steps_per_epoch=len(loader),
        total_steps=scheduler.total_steps,
        warmup_steps=scheduler.warmup_steps,
        batch_size=config.batch_size,
        num_workers=loader.num_workers,
        time_budget_s=context.clock.budget_s,
        processes=context.world.size,
        sync_bn=config.sync_bn and context.world.distributed,
        **details,
    )


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
    result = _train_epochs(session)
    # What the run was asked for, beside what it did: "1 of 30 epochs: the 5-minute time budget ended the run".
    emit("train_end", **result.to_dict(), epochs=session.config.epochs, time_budget_s=session.context.clock.budget_s)
    return result


def _train_epochs(session: _Session) -> FitResult:
    """The epoch loop: train, evaluate, checkpoint, report, until the epochs, the time budget, early stopping or a
    cancel end it."""
    config, context, progress, loader, emit = (
        session.config,
        session.context,
        session.progress,
        session.loader,
        session.emit,
    )
    world = context.world
    position = {"epoch": session.start_epoch}
    saved_at = {"time": time.perf_counter()}

    def checkpoint_mid_epoch(step_in_epoch: int) -> None:
        # Rank 0's clock alone decides: only it writes, and no other rank needs to wait for it.
        if session.run_dir is None or not world.is_main:
            return
        if time.perf_counter() - saved_at["time"] >= config.checkpoint_minutes * 60:
            session.save("last.pt", position["epoch"], step_in_epoch)
            saved_at["time"] = time.perf_counter()
            path = str(session.run_dir / "last.pt")
            emit("checkpoint", path=path, epoch=position["epoch"], step_in_epoch=step_in_epoch)

    context.after_step = checkpoint_mid_epoch
    stopped, first_step = "epochs", session.first_step
    completed = session.start_epoch  # whole epochs trained: every count shown to the user comes from this one
    partial = 0  # steps of the epoch after those, when the run ended in its middle
    try:
        for epoch in range(session.start_epoch, config.epochs):
            position["epoch"] = epoch
            set_loader_epoch(loader, epoch)
            mosaic = context.scheduler.progress() < 1.0 - config.close_mosaic
            cast(TrainDataset, loader.dataset).set_mosaic(mosaic)
            summary = train_one_epoch(session.train_model, loader, context, epoch=epoch, first_step=first_step)
            first_step = 0
            losses = {key: value for key, value in summary.items() if key.startswith("loss")}
            if summary["stopped"] == "cancelled":
                session.save("last.pt", epoch, summary["steps"])
                session.history.append({"epoch": epoch, "steps": summary["steps"], "train": losses, "val": None})
                stopped, partial = "cancelled", summary["steps"]
                break
            metrics = None
            evaluate_now = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
            if world.is_main and (evaluate_now or summary["stopped"] == "time"):
                metrics = _evaluate_epoch(session, epoch)
            session.history.append({"epoch": epoch, "steps": summary["steps"], "train": losses, "val": metrics})
            finished = summary["stopped"] is None
            session.save("last.pt", epoch + 1 if finished else epoch, 0 if finished else summary["steps"])
            # A time budget may end an epoch part way: that epoch is reported with its steps, and not counted.
            complete = finished or summary["steps"] >= len(loader)
            completed, partial = (epoch + 1, 0) if complete else (epoch, summary["steps"])
            emit(
                "epoch",
                epoch=epoch,
                train=losses,
                val=metrics,
                best_map=progress["best_map"],
                best_epoch=progress["best_epoch"],
                lr=context.optimizer.param_groups[0]["lr"],
                elapsed_s=context.clock.elapsed_s,
                complete=complete,
                steps=summary["steps"],
                steps_per_epoch=len(loader),
                epochs_done=completed,
                mosaic=mosaic and config.augment and config.mosaic_prob > 0,
            )
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
        stop_loader_workers(loader)
    return FitResult(
        run_dir=session.run_dir or Path(),
        stopped=stopped,
        epochs_done=completed,
        best_map=max(0.0, progress["best_map"]),
        best_epoch=progress["best_epoch"],
        elapsed_s=context.clock.elapsed_s,
        partial_steps=partial,
        steps_per_epoch=len(loader),
    )


def stop_loader_workers(loader: torch.utils.data.DataLoader) -> None:
    """Stops a loader's persistent worker processes now, not when the loader is collected."""
    iterator = getattr(loader, "_iterator", None)
    if loader.num_workers and iterator is not None:
        iterator._shutdown_workers()  # the DataLoader's own way; there is no public one for persistent workers


def _evaluate_epoch(session: _Session, epoch: int) -> dict[str, Any] | None:
    """Evaluates the (EMA) model and keeps it when it is the best so far (in a run folder: a higher mAP50-95 than
    before; in memory: at least as high, so on a tie the later weights win). Returns the headline metrics, None
    when there is nothing to evaluate on (in memory, the last weights are then kept)."""
    context, progress = session.context, session.progress
    if session.eval_images is None:
        progress["best_epoch"] = epoch
        session.keep_best(epoch, None)
        return None
    result = evaluate(
        session.evaluated_model, session.eval_images, device=context.device, batch_size=session.config.batch_size
    )
    score = headline_map(result)
    if score > progress["best_map"] or (session.run_dir is None and score >= progress["best_map"]):
        progress.update(best_map=score, best_epoch=epoch, bad_epochs=0)
        session.keep_best(epoch, result)
    else:
        progress["bad_epochs"] += 1
    return dict(result.metrics)


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning a given model in memory
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FineTuneResult:
    """How `fine_tune` ended.

    Attributes:
        fit: the loop's result (run_dir is meaningless here: nothing was written).
        start_map: mAP50-95 of the model before training; None without validation images.
        best_map: mAP50-95 of the weights left in the model; None without validation images.
        best_epoch: 0-based epoch whose weights were left in the model; None when the starting weights stayed best.
        history: per epoch trained: epoch, steps, train (loss means), val (headline metrics or None).
    """

    fit: FitResult
    start_map: float | None
    best_map: float | None
    best_epoch: int | None
    history: list[dict[str, Any]]


def fine_tune(
    model: YoloNAS,
    train_set: DetectionSet,
    val_set: DetectionSet,
    config: TrainConfig,
    *,
    on_event: EventCallback | None = None,
    stop_requested: Callable[[], bool] | None = None,
    start_details: dict[str, Any] | None = None,
) -> FineTuneResult:
    """Trains a given `model` in place with the run's loop, on given splits, writing nothing (`config.data`,
    `size`, `weights`, `patience` and `checkpoint_minutes` are not used).

    The model is evaluated before training and after each epoch on `val_set` (skipped when it is empty), and the
    best weights by mAP50-95 (the starting ones included; on a tie the later) are loaded back at the end; without
    validation the last weights stay, except after a cancel, which brings back the last completed epoch's (or the
    starting ones). Events as in `fit` ("train_start" with `start_details` added, "step", "epoch"), except
    "train_end": the caller reports the end in its own terms.
    """
    emit = on_event or ignore_event
    seed_everything(config.seed)
    config = config.with_changes(patience=None, eval_every=1)
    session = _assemble(config, model, _augmentation(config), train_set, val_set, None, emit, stop_requested, World())
    _emit_start(session, len(train_set), len(val_set), **(start_details or {}))
    start_map = None
    if session.eval_images is not None:
        start = evaluate(model, session.eval_images, device=session.context.device, batch_size=config.batch_size)
        start_map = headline_map(start)
        session.progress["best_map"] = start_map
    session.keep_best(None, None)
    result = _train_epochs(session)
    if (session.eval_images is not None or result.stopped == "cancelled") and session.best_state is not None:
        model.load_state_dict(session.best_state)
    model.eval()
    evaluated = session.eval_images is not None
    best_map = session.progress["best_map"] if evaluated else None
    best_epoch = session.progress["best_epoch"]
    return FineTuneResult(result, start_map, best_map, best_epoch, session.history)


def _ensure_checkpoint_room(run_dir: Path, size: str, num_classes: int) -> None:
    """Refuses a run whose folder's disk cannot hold its checkpoints at their largest: last.pt and best.pt, and a
    new last.pt written beside the old one before it replaces it (`atomic_save`), less what they hold already."""
    last, best = checkpoint_sizes(size, num_classes)
    present = sum((run_dir / name).stat().st_size for name in ("last.pt", "best.pt") if (run_dir / name).is_file())
    ensure_room(
        run_dir, 2 * last + best - present, f"this run's checkpoints (last.pt and best.pt of YOLO-NAS {size.upper()})"
    )


def _restore(checkpoint: dict[str, Any], session: _Session) -> tuple[int, int]:
    """Loads last.pt into the session (weights, optimizer, schedule, scaler, EMA, progress, RNG states); returns the
    position to go on from: (epoch, steps of it already done)."""
    context = session.context
    session.model.load_state_dict(checkpoint["model"])
    context.optimizer.load_state_dict(checkpoint["optimizer"])
    context.scheduler.load_state_dict(checkpoint["scheduler"])
    if context.scaler is not None and checkpoint.get("scaler"):
        context.scaler.load_state_dict(checkpoint["scaler"])
    if context.ema is not None and checkpoint.get("ema") is not None:
        context.ema.module.load_state_dict(checkpoint["ema"])
        context.ema.load_state_dict(checkpoint["ema_state"])
    session.progress.update(checkpoint.get("metrics") or {})
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
