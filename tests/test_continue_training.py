"""Continue training (issue 18): a finished run trained for more epochs or minutes in its own folder, its curves
appended, best.pt replaced only by a better mAP50-95; the totals and the lr schedule of the new segment."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from backend.models.checkpoints import read_checkpoint
from backend.training.config import TrainConfig, TrainingError
from backend.training.continuation import EPOCH_CAP_MARGIN, continued_config, prepare_checkpoint
from backend.training.trainer import fit, resume
from tests.test_training import read_events, tiny_config


@pytest.mark.slow
def test_continuing_a_finished_run_trains_more_epochs_in_its_folder(small_set: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = fit(tiny_config(small_set, epochs=1), run_dir)
    assert (first.stopped, first.epochs_done) == ("epochs", 1)
    lines_before = (run_dir / "metrics.jsonl").read_text().splitlines()
    best_before = read_checkpoint(run_dir / "best.pt")
    best_map_before = best_before["metrics"]["best_map"]

    # A plain resume of a finished run has nothing left to do; one more epoch trains one more epoch.
    second = resume(run_dir, more_epochs=1)

    assert (second.stopped, second.epochs_done) == ("epochs", 2)
    lines_after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert lines_after[: len(lines_before)] == lines_before  # appended, never rewritten
    events = read_events(run_dir)
    steps = [(event["epoch"], event["step"]) for event in events if event["event"] == "step"]
    per_epoch = events[0]["steps_per_epoch"]  # 8 images, batch 2: 4 steps
    assert steps == [(epoch, step) for epoch in (0, 1) for step in range(1, per_epoch + 1)]
    assert [event["event"] for event in events].count("train_start") == 2
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["epochs"] == 2 and saved["continued"][0]["more_epochs"] == 1
    assert read_checkpoint(run_dir / "last.pt")["epoch"] == 2
    # best.pt: the better of the two evaluations, never a worse one.
    epoch_maps = [event["val"]["mAP50-95"] for event in events if event["event"] == "epoch"]
    best_after = read_checkpoint(run_dir / "best.pt")
    if epoch_maps[1] > best_map_before:
        assert best_after["epoch"] == 2 and best_after["metrics"]["best_map"] == pytest.approx(epoch_maps[1])
    else:
        assert best_after["epoch"] == best_before["epoch"]
        assert all(torch.equal(best_after["model"][key], best_before["model"][key]) for key in best_before["model"])
    assert second.best_map == pytest.approx(max(epoch_maps))


@pytest.mark.slow
def test_continuing_keeps_best_pt_unless_beaten(small_set: Path, tmp_path: Path) -> None:
    """lr ~0 in the extra epoch: the weights stay, the mAP does not beat the first one, best.pt is not rewritten."""
    run_dir = tmp_path / "run"
    fit(tiny_config(small_set, epochs=1, lr=1e-12, warmup_epochs=0), run_dir)
    before = (run_dir / "best.pt").stat().st_mtime_ns, (run_dir / "best.pt").read_bytes()

    result = resume(run_dir, more_epochs=1)

    assert result.epochs_done == 2 and result.best_epoch == 0
    assert ((run_dir / "best.pt").stat().st_mtime_ns, (run_dir / "best.pt").read_bytes()) == before


def checkpoint_at(epoch: int, steps_done: int, total_steps: int, elapsed_s: float, epochs: int) -> dict:
    return {
        "epoch": epoch,
        "step_in_epoch": 0,
        "metrics": {"elapsed_s": elapsed_s, "best_map": 0.2, "best_epoch": 3, "bad_epochs": 5},
        "scheduler": {
            "steps_done": steps_done,
            "elapsed_s": elapsed_s,
            "warmup_end_progress": 0.2,
            "total_steps": total_steps,
            "warmup_steps": 20,
        },
        "train_config": {"epochs": epochs},
    }


def test_continued_totals_schedule_and_patience() -> None:
    config = TrainConfig(data="/d", epochs=10, time_minutes=10.0, patience=5)
    # 10 epochs of 10 steps in 600 s: 60 s an epoch.
    checkpoint = checkpoint_at(10, 100, 100, 600.0, 10)

    more_time = continued_config(config, checkpoint, more_minutes=20, more_epochs=None)
    assert more_time.time_minutes == pytest.approx(30.0)
    assert more_time.epochs == 10 + math.ceil(EPOCH_CAP_MARGIN * 20) + 1  # 20 epochs fit in 20 minutes; twice that
    more_epochs = continued_config(config, checkpoint, more_minutes=None, more_epochs=3)
    assert (more_epochs.epochs, more_epochs.time_minutes) == (13, None)  # the epochs end it, not the old budget
    both = continued_config(config, checkpoint, more_minutes=5, more_epochs=3)
    assert (both.epochs, both.time_minutes) == (13, pytest.approx(15.0))
    with pytest.raises(TrainingError, match="more minutes"):
        continued_config(config, checkpoint, more_minutes=None, more_epochs=None)
    with pytest.raises(TrainingError, match="positive"):
        continued_config(config, checkpoint, more_minutes=-1, more_epochs=None)

    prepared = prepare_checkpoint(checkpoint, config, more_time)
    assert prepared["metrics"]["bad_epochs"] == 0 and prepared["metrics"]["best_map"] == 0.2
    assert checkpoint["metrics"]["bad_epochs"] == 5  # the caller's dict is left alone
    # The warm-up ended at step 20 (120 s of 600): over the 30-minute total that is 120 / 1800 of the run.
    assert prepared["scheduler"]["warmup_end_progress"] == pytest.approx(120 / 1800)
