"""Shared fixtures. `reference_dir` is ../shared/reference next to the checkout (absent on a user's fresh clone)."""

from __future__ import annotations

import io
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

    return generate_synthetic_dataset(tmp_path_factory.mktemp("data") / "shapes", num_train=8, num_val=4,
                                      image_size=(128, 128), seed=3)  # fmt: skip
