"""INT8 against FP32 on this CPU, measured side by side in one run, on the synthetic set and on real photos.

For each data set (the synthetic shapes set, generated here, and ../shared/data/raccoon, 200 photos, when present):
a YOLO-NAS S run trained at 320 (`--run-synthetic`/`--run-raccoon` to reuse one, else trained here for
`--train-minutes`), then `yolodex quantize` (the whole pipeline: three calibration methods with the default float
policy, the sensitivity scan and the automatic policy, QAT if `auto` needs it) at each `--sizes` input size
(the model is fully convolutional, so the 320 run is also quantized and measured at 640). It prints, per data set
and size, every candidate's mAP50-95 and its ratios to FP32, then the issue's three targets for the chosen INT8
model:
- mAP50-95 within 0.5 point of FP32;
- latency p50 at batch 1 at most 0.5x FP32 (onnxruntime, `--threads` threads, models taking turns);
- file size at most 0.3x FP32.

    .venv/bin/python bench/quantize.py --json quantize_bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.data.synthetic import generate_synthetic_dataset
from backend.quantization.pipeline import QuantizeOptions, _choose, measure_speed, quantize_run
from backend.training.config import TrainConfig
from backend.training.trainer import fit

RACCOON = Path(__file__).resolve().parents[2] / "shared" / "data" / "raccoon"
TARGETS = {"map_drop_points": 0.5, "latency_ratio": 0.5, "size_ratio": 0.3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["synthetic", "raccoon"], choices=["synthetic", "raccoon"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[320, 640])
    parser.add_argument("--run-synthetic", type=Path, help="a finished run on the synthetic set to reuse")
    parser.add_argument("--run-raccoon", type=Path, help="a finished run on raccoon to reuse (e.g. bench/train.py's)")
    parser.add_argument("--train-minutes", type=float, default=6.0, help="training budget when no run is given")
    parser.add_argument(
        "--finetune-minutes",
        type=float,
        default=5.0,
        help="at a size other than the run's, fine-tune it there first for this long (0: quantize the run as it is)",
    )
    parser.add_argument("--method", default="auto", choices=["auto", "ptq", "qat"])
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="keep runs and models here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="with --out of an earlier run: measure the saved models' speed again, side by side, "
        "and print the results (nothing is trained or quantized)",
    )
    args = parser.parse_args()
    if args.report_only:
        if not args.out:
            parser.error("--report-only needs --out, the folder of an earlier run")
        _report_only(args)
        return

    with tempfile.TemporaryDirectory(prefix="yolodex-bench-quantize-") as scratch:
        root = args.out or Path(scratch)
        results = []
        for name in args.sets:
            run = _run_for(name, args, root)
            if run is None:
                continue
            for size in args.sizes:
                sized = _finetuned(run, size, args.finetune_minutes, root / f"run_{name}_{size}")
                started = time.perf_counter()
                options = QuantizeOptions(
                    method=args.method, calib_images=args.calib, budget=args.budget, threads=args.threads, imgsz=size
                )
                report = quantize_run(sized, root / f"{name}_{size}", options)
                results.append(_summary(name, size, report, time.perf_counter() - started))
                _print(results[-1])
    _finish(args, results)


def _finish(args: argparse.Namespace, results: list[dict]) -> None:
    payload = {
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "targets": TARGETS,
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(payload, indent=2))
    print("\nsummary (chosen INT8 vs FP32):")
    for item in results:
        verdict = ", ".join(f"{key} {'ok' if ok else 'MISSED'}" for key, ok in item["targets_met"].items())
        print(
            f"  {item['set']:9s} {item['imgsz']:4d}: {item['chosen']:15s} drop {item['drop_points']:+.2f} pt, "
            f"latency x{item['latency_ratio']:.2f}, size x{item['size_ratio']:.2f}  [{verdict}]"
        )


def _run_for(name: str, args: argparse.Namespace, root: Path) -> Path | None:
    given = args.run_synthetic if name == "synthetic" else args.run_raccoon
    if given:
        return given
    if name == "raccoon":
        if not RACCOON.is_dir():
            print(f"raccoon: skipped ({RACCOON} is not here; it ships with the task's shared data, not the repo)")
            return None
        data = RACCOON
    else:
        data = generate_synthetic_dataset(
            root / "shapes", num_train=300, num_val=60, image_size=(320, 256), seed=0, overwrite=True
        )
    print(f"{name}: training YOLO-NAS S at 320 for {args.train_minutes} min ...", flush=True)
    config = TrainConfig(data=str(data), size="s", imgsz=320, epochs=300, time_minutes=args.train_minutes, seed=0)
    fit(config, root / f"run_{name}")
    return root / f"run_{name}"


def _report_only(args: argparse.Namespace) -> None:
    results = []
    for name in args.sets:
        for size in args.sizes:
            path = args.out / f"{name}_{size}" / "quant_report.json"
            if not path.is_file():
                continue
            report = json.loads(path.read_text())
            models = report["models"]
            speed = measure_speed({key: Path(row["path"]) for key, row in models.items()}, size, args.threads, 40)
            for key, row in models.items():
                row.update(speed[key])
            fp32_map = models["fp32"]["metrics"]["mAP50-95"]
            report["chosen"] = _choose(models, fp32_map, report["budget_points"] / 100, report["calibration"]["method"])
            results.append(_summary(name, size, report, 0.0))
            _print(results[-1])
    _finish(args, results)


def _finetuned(run: Path, size: int, minutes: float, out: Path) -> Path:
    """The run itself at its own size; elsewhere (e.g. 640 for a 320 run) a copy fine-tuned at `size` for `minutes`
    from its best.pt, so that the FP32 reference is a model meant for that size."""
    train = json.loads((run / "config.json").read_text())["train"]
    if int(train["imgsz"]) == size or minutes <= 0:
        return run
    if not (out / "best.pt").is_file():
        print(f"fine-tuning {run.name} at {size} for {minutes} min ...", flush=True)
        config = TrainConfig(
            data=train["data"],
            size=train["size"],
            imgsz=size,
            epochs=300,
            time_minutes=minutes,
            weights=str(run / "best.pt"),
            batch_size=max(2, int(train["batch_size"]) // 4),
            seed=0,
        )
        fit(config, out)
    return out


def _summary(name: str, size: int, report: dict, seconds: float) -> dict:
    models = report["models"]
    fp32, chosen = models["fp32"], models[report["chosen"]]
    drop = 100 * (fp32["metrics"]["mAP50-95"] - chosen["metrics"]["mAP50-95"])
    latency = chosen["latency_ms_p50"] / fp32["latency_ms_p50"]
    size_ratio = chosen["bytes"] / fp32["bytes"]
    return {
        "set": name,
        "imgsz": size,
        "chosen": report["chosen"],
        "seconds": round(seconds, 1),
        "fp32_map": fp32["metrics"]["mAP50-95"],
        "drop_points": round(drop, 3),
        "latency_ratio": round(latency, 3),
        "size_ratio": round(size_ratio, 3),
        "targets_met": {
            "mAP": drop <= TARGETS["map_drop_points"] + 1e-9,
            "latency": latency <= TARGETS["latency_ratio"],
            "size": size_ratio <= TARGETS["size_ratio"],
        },
        "float_layers": [item["module"] for item in (report["sensitivity"] or {}).get("float_layers", [])],
        "rows": {
            key: {
                "mAP50-95": row["metrics"]["mAP50-95"],
                "mAP50": row["metrics"]["mAP50"],
                "latency_ms_p50": row["latency_ms_p50"],
                "latency_ms_p95": row["latency_ms_p95"],
                "throughput_b8": row["throughput_b8_images_per_s"],
                "bytes": row["bytes"],
                "agreement": row.get("agreement", {}).get("mean_agreement"),
                "float_layers": len(row.get("float_layers", [])),
            }
            for key, row in models.items()
        },
    }


def _print(item: dict) -> None:
    rows = item["rows"]
    fp32 = rows["fp32"]
    print(f"\n{item['set']} at {item['imgsz']} ({item['seconds']:.0f} s): chosen {item['chosen']}")
    header = ["model", "mAP50-95", "drop pt", "p50 x", "b8 x", "size x", "agree"]
    print(f"  {header[0]:15s} " + " ".join(f"{column:>8s}" for column in header[1:]) + " float")
    for key, row in rows.items():
        agreement = "-" if row["agreement"] is None else f"{row['agreement']:.2f}"
        values = [
            f"{row['mAP50-95']:.4f}",
            f"{100 * (fp32['mAP50-95'] - row['mAP50-95']):.2f}",
            f"{row['latency_ms_p50'] / fp32['latency_ms_p50']:.2f}",
            f"{row['throughput_b8'] / fp32['throughput_b8']:.2f}",
            f"{row['bytes'] / fp32['bytes']:.2f}",
            agreement,
        ]
        print(f"  {key:15s} " + " ".join(f"{value:>8s}" for value in values) + f" {row['float_layers']}")


if __name__ == "__main__":
    main()
