"""The `yolodex` command line, run for real in a subprocess: exit codes, stdout/stderr, files written.

Each run starts a fresh interpreter that imports torch (~3 s), hence the slow markers.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.models import save_checkpoint
from tests.conftest import FIXTURES, REPO_ROOT
from tests.test_export import CLASS_NAMES, detector_with_spread_scores

IMGSZ = 128
SUMMARY = json.loads((FIXTURES / "reference" / "yolo_nas_summary.json").read_text())


def run_cli(*args: str | Path, storage: Path, command: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "YOLODEX_STORAGE": str(storage), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1"}
    return subprocess.run(
        [*(command or [sys.executable, "-m", "backend.cli"]), *map(str, args)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def classes_removed(size: str, removed: int) -> int:
    """Parameters in the class predictors for `removed` classes: one 1x1 conv per head, weight and bias."""
    state_dict = json.loads((FIXTURES / "reference" / f"yolo_nas_{size}_state_dict.json").read_text())
    return sum(removed * (state_dict[f"heads.head{i}.cls_pred.weight"][1] + 1) for i in (1, 2, 3))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Our checkpoint of a 3-class YOLO-NAS S whose random weights give detections above 0.25 at 128x128."""
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "best.pt", detector_with_spread_scores(), class_names=CLASS_NAMES, imgsz=IMGSZ
    )


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    """A 200x120 (W x H) PNG: non-square, so a box mapped back with the wrong axis would leave the image."""
    pixels = np.random.default_rng(5).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, served folder) of an http.server on a free port, in a thread."""
    served = tmp_path / "served"
    served.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=served))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- info ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_info_s_matches_official_counts(tmp_path: Path) -> None:
    result = run_cli("info", "--size", "s", "--json", storage=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["size"], info["num_classes"], info["imgsz"], info["loaded"]) == ("s", 80, 640, None)
    assert info["params_total"] == 19_053_888 == SUMMARY["yolo_nas_s"]["params_total"]
    assert info["params_fused"] == 12_175_888 == SUMMARY["yolo_nas_s"]["full_fused_params_total"]
    assert info["gflops_fused"] == pytest.approx(31.8, abs=0.01)


@pytest.mark.slow
def test_info_m_with_three_classes(tmp_path: Path) -> None:
    result = run_cli("info", "--size", "m", "--num-classes", "3", "--json", storage=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["size"], info["num_classes"]) == ("m", 3)
    # The official 80-class counts less the class predictors of 77 classes: 51,130,683 and 31,854,603.
    fewer = classes_removed("m", 77)
    assert info["params_total"] == SUMMARY["yolo_nas_m"]["params_total"] - fewer
    assert info["params_fused"] == SUMMARY["yolo_nas_m"]["full_fused_params_total"] - fewer
    # Fewer classes, slightly fewer FLOPs than the official 87.76 GFLOPs of the 80-class M.
    assert 87.0 < info["gflops_fused"] < SUMMARY["yolo_nas_m"]["flops_fused_eval_640"] / 1e9


@pytest.mark.slow
def test_info_with_weights_says_what_it_loaded(checkpoint: Path, tmp_path: Path) -> None:
    result = run_cli("info", "--weights", checkpoint, "--imgsz", str(IMGSZ), "--json", storage=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["size"], info["num_classes"], info["imgsz"]) == ("s", 3, IMGSZ)
    assert info["params_total"] == 19_053_888 - classes_removed("s", 77)
    loaded = info["loaded"]
    assert str(checkpoint) in loaded and "yolodex layout" in loaded and "YOLO-NAS S, 3 classes" in loaded
    assert "fusion none" in loaded

    text = run_cli("info", "--weights", checkpoint, "--imgsz", str(IMGSZ), storage=tmp_path)
    assert text.returncode == 0 and loaded in text.stdout


@pytest.mark.slow
def test_info_with_weights_of_another_size_fails_cleanly(checkpoint: Path, tmp_path: Path) -> None:
    # Through the installed console script when there is one: it must turn main()'s 1 into the exit status.
    script = Path(sys.executable).with_name("yolodex")
    command = [str(script)] if script.is_file() else None
    result = run_cli("info", "--weights", checkpoint, "--size", "m", storage=tmp_path, command=command)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("yolodex: error: ")
    assert "Traceback" not in result.stderr
    # Names a key whose shape differs, with both shapes (S stage 1 is 32 wide, M's 64).
    assert "backbone.stage1.blocks.conv1.conv.weight: checkpoint [32, 96, 1, 1] vs model [64, 96, 1, 1]" in lines[0]
    assert "YOLO-NAS S with 3 classes" in lines[0]


# --- export → predict ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_then_predict(checkpoint: Path, photo: Path, tmp_path: Path) -> None:
    onnx_path = tmp_path / "out" / "x.onnx"
    exported = run_cli("export", "--weights", checkpoint, "-o", onnx_path, "--imgsz", str(IMGSZ), storage=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert onnx_path.is_file() and f"wrote {onnx_path}" in exported.stdout
    assert "YOLO-NAS S, 3 classes" in exported.stderr  # what was exported

    predicted = run_cli("predict", onnx_path, photo, photo, "--json", storage=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    results = json.loads(predicted.stdout)
    assert [entry["image"] for entry in results] == [str(photo), str(photo)]
    assert results[0]["detections"] == results[1]["detections"]
    detections = results[0]["detections"]
    assert len(detections) > 0
    for found in detections:
        x1, y1, x2, y2 = found["box"]
        assert 0 <= x1 <= x2 <= 200 and 0 <= y1 <= y2 <= 120, found
        assert 0.25 < found["score"] <= 1
        assert found["class_name"] == CLASS_NAMES[found["class_id"]]
    scores = [found["score"] for found in detections]
    assert scores == sorted(scores, reverse=True)
    assert all(entry["ms"] > 0 for entry in results)

    # The runtime in use is named; the reference runtime finds the same objects.
    reference = run_cli("predict", onnx_path, photo, "--json", "--runtime", "onnxruntime", storage=tmp_path)
    assert reference.returncode == 0, reference.stderr
    (referenced,) = json.loads(reference.stdout)
    assert referenced["runtime"] == "onnxruntime"
    assert results[0]["runtime"] in ("OpenVINO", "onnxruntime")
    # (one detection may sit right at the 0.25 threshold in one runtime and not the other)
    assert abs(len(referenced["detections"]) - len(detections)) <= 1


@pytest.mark.slow
def test_predict_on_a_corrupt_image_fails_cleanly(checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    result = run_cli("predict", checkpoint, broken, "--imgsz", str(IMGSZ), storage=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("yolodex: error: ") and str(broken) in error and "as an image" in error


@pytest.mark.slow
def test_predict_on_a_missing_model_fails_cleanly(photo: Path, tmp_path: Path) -> None:
    result = run_cli("predict", tmp_path / "nowhere.onnx", photo, storage=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("yolodex: error: ") and "nowhere.onnx" in result.stderr


# --- download --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_download_from_a_local_server(file_server: tuple[str, Path], tmp_path: Path) -> None:
    base_url, served = file_server
    payload = os.urandom(300_000)
    (served / "w.pth").write_bytes(payload)
    storage = tmp_path / "storage"
    result = run_cli("download", "--size", "s", "--url", f"{base_url}/w.pth", storage=storage)
    assert result.returncode == 0, result.stderr
    target = storage / "weights" / "yolo_nas_s_coco.pth"
    assert target.read_bytes() == payload
    assert sorted(path.name for path in target.parent.iterdir()) == [target.name]  # no .part left behind
    assert str(target) in result.stdout
    assert "non-commercial" in result.stdout


@pytest.mark.slow
def test_download_from_a_dead_url_says_where_to_put_the_file(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    url = f"http://127.0.0.1:{unused_port()}/w.pth"
    result = run_cli("download", "--size", "s", "--url", url, storage=storage)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("yolodex: error: ") and url in error
    assert f"put it at {storage.resolve() / 'weights' / 'yolo_nas_s_coco.pth'}" in error
    assert not (storage / "weights" / "yolo_nas_s_coco.pth").exists()


# --- train: the estimate, and --resume with more epochs ---------------------------------------------------------


@pytest.mark.slow
def test_train_prints_the_estimate_and_resume_epochs_are_more(tmp_path: Path) -> None:
    from backend.data.synthetic import generate_synthetic_dataset

    data = generate_synthetic_dataset(tmp_path / "shapes", num_train=8, num_val=2, image_size=(96, 96), seed=1)
    storage, run_dir = tmp_path / "storage", tmp_path / "storage" / "runs" / "tiny"
    tiny = ("--size", "s", "--imgsz", "64", "--batch", "2", "--min-samples", "4", "--workers", "0", "--device", "cpu")
    first = run_cli(
        "train", "--data", data, *tiny, "--epochs", "1", "--measure-speed", "--out", run_dir, "--json", storage=storage
    )
    assert first.returncode == 0, first.stderr
    # No earlier run: --measure-speed timed a few steps first, and the estimate names that probe.
    assert "measuring this machine's speed" in first.stderr
    assert "an epoch on this machine (4 steps of 2 images at" in first.stderr
    assert "measured by the speed probe of" in first.stderr and "Recommended time budget:" in first.stderr
    assert (json.loads(first.stdout)["stopped"], json.loads(first.stdout)["epochs_done"]) == ("epochs", 1)

    # --resume --epochs 1 on a finished run: ONE MORE epoch (not "1 epoch in all", which would do nothing). The
    # estimate now comes from the run's own steps.
    more = run_cli("train", "--resume", run_dir, "--epochs", "1", "--json", storage=storage)
    assert more.returncode == 0, more.stderr
    assert "measured by the run tiny" in more.stderr
    result = json.loads(more.stdout)
    assert (result["stopped"], result["epochs_done"]) == ("epochs", 2)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [event["event"] for event in events].count("train_start") == 2
    assert sorted({event["epoch"] for event in events if event["event"] == "step"}) == [0, 1]
