"""`yolodex import`, `crawl`, `predict` and `eval` draw a tqdm bar on stderr when stderr is a terminal (a real pty
here), and nothing with --json or when stderr is a pipe. Each run is a fresh interpreter (~3 s of imports): slow."""

from __future__ import annotations

import fcntl
import http.server
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.data.synthetic import generate_synthetic_dataset
from backend.models import save_checkpoint
from tests.conftest import REPO_ROOT, encode_image, textured_image
from tests.test_export import CLASS_NAMES, detector_with_spread_scores

pytestmark = pytest.mark.slow
IMAGES = 12


def _env(storage: Path) -> dict[str, str]:
    return {**os.environ, "YOLODEX_STORAGE": str(storage), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


def run_on_a_terminal(*args: str | Path, storage: Path) -> tuple[int, str, str]:
    """Runs `yolodex ARGS` with stderr on a 100x24 pty and stdout on a pipe: (exit code, stdout, terminal text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    with subprocess.Popen(
        [sys.executable, "-m", "backend.cli", *map(str, args)],
        cwd=REPO_ROOT,
        env=_env(storage),
        stdout=subprocess.PIPE,
        stderr=slave,
    ) as process:
        os.close(slave)
        stdout = bytearray()
        reader = threading.Thread(target=lambda: stdout.extend(process.stdout.read()))  # type: ignore[union-attr]
        reader.start()
        terminal = bytearray()
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other end has exited
                break
            if not chunk:
                break
            terminal.extend(chunk)
        reader.join(timeout=600)
        code = process.wait(timeout=600)
    os.close(master)
    return code, stdout.decode(), terminal.decode(errors="replace")


def run_piped(*args: str | Path, storage: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", *map(str, args)],
        cwd=REPO_ROOT,
        env=_env(storage),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "photos"
    images.mkdir()
    for seed in range(IMAGES):
        (images / f"{seed:02d}.png").write_bytes(encode_image(textured_image(seed, (80, 60))))
    return images


def test_import_draws_a_bar_on_a_terminal(folder: Path, tmp_path: Path) -> None:
    code, stdout, terminal = run_on_a_terminal("import", folder, "--project", "dex", storage=tmp_path / "store")
    assert code == 0, terminal
    assert stdout.startswith(f"dex: {IMAGES} accepted")
    assert "import: " in terminal and f"{IMAGES}/{IMAGES} [" in terminal and "file/s" in terminal
    assert "%|" in terminal  # tqdm's bar


def test_import_with_json_on_a_terminal_draws_nothing(folder: Path, tmp_path: Path) -> None:
    code, stdout, terminal = run_on_a_terminal(
        "import", folder, "--project", "dex", "--json", storage=tmp_path / "store"
    )
    assert code == 0, terminal
    assert json.loads(stdout)["counts"]["accepted"] == IMAGES
    assert terminal.strip() == ""


def test_import_into_a_pipe_draws_nothing(folder: Path, tmp_path: Path) -> None:
    result = run_piped("import", folder, "--project", "dex", storage=tmp_path / "store")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"dex: {IMAGES} accepted")
    assert result.stderr == ""


@pytest.fixture
def image_server(folder: Path) -> Iterator[str]:
    handler = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *args: None})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_crawl_draws_a_bar_on_a_terminal_and_nothing_with_json(image_server: str, tmp_path: Path) -> None:
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{image_server}/{seed:02d}.png\n" for seed in range(IMAGES)))
    arguments = ("crawl", "--urls", urls, "--allow-private", "--project", "dex")
    code, stdout, terminal = run_on_a_terminal(*arguments, storage=tmp_path / "a")
    assert code == 0, terminal
    assert f"kept {IMAGES} of {IMAGES} fetched" in stdout
    assert "crawl: " in terminal and f"{IMAGES}/{IMAGES} [" in terminal
    code, stdout, terminal = run_on_a_terminal(*arguments, "--json", storage=tmp_path / "b")
    assert code == 0 and json.loads(stdout)["kept"] == IMAGES
    assert terminal.strip() == ""


def test_predict_draws_a_bar_on_a_terminal(folder: Path, tmp_path: Path) -> None:
    model = save_checkpoint(tmp_path / "best.pt", detector_with_spread_scores(), class_names=CLASS_NAMES, imgsz=128)
    images = sorted(folder.iterdir())[:3]
    code, stdout, terminal = run_on_a_terminal("predict", model, *images, "--imgsz", "128", storage=tmp_path / "s")
    assert code == 0, terminal
    assert all(f"{image}: " in stdout for image in images)
    assert "predict: " in terminal and "3/3 [" in terminal


def test_eval_draws_a_bar_on_a_terminal_and_nothing_with_json(tmp_path: Path) -> None:
    shapes = ["circle", "square", "triangle"]
    data = generate_synthetic_dataset(
        tmp_path / "shapes", num_train=1, num_val=5, image_size=(96, 96), class_names=shapes
    )
    model = save_checkpoint(
        tmp_path / "best.pt", detector_with_spread_scores(len(shapes)), class_names=shapes, imgsz=96
    )
    arguments = ("eval", model, "--data", data, "--batch", "2")
    code, stdout, terminal = run_on_a_terminal(*arguments, storage=tmp_path / "s")
    assert code == 0, terminal
    assert "5 images" in stdout and "mAP" in stdout
    assert "eval: " in terminal and "5/5 [" in terminal and "img/s" in terminal
    code, stdout, terminal = run_on_a_terminal(*arguments, "--json", storage=tmp_path / "s")
    assert code == 0, terminal
    assert set(json.loads(stdout)["metrics"]) >= {"mAP50", "mAP50-95"}
    assert terminal.strip() == ""
