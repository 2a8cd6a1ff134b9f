"""Training for real on the synthetic set: overfitting, a killed run resumed, time budget, early stop, bad data.

Runs are tiny (YOLO-NAS S at 64–160 px, a few steps) so the suite stays within minutes on two cores; each test
still exercises the real loader, loss, optimizer, EMA, pycocotools evaluation and checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from backend.data.records import DatasetError
from backend.data.synthetic import generate_synthetic_dataset
from backend.models import build_model, load_model, save_checkpoint
from backend.models.checkpoints import read_checkpoint
from backend.training.config import TrainConfig
from backend.training.engine import TrainingError
from backend.training.trainer import fit, load_splits, load_start_weights, resume
from tests.conftest import REPO_ROOT


def read_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tiny_config(data: Path, **changes) -> TrainConfig:
    values = dict(
        data=str(data),
        size="s",
        imgsz=64,
        epochs=2,
        batch_size=2,
        min_samples=4,
        num_workers=0,
        patience=None,
        warmup_epochs=0.5,
    )
    return TrainConfig(**{**values, **changes})


# --- learning ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_overfits_four_synthetic_images(tmp_path: Path) -> None:
    """4 images (8 boxes of 25–60 px, 3 classes), no augmentation, evaluated on themselves: mAP50 ≥ 0.9 within
    200 optimizer steps at 160 px (measured: 1.0, mAP50-95 0.97).

    EMA off: from scratch at lr 1e-3 the weights move fast and BatchNorm's running statistics (momentum 0.03) lag
    them until the cosine slows down; an EMA of those statistics lags further. This test is about learning.
    """
    data = generate_synthetic_dataset(tmp_path / "four", num_train=4, num_val=0, image_size=(160, 160), seed=14)
    shutil.copy(data / "train.json", data / "val.json")
    config = TrainConfig(
        data=str(data),
        size="s",
        imgsz=160,
        epochs=50,
        batch_size=4,
        min_samples=16,
        augment=False,
        lr=1e-3,
        warmup_epochs=1,
        eval_every=5,
        patience=None,
        num_workers=0,
        ema_decay=0.0,
    )
    result = fit(config, tmp_path / "run")
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evaluation["metrics"]["mAP50"] >= 0.9, evaluation["metrics"]
    assert result.best_map == pytest.approx(evaluation["metrics"]["mAP50-95"], abs=1e-4)
    losses = [event["train"]["loss"] for event in read_events(tmp_path / "run") if event["event"] == "epoch"]
    assert losses[-1] < 0.5 * losses[0]


# --- kill and resume, through the CLI ------------------------------------------------------------------------------


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "backend.cli", *map(str, args)]


def cli_env(storage: Path) -> dict[str, str]:
    return {**os.environ, "YOLODEX_STORAGE": str(storage)}


@pytest.mark.slow
def test_killed_run_resumes_where_it_stopped_and_evaluates_alike(small_set: Path, tmp_path: Path) -> None:
    train_args = [
        "train",
        "--data",
        small_set,
        "--size",
        "s",
        "--imgsz",
        64,
        "--epochs",
        3,
        "--batch",
        2,
        "--min-samples",
        8,
        "--workers",
        0,
        "--checkpoint-minutes",
        0,
        "--quiet",
    ]
    # The same run uninterrupted, for reference.
    reference = subprocess.run(
        cli(*train_args, "--out", tmp_path / "reference", "--json"),
        cwd=REPO_ROOT,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert reference.returncode == 0, reference.stderr

    # Kill -9 in the middle of epoch 2, right after a mid-epoch checkpoint.
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        cli(*train_args, "--out", run_dir),
        cwd=REPO_ROOT,
        env=cli_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            events = read_events(run_dir) if (run_dir / "metrics.jsonl").exists() else []
            if any(e["event"] == "checkpoint" and e["epoch"] == 1 and e["step_in_epoch"] == 2 for e in events):
                break
            assert process.poll() is None, process.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("no mid-epoch checkpoint within 300 s")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    killed_at = read_checkpoint(run_dir / "last.pt")
    assert (killed_at["epoch"], killed_at["step_in_epoch"]) >= (1, 2)  # a later checkpoint may have landed
    assert not (run_dir / "eval.json").exists() or read_events(run_dir)[-1]["event"] != "train_end"

    resumed = subprocess.run(
        cli("train", "--resume", run_dir, "--json", "--quiet"),
        cwd=REPO_ROOT,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert (result["stopped"], result["epochs_done"]) == ("epochs", 3)

    events = read_events(run_dir)
    starts = [e for e in events if e["event"] == "train_start"]
    position = (killed_at["epoch"], killed_at["step_in_epoch"])
    assert len(starts) == 2 and f"epoch {position[0] + 1}, step {position[1]}" in starts[1]["start"]
    # After the resume, steps continue from the checkpoint with the losses the uninterrupted run had there.
    resumed_steps = {
        (e["epoch"], e["step"]): e["loss"] for e in events[events.index(starts[1]) :] if e["event"] == "step"
    }
    reference_steps = {
        (e["epoch"], e["step"]): e["loss"] for e in read_events(tmp_path / "reference") if e["event"] == "step"
    }
    assert min(resumed_steps) == (position[0], position[1] + 1)
    assert set(resumed_steps) == {key for key in reference_steps if key > position}
    for key, loss in resumed_steps.items():
        assert loss == pytest.approx(reference_steps[key], rel=1e-3), key

    # best.pt evaluated again through `yolodex eval` gives the eval.json that training wrote.
    evaluated = subprocess.run(
        cli("eval", run_dir, "--data", small_set, "--json"),
        cwd=REPO_ROOT,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    saved = json.loads((run_dir / "eval.json").read_text())
    assert json.loads(evaluated.stdout)["metrics"] == pytest.approx(saved["metrics"], abs=1e-4)
    _, report = load_model(run_dir / "best.pt")
    assert report.class_names == ["circle", "square", "triangle"] and report.imgsz == 64
    assert read_checkpoint(run_dir / "best.pt")["weights"] == "ema"  # best.pt holds the EMA weights alone
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["epochs"] == 3 and config["data"]["train_images"] == 8


# --- stopping rules ------------------------------------------------------------------------------------------------


def test_time_budget_stops_evaluates_and_saves_best(small_set: Path, tmp_path: Path) -> None:
    result = fit(tiny_config(small_set, epochs=1000, time_minutes=0.05), tmp_path / "run")
    assert result.stopped == "time" and result.epochs_done < 1000
    assert 3.0 <= result.elapsed_s < 3.0 + 30  # stops after the step that crossed the budget
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "eval.json").is_file()
    epochs = [e for e in read_events(tmp_path / "run") if e["event"] == "epoch"]
    assert epochs[-1]["val"] is not None  # the interrupted epoch was still evaluated
    # One count: the whole epochs, and the steps of the one the budget cut short, are the same in every event.
    end = read_events(tmp_path / "run")[-1]
    assert end["event"] == "train_end" and (end["epochs"], end["time_budget_s"]) == (1000, 3.0)
    assert end["epochs_done"] == result.epochs_done == sum(e["complete"] for e in epochs)
    assert [e["epochs_done"] for e in epochs] == [e["epoch"] + e["complete"] for e in epochs]
    assert result.partial_steps == (0 if epochs[-1]["complete"] else epochs[-1]["steps"])
    from backend import catalog

    text = catalog.run_info(tmp_path / "run").epochs_text
    assert text.startswith(f"{result.epochs_done} of 1000 epochs: the 3-second time budget ended the run")
    assert catalog.training_end_text(end) == f"{text}; best mAP50-95 {result.best_map:.3f}"
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    assert last["metrics"]["elapsed_s"] >= 3.0


def test_early_stopping_after_patience(small_set: Path, tmp_path: Path) -> None:
    # lr ~0: the weights barely move, so mAP50-95 never beats the first evaluation.
    result = fit(tiny_config(small_set, epochs=6, patience=2, lr=1e-12, warmup_epochs=0), tmp_path / "run")
    assert result.stopped == "early_stop"
    assert result.best_epoch == 0 and result.epochs_done == 3
    assert [e["event"] for e in read_events(tmp_path / "run")][-2:] == ["early_stop", "train_end"]


def test_cancel_saves_position_and_resume_finishes(small_set: Path, tmp_path: Path) -> None:
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    first = fit(tiny_config(small_set), tmp_path / "run", stop_requested=stop_after_three)
    assert first.stopped == "cancelled"
    checkpoint = read_checkpoint(tmp_path / "run" / "last.pt")
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"]) == (0, 3)  # 8 images, batch 2: 4 steps per epoch
    with pytest.raises(TrainingError, match="already holds a run"):
        fit(tiny_config(small_set), tmp_path / "run")
    second = resume(tmp_path / "run")
    assert (second.stopped, second.epochs_done) == ("epochs", 2)
    steps = [(e["epoch"], e["step"]) for e in read_events(tmp_path / "run") if e["event"] == "step"]
    assert steps == [(epoch, step) for epoch in (0, 1) for step in (1, 2, 3, 4)]


# --- start weights and failures ------------------------------------------------------------------------------------


def test_start_from_an_earlier_run_with_other_classes(small_set: Path, tmp_path: Path) -> None:
    earlier = build_model("s", 5)
    save_checkpoint(tmp_path / "earlier.pt", earlier, class_names=[f"c{i}" for i in range(5)], imgsz=64)
    result = fit(tiny_config(small_set, epochs=1, weights=str(tmp_path / "earlier.pt")), tmp_path / "run")
    start = json.loads((tmp_path / "run" / "config.json").read_text())["start"]
    assert "earlier.pt" in start and "5 → 3 classes" in start
    assert result.stopped == "epochs"


def test_non_finite_loss_stops_with_advice(small_set: Path, tmp_path: Path) -> None:
    broken = build_model("s", 3)
    with torch.no_grad():
        broken.heads.head1.cls_pred.weight.fill_(float("nan"))
    save_checkpoint(tmp_path / "broken.pt", broken, class_names=["circle", "square", "triangle"], imgsz=64)
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 1, step 1.*lower learning rate"):
        fit(tiny_config(small_set, weights=str(tmp_path / "broken.pt")), tmp_path / "run")


# --- bad data ------------------------------------------------------------------------------------------------------


def test_bad_data_gives_clear_errors_or_counted_drops(small_set: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad"
    shutil.copytree(small_set, data)
    coco = json.loads((data / "train.json").read_text())
    # A declared class without any box, a box reaching outside its image, and a corrupt image file.
    coco["categories"].append({"id": 9, "name": "hexagon"})
    outside = next(a for a in coco["annotations"] if a["image_id"] != coco["images"][1]["id"])
    outside["bbox"] = [100.0, 100.0, 80.0, 80.0]
    (data / "images" / coco["images"][1]["file_name"]).write_bytes(b"not an image at all")
    (data / "train.json").write_text(json.dumps(coco))
    val = json.loads((data / "val.json").read_text())
    val["categories"].append({"id": 9, "name": "hexagon"})
    (data / "val.json").write_text(json.dumps(val))

    train_set, _, _ = load_splits(data, seed=0)
    assert train_set.class_names[-1] == "hexagon" and len(train_set) == 7
    assert train_set.report.boxes_clipped == 1 and len(train_set.report.images_skipped) == 1
    result = fit(tiny_config(data, epochs=1), tmp_path / "run")  # trains, with 4 classes
    assert result.stopped == "epochs"
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    hexagon = next(item for item in evaluation["per_class"] if item["class_name"] == "hexagon")
    assert hexagon["gt_count"] == 0 and hexagon["AP50-95"] is None
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["data"]["train"]
    assert recorded["boxes_clipped"] == 1 and recorded["images_skipped"][0][1]

    (data / "train.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"train\.json"):
        load_splits(data, seed=0)
    empty = {"images": [], "annotations": [], "categories": coco["categories"]}
    (data / "train.json").write_text(json.dumps(empty))
    with pytest.raises(DatasetError, match="no usable images"):
        load_splits(data, seed=0)


def test_cli_train_reports_bad_data_without_a_traceback(tmp_path: Path) -> None:
    args = cli("train", "--data", tmp_path / "nowhere", "--out", tmp_path / "run")
    completed = subprocess.run(args, cwd=REPO_ROOT, env=cli_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1
    first_line, *rest = completed.stderr.strip().splitlines()
    assert first_line.startswith("yolodex: error: dataset not found") and "nowhere" in first_line
    assert "Traceback" not in completed.stderr and any("COCO" in line for line in rest)  # the accepted layouts


def test_start_from_official_coco_weights_in_storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`weights="coco"` takes storage/weights/yolo_nas_s_coco.pth (official {"net": ...} layout, 80 classes) when it
    is there, without downloading, and transfers all but the class predictors."""
    monkeypatch.setenv("YOLODEX_STORAGE", str(tmp_path / "storage"))
    official = build_model("s", 80)
    (tmp_path / "storage" / "weights").mkdir(parents=True)
    torch.save({"net": official.state_dict()}, tmp_path / "storage" / "weights" / "yolo_nas_s_coco.pth")
    model = build_model("s", 3)
    described = load_start_weights(model, "coco")
    assert "yolo_nas_s_coco.pth (net)" in described and "80 → 3 classes" in described
    loaded, original = model.state_dict(), official.state_dict()
    for key, value in loaded.items():
        if ".cls_pred." in key:
            assert value.shape[0] == 3, key
        else:
            assert torch.equal(value, original[key]), key


def _fit_in_daemon(data: str, run_dir: str, outcome) -> None:
    try:
        result = fit(tiny_config(Path(data), epochs=1, num_workers=1), run_dir)
        outcome.put(("ok", result.epochs_done))
    except BaseException as error:  # reported to the parent, which asserts on it
        outcome.put(("error", repr(error)))


@pytest.mark.slow
def test_training_runs_inside_a_daemonic_worker_process(small_set: Path, tmp_path: Path) -> None:
    """The job worker's processes are daemonic and may not start loader processes: training must still run there."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    outcome = context.Queue()
    worker = context.Process(target=_fit_in_daemon, args=(str(small_set), str(tmp_path / "run"), outcome), daemon=True)
    worker.start()
    status, detail = outcome.get(timeout=300)
    worker.join(30)
    assert status == "ok" and detail == 1, detail


def test_epoch_counts_in_words() -> None:
    from backend.catalog import epochs_text, training_end_text

    assert epochs_text(1, 30, "time", 300.0) == "1 of 30 epochs: the 5-minute time budget ended the run"
    assert epochs_text(1, 30, "time", 3.0, 37, 120) == (
        "1 of 30 epochs: the 3-second time budget ended the run (and 37 of 120 steps of epoch 2)"
    )
    assert epochs_text(30, 30, "epochs") == "30 of 30 epochs"
    assert epochs_text(0, 30, "cancelled", None, 4, 10) == "0 of 30 epochs: cancelled (and 4 of 10 steps of epoch 1)"
    # A run cancelled before any evaluation has no score: its placeholder 0.0 is not shown as one.
    end = {"stopped": "cancelled", "epochs_done": 0, "best_map": 0.0, "best_epoch": None, "epochs": 30}
    assert training_end_text(end) == "0 of 30 epochs: cancelled; not evaluated"


@pytest.mark.slow
def test_cli_train_ends_with_the_one_epoch_count_and_the_budget_that_ended_it(small_set: Path, tmp_path: Path) -> None:
    args = cli(
        "train",
        "--data",
        small_set,
        "--size",
        "s",
        "--imgsz",
        64,
        "--epochs",
        30,
        "--time",
        0.05,
        "--batch",
        2,
        "--min-samples",
        8,
        "--workers",
        0,
        "--quiet",
        "--out",
        tmp_path / "run",
    )
    finished = subprocess.run(args, cwd=REPO_ROOT, env=cli_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    done = next(e for e in read_events(tmp_path / "run") if e["event"] == "train_end")["epochs_done"]
    assert done < 30  # 3 seconds cannot train 30 epochs: the budget ended it
    assert f"{tmp_path / 'run'}: {done} of 30 epochs: the 3-second time budget ended the run" in finished.stdout


def test_closing_mosaic_turns_it_off_for_the_last_part_of_the_run(small_set: Path, tmp_path: Path) -> None:
    """close_mosaic 0.5 over 4 epochs: epochs 1-2 start before half the steps are done, 3-4 at or after."""
    result = fit(tiny_config(small_set, epochs=4, close_mosaic=0.5, eval_every=4), tmp_path / "run")
    assert result.epochs_done == 4
    epochs = [e for e in read_events(tmp_path / "run") if e["event"] == "epoch"]
    assert [e["mosaic"] for e in epochs] == [True, True, False, False]


def test_a_closed_mosaic_draws_single_images_and_keeps_the_other_random_streams(small_set: Path) -> None:
    from backend.data.augment import default_pipeline
    from backend.data.loader import TrainDataset

    train_set = load_splits(small_set, 0)[0]
    dataset = TrainDataset(train_set.records, 64, default_pipeline(64, mosaic_prob=1.0), seed=1)
    with_mosaic = [dataset[index] for index in range(4)]
    dataset.set_mosaic(False)
    without = [dataset[index] for index in range(4)]
    plain = TrainDataset(train_set.records, 64, default_pipeline(64, mosaic_prob=0.0), seed=1)
    for (image, boxes, labels), (plain_image, plain_boxes, plain_labels) in zip(
        without, [plain[index] for index in range(4)], strict=True
    ):
        # mosaic_prob 0 takes the same draw and skips the mosaic: the same samples, pixel for pixel.
        assert (image == plain_image).all() and (boxes == plain_boxes).all() and (labels == plain_labels).all()
    assert any(not (a[0] == b[0]).all() for a, b in zip(with_mosaic, without, strict=True))
    assert sum(len(labels) for _, _, labels in without) < sum(len(labels) for _, _, labels in with_mosaic)
