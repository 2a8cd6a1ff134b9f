"""The augmentation pipeline as a run's data: recorded in config.json, given with `yolodex train --augment FILE`,
used again by a resume (and the default by runs recorded before there was one). Tiny real runs (S at 64 px)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import albumentations as A
import pytest

import backend.training.trainer as trainer
from backend.data.augment import (
    Letterbox,
    RandomScaleTranslate,
    YoloxMosaic,
    box_params,
    default_pipeline,
    pipeline_to_dict,
)
from backend.data.loader import TrainDataset
from backend.training.trainer import fit, resume
from tests.conftest import REPO_ROOT
from tests.test_training import cli, cli_env, tiny_config


def custom_pipeline() -> dict:
    """Not the default: no HSV, always flipped, half the mosaics."""
    steps = [YoloxMosaic(64, p=0.5), RandomScaleTranslate(64, scale=(0.8, 1.2)), A.HorizontalFlip(p=1.0), Letterbox(64)]
    return pipeline_to_dict(A.Compose(steps, bbox_params=box_params()))


def stop_after(steps: int):
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] > steps

    return stop


@pytest.fixture
def pipelines_used(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The `A.to_dict` form of every pipeline the trainer builds its training dataset with (the real dataset)."""
    used: list[dict] = []

    class RecordingDataset(TrainDataset):
        def __init__(self, records, imgsz, augment, **kwargs) -> None:
            used.append(pipeline_to_dict(augment) if augment is not None else None)
            super().__init__(records, imgsz, augment, **kwargs)

    monkeypatch.setattr(trainer, "TrainDataset", RecordingDataset)
    return used


@pytest.mark.slow  # three tiny runs: about a minute on two cores
def test_a_run_records_its_pipeline_and_a_resume_trains_with_the_recorded_one(
    small_set: Path, tmp_path: Path, pipelines_used: list[dict]
) -> None:
    spec = custom_pipeline()
    run = tmp_path / "run"
    first = fit(tiny_config(small_set, augment_pipeline=spec), run, stop_requested=stop_after(1))
    assert first.stopped == "cancelled"
    recorded = json.loads((run / "config.json").read_text())["train"]["augment_pipeline"]
    assert recorded == spec and pipelines_used == [spec]

    old = tmp_path / "old"  # a run from before pipelines were recorded: config.json has no augment_pipeline
    shutil.copytree(run, old)
    saved = json.loads((old / "config.json").read_text())
    del saved["train"]["augment_pipeline"]
    (old / "config.json").write_text(json.dumps(saved))

    resume(run, stop_requested=stop_after(1))
    assert pipelines_used[-1] == spec
    resume(old, stop_requested=stop_after(1))
    assert pipelines_used[-1] == pipeline_to_dict(default_pipeline(64))


def test_a_run_without_a_pipeline_records_the_default(
    small_set: Path, tmp_path: Path, pipelines_used: list[dict]
) -> None:
    fit(tiny_config(small_set, mosaic_prob=0.5), tmp_path / "run", stop_requested=stop_after(0))
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["train"]["augment_pipeline"]
    assert recorded == pipeline_to_dict(default_pipeline(64, mosaic_prob=0.5)) == pipelines_used[0]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{'transform': [", "neither JSON nor YAML"),
        (json.dumps({"transform": {"__class_fullname__": "Blur3000", "p": 1.0}}), "Blur3000"),
        (json.dumps(pipeline_to_dict(default_pipeline(320))), "the training size is 64x64"),
    ],
)
def test_cli_train_refuses_a_bad_augment_file_and_writes_no_run(
    small_set: Path, tmp_path: Path, content: str, reason: str
) -> None:
    pipeline = tmp_path / "pipeline.json"
    pipeline.write_text(content)
    out = tmp_path / "runs" / "run"
    args = cli("train", "--data", small_set, "--imgsz", "64", "--out", out, "--augment", pipeline, "--quiet")
    completed = subprocess.run(args, cwd=REPO_ROOT, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1, completed.stderr
    assert completed.stderr.startswith("yolodex: error: ") and str(pipeline) in completed.stderr
    assert reason in completed.stderr and "Traceback" not in completed.stderr
    assert not out.exists() and not (tmp_path / "runs").exists()
