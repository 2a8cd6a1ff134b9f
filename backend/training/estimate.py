"""How long a training epoch takes on this machine, and the time budget to give a run (before a run).

The speed is measured, never guessed. Sources, in order:

1. an earlier run in this storage with the same model size, input size, batch, device type and precision, in one
   process: its training images per second of wall clock between consecutive steps of an epoch (data loading
   included, evaluation not), and its evaluation's validation images per second (the seconds between an evaluated
   epoch's last step and its "epoch" event: evaluation and checkpoints). The newest such run wins (a faster trainer
   makes older runs stale). Another input size or batch is never scaled from: only the same settings count.
2. a speed probe (`measure_speed`): a few real training steps of the model on random images and boxes, through the
   trainer's own `train_one_epoch`, plus an evaluation forward pass; cached in `<storage>/speed_probes.json` under
   size, imgsz, batch, device, precision, the torch version and the CPU model (another torch or CPU is another
   speed). It excludes data loading and pycocotools, so it reads a little fast.

An epoch is what the trainer's loader gives: max(training images, min_samples) samples, in whole batches
(`steps_per_epoch`). The recommended budget (`recommend`) is the time to show the model about RECOMMENDED_IMAGES
training images, or MIN_PASSES passes over a larger training set, rounded up to whole epochs, each with its
evaluation.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backend.runs import RunFolder

# About 7,500 training images: what the raccoon bench (bench/train.py, S at 320 from random initialisation) sees in
# its 10 minutes at 12.5 images/s, the run length the targets are set at (mAP50 0.5 after 5 minutes, 0.65
# after 10). Small sets need that many images (resampled) to learn; larger ones at least MIN_PASSES passes.
RECOMMENDED_IMAGES = 7_500
MIN_PASSES = 10
PROBE_FILE = "speed_probes.json"
PROBE_STEPS = 3  # the first one warms up (allocations, kernels' first calls) and is not timed
VAL_HOLDOUT_FRACTION = 0.2  # as backend.training.trainer: a dataset without val.json holds out a fifth of train


@dataclass(frozen=True)
class SpeedKey:
    """The settings a speed holds for. `device` is a device type ("cpu", "cuda"), `precision` the trainer's
    "train_start" word for it ("float32", "torch.bfloat16", "torch.float16")."""

    size: str
    imgsz: int
    batch: int
    device: str
    precision: str


@dataclass(frozen=True)
class Speed:
    """A measured training speed.

    Attributes:
        images_per_s: training images per second.
        eval_images_per_s: validation images per second of evaluation, None when not measured.
        source: "run" (an earlier run's steps) or "probe" (a speed probe).
        detail: which run or probe, in words.
    """

    images_per_s: float
    eval_images_per_s: float | None
    source: str
    detail: str


def device_type(device: str) -> str:
    """ "cuda:0" → "cuda"; "cpu" → "cpu"."""
    return str(device).split(":")[0]


def speed_key(size: str, imgsz: int, batch: int, device: str, amp: bool | None = None) -> SpeedKey:
    """The key of the settings a run with `device` ("auto", "cpu", "cuda", ...) and `amp` trains with here."""
    # Imported here: torch (2-3 s to import) only when a speed is measured or keyed: the Train page imports this module.
    from backend.training.engine import autocast_dtype, resolve_device

    resolved = resolve_device(device)
    return SpeedKey(size, int(imgsz), int(batch), resolved.type, str(autocast_dtype(resolved, amp) or "float32"))


def steps_per_epoch(train_images: int, batch: int, min_samples: int) -> int:
    """Optimizer steps in one epoch of the trainer's loader (`backend.data.loader.EpochSampler`, one process)."""
    samples = max(int(train_images), int(min_samples))
    return samples // batch if samples >= batch else 1


def version_images(folder: str | Path) -> tuple[int, int]:
    """(training images, validation images) a run on the dataset folder trains and evaluates on: train.json and
    val.json's image counts; without a val split, the trainer holds out a fifth of train."""
    folder = Path(folder)

    def count(name: str) -> int | None:
        try:
            return len(json.loads((folder / name).read_text()).get("images") or [])
        except (OSError, ValueError, AttributeError):
            return None

    train, val = count("train.json") or 0, count("val.json")
    if not val and train >= 2:
        val = max(1, round(train * VAL_HOLDOUT_FRACTION))
        train -= val
    return train, val or 0


# ----------------------------------------------------------------------------------------------------------------
# Earlier runs
# ----------------------------------------------------------------------------------------------------------------


def speed_from_runs(runs_dir: str | Path, key: SpeedKey) -> Speed | None:
    """The speed of the newest run under `runs_dir` trained with `key`'s settings in one process (see the module
    docstring), None when there is none with at least two timed steps."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return None
    folders = [folder for folder in runs_dir.iterdir() if (folder / "metrics.jsonl").is_file()]
    for folder in sorted(folders, key=lambda folder: (folder / "metrics.jsonl").stat().st_mtime, reverse=True):
        train = RunFolder(folder).train_or_none()
        if train is None:
            continue
        if (train.get("size"), train.get("imgsz"), train.get("batch_size")) != (key.size, key.imgsz, key.batch):
            continue
        speed = _run_speed(folder / "metrics.jsonl", key)
        if speed is not None:
            return speed
    return None


def _run_speed(path: Path, key: SpeedKey) -> Speed | None:
    images = seconds = eval_images = eval_seconds = 0.0
    segment: dict[str, Any] | None = None  # the train_start of the events being read, None when it does not match
    last_step: dict[str, Any] | None = None
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        name = event.get("event")
        if name == "train_start":
            matches = (
                device_type(event.get("device", "")) == key.device
                and event.get("precision") == key.precision
                and int(event.get("processes") or 1) == 1
                and event.get("batch_size") == key.batch
            )
            segment, last_step = (event if matches else None), None
        elif segment is None:
            continue
        elif name == "step" and event.get("elapsed_s") is not None:
            # Pairs of consecutive steps of one epoch: the first step of a segment (warm-up) only opens a pair.
            if last_step is not None and last_step.get("epoch") == event.get("epoch"):
                steps = int(event["global_step"]) - int(last_step["global_step"])
                delta = float(event["elapsed_s"]) - float(last_step["elapsed_s"])
                if steps > 0 and delta > 0:
                    images, seconds = images + steps * key.batch, seconds + delta
            last_step = event
        elif name == "epoch" and event.get("val") and last_step is not None and event.get("elapsed_s") is not None:
            delta = float(event["elapsed_s"]) - float(last_step["elapsed_s"])
            if delta > 0 and segment.get("val_images"):
                eval_images, eval_seconds = eval_images + int(segment["val_images"]), eval_seconds + delta
            last_step = None
    if images < 2 * key.batch or seconds <= 0:
        return None
    eval_rate = eval_images / eval_seconds if eval_seconds > 0 else None
    return Speed(images / seconds, eval_rate, "run", f"run {path.parent.name}")


# ----------------------------------------------------------------------------------------------------------------
# The speed probe
# ----------------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _probe_id(key: SpeedKey) -> str:
    # Imported here: torch only when a speed is measured or keyed: the Train page imports this module.
    import torch

    machine = cpu_model()
    if key.device == "cuda" and torch.cuda.is_available():
        machine = torch.cuda.get_device_name(0)
    return json.dumps({**asdict(key), "torch": torch.__version__, "machine": machine}, sort_keys=True)


def cached_probe(storage: str | Path, key: SpeedKey) -> Speed | None:
    """The cached speed probe for `key` on this machine and torch version, None when there is none."""
    try:
        entry = json.loads((Path(storage) / PROBE_FILE).read_text()).get(_probe_id(key))
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(entry, dict) or not entry.get("images_per_s"):
        return None
    return Speed(entry["images_per_s"], entry.get("eval_images_per_s"), "probe", entry.get("detail", "speed probe"))


def measured_speed(storage: str | Path, runs_dir: str | Path, key: SpeedKey) -> Speed | None:
    """An earlier run's speed, else the cached probe's, else None (measure it with `measure_speed`)."""
    return speed_from_runs(runs_dir, key) or cached_probe(storage, key)


def measure_speed(storage: str | Path, key: SpeedKey, num_classes: int = 1, steps: int = PROBE_STEPS) -> Speed:
    """Times `steps` training steps (the first untimed) of YOLO-NAS `key.size` on random images and boxes, and an
    evaluation forward pass, on `key.device` in `key.precision`; caches and returns the speed. About 20 s for S at
    320 px, batch 16, on a 2-core CPU in float32."""
    # Imported here: torch and the training modules only when a speed is measured: the Train page imports this module.
    import torch

    from backend.files import atomic_write_json
    from backend.models.yolo_nas import build_model
    from backend.training.config import TrainConfig
    from backend.training.ema import ModelEMA
    from backend.training.engine import StepContext, autocast_dtype, resolve_device, train_one_epoch, use_channels_last
    from backend.training.loss import YoloNASLoss
    from backend.training.schedule import WarmupCosineSchedule, build_optimizer

    device = resolve_device(key.device)
    dtype = autocast_dtype(device, None if key.precision != "float32" else False)
    if str(dtype or "float32") != key.precision:
        raise ValueError(f"this machine trains {key.device} in {dtype or 'float32'}, not {key.precision}")
    config = TrainConfig(size=key.size, imgsz=key.imgsz, batch_size=key.batch)
    generator = torch.Generator().manual_seed(0)
    model = build_model(key.size, num_classes).to(device)
    if use_channels_last(device, dtype):
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # Module.to takes it; the stubs omit it
    optimizer = build_optimizer(model, config.peak_lr, config.weight_decay)
    scheduler = WarmupCosineSchedule(optimizer, config.peak_lr, 0, 1000, config.final_lr_ratio)
    times: list[float] = []

    def on_event(name: str, **_data: Any) -> None:
        if name == "step":
            times.append(time.perf_counter())

    context = StepContext(
        loss_fn=YoloNASLoss(num_classes, strides=model.strides),
        optimizer=optimizer,
        scheduler=scheduler,
        ema=ModelEMA(model, config.ema_decay),
        device=device,
        dtype=dtype,
        grad_clip_norm=config.grad_clip_norm,
        on_event=on_event,
    )
    batches = [_random_batch(key, num_classes, generator) for _ in range(max(2, steps))]
    started = time.perf_counter()
    train_one_epoch(model, batches, context, epoch=0)
    images_per_s = (len(times) - 1) * key.batch / (times[-1] - times[0])
    eval_images_per_s = _time_evaluation(context.ema.module if context.ema else model, batches[0], device, dtype)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    detail = f"speed probe of {when}, {len(times) - 1} timed steps in {time.perf_counter() - started:.0f} s"
    path = Path(storage) / PROBE_FILE
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    cache[_probe_id(key)] = {"images_per_s": images_per_s, "eval_images_per_s": eval_images_per_s, "detail": detail}
    atomic_write_json(path, cache)
    return Speed(images_per_s, eval_images_per_s, "probe", detail)


def _random_batch(key: SpeedKey, num_classes: int, generator: Any) -> dict[str, Any]:
    """A batch as `collate_detections` makes it: 3 boxes an image, 1/8 to 1/2 of the side."""
    # Imported here: torch only when a speed is measured: the Train page imports this module.
    import torch

    count, side = key.batch, key.imgsz
    images = torch.randint(0, 256, (count, 3, side, side), dtype=torch.uint8, generator=generator)
    corner = torch.rand(count, 3, 2, generator=generator) * side / 2
    extent = (torch.rand(count, 3, 2, generator=generator) * 3 + 1) * side / 8
    boxes = torch.cat([corner, corner + extent], dim=-1)  # (B, 3, 4) xyxy in input pixels
    labels = torch.randint(0, num_classes, (count, 3), generator=generator)
    return {"images": images, "gt_boxes": boxes, "gt_labels": labels, "gt_mask": torch.ones(count, 3, dtype=torch.bool)}


def _time_evaluation(model: Any, batch: dict[str, Any], device: Any, dtype: Any) -> float:
    """Validation images per second of the model's forward pass (one warm-up pass, one timed)."""
    # Imported here: torch only when a speed is measured: the Train page imports this module.
    import torch

    from backend.training.engine import images_to_input, use_channels_last

    images = images_to_input(batch["images"], device, use_channels_last(device, dtype))
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        model(images)
        started = time.perf_counter()
        model(images)
        seconds = time.perf_counter() - started
    return images.shape[0] / seconds


# ----------------------------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """An epoch's duration for a dataset at a speed, and the recommended time budget.

    Attributes:
        epoch_s: seconds of training steps in one epoch.
        eval_s: seconds of the evaluation after each epoch, None when the speed has no evaluation rate.
        recommended_epochs / recommended_minutes: `recommend`'s budget.
    """

    speed: Speed
    train_images: int
    val_images: int
    batch: int
    steps_per_epoch: int
    epoch_s: float
    eval_s: float | None
    recommended_epochs: int
    recommended_minutes: int

    def text(self) -> str:
        """The estimate in one paragraph, for the Train page and the CLI."""
        evaluation = (
            f", plus {_duration(self.eval_s)} to evaluate the {self.val_images} validation images after each epoch"
            if self.eval_s is not None
            else " (the evaluation after each epoch comes on top: not measured)"
        )
        return (
            f"{_duration(self.epoch_s).capitalize()} an epoch on this machine ({self.steps_per_epoch} steps of "
            f"{self.batch} images at {self.speed.images_per_s:.1f} training images/s, measured by the "
            f"{self.speed.detail})"
            f"{evaluation}. Recommended time budget: {self.recommended_minutes} min, about "
            f"{self.recommended_epochs} epochs (the rule: the time to train on about {RECOMMENDED_IMAGES:,} images, "
            f"or {MIN_PASSES} passes over a larger training set, in whole epochs)."
        )


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    return f"about {seconds:.0f} s" if seconds < 90 else f"about {seconds / 60:.1f} min"


def recommend(speed: Speed, train_images: int, val_images: int, batch: int, min_samples: int) -> Estimate:
    """The epoch's duration and the recommended budget for `train_images` / `val_images` at `speed`."""
    steps = steps_per_epoch(train_images, batch, min_samples)
    epoch_s = steps * batch / speed.images_per_s
    eval_s = val_images / speed.eval_images_per_s if speed.eval_images_per_s and val_images else None
    images = max(RECOMMENDED_IMAGES, MIN_PASSES * train_images)
    epochs = max(1, math.ceil(images / (steps * batch)))
    minutes = max(1, math.ceil(epochs * (epoch_s + (eval_s or 0.0)) / 60))
    return Estimate(speed, train_images, val_images, batch, steps, epoch_s, eval_s, epochs, minutes)


def estimate_for(
    storage: str | Path, runs_dir: str | Path, data: str | Path, key: SpeedKey, min_samples: int
) -> Estimate | None:
    """The estimate for training with `key` on the dataset folder `data` from a measured speed, None without one."""
    speed = measured_speed(storage, runs_dir, key)
    if speed is None:
        return None
    train_images, val_images = version_images(data)
    return recommend(speed, train_images, val_images, key.batch, min_samples)
