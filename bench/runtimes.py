"""Where inference time goes: each runtime on the FP32 and INT8 models, against this CPU's measured peaks.

Part 1 (always): per runtime (onnxruntime, OpenVINO f32, OpenVINO bf16 where the CPU has native bf16) and model
(the FP32 export as `yolodex quantize` writes it, and its INT8 QDQ quantization with the default float policy), the
batch-1 latency (median and 90th percentile) and the achieved GOP/s: the model's operations (counted in a forward
pass: 2 per multiply-add of every convolution) divided by the median latency. Beside them, the CPU's peaks measured
here with torch: an fp32 matmul, a bf16 matmul (emulated, so slow, on a CPU without native bf16) and an fp32 3×3
convolution. The engines take turns run by run, so load from other work falls on all of them alike.

Part 2 (`--bulk`): the work yolodex does in bulk, timed in each runtime on a small synthetic set: pre-labeling
(the Predictor over the images in batches of 8), evaluating an ONNX model (`evaluate_onnx`) and the quantization's
sensitivity scan (`scan_sensitivity` over `--scan-layers` layers). Pre-labeling and evaluation run with
`YOLODEX_RUNTIME` set, which is what "auto" resolves to; the scan is given the runtime.

Images: the validation images of `--data` (default: ../shared/data/raccoon when it is there) for calibration; a
synthetic set otherwise. Weights are random unless `--checkpoint` is given: latency does not depend on them.

    .venv/bin/python bench/runtimes.py --imgsz 320 640 --threads 2
    .venv/bin/python bench/runtimes.py --imgsz 160 --bulk --no-peaks
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.data.folders import load_dataset
from backend.data.records import DetectionSet
from backend.data.synthetic import generate_synthetic_dataset
from backend.export.onnx_export import export_onnx
from backend.inference import Predictor
from backend.models import build_model, load_model
from backend.processing import PostprocessConfig
from backend.quantization.calibration import CalibrationImages
from backend.quantization.pipeline import evaluate_onnx
from backend.quantization.ptq import calibrate, default_float_nodes, preprocess_fp32, quantize_onnx, weighted_nodes
from backend.quantization.sensitivity import scan_sensitivity
from backend.runtimes import RUNTIME_ENV, native_bf16, open_onnx, openvino_problem, runtime_label

RACCOON = Path(__file__).resolve().parents[2] / "shared" / "data" / "raccoon"
WARMUP_RUNS = 2


def model_gops(model: torch.nn.Module, imgsz: int) -> float:
    """Giga-operations of one image's forward pass: 2 per multiply-add of every Conv2d, ConvTranspose2d and Linear
    (the rest, activations and the decoding, is under 1 % of the total)."""
    total = 0

    def count(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            total += 2 * output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, torch.nn.ConvTranspose2d):
            kh, kw = module.kernel_size
            total += 2 * inputs[0].numel() * (module.out_channels // module.groups) * kh * kw
        elif isinstance(module, torch.nn.Linear):
            total += 2 * output.numel() * module.in_features

    handles = [module.register_forward_hook(count) for module in model.modules()]
    with torch.inference_mode():
        model(torch.zeros(1, 3, imgsz, imgsz))
    for handle in handles:
        handle.remove()
    return total / 1e9


def peaks(threads: int, seconds: float = 1.0) -> dict[str, float]:
    """GOP/s of an fp32 and a bf16 matmul (2048², torch) and an fp32 3×3 convolution (256→256 channels, 80×80), at
    `threads` threads: the most this CPU gives our kind of work."""
    torch.set_num_threads(threads)

    def rate(operations: float, run: Callable[[], object]) -> float:
        run()
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            run()
            done += 1
        return operations * done / (time.perf_counter() - started) / 1e9

    n = 2048
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    image, weight = torch.randn(1, 256, 80, 80), torch.randn(256, 256, 3, 3)
    with torch.inference_mode():
        return {
            "fp32 matmul": rate(2 * n**3, lambda: a32 @ b32),
            "bf16 matmul": rate(2 * n**3, lambda: a16 @ b16),
            "fp32 conv3x3": rate(
                2 * 256 * 80 * 80 * 256 * 9, lambda: torch.nn.functional.conv2d(image, weight, padding=1)
            ),
        }


def dataset(data: Path | None, folder: Path) -> tuple[DetectionSet, str]:
    """The validation split of `data` (or of the raccoon set when it is there), else a synthetic set."""
    source = data or (RACCOON if (RACCOON / "val.json").is_file() else None)
    if source is not None:
        splits = load_dataset(source)
        return splits["val"] if len(splits.get("val", [])) else splits["train"], str(source)
    synthetic = generate_synthetic_dataset(folder / "synthetic", num_train=2, num_val=16, image_size=(320, 320), seed=3)
    return load_dataset(synthetic)["val"], "synthetic"


def models(model: torch.nn.Module, imgsz: int, images: DetectionSet, folder: Path) -> dict[str, Path]:
    """The FP32 export (partially fused, as `yolodex quantize` writes it) and its INT8 QDQ quantization."""
    fp32 = export_onnx(model, folder / f"fp32_{imgsz}.onnx", imgsz=imgsz, fuse=False)
    reader = CalibrationImages(images.records, imgsz, count=8)
    int8 = quantize_onnx(fp32, folder / f"int8_{imgsz}.onnx", reader, nodes_to_exclude=default_float_nodes(fp32))
    return {"FP32": fp32, "INT8": int8}


def engines() -> list[tuple[str, str]]:
    """(runtime, compute) pairs that run here."""
    found = [("onnxruntime", "f32")]
    if openvino_problem() is None:
        found.append(("openvino", "f32"))
        if native_bf16():
            found.append(("openvino", "bf16"))
    return found


def latency(files: dict[str, Path], imgsz: int, threads: int, runs: int) -> dict[tuple[str, str], list[float]]:
    """Batch-1 seconds per (engine label, model), the engines taking turns run by run."""
    sessions = {}
    for runtime, compute in engines():
        for name, path in files.items():
            if compute == "bf16" and name != "FP32":
                continue  # bf16 is the FP32 model's own variant
            sessions[runtime_label(runtime, compute), name] = open_onnx(
                path, runtime=runtime, compute=compute, threads=threads
            )
    feed = {"images": np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)}
    for session in sessions.values():
        for _ in range(WARMUP_RUNS):
            session.run(None, feed)
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in sessions}
    for _ in range(runs):
        for key, session in sessions.items():
            started = time.perf_counter()
            session.run(None, feed)
            seconds[key].append(time.perf_counter() - started)
    return seconds


def bulk(model: torch.nn.Module, imgsz: int, threads: int, scan_layers: int, folder: Path) -> list[dict]:
    """Pre-labeling, evaluation and the sensitivity scan, timed in each runtime (YOLODEX_RUNTIME set)."""
    data = generate_synthetic_dataset(folder / "bulk", num_train=8, num_val=16, image_size=(320, 320), seed=4)
    splits = load_dataset(data)
    val = splits["val"]
    if model.num_classes != len(val.class_names):  # random weights: the synthetic set's classes
        torch.manual_seed(0)
        model = build_model("s", len(val.class_names)).eval().fuse()
    fp32 = export_onnx(model, folder / "bulk_fp32.onnx", imgsz=imgsz, fuse=False)
    prepared = preprocess_fp32(fp32, folder / "bulk_pre.onnx")
    calibration = calibrate(
        prepared, CalibrationImages(splits["train"].records, imgsz, count=8), folder / "ranges.json", method="minmax"
    )
    scan_images = np.concatenate(
        [item["images"] for item in iter(CalibrationImages(val.records, imgsz, count=8, seed=1).get_next, None)]
    )
    layers = weighted_nodes(prepared)[:scan_layers]
    paths = [record.path for record in val.records]
    runtimes = ["onnxruntime"] + (["openvino"] if openvino_problem() is None else [])

    def prelabel() -> None:
        predictor = Predictor.from_path(fp32, postprocess=PostprocessConfig(conf_threshold=0.05), threads=threads)
        for start in range(0, len(paths), 8):
            predictor.predict(paths[start : start + 8])

    tasks: dict[str, Callable[[str], object]] = {
        f"pre-labeling {len(paths)} images (s)": lambda runtime: prelabel(),
        f"evaluation of {len(val)} images (s)": lambda runtime: evaluate_onnx(fp32, val, threads),
        f"scan of {len(layers)} layers on {len(scan_images)} images (s)": lambda runtime: scan_sensitivity(
            calibration, scan_images, candidates=layers, threads=threads, runtime=runtime
        ),
    }
    rows = [{"runtime": runtime_label(runtime)} for runtime in runtimes]
    for name, task in tasks.items():  # the runtimes take turns task by task: load drifts less between them
        for row, runtime in zip(rows, runtimes, strict=True):
            os.environ[RUNTIME_ENV] = runtime
            started = time.perf_counter()
            task(runtime)
            row[name] = round(time.perf_counter() - started, 2)
    os.environ.pop(RUNTIME_ENV, None)
    return rows


def table(rows: list[dict]) -> str:
    """Rows as a Markdown table."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[column]) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="s", choices=["s", "m", "l"])
    parser.add_argument("--imgsz", type=int, nargs="+", default=[320, 640])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10, help="timed batch-1 runs per engine and model")
    parser.add_argument("--data", type=Path, help="dataset for calibration images (default: raccoon if present)")
    parser.add_argument("--checkpoint", type=Path, help="a best.pt to time instead of random weights")
    parser.add_argument("--bulk", action="store_true", help="also time pre-labeling, evaluation and the scan")
    parser.add_argument("--bulk-imgsz", type=int, default=160)
    parser.add_argument("--scan-layers", type=int, default=10)
    parser.add_argument("--no-peaks", action="store_true", help="skip the latency table and the peak probes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.checkpoint:
        model, _ = load_model(args.checkpoint)
    else:
        model = build_model(args.size)
    model = model.eval().fuse()  # partial fusion, the form quantization works on
    results: dict = {"threads": args.threads, "engines": [runtime_label(*engine) for engine in engines()]}
    with tempfile.TemporaryDirectory(prefix="yolodex-runtimes-") as scratch:
        folder = Path(scratch)
        if not args.no_peaks:
            images, source = dataset(args.data, folder)
            measured = peaks(args.threads)
            print(f"peaks at {args.threads} threads: " + ", ".join(f"{k} {v:.1f} GOP/s" for k, v in measured.items()))
            rows = []
            for imgsz in args.imgsz:
                gops = model_gops(model, imgsz)
                seconds = latency(models(model, imgsz, images, folder), imgsz, args.threads, args.runs)
                for (engine, name), times in seconds.items():
                    median = float(np.median(times))
                    rows.append(
                        {
                            "runtime": engine,
                            "model": f"{args.size.upper()} {name}",
                            "imgsz": imgsz,
                            "GOPs": round(gops, 2),
                            "p50 ms": round(1000 * median, 1),
                            "p90 ms": round(1000 * float(np.percentile(times, 90)), 1),
                            "GOP/s": round(gops / median, 1),
                            "% fp32 matmul": round(100 * gops / median / measured["fp32 matmul"], 1),
                            "% fp32 conv": round(100 * gops / median / measured["fp32 conv3x3"], 1),
                        }
                    )
            print(f"calibration images: {source}")
            print(table(rows))
            results |= {"peaks": measured, "latency": rows, "calibration_images": source}
        if args.bulk:
            rows = bulk(model, args.bulk_imgsz, args.threads, args.scan_layers, folder)
            print(f"bulk work, S at {args.bulk_imgsz}, {args.threads} threads:")
            print(table(rows))
            results["bulk"] = rows
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
