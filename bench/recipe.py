"""The small-data recipe, ablated: each variant's mAP after 2, 5 and 10 minutes of training from random weights.

A budget of minutes is turned into a number of optimizer steps with the variant's own training rate on this
machine (images/s of `bench/train_step.py`'s trainer path at the variant's image size, measured in this run unless
given with --rate IMGSZ=R), and each run trains exactly that many steps: epochs of `--epoch-steps` steps, the
schedule annealing over all of them. So the figures do not depend on what else the machine does while the table
is made (only how long it takes), and a variant that makes steps cheaper (a smaller input) gets more of them.
Evaluation time is left out of the budget here; `bench/train_step.py` measures its share of an epoch.

Each run is scored by its best.pt's evaluation on the validation split (pycocotools mAP50-95 and mAP50, eval.json),
as in training.

    .venv/bin/python bench/recipe.py --data ../shared/data/raccoon --variants baseline,close_mosaic --minutes 2,5

`augment_old` trains the baseline with the hand-written augmentation that the albumentations pipeline replaced
(its loader and augment modules read from git, as bench/loader.py does); `augment_new` is the baseline under
another name. The issue's comparison, two seeds of 10 minutes each:

    .venv/bin/python bench/recipe.py --variants augment_new,augment_old --minutes 10 --seeds 0,1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.data.synthetic import generate_synthetic_dataset
from backend.training.config import TrainConfig
from backend.training.trainer import fit

RACCOON = Path(__file__).resolve().parents[2] / "shared" / "data" / "raccoon"
# What each variant changes in the baseline (TrainConfig's defaults for S, from random weights, batch 16).
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "close_mosaic": {"close_mosaic": 0.3},
    "imgsz_256": {"imgsz": 256},
    "short_warmup": {"warmup_epochs": 0.5},
    "lr_2x": {"lr": 2e-3},
    "ema_0.99": {"ema_decay": 0.99},
    "mosaic_half": {"mosaic_prob": 0.5},
    "augment_new": {},
    "augment_old": {},  # the baseline trained through the hand-written pipeline of git history (old_augmentation)
}


@contextlib.contextmanager
def old_augmentation():
    """The trainer builds its training dataset with the loader and augmentation of the last commit that had the
    hand-written pipeline (bench/loader.py's reference), with the mosaic probability of the pipeline it was given."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from loader import default_reference_rev, reference_loader  # a sibling script, imported only here

    import backend.training.trainer as trainer

    reference = reference_loader(default_reference_rev(), Path(tempfile.mkdtemp(prefix="yolodex-old-augment-")))

    def dataset(records, imgsz, augment, **kwargs):
        if augment is None:
            return reference.TrainDataset(records, imgsz, None, **kwargs)
        mosaic_prob = next((step.p for step in augment.transforms if type(step).__name__ == "YoloxMosaic"), 0.0)
        config = reference.AugmentConfig(mosaic_prob=mosaic_prob)
        return reference.TrainDataset(records, imgsz, config, **kwargs)

    original = trainer.TrainDataset
    trainer.TrainDataset = dataset
    try:
        yield
    finally:
        trainer.TrainDataset = original


def measure_rate(data: Path, imgsz: int, batch: int) -> float:
    """Training images/s of the trainer's path at `imgsz` (bench/train_step.py, 6 steps)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import StepPath  # a sibling script, imported only here

    from backend.data.augment import default_pipeline
    from backend.data.folders import load_dataset
    from backend.data.loader import TrainDataset, make_train_loader
    from backend.training.engine import autocast_dtype, use_channels_last

    train_set = load_dataset(data)["train"]
    device = torch.device("cpu")
    dtype = autocast_dtype(device, None)
    path = StepPath("trainer", len(train_set.class_names), "s", use_channels_last(device, dtype), dtype)
    dataset = TrainDataset(train_set.records, imgsz, default_pipeline(imgsz), seed=0)
    dataset.preload()
    for count, batch_data in enumerate(make_train_loader(dataset, batch, min_samples=6 * batch, num_workers=0)):
        path.step(batch_data, 0.0)
        if count == 5:
            break
    return path.summary(batch, 1.0, skip=2)["images_per_s"]


def run_variant(data: Path, name: str, steps: int, epoch_steps: int, batch: int, seed: int, out: Path) -> dict:
    changes = VARIANTS[name]
    epochs = max(1, round(steps / epoch_steps))  # whole epochs nearest the budget
    values = {
        "data": str(data),
        "size": "s",
        "imgsz": 320,
        "batch_size": batch,
        "epochs": epochs,
        "min_samples": epoch_steps * batch,
        "patience": None,
        "seed": seed,
    }
    config = TrainConfig(**{**values, **changes})
    started = time.perf_counter()
    with old_augmentation() if name == "augment_old" else contextlib.nullcontext():
        fit(config, out)
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    return {
        "mAP50-95": round(metrics.get("mAP50-95") or 0.0, 4),
        "mAP50": round(metrics.get("mAP50") or 0.0, 4),
        "steps": epochs * epoch_steps,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="dataset folder (default raccoon; 'synthetic' generates one)")
    parser.add_argument("--variants", default="baseline,close_mosaic,imgsz_256")
    parser.add_argument("--minutes", default="2,5,10")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epoch-steps", type=int, default=10, help="optimizer steps an epoch (one evaluation each)")
    parser.add_argument("--rate", action="append", default=[], help="IMGSZ=IMAGES_PER_S, skips measuring that size")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", type=Path, help="write (and extend, when it exists) the table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = args.data or RACCOON
    if str(data) == "synthetic":
        data = generate_synthetic_dataset(
            Path(tempfile.mkdtemp(prefix="yolodex-recipe-")) / "synthetic",
            num_train=160,
            num_val=40,
            image_size=((320, 240), (640, 480)),
            seed=7,
        )
    if not (Path(data) / "train.json").is_file():
        sys.exit(f"no dataset at {data} (raccoon lives in ../shared/data/raccoon beside the checkout)")
    rates = {int(size): float(rate) for size, rate in (item.split("=") for item in args.rate)}
    table = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {"rows": []}
    work = Path(tempfile.mkdtemp(prefix="yolodex-recipe-runs-"))
    for name in args.variants.split(","):
        imgsz = VARIANTS[name].get("imgsz", 320)
        if imgsz not in rates:
            rates[imgsz] = measure_rate(Path(data), imgsz, args.batch)
            print(f"rate at {imgsz}: {rates[imgsz]} images/s", flush=True)
        for minutes in (float(value) for value in args.minutes.split(",")):
            steps = max(1, round(minutes * 60 * rates[imgsz] / args.batch))
            for seed in (int(value) for value in args.seeds.split(",")):
                out = work / f"{name}-{minutes:g}min-seed{seed}"
                result = run_variant(Path(data), name, steps, args.epoch_steps, args.batch, seed, out)
                row = {
                    "data": Path(data).name,
                    "variant": name,
                    "minutes": minutes,
                    "seed": seed,
                    "images_per_s": rates[imgsz],
                    **result,
                }
                print(json.dumps(row), flush=True)
                table["rows"].append(row)
                if args.json:
                    args.json.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
