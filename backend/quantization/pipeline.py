"""From a training run to a measured INT8 model: export FP32, quantize (PTQ), evaluate both, write the report.

Run folder in, files out (architecture.md): `model_fp32.onnx`, `model_int8.onnx`, `quant_report.json`.
The FP32 export is of the *partially* fused model (QARepVGG branches merged, post-BN kept), as the fact sheet's
quantization pipeline does (§6); both files keep the ONNX I/O contract, so the Pokédex and `yolodex predict` run
either unchanged. The report covers what this slice measures: mAP50-95/mAP50 and per-class AP with deltas to FP32,
batch-1 latency p50/p95 side by side, file sizes, the op types onnxruntime executed and the nodes kept in float.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from backend.data.records import DetectionSet
from backend.evaluation.coco_eval import evaluate_detections
from backend.export.onnx_export import export_onnx, read_onnx_metadata
from backend.files import atomic_write_json
from backend.inference import Predictor
from backend.models.checkpoints import CheckpointError, load_model
from backend.quantization.calibration import CalibrationImages
from backend.quantization.ptq import executed_op_types, quantize_onnx
from backend.training.engine import EVAL_POSTPROCESS
from backend.training.trainer import load_splits, run_checkpoint

logger = logging.getLogger(__name__)

LATENCY_WARMUP = 3


def quantize_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    calibration: str = "percentile",
    calib_images: int = 64,
    threads: int = 2,
    latency_runs: int = 20,
) -> dict[str, Any]:
    """PTQ of a run's best.pt with the default float policy; returns (and writes) the FP32-vs-INT8 report.

    Args:
        run_dir: a training run folder (best.pt or last.pt, and config.json naming its dataset).
        out_dir: where the ONNX files and quant_report.json go (default: the run folder).
        calibration: "percentile" (99.99), "minmax" or "entropy".
        calib_images: calibration images drawn from the training split (validation pre-processing).
        threads: onnxruntime intra-op threads for evaluation and latency.
        latency_runs: timed batch-1 runs per model, taking turns.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir
    checkpoint = run_checkpoint(run_dir)
    if not checkpoint.is_file() or not (run_dir / "config.json").is_file():
        raise CheckpointError(f"{run_dir} is not a training run folder (best.pt/last.pt and config.json expected)")
    train_config = json.loads((run_dir / "config.json").read_text())["train"]
    model, loaded = load_model(checkpoint)
    if model.fusion == "full":
        raise CheckpointError(f"{checkpoint} is fully fused; quantization needs unfused or partially fused weights")
    if model.fusion == "none":
        model.eval().fuse()  # partial fusion: the form the quantization pipeline works on
    imgsz = int(train_config["imgsz"])
    train_set, val_set, notes = load_splits(train_config["data"], int(train_config.get("seed", 0)))

    fp32_path = export_onnx(model, out_dir / "model_fp32.onnx", imgsz=imgsz, class_names=loaded.class_names,
                            run_id=run_dir.name, fuse=False)  # fmt: skip
    started = time.perf_counter()
    reader = CalibrationImages(train_set.records, imgsz, count=calib_images)
    int8_path = quantize_onnx(fp32_path, out_dir / "model_int8.onnx", reader, method=calibration)
    quantize_s = time.perf_counter() - started
    settings = json.loads(read_onnx_metadata(int8_path)["quantization"])

    fp32_eval = evaluate_onnx(fp32_path, val_set, threads)
    int8_eval = evaluate_onnx(int8_path, val_set, threads)
    latency = _latency_side_by_side({"fp32": fp32_path, "int8": int8_path}, imgsz, threads, latency_runs)
    report = {
        "run": str(run_dir), "checkpoint": str(checkpoint), "imgsz": imgsz, "method": "ptq",
        "calibration": {"method": calibration, "images": settings["calibration_images"], "asked": calib_images,
                        "split": "train", "seconds": round(quantize_s, 1)},
        "float_nodes": settings["float_nodes"], "notes": notes,
        "validation_images": len(val_set), "threads": threads,
        "models": {
            "fp32": {"path": str(fp32_path), "bytes": fp32_path.stat().st_size, **fp32_eval, **latency["fp32"]},
            "int8": {"path": str(int8_path), "bytes": int8_path.stat().st_size, **int8_eval, **latency["int8"],
                     "executed_op_types": executed_op_types(int8_path, (1, 3, imgsz, imgsz), threads=threads)},
        },
    }  # fmt: skip
    report["deltas"] = _deltas(report["models"]["fp32"], report["models"]["int8"])
    atomic_write_json(out_dir / "quant_report.json", report)
    return report


def evaluate_onnx(path: Path, dataset: DetectionSet, threads: int | None = None) -> dict[str, Any]:
    """COCO metrics and per-class AP50-95 of an ONNX model on `dataset`, through the shared pre/post-processing
    (Predictor, the validation post-processing of training)."""
    predictor = Predictor.from_path(path, postprocess=EVAL_POSTPROCESS, threads=threads)
    predictions = [predictor.predict([record.path])[0] for record in dataset.records]
    result = evaluate_detections(dataset, predictions)
    per_class = {item["class_name"]: item["AP50-95"] for item in result.to_dict()["per_class"]}
    return {"metrics": dict(result.metrics), "per_class_ap": per_class}


def _latency_side_by_side(paths: dict[str, Path], imgsz: int, threads: int, runs: int) -> dict[str, dict[str, float]]:
    """Batch-1 latency p50/p95 in ms; the models take turns run by run so machine load falls on both alike."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    sessions = {
        name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in paths.items()
    }
    images = np.random.default_rng(0).random((1, 3, imgsz, imgsz), dtype=np.float32)
    timings: dict[str, list[float]] = {name: [] for name in sessions}
    for index in range(LATENCY_WARMUP + runs):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, {"images": images})
            if index >= LATENCY_WARMUP:
                timings[name].append((time.perf_counter() - started) * 1000)
    return {
        name: {"latency_ms_p50": round(float(np.percentile(values, 50)), 2),
               "latency_ms_p95": round(float(np.percentile(values, 95)), 2)}
        for name, values in timings.items()
    }  # fmt: skip


def _deltas(fp32: dict[str, Any], int8: dict[str, Any]) -> dict[str, Any]:
    """INT8 minus FP32 for each metric and class AP (points of mAP as fractions), and the size/latency ratios."""

    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 4)

    return {
        "metrics": {key: minus(fp32["metrics"].get(key), value) for key, value in int8["metrics"].items()},
        "per_class_ap": {name: minus(fp32["per_class_ap"].get(name), ap) for name, ap in int8["per_class_ap"].items()},
        "size_ratio": round(int8["bytes"] / fp32["bytes"], 3),
        "latency_ratio_p50": round(int8["latency_ms_p50"] / fp32["latency_ms_p50"], 3),
    }
