"""One YOLO-NAS training step, phase by phase, on this machine: the plain path and the trainer's, side by side.

Every path trains its own copy of the same model on the same batches, step by step in turn, so the machine's load
falls on them alike. The phases of a step: waiting for the loader (a real `make_train_loader` over --data, or a
generated synthetic set, with the trainer's worker count), forward, loss with the task-aligned assigner, backward,
gradient clipping and the AdamW step, the EMA update. It also prints the share of an epoch that one evaluation of
the validation split costs, and the compute achieved (3 × forward GFLOPs an image × images/s: a backward costs
about twice a forward) against this CPU's peaks, probed in the same run (an fp32 2048² matmul, a 3×3 convolution
of 64 channels at 80×80, batch 16, NCHW and NHWC; the same in bf16 where the CPU has native bf16).

Paths:
- `nchw`: NCHW activations (what fp32 training on a CPU without native bf16 ran before channels-last was fixed);
- `trainer`: what `backend.training.trainer.fit` runs now on this machine (`use_channels_last`, `autocast_dtype`).

    .venv/bin/python bench/train_step.py --imgsz 320 --batch 16 --steps 8 --json step.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.data.augment import default_pipeline
from backend.data.folders import load_dataset
from backend.data.loader import TrainDataset, make_train_loader, set_loader_epoch
from backend.data.synthetic import generate_synthetic_dataset
from backend.models import build_model
from backend.models.summary import count_gflops
from backend.training.ema import ModelEMA
from backend.training.engine import EvalImages, autocast_dtype, evaluate, images_to_input, use_channels_last
from backend.training.loss import YoloNASLoss
from backend.training.schedule import build_optimizer
from backend.training.trainer import usable_num_workers

RACCOON = Path(__file__).resolve().parents[2] / "shared" / "data" / "raccoon"
PHASES = ("data_wait", "forward", "loss", "backward", "optimizer", "ema")


def seconds_of(function: Callable[[], object], repeats: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - started) / repeats


def probe_peaks(bf16: bool) -> dict[str, float]:
    """GFLOP/s of a dense matmul and of a 3×3 convolution (forward), the reference for what a step achieves."""
    peaks = {}
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peaks["matmul_fp32"] = 2 * 2048**3 / seconds_of(lambda: a @ b, 5) / 1e9
    x = torch.randn(16, 64, 80, 80)
    weight = torch.randn(64, 64, 3, 3)
    conv_flops = 2 * 16 * 64 * 64 * 9 * 80 * 80
    with torch.no_grad():
        peaks["conv3x3_fp32_nchw"] = conv_flops / seconds_of(lambda: F.conv2d(x, weight, padding=1), 5) / 1e9
        x_nhwc, w_nhwc = (t.contiguous(memory_format=torch.channels_last) for t in (x, weight))
        peaks["conv3x3_fp32_nhwc"] = conv_flops / seconds_of(lambda: F.conv2d(x_nhwc, w_nhwc, padding=1), 5) / 1e9
        if bf16:  # without native bf16 it is emulated, hundreds of times slower: not a peak of anything
            a16, b16, x16, w16 = (t.bfloat16() for t in (a, b, x_nhwc, w_nhwc))
            peaks["matmul_bf16"] = 2 * 2048**3 / seconds_of(lambda: a16 @ b16, 5) / 1e9
            peaks["conv3x3_bf16_nhwc"] = conv_flops / seconds_of(lambda: F.conv2d(x16, w16, padding=1), 5) / 1e9
    return {key: round(value, 1) for key, value in peaks.items()}


class StepPath:
    """One way of running a training step: its own model, optimizer and EMA, the same start weights."""

    def __init__(self, name: str, num_classes: int, size: str, channels_last: bool, dtype: torch.dtype | None):
        torch.manual_seed(0)
        self.name, self.channels_last, self.dtype = name, channels_last, dtype
        self.model = build_model(size, num_classes).train()
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, 1e-3, 1e-4)
        self.ema = ModelEMA(self.model, 0.9)
        self.loss_fn = YoloNASLoss(num_classes, strides=self.model.strides)
        self.times: dict[str, list[float]] = {phase: [] for phase in PHASES}
        self.losses: list[float] = []

    def step(self, batch: dict[str, torch.Tensor], data_wait: float) -> None:
        device = torch.device("cpu")
        marks = [time.perf_counter()]
        images = images_to_input(batch["images"], device, self.channels_last)
        with torch.autocast("cpu", dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            outputs = self.model(images)
        marks.append(time.perf_counter())
        losses = self.loss_fn(*outputs, batch["gt_boxes"], batch["gt_labels"], batch["gt_mask"], images.shape[2:])
        marks.append(time.perf_counter())
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        marks.append(time.perf_counter())
        nn.utils.clip_grad_norm_(self.model.parameters(), 10.0, foreach=True)
        self.optimizer.step()
        marks.append(time.perf_counter())
        self.ema.update(self.model)
        marks.append(time.perf_counter())
        self.times["data_wait"].append(data_wait)
        for phase, start, end in zip(PHASES[1:], marks[:-1], marks[1:], strict=True):
            self.times[phase].append(end - start)
        self.losses.append(losses["loss"].item())

    def summary(self, batch_size: int, train_gflops: float, skip: int) -> dict[str, object]:
        medians = {phase: statistics.median(values[skip:]) for phase, values in self.times.items()}
        step_s = sum(medians.values())
        rate = batch_size / step_s
        return {
            "phases_ms": {phase: round(value * 1000, 1) for phase, value in medians.items()},
            "phase_share": {phase: round(value / step_s, 3) for phase, value in medians.items()},
            "step_s": round(step_s, 3),
            "images_per_s": round(rate, 2),
            "train_gflops_per_s": round(train_gflops * rate, 1),
            "losses": [round(value, 4) for value in self.losses],
        }


def measure_step(data: Path | None, size: str, imgsz: int, batch: int, steps: int) -> dict:
    """The phase profile of both paths, the evaluation's share of an epoch and the peaks (see the module doc)."""
    data = data or (RACCOON if (RACCOON / "train.json").is_file() else None)
    if data is None:
        data = generate_synthetic_dataset(Path(tempfile.mkdtemp(prefix="yolodex-step-")) / "synthetic", num_train=64)
    splits = load_dataset(data)
    train_set, val_set = splits["train"], splits.get("val") or splits["train"]
    device = torch.device("cpu")
    dtype = autocast_dtype(device, None)
    paths = [
        StepPath("nchw", len(train_set.class_names), size, False, dtype),
        StepPath("trainer", len(train_set.class_names), size, use_channels_last(device, dtype), dtype),
    ]
    dataset = TrainDataset(train_set.records, imgsz, default_pipeline(imgsz), seed=0)
    dataset.preload()
    workers = usable_num_workers(None)
    loader = make_train_loader(dataset, batch, min_samples=batch * steps, num_workers=workers)
    set_loader_epoch(loader, 0)

    iterator = iter(loader)
    for _ in range(steps):
        waited = time.perf_counter()
        samples = next(iterator)
        waited = time.perf_counter() - waited
        for path in paths:  # both steps take this batch (and its wait); the loader prepares the next one meanwhile
            path.step(samples, waited)
    del iterator

    forward_gflops = count_gflops(build_model(size, len(train_set.class_names)), (imgsz, imgsz))
    train_gflops = 3 * forward_gflops
    results = {path.name: path.summary(batch, train_gflops, skip=min(2, steps - 1)) for path in paths}
    trainer = paths[-1]
    started = time.perf_counter()
    evaluate(trainer.ema.module, EvalImages(val_set, imgsz), device=device, batch_size=batch)
    eval_s = time.perf_counter() - started
    epoch_s = len(make_train_loader(dataset, batch, num_workers=0)) * results["trainer"]["step_s"]
    peaks = probe_peaks(bf16=dtype == torch.bfloat16)
    peak_name = "conv3x3_bf16_nhwc" if dtype == torch.bfloat16 else "conv3x3_fp32_nhwc"
    for result in results.values():
        result["share_of_peak"] = round(result["train_gflops_per_s"] / peaks[peak_name], 3)
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "native_bf16": dtype == torch.bfloat16,
            "loader_workers": workers,
        },
        "setup": {
            "size": size,
            "imgsz": imgsz,
            "batch": batch,
            "steps": steps,
            "data": str(data),
            "precision": str(dtype or "float32"),
            "forward_gflops_per_image": round(forward_gflops, 2),
            "train_gflops_per_image": round(train_gflops, 2),
        },
        "peaks_gflops_per_s": peaks,
        "peak_used": peak_name,
        "paths": results,
        "ratio_trainer_vs_nchw": round(results["trainer"]["images_per_s"] / results["nchw"]["images_per_s"], 2),
        "evaluation": {
            "val_images": len(val_set),
            "seconds": round(eval_s, 1),
            "epoch_train_s": round(epoch_s, 1),
            "share_of_epoch": round(eval_s / (eval_s + epoch_s), 3),
        },
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data",
        type=Path,
        help="a dataset folder (default: raccoon beside the checkout, else a generated synthetic set)",
    )
    parser.add_argument("--size", default="s")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="steps of each path (the first 2 are warm-up)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    report = measure_step(args.data, args.size, args.imgsz, args.batch, args.steps)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
