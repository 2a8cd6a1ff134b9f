"""Training speed and quality on real photos under a wall-clock budget, next to the peer's published figures.

Trains YOLO-NAS from scratch (or from `--weights`) on ../shared/data/raccoon (200 photos, COCO layout) at imgsz
320 on this machine for `--minutes` (default 10), then prints:
- images/s of the training steps (data loading included, evaluation excluded) and over the whole run;
- compute achieved: forward GFLOPs per image × images/s (the same measure for the peer);
- mAP50-95 and mAP50 (pycocotools) on the val split of best.pt, in PyTorch and through its ONNX FP32 export;
- the ratios to the peer (Ultralytics YOLOv8n, 25 epochs from scratch in 531 s on this kind of machine:
  7.5 images/s, mAP50-95 0.136, mAP50 0.327 from its ONNX export under pycocotools; issue 3 §7).

    .venv/bin/python bench/train.py --minutes 10 --json train_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.data.folders import load_dataset
from backend.evaluation.coco_eval import evaluate_detections
from backend.export.onnx_export import export_onnx
from backend.inference import Predictor
from backend.models import build_model, load_model
from backend.models.summary import count_gflops
from backend.training.config import TrainConfig
from backend.training.engine import EVAL_POSTPROCESS
from backend.training.trainer import fit

RACCOON = Path(__file__).resolve().parents[2] / "shared" / "data" / "raccoon"
# Ultralytics YOLOv8n: 8.7 GFLOPs at 640 (its own count, 2·MACs), so a quarter at 320.
PEER = {"name": "YOLOv8n (Ultralytics)", "images_per_s": 7.5, "gflops_320": 8.7 / 4, "seconds": 531,
        "mAP50-95": 0.136, "mAP50": 0.327}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=RACCOON)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--size", default="s")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=300, help="upper bound; the time budget ends the run")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--ema-decay", type=float, default=0.9)
    parser.add_argument("--min-samples", type=int, default=512)
    parser.add_argument("--mosaic", type=float, default=1.0)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--weights")
    parser.add_argument("--no-amp", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, help="run folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not (args.data / "train.json").is_file():
        sys.exit(f"needs the raccoon set at {args.data} (../shared/data/raccoon beside the checkout)")
    torch.set_num_threads(args.threads)

    out = args.out or Path(tempfile.mkdtemp(prefix="yolodex-bench-train-")) / "run"
    config = TrainConfig(
        data=str(args.data), size=args.size, imgsz=args.imgsz, epochs=args.epochs, batch_size=args.batch,
        time_minutes=args.minutes, weights=args.weights, lr=args.lr, ema_decay=args.ema_decay, patience=None,
        min_samples=args.min_samples, mosaic_prob=args.mosaic, num_workers=args.workers,
        amp=False if args.no_amp else None,
    )  # fmt: skip
    step_seconds, step_images, steps = [], 0, 0
    last = {"time": None}

    def on_event(name: str, **data: object) -> None:
        nonlocal step_images, steps
        now = time.perf_counter()
        if name == "step":
            steps += 1
            if last["time"] is not None:
                step_seconds.append(now - last["time"])
                step_images += config.batch_size
            last["time"] = now
        elif name == "epoch":
            last["time"] = None  # evaluation time is not step time
            val = data.get("val") or {}
            loss = data["train"].get("loss", float("nan"))
            print(f"epoch {data['epoch'] + 1}: loss {loss:.3f} mAP50-95 {val.get('mAP50-95')} "
                  f"mAP50 {val.get('mAP50')} ({data['elapsed_s']:.0f} s)", flush=True)  # fmt: skip

    started = time.perf_counter()
    result = fit(config, out, on_event=on_event)
    wall_s = time.perf_counter() - started
    torch_eval = json.loads((out / "eval.json").read_text())["metrics"]

    # The peer's figures come from its ONNX export, so ours do too: best.pt → ONNX FP32 → onnxruntime → pycocotools.
    model, _ = load_model(out / "best.pt")
    onnx_path = export_onnx(model, out / "model_fp32.onnx", imgsz=args.imgsz, class_names=model_class_names(out))
    predictor = Predictor.from_path(onnx_path, postprocess=EVAL_POSTPROCESS)
    val_set = load_dataset(args.data)["val"]
    predictions = [predictor.predict([record.path])[0] for record in val_set.records]
    onnx_eval = evaluate_detections(val_set, predictions).metrics

    gflops = count_gflops(build_model(args.size, 1).eval(), args.imgsz)
    step_rate = step_images / sum(step_seconds) if step_seconds else 0.0
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__},
        "config": config.to_dict(),
        "stopped": result.stopped, "epochs": result.epochs_done, "train_seconds": round(result.elapsed_s, 1),
        "wall_seconds": round(wall_s, 1),
        "images_per_s_steps": round(step_rate, 2),
        "images_per_s_overall": round(steps * config.batch_size / result.elapsed_s, 2) if result.elapsed_s else None,
        "gflops_per_image": round(gflops, 2),
        "compute_gflops_per_s": round(gflops * step_rate, 1),
        "torch": {key: torch_eval.get(key) for key in ("mAP50-95", "mAP50")},
        "onnx": {key: onnx_eval.get(key) for key in ("mAP50-95", "mAP50")},
        "peer": PEER,
    }  # fmt: skip
    peer_compute = PEER["gflops_320"] * PEER["images_per_s"]
    report["ratios"] = {
        "compute_vs_peer": round(report["compute_gflops_per_s"] / peer_compute, 2),
        "images_per_s_vs_peer": round(step_rate / PEER["images_per_s"], 2),
        "mAP50-95_vs_peer": round((onnx_eval.get("mAP50-95") or 0.0) / PEER["mAP50-95"], 2),
        "mAP50_vs_peer": round((onnx_eval.get("mAP50") or 0.0) / PEER["mAP50"], 2),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def model_class_names(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "config.json").read_text())["class_names"]


if __name__ == "__main__":
    main()
