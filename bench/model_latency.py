"""YOLO-NAS CPU latency, batch 1: PyTorch unfused vs PyTorch fully fused vs onnxruntime FP32, side by side.

For each size and input side: the unfused eval model and its fully fused copy run `predict_boxes` (backbone, neck,
heads and DFL decoding) under `torch.inference_mode()`; onnxruntime (CPUExecutionProvider) runs the fused export
without NMS, which computes the same boxes and scores. The engines take turns run by run (after warm-up), so load
from anything else on the machine falls on all of them alike. Prints the median and 90th percentile of each, the
ratios between them, and the largest output differences against the unfused model (they compute the same thing).

Weights are random: latency does not depend on their values.

    .venv/bin/python bench/model_latency.py --sizes s --imgsz 320 640 --threads 2 --json latency.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.export.onnx_export import export_onnx
from backend.models import build_model

ENGINES = ("torch unfused", "torch fused", "onnxruntime fp32")
WARMUP_RUNS = 3


def default_runs(imgsz: int) -> int:
    return 20 if imgsz <= 320 else 10


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_engines(size: str, imgsz: int, threads: int, folder: Path) -> dict[str, Callable[[np.ndarray], tuple]]:
    """Engine name → function of a (1, 3, imgsz, imgsz) float32 array returning (boxes, scores) as NumPy."""
    torch.manual_seed(0)
    unfused = build_model(size).eval()
    fused = copy.deepcopy(unfused).fuse(full=True)
    onnx_path = export_onnx(unfused, folder / f"yolo_nas_{size}_{imgsz}.onnx", imgsz=imgsz)  # fused, no NMS
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def run_torch(model):
        def run(images: np.ndarray) -> tuple:
            with torch.inference_mode():
                boxes, scores = model.predict_boxes(torch.from_numpy(images))
            return boxes.numpy(), scores.numpy()

        return run

    def run_onnx(images: np.ndarray) -> tuple:
        return tuple(session.run(None, {"images": images}))

    return dict(zip(ENGINES, (run_torch(unfused), run_torch(fused), run_onnx)))


def measure(engines: dict[str, Callable], images: np.ndarray, runs: int) -> tuple[dict[str, list[float]], dict]:
    """Per-engine timings in ms (engines interleaved run by run), and max |Δ| of outputs vs the first engine."""
    outputs = {name: engine(images) for name, engine in engines.items()}
    for _ in range(WARMUP_RUNS - 1):
        for engine in engines.values():
            engine(images)
    baseline_boxes, baseline_scores = outputs[ENGINES[0]]
    differences = {
        name: {
            "max_box_px": float(np.abs(boxes - baseline_boxes).max()),
            "max_score": float(np.abs(scores - baseline_scores).max()),
        }
        for name, (boxes, scores) in outputs.items()
        if name != ENGINES[0]
    }
    timings: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(runs):
        for name, engine in engines.items():
            start = time.perf_counter()
            engine(images)
            timings[name].append((time.perf_counter() - start) * 1e3)
    return timings, differences


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=["s", "m", "l"], default=["s"])
    parser.add_argument("--imgsz", nargs="+", type=int, default=[320, 640])
    parser.add_argument("--runs", type=int, help="timed runs per engine (default: 20 up to 320 px, 10 above)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and onnxruntime intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    header = (
        f"CPU: {cpu_name()}; {args.threads} threads (torch.set_num_threads, ORT intra_op_num_threads), "
        f"batch 1, {WARMUP_RUNS} warm-up runs; torch {torch.__version__}, onnxruntime {ort.__version__}"
    )
    print(header)
    results: dict = {
        "cpu": cpu_name(),
        "threads": args.threads,
        "batch": 1,
        "warmup_runs": WARMUP_RUNS,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "rows": [],
    }
    table = [f"{'size':<5}{'imgsz':>6}  {'engine':<18}{'runs':>5}{'median ms':>11}{'p90 ms':>9}{'vs unfused':>12}"]
    ratio_lines = []
    with tempfile.TemporaryDirectory(prefix="yolodex-bench-") as folder:
        for size in args.sizes:
            for imgsz in args.imgsz:
                runs = args.runs or default_runs(imgsz)
                engines = make_engines(size, imgsz, args.threads, Path(folder))
                images = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
                timings, differences = measure(engines, images, runs)
                medians = {name: float(np.median(values)) for name, values in timings.items()}
                for name, values in timings.items():
                    row = {
                        "size": size,
                        "imgsz": imgsz,
                        "engine": name,
                        "runs": runs,
                        "median_ms": medians[name],
                        "p90_ms": float(np.percentile(values, 90)),
                        "speedup_vs_unfused": medians[ENGINES[0]] / medians[name],
                        **differences.get(name, {}),
                    }
                    results["rows"].append(row)
                    table.append(
                        f"{size:<5}{imgsz:>6}  {name:<18}{runs:>5}{row['median_ms']:>11.1f}{row['p90_ms']:>9.1f}"
                        f"{row['speedup_vs_unfused']:>11.2f}x"
                    )
                unfused, fused, onnx = (medians[name] for name in ENGINES)
                ratios = {
                    "fused_vs_unfused": unfused / fused,
                    "ort_vs_fused": fused / onnx,
                    "ort_vs_unfused": unfused / onnx,
                }
                results.setdefault("ratios", []).append({"size": size, "imgsz": imgsz, **ratios})
                ratio_lines.append(
                    f"{size} @ {imgsz}: fused/unfused speedup {ratios['fused_vs_unfused']:.2f}x, "
                    f"ORT/fused {ratios['ort_vs_fused']:.2f}x, ORT/unfused {ratios['ort_vs_unfused']:.2f}x; "
                    + ", ".join(
                        f"{name} max |Δ| vs unfused {diff['max_box_px']:.1e} px, {diff['max_score']:.1e} score"
                        for name, diff in differences.items()
                    )
                )
    print("\n".join(table))
    print("\n".join(ratio_lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
