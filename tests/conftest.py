"""Shared fixtures. `reference_dir` is ../shared/reference next to the checkout (absent on a user's fresh clone)."""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"

# The session-wide Label Studio server fixture (`labelstudio`).
pytest_plugins = ["tests.labelstudio_fixture", "tests.redis_fixture", "tests.postgres_fixture"]

# Free space a full run asks for: its peak under pytest's base folder was 5.7 GB (measured 2026-11-29), plus margin.
NEEDED_DISK_GB = 10


def pytest_report_header(config: pytest.Config) -> str:
    """The free space where tmp_path lives: a full disk fails tests far from the cause (torch.save's "unexpected
    pos", "could not create numbered dir"), so the header says it first."""
    basetemp = config.option.basetemp
    folder = Path(basetemp).resolve().parent if basetemp else Path(tempfile.gettempdir())
    free_gb = shutil.disk_usage(folder).free / 1e9
    line = f"free disk space for tmp_path: {free_gb:.0f} GB; a full run needs about {NEEDED_DISK_GB} GB"
    if free_gb < NEEDED_DISK_GB:
        line += " -- WARNING: free some space (old /tmp/pytest-of-* folders?) or set --basetemp elsewhere"
    return line


# Two cores: keep torch from oversubscribing when tests run beside servers and workers.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (SHARED_REFERENCE / "yolo_nas_s_random_fp16.pth").is_file():
        pytest.skip(f"needs the official reference files in {SHARED_REFERENCE} (present in CI, not in a user's clone)")
    return SHARED_REFERENCE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _keep_main_module() -> Iterator[None]:
    """Puts pytest's `__main__` back after each test. AppTest runs a page as `__main__` and leaves it in
    sys.modules; a later "spawn" process would then re-run that page on start-up (multiprocessing re-imports the
    parent's main file), fail there and never run its target."""
    main = sys.modules.get("__main__")
    yield
    if main is not None and sys.modules.get("__main__") is not main:
        sys.modules["__main__"] = main


def textured_image(seed: int, size: tuple[int, int] = (96, 64)) -> np.ndarray:
    """(H, W, 3) uint8 RGB of `size` (W, H): smooth random colour blobs, so every seed has a distinct perceptual
    hash (the store and ingest tests use it as a photo stand-in)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 6, 3)).astype(np.uint8)
    return cv2.resize(coarse, size, interpolation=cv2.INTER_CUBIC)


def encode_image(pixels: np.ndarray, image_format: str = "PNG", **options: Any) -> bytes:
    """`pixels` (H, W, 3) uint8 RGB encoded with Pillow (PNG, JPEG with quality=..., GIF, ...)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 train / 4 val synthetic images of 128×128, three classes (the tiny training runs' data)."""
    from backend.data.synthetic import generate_synthetic_dataset

    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "shapes", num_train=8, num_val=4, image_size=(128, 128), seed=3
    )


# The session's detector (`detecting_run`): YOLO-NAS S trained from scratch until it finds the shapes of a few
# synthetic images, so that the quantization tests see what a quantization costs in mAP.
DETECTOR_IMGSZ = 96
# Training stops at the first epoch whose validation mAP50 reaches this: a quantization that destroys accuracy must
# have accuracy to destroy.
DETECTOR_MIN_MAP50 = 0.5
DETECTOR_MAX_EPOCHS = 40  # of 10 steps: the cap, far above what it needs


@pytest.fixture(scope="session")
def detecting_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training run folder (best.pt, config.json naming its dataset, eval.json) of YOLO-NAS S at 96 px that really
    detects: mAP50 ≥ `DETECTOR_MIN_MAP50` on its validation images (checked here).

    Eight 96×96 synthetic images, trained on without augmentation and validated on themselves (val.json is a copy of
    train.json): what the quantization tests measure is the accuracy a quantization loses, not how well the model
    generalises, and a model that has learned its own images is the cheapest one with accuracy to lose. Training
    is stopped (as a cancel would) once an epoch's evaluation reaches the mark. Read the folder, do not write into
    it (other tests share it): quantize with an `out_dir`.
    """
    from backend.data.synthetic import generate_synthetic_dataset
    from backend.training.config import TrainConfig
    from backend.training.trainer import fit

    root = tmp_path_factory.mktemp("detector")
    data = generate_synthetic_dataset(root / "shapes", num_train=8, num_val=0, image_size=(96, 96), seed=14)
    shutil.copy(data / "train.json", data / "val.json")
    config = TrainConfig(
        data=str(data),
        size="s",
        imgsz=DETECTOR_IMGSZ,
        epochs=DETECTOR_MAX_EPOCHS,
        batch_size=4,
        min_samples=40,
        augment=False,
        lr=2e-3,
        warmup_epochs=1,
        patience=None,
        num_workers=0,
        ema_decay=0.0,
        checkpoint_minutes=60,
    )
    reached: list[float] = []

    def on_event(name: str, **data: Any) -> None:
        if name == "epoch" and data["val"] and data["val"]["mAP50"] >= DETECTOR_MIN_MAP50:
            reached.append(data["val"]["mAP50"])

    fit(config, root / "run", on_event=on_event, stop_requested=lambda: bool(reached))
    metrics = json.loads((root / "run" / "eval.json").read_text())["metrics"]
    assert metrics["mAP50"] >= DETECTOR_MIN_MAP50, f"the session's detector did not learn its images: {metrics}"
    return root / "run"
