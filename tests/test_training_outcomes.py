"""Training outcomes that say what happened (issue 19): best.pt holds what inference needs and last.pt what resuming
needs; no room for the checkpoints, a dataset whose boxes were all dropped, --epochs 0, a plain resume of a finished
run and a damaged last.pt each end with one clear message; nothing stored before any of them is lost.

One tiny run (YOLO-NAS S at 64 px, one epoch of 4 steps) is trained once for the module; each case works on a copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backend.cli import main
from backend.data.records import DatasetError
from backend.models import build_model, load_model
from backend.models.checkpoints import CheckpointError, read_checkpoint
from backend.training.config import TrainConfig, TrainingError
from backend.training.trainer import RunFinished, fit, load_splits, load_start_weights, resume
from tests.conftest import REPO_ROOT

SMALL_DISK = "64m"  # a tmpfs this size holds neither a run's checkpoints (~700 MB for S) nor its ONNX files


def tiny_config(data: Path, **changes) -> TrainConfig:
    values = dict(
        data=str(data),
        size="s",
        imgsz=64,
        epochs=1,
        batch_size=2,
        min_samples=4,
        num_workers=0,
        patience=None,
        warmup_epochs=0.5,
    )
    return TrainConfig(**{**values, **changes})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def trained_run(small_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = fit(tiny_config(small_set), run_dir)
    assert (result.stopped, result.epochs_done) == ("epochs", 1)
    return run_dir


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


# --- what best.pt and last.pt hold ------------------------------------------------------------------------------


def test_best_pt_holds_the_ema_weights_and_what_inference_needs(trained_run: Path) -> None:
    best, last = read_checkpoint(trained_run / "best.pt"), read_checkpoint(trained_run / "last.pt")
    assert "optimizer" not in best and best.get("ema") is None and best["weights"] == "ema"
    assert {"optimizer", "scheduler", "rng", "ema_state"} <= set(last) and last["ema"] is not None
    # Written at the end of the only epoch, like last.pt: best.pt's weights are last.pt's EMA weights.
    assert best["model"].keys() == last["ema"].keys()
    assert all(torch.equal(best["model"][key], last["ema"][key]) for key in last["ema"])
    assert best["config"] == {**last["config"]} and best["config"]["imgsz"] == 64 and best["epoch"] == 1
    evaluation = json.loads((trained_run / "eval.json").read_text())
    assert best["evaluation"] == pytest.approx(evaluation["metrics"])
    # Measured for S: 76.5 MB against 256.2 MB before (the raw model, its EMA and AdamW's moments).
    assert (trained_run / "best.pt").stat().st_size < 0.35 * (trained_run / "last.pt").stat().st_size
    model, report = load_model(trained_run / "best.pt")
    assert report.class_names == ["circle", "square", "triangle"] and report.imgsz == 64
    assert all(torch.equal(model.state_dict()[key], value.float()) for key, value in best["model"].items())
    # A new run starts from it (its EMA weights) as it did from the fat best.pt.
    assert "best.pt (model)" in load_start_weights(build_model("s", 3), str(trained_run))


# --- no room for the checkpoints ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_mounts() -> None:
    """Tests that mount a small tmpfs do it in their own user and mount namespaces (`unshare -rm`)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a small tmpfs")


def on_small_disk(small: Path, *args: str | Path) -> subprocess.CompletedProcess:
    """`yolodex *args` with `small` a 64 MB tmpfs holding one earlier file; prints the folder's files after."""
    script = (
        'mount -t tmpfs -o size=$SIZE tmpfs "$SMALL" && echo kept > "$SMALL/earlier.txt" || exit 99; '
        '"$@"; status=$?; echo "files: $(cd "$SMALL" && find . -type f | sort | tr "\\n" " ")"; '
        'echo "earlier: $(cat "$SMALL/earlier.txt")"; exit $status'
    )
    small.mkdir()
    env = {**os.environ, "SMALL": str(small), "SIZE": SMALL_DISK, "YOLODEX_STORAGE": str(small.parent / "storage")}
    command = ["unshare", "-rm", "sh", "-c", script, "sh", sys.executable, "-m", "backend.cli", *map(str, args)]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.usefixtures("private_mounts")
def test_training_refuses_a_folder_without_room_for_its_checkpoints(small_set: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    completed = on_small_disk(
        small,
        "train",
        "--data",
        small_set,
        "--imgsz",
        64,
        "--epochs",
        1,
        "--batch",
        2,
        "--min-samples",
        4,
        "--workers",
        0,
        "--quiet",
        "--out",
        small / "run",
    )
    assert completed.returncode == 1, completed.stderr
    error = completed.stderr.strip().splitlines()
    assert len(error) == 1 and "Traceback" not in completed.stderr
    assert error[0].startswith(f"yolodex: error: not enough free space in {small / 'run'} for this run's checkpoints")
    assert re.search(r": [\d,]+ MB \([\d,]+ bytes\) free, about [\d,]+ MB \([\d,]+ bytes\) needed\.", error[0])
    # Nothing written, nothing lost: the run folder was not even created.
    assert "files: ./earlier.txt \nearlier: kept" in completed.stdout


@pytest.mark.usefixtures("private_mounts")
def test_quantization_refuses_a_folder_without_room_for_its_onnx_files(run_copy: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    before = snapshot(run_copy)
    completed = on_small_disk(small, "quantize", run_copy, "--out", small / "int8", "--method", "ptq")
    assert completed.returncode == 1, completed.stderr
    error = completed.stderr.strip().splitlines()
    assert len(error) == 1 and "Traceback" not in completed.stderr
    assert error[0].startswith(f"yolodex: error: not enough free space in {small / 'int8'} for the quantization's")
    assert "files: ./earlier.txt \nearlier: kept" in completed.stdout
    assert snapshot(run_copy) == before


# --- bad data, bad flags ---------------------------------------------------------------------------------------------


def test_a_dataset_whose_boxes_are_all_degenerate_is_refused_with_the_counts(small_set: Path, tmp_path: Path) -> None:
    data = Path(shutil.copytree(small_set, tmp_path / "flat"))
    coco = json.loads((data / "train.json").read_text())
    for annotation in coco["annotations"]:
        annotation["bbox"][3] = 0.0  # no height
    (data / "train.json").write_text(json.dumps(coco))
    before = snapshot(data)
    count = len(coco["annotations"])
    with pytest.raises(
        DatasetError, match=rf"all {count} boxes of the training split were dropped.*{count} degenerate"
    ):
        fit(tiny_config(data), tmp_path / "run")
    assert not (tmp_path / "run").exists() and snapshot(data) == before


def test_the_loading_report_survives_the_hold_out(small_set: Path, tmp_path: Path) -> None:
    """No val split: a fifth of train is held out, and config.json still says what loading dropped and clipped."""
    data = Path(shutil.copytree(small_set, tmp_path / "noval"))
    (data / "val.json").unlink()
    coco = json.loads((data / "train.json").read_text())
    coco["annotations"][0]["bbox"][2] = 0.0  # degenerate: dropped
    coco["annotations"][1]["bbox"][3] = -4.0  # degenerate: dropped
    (data / "train.json").write_text(json.dumps(coco))
    train_set, val_set, _ = load_splits(data, seed=0)
    assert (len(train_set), len(val_set)) == (6, 2) and train_set.report.boxes_dropped == {"degenerate": 2}
    assert train_set.report.boxes == sum(len(record.boxes) for record in train_set.records)

    result = fit(tiny_config(data), tmp_path / "run", stop_requested=lambda: True)  # config.json, one step
    assert result.stopped == "cancelled"
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert recorded["train"]["boxes_dropped"] == {"degenerate": 2}
    assert (recorded["train_images"], recorded["val_images"]) == (6, 2)
    assert recorded["train"]["images"] + recorded["val"]["images"] == 8
    assert recorded["train"]["boxes"] + recorded["val"]["boxes"] == len(coco["annotations"]) - 2


@pytest.mark.parametrize(
    "flags", [["--epochs", "0"], ["--epochs", "-3"], ["--time", "0"], ["--time", "-1.5"]], ids=lambda f: " ".join(f)
)
def test_cli_refuses_a_budget_of_nothing_naming_the_flag(
    flags: list[str], trained_run: Path, small_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = snapshot(trained_run)
    args = ["train", "--data", str(small_set), "--out", str(tmp_path / "run"), "--quiet", *flags]
    assert main(args) == 1
    assert capsys.readouterr().err == f"yolodex: error: {flags[0]} must be above 0 (got {float(flags[1]):g})\n"
    assert not (tmp_path / "run").exists()
    # On --resume they mean "this much more": 0 more is refused too, not taken as a plain resume.
    assert main(["train", "--resume", str(trained_run), "--quiet", *flags]) == 1
    assert capsys.readouterr().err.startswith(f"yolodex: error: {flags[0]} must be above 0")
    assert snapshot(trained_run) == before


# --- resuming -------------------------------------------------------------------------------------------------------


def test_resuming_a_finished_run_says_it_is_finished(run_copy: Path, capsys: pytest.CaptureFixture) -> None:
    before = snapshot(run_copy)
    with pytest.raises(RunFinished, match=r"is finished \(1 of 1 epochs trained, best mAP50-95 \d\.\d{3}\)") as raised:
        resume(run_copy)
    assert "yolodex" not in str(raised.value)  # a job's error on a page: the words fit both places
    assert snapshot(run_copy) == before  # no train_start / train_end of epochs it did not run
    with pytest.raises(TrainingError, match="at least one more epoch"):
        resume(run_copy, more_epochs=0)  # 0 more is refused, not taken as a plain resume
    # The command line names the flags that continue it.
    assert main(["train", "--resume", str(run_copy), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"yolodex: error: {run_copy} is finished (1 of 1 epochs trained") and error.count("\n") == 1
    assert error.endswith(f"(--resume {run_copy} with --epochs N or --time MINUTES)\n")
    assert snapshot(run_copy) == before


def test_a_damaged_last_pt_offers_the_intact_best_pt(
    run_copy: Path, small_set: Path, capsys: pytest.CaptureFixture
) -> None:
    last, best = run_copy / "last.pt", run_copy / "best.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a copy cut short
    best_before = best.read_bytes()
    with pytest.raises(CheckpointError) as raised:
        resume(run_copy)
    message = str(raised.value)
    assert message.startswith(f"{last} is damaged (") and "download" not in message and "yolodex" not in message
    assert (
        f"{best} is intact (epoch 1): start a new run from its weights (the same data, size S and imgsz 64" in message
    )
    assert best.read_bytes() == best_before
    # The command line gives the command, and the command's start weights load.
    assert main(["train", "--resume", str(run_copy), "--quiet"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.endswith(f": yolodex train --data {small_set} --size s --imgsz 64 --weights {best}\n")
    assert "best.pt" in load_start_weights(build_model("s", 3), str(best))
    assert best.read_bytes() == best_before

    best.write_bytes(best_before[:1000])
    with pytest.raises(
        CheckpointError, match=r"is damaged .*and there is no intact best\.pt beside it: start a new run"
    ):
        resume(run_copy)
