"""`yolodex dataset starter|freeze|export|stats`, `yolodex import` and `yolodex crawl` end to end, each a real process
on a temporary storage folder (SQLite metadata, content-addressed images); the crawl reads a local HTTP server."""

from __future__ import annotations

import functools
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend import cli
from backend.data.folders import load_dataset
from backend.store import db
from tests.conftest import REPO_ROOT

STARTER = "Starter Pokédex"


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("storage")


def yolodex(storage: Path, *args: str | Path) -> dict:
    env = {**os.environ, "YOLODEX_STORAGE": str(storage)}
    env.pop("YOLODEX_DATABASE_URL", None)
    completed = subprocess.run(
        [sys.executable, "-m", "backend.cli", *map(str, args), "--json"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


def png_bytes(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_starter_project_is_created_once(storage):
    first = yolodex(storage, "dataset", "starter")
    assert first["project"] == STARTER and first["created"]
    assert len(first["import"]["accepted"]) == 64 and first["import"]["annotations"] > 0
    assert yolodex(storage, "dataset", "starter")["created"] is False
    stats = yolodex(storage, "dataset", "stats", "--project", STARTER)
    assert stats  # class statistics as data (the app plots them)


def test_freeze_gives_a_dataset_that_trains_and_exports(storage, tmp_path):
    yolodex(storage, "dataset", "starter")
    frozen = yolodex(storage, "dataset", "freeze", "--project", STARTER, "--name", "v1", "--val", "0.25")
    splits = load_dataset(frozen["folder"])  # what `yolodex train --data` reads
    assert len(splits["train"]) + len(splits["val"]) == 64 and len(splits["val"]) > 0
    assert splits["train"].class_names == ["circle", "square", "triangle"]
    exported = yolodex(
        storage,
        "dataset",
        "export",
        "--project",
        STARTER,
        "--name",
        "v1",
        "--format",
        "yolo",
        "--out",
        tmp_path / "yolo",
    )
    assert (Path(exported["path"]) / "data.yaml").is_file() or (tmp_path / "yolo" / "data.yaml").is_file()
    # COCO: the standard per-split files, which the importer reads back (every split) into another project.
    coco = yolodex(
        storage,
        "dataset",
        "export",
        "--project",
        STARTER,
        "--name",
        "v1",
        "--format",
        "coco",
        "--out",
        tmp_path / "coco",
    )
    assert sorted(path.name for path in Path(coco["path"]).glob("*.json")) == ["train.json", "val.json"]
    again = yolodex(storage, "import", tmp_path / "coco", "--project", "Reimported")
    boxes = sum(sum(len(record.boxes) for record in split.records) for split in splits.values())
    assert again["counts"]["accepted"] == 64 and again["annotations"] == boxes


def test_unknown_project_or_version_is_a_clear_error(storage):
    env = {**os.environ, "YOLODEX_STORAGE": str(storage)}
    completed = subprocess.run(
        [sys.executable, "-m", "backend.cli", "dataset", "stats", "--project", "Nope"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 1 and "no project called 'Nope'" in completed.stderr


def test_import_reports_every_file(storage, tmp_path):
    folder = tmp_path / "mixed name é"
    folder.mkdir()
    (folder / "a photo.png").write_bytes(png_bytes(1))
    (folder / "copy of a photo.png").write_bytes(png_bytes(1))
    (folder / "notes.jpg").write_text("not an image")
    report = yolodex(storage, "import", folder, "--project", "Mine")
    assert len(report["accepted"]) == 1 and len(report["duplicates"]) == 1 and len(report["rejected"]) == 1
    assert "notes.jpg" in report["rejected"][0]["name"]


def test_a_database_locked_by_another_process_is_a_clear_error_and_changes_nothing(tmp_path, monkeypatch, capsys):
    """Another process's long write (a big import job) holds the SQLite file's write lock past the busy timeout:
    `yolodex import` says what is going on and what to do, not the SQL, and adds nothing."""
    monkeypatch.setenv("YOLODEX_STORAGE", str(tmp_path / "storage"))
    monkeypatch.delenv("YOLODEX_DATABASE_URL", raising=False)
    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)  # engines made from here on give up quickly
    (tmp_path / "one.png").write_bytes(png_bytes(7))
    (tmp_path / "two.png").write_bytes(png_bytes(8))
    assert cli.main(["import", str(tmp_path / "one.png"), "--project", "Mine"]) == 0
    writer = sqlite3.connect(tmp_path / "storage" / "yolodex.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        capsys.readouterr()
        assert cli.main(["import", str(tmp_path / "two.png"), "--project", "Mine"]) == 1
    finally:
        writer.rollback()
        writer.close()
    error = capsys.readouterr().err
    assert "the database is busy" in error and "YOLODEX_DATABASE_URL" in error and "INSERT" not in error
    assert cli.main(["dataset", "stats", "--project", "Mine", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 1


def test_crawl_url_list_from_a_local_server(storage, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "pic.png").write_bytes(png_bytes(7))
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls = tmp_path / "urls.txt"
        urls.write_text(f"# my list\n{base}/pic.png\n{base}/missing.png\n")
        report = yolodex(storage, "crawl", "--urls", urls, "--project", "Crawled", "--allow-private")
    finally:
        server.shutdown()
    assert report["kept"] == 1 and report["stored"] == {"accepted": 1}
    assert any("missing.png" in item["url"] for item in report["rejected"])
