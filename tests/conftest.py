"""Shared fixtures. `reference_dir` is ../shared/reference next to the checkout (absent on a user's fresh clone)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"

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
