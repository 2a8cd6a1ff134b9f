"""Training speed and quality on real photos under a wall-clock budget, next to the peer's published figures.

Trains YOLO-NAS from scratch (or from `--weights`) on ../shared/data/raccoon (200 photos, COCO layout) at imgsz
320 on this machine for `--minutes` (default 10), then prints:
- images/s of the training steps (data loading included, evaluation excluded) and over the whole run;
- compute achieved: forward GFLOPs per image × images/s (the same measure for the peer);
- mAP50-95 and mAP50 (pycocotools) on the val split of best.pt, in PyTorch and through its ONNX FP32 export;
- first, the step profile of bench/train_step.py on the same data and settings: the NCHW path and the trainer's,
  side by side in this run, their images/s ratio and the compute achieved against this CPU's probed peak
  (`--no-step-profile` skips it);
- the ratios to the peer (Ultralytics YOLOv8n, 25 epochs from scratch in 531 s on this kind of machine:
  7.5 images/s, mAP50-95 0.136, mAP50 0.327 from its ONNX export under pycocotools).

    .venv/bin/python bench/train.py --minutes 10 --json train_bench.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.data.folders import load_dataset
from backend.export.onnx_export import export_onnx
from backend.models import build_model, load_model
from backend.models.summary import count_gflops
from backend.quantization.pipeline import evaluate_onnx
from backend.training.config import TrainConfig
from backend.training.trainer import fit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import measure_step  # a sibling script

RACCOON = Path(__file__).resolve().parents[2] / "shared" / "data" / "raccoon"
# Ultralytics YOLOv8n: 8.7 GFLOPs at 640 (its own count, 2·MACs), so a quarter at 320.
PEER = {
    "name": "YOLOv8n (Ultralytics)",
    "images_per_s": 7.5,
    "gflops_320": 8.7 / 4,
    "seconds": 531,
    "mAP50-95": 0.136,
    "mAP50": 0.327,
}


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
    parser.add_argument("--report-only", action="store_true", help="measure the finished run in --out, no training")
    parser.add_argument("--compile", action="store_true", help="train a torch.compile'd model (TrainConfig.compile)")
    parser.add_argument("--close-mosaic", type=float, default=0.0, help="last fraction of the run without mosaic")
    parser.add_argument("--no-step-profile", action="store_true")
    args = parser.parse_args()
    if not (args.data / "train.json").is_file():
        sys.exit(f"needs the raccoon set at {args.data} (../shared/data/raccoon beside the checkout)")
    torch.set_num_threads(args.threads)

    step_profile = None
    if not args.no_step_profile and not args.report_only:
        step_profile = measure_step(args.data, args.size, args.imgsz, args.batch, steps=8)
        print(json.dumps(step_profile, indent=2), flush=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="yolodex-bench-train-")) / "run"
    if args.report_only:
        config = TrainConfig.from_dict(json.loads((out / "config.json").read_text())["train"])
    else:
        config = TrainConfig(
            data=str(args.data),
            size=args.size,
            imgsz=args.imgsz,
            epochs=args.epochs,
            batch_size=args.batch,
            time_minutes=args.minutes,
            weights=args.weights,
            lr=args.lr,
            ema_decay=args.ema_decay,
            patience=None,
            min_samples=args.min_samples,
            mosaic_prob=args.mosaic,
            num_workers=args.workers,
            amp=False if args.no_amp else None,
            compile=args.compile,
            close_mosaic=args.close_mosaic,
        )
        fit(config, out, on_event=print_epoch)
    report = measure(out, config, Path(config.data))
    if step_profile is not None:
        report["step_profile"] = step_profile
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def print_epoch(name: str, **data: object) -> None:
    if name == "epoch":
        val = data.get("val") or {}
        loss = data["train"].get("loss", float("nan"))
        print(
            f"epoch {data['epoch'] + 1}: loss {loss:.3f} mAP50-95 {val.get('mAP50-95')} "
            f"mAP50 {val.get('mAP50')} ({data['elapsed_s']:.0f} s)",
            flush=True,
        )


def measure(out: Path, config: TrainConfig, data: Path) -> dict:
    """Speed from the run's metrics.jsonl, accuracy of best.pt in PyTorch (eval.json) and through ONNX FP32."""
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [event for event in events if event["event"] == "step"]
    # Step time = time between consecutive step events of one epoch (data loading included, evaluation not).
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(steps) if a["epoch"] == b["epoch"]]
    step_rate = config.batch_size * len(gaps) / sum(gaps) if gaps else 0.0
    end = next(event for event in reversed(events) if event["event"] == "train_end")
    torch_eval = json.loads((out / "eval.json").read_text())["metrics"]

    # The peer's figures come from its ONNX export, so ours do too: best.pt → ONNX FP32 → onnxruntime → pycocotools.
    model, _ = load_model(out / "best.pt")
    onnx_path = export_onnx(model, out / "model_fp32.onnx", imgsz=config.imgsz, class_names=model_class_names(out))
    onnx_eval = evaluate_onnx(onnx_path, load_dataset(data)["val"])["metrics"]

    gflops = count_gflops(build_model(config.size, 1).eval(), (config.imgsz, config.imgsz))
    peer_compute = PEER["gflops_320"] * PEER["images_per_s"]
    return {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "config": config.to_dict(),
        "stopped": end["stopped"],
        "epochs": end["epochs_done"],
        "train_seconds": round(end["elapsed_s"], 1),
        "images_per_s_steps": round(step_rate, 2),
        "images_per_s_overall": round(len(steps) * config.batch_size / end["elapsed_s"], 2),
        "gflops_per_image": round(gflops, 2),
        "compute_gflops_per_s": round(gflops * step_rate, 1),
        "torch": {key: torch_eval.get(key) for key in ("mAP50-95", "mAP50")},
        "onnx": {key: onnx_eval.get(key) for key in ("mAP50-95", "mAP50")},
        "peer": PEER,
        "ratios": {
            "compute_vs_peer": round(gflops * step_rate / peer_compute, 2),
            "images_per_s_vs_peer": round(step_rate / PEER["images_per_s"], 2),
            "mAP50-95_vs_peer": round((onnx_eval.get("mAP50-95") or 0.0) / PEER["mAP50-95"], 2),
            "mAP50_vs_peer": round((onnx_eval.get("mAP50") or 0.0) / PEER["mAP50"], 2),
        },
    }


def model_class_names(run_dir: Path) -> list[str]:
    return json.loads((run_dir / "config.json").read_text())["class_names"]


if __name__ == "__main__":
    main()
