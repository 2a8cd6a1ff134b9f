"""Training-loader throughput: the albumentations pipeline against the hand-written one it replaced, side by side.

The reference is the loader and augmentation code of an earlier commit (`--reference-rev`; by default the last
commit whose backend/data/augment.py still has the hand-written `AugmentConfig`), read with `git show` into a
temporary module, so the comparison keeps working after that code left the tree. Both run the same recipe
(mosaic p 1, scale 0.5-1.5, translate 0.1, HSV 5/30/30, flip 0.5) on the same records, batches of 16 through
`make_train_loader` with 0 workers (the per-sample cost, in this process) and 1 worker (as training runs on a
2-core machine), alternating old and new `--rounds` times; the figure is each side's best round (the least
disturbed by whatever else runs on the machine). With 0 workers it is given twice: per wall-clock second and per
CPU second of this process (the cost of a sample, robust to a busy machine). `--interleaved N` adds the figure
that stays steady on a shared machine: N samples per side, old and new alternating sample by sample (so a burst of
load hits both alike), OpenCV sequential as in a loader worker, the CPU time of this thread per sample.
Results: bench/loader_results.md.

    .venv/bin/python bench/loader.py                    # synthetic set, and raccoon if ../shared/data/raccoon exists
    .venv/bin/python bench/loader.py --data DIR --imgsz 640 --batches 20
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.data.augment import default_pipeline
from backend.data.folders import load_dataset
from backend.data.loader import TrainDataset, make_train_loader, set_loader_epoch
from backend.data.synthetic import generate_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
RACCOON = ROOT.parent / "shared" / "data" / "raccoon"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout


def default_reference_rev() -> str:
    """The last commit with the hand-written pipeline: the parent of the commit that replaced backend/data/augment.py's
    `class AugmentConfig` (so its loader.py is the one that went with it), or HEAD while it is still there."""
    newer = None
    for rev in _git("log", "--format=%H", "--", "backend/data/augment.py").split():
        if "class AugmentConfig" in _git("show", f"{rev}:backend/data/augment.py"):
            return _git("rev-parse", f"{newer}^").strip() if newer else rev
        newer = rev
    raise SystemExit("no commit holds the hand-written backend/data/augment.py: give --reference-rev")


def reference_loader(rev: str, folder: Path) -> ModuleType:
    """backend/data/loader.py of `rev`, importing backend/data/augment.py of `rev`, as a module."""
    augment_source = _git("show", f"{rev}:backend/data/augment.py")
    loader_source = _git("show", f"{rev}:backend/data/loader.py")
    (folder / "reference_augment.py").write_text(augment_source)
    (folder / "reference_loader.py").write_text(
        loader_source.replace("from backend.data.augment import", "from reference_augment import")
    )
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("reference_loader", folder / "reference_loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def images_per_s(dataset, batch: int, batches: int, workers: int) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU second of this process: the loading itself when workers is
    0, which other programs on the machine slow down far less than the wall clock)."""
    loader = make_train_loader(dataset, batch, min_samples=batch * batches, num_workers=workers, seed=0)
    set_loader_epoch(loader, 0)
    iterator = iter(loader)
    next(iterator)  # worker start-up and the first batch are not the steady state
    start, start_cpu = time.perf_counter(), time.process_time()
    count = sum(len(item["images"]) for item in iterator)
    elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    del iterator, loader
    return count / elapsed, count / max(elapsed_cpu, 1e-9)


def interleaved_ms(old, new, samples: int) -> tuple[float, float]:
    """(old, new) mean milliseconds of this thread's CPU time per sample, old and new alternating sample by sample
    (which goes first alternates too), OpenCV sequential as in a DataLoader worker (`loader._init_worker`)."""
    import cv2  # only this measurement changes OpenCV's thread count

    threads = cv2.getNumThreads()
    cv2.setNumThreads(0)
    try:
        for index in range(8):  # first calls (lazy imports, caches) are not the steady state
            old[index], new[index]
        spent = {"old": 0.0, "new": 0.0}
        for index in range(samples):
            order = (("old", old), ("new", new)) if index % 2 else (("new", new), ("old", old))
            for side, dataset in order:
                start = time.thread_time()
                dataset[index]
                spent[side] += time.thread_time() - start
    finally:
        cv2.setNumThreads(threads)
    return spent["old"] / samples * 1e3, spent["new"] / samples * 1e3


def compare(
    name: str, records, reference: ModuleType, imgsz: int, batch: int, batches: int, rounds: int, interleaved: int
) -> list:
    old = reference.TrainDataset(records, imgsz, reference.AugmentConfig(), seed=0)
    new = TrainDataset(records, imgsz, default_pipeline(imgsz), seed=0)
    old.preload()
    new.preload()
    rows = []
    if interleaved:
        old_ms, new_ms = interleaved_ms(old, new, interleaved)
        rows.append((name, len(records), imgsz, "-", "interleaved", 1e3 / old_ms, 1e3 / new_ms, old_ms / new_ms))
        print(
            f"{name:10s} {len(records):6d} {imgsz:5d} {'-':>7s} {'inter':>5s} {1e3 / old_ms:11.1f} "
            f"{1e3 / new_ms:11.1f} {old_ms / new_ms:8.2f}   ({old_ms:.3f} vs {new_ms:.3f} ms a sample)",
            flush=True,
        )
    for workers, clock in ((0, "cpu"), (0, "wall"), (1, "wall")):
        best = {"old": 0.0, "new": 0.0}
        for _ in range(rounds):
            for side, dataset in (("old", old), ("new", new)):
                wall, cpu = images_per_s(dataset, batch, batches, workers)
                best[side] = max(best[side], cpu if clock == "cpu" else wall)
        rows.append((name, len(records), imgsz, workers, clock, best["old"], best["new"], best["new"] / best["old"]))
        print(
            f"{name:10s} {len(records):6d} {imgsz:5d} {workers:7d} {clock:>5s} {best['old']:11.1f} "
            f"{best['new']:11.1f} {best['new'] / best['old']:8.2f}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-rev", default=None, help="commit of the hand-written pipeline (default: last)")
    parser.add_argument("--data", type=Path, default=None, help="a dataset folder instead of synthetic + raccoon")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=12, help="batches timed per round")
    parser.add_argument("--rounds", type=int, default=3, help="old/new alternations; the best round counts")
    parser.add_argument(
        "--interleaved", type=int, default=0, metavar="N", help="also N samples a side alternating (module docstring)"
    )
    args = parser.parse_args()

    rev = args.reference_rev or default_reference_rev()
    with tempfile.TemporaryDirectory(prefix="yolodex-loader-bench-") as scratch:
        scratch = Path(scratch)
        reference = reference_loader(rev, scratch)
        print(f"reference: {rev[:12]} (hand-written); new: the albumentations pipeline of the working tree")
        sets = []
        if args.data is not None:
            sets.append((args.data.name, args.data))
        else:
            synthetic = generate_synthetic_dataset(
                scratch / "synthetic", num_train=64, num_val=1, image_size=((240, 180), (640, 480)), seed=0
            )
            sets.append(("synthetic", synthetic))
            if RACCOON.is_dir():
                sets.append(("raccoon", RACCOON))
            else:
                print(f"raccoon: skipped, {RACCOON} does not exist")
        print(
            f"{'data':10s} {'images':>6s} {'imgsz':>5s} {'workers':>7s} {'clock':>5s} {'old img/s':>11s} "
            f"{'new img/s':>11s} {'new/old':>8s}"
        )
        for name, path in sets:
            records = load_dataset(path)["train"].records
            compare(name, records, reference, args.imgsz, args.batch, args.batches, args.rounds, args.interleaved)


if __name__ == "__main__":
    main()
