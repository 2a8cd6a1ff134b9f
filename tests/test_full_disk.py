"""A full disk (issue 19, finding 3): an import says so in one line, in the CLI and on the Datasets page, keeps no
image file whose row was not committed, loses nothing stored before, and read-only commands still work.

Two ways to fill a disk: a real size-limited tmpfs (mounting one needs root; skipped with the reason otherwise), and,
everywhere, the store's file writer failing with ENOSPC or SQLite's own "database or disk is full"
(`PRAGMA max_page_count`).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import http.server
import json
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from sqlalchemy import Engine, event
from streamlit.testing.v1 import AppTest

from backend import cli
from backend.files import atomic_write
from backend.ingest import service
from backend.store import images as image_store
from tests.conftest import REPO_ROOT, encode_image, textured_image

PAGE = REPO_ROOT / "pages" / "datasets.py"
PROJECT = "Full"


def write_images(folder: Path, first_seed: int, count: int, size: tuple[int, int] = (96, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(first_seed, first_seed + count):
        (folder / f"photo_{seed}.png").write_bytes(encode_image(textured_image(seed, size)))
    return folder


def write_labeled_set(folder: Path) -> Path:
    """A COCO folder of 4 labeled images (class "Pika")."""
    write_images(folder / "images", 500, 4)
    images = [{"id": n + 1, "file_name": f"photo_{500 + n}.png", "width": 96, "height": 64} for n in range(4)]
    boxes = [
        {"id": n + 1, "image_id": n + 1, "category_id": 1, "bbox": [8, 8, 40, 30], "area": 1200, "iscrowd": 0}
        for n in range(4)
    ]
    coco = {"images": images, "annotations": boxes, "categories": [{"id": 1, "name": "Pika"}]}
    (folder / "train.json").write_text(json.dumps(coco))
    return folder


def stored_files(storage: Path) -> dict[str, str]:
    """{path relative to storage: sha256} of every file in the image store (temporary files included)."""
    return {
        path.relative_to(storage).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((storage / "images").rglob("*"))
        if path.is_file()
    }


def image_rows(storage: Path) -> list[str]:
    with sqlite3.connect(storage / "yolodex.db") as connection:
        return sorted(row[0] for row in connection.execute("SELECT path FROM images"))


def stats(capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    assert cli.main(["dataset", "stats", "--project", PROJECT, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("yolodex: error: "), err
    assert "Traceback" not in err and "sqlite3" not in err and "Errno" not in err
    return lines[0]


@pytest.fixture
def storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A storage folder holding project "Full" with 4 labeled images, on the ordinary disk."""
    return _storage(tmp_path / "storage", tmp_path, monkeypatch)


def _storage(folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("YOLODEX_DATABASE_URL", "YOLODEX_QUEUE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("YOLODEX_STORAGE", str(folder))
    assert cli.main(["import", str(write_labeled_set(tmp_path / "labeled")), "--project", PROJECT]) == 0
    return folder


def fail_the_nth_image_write(monkeypatch: pytest.MonkeyPatch, nth: int) -> list[Path]:
    """The store's file writer runs out of space at its `nth` image (the earlier ones are written for real);
    returns the paths it was asked to write."""
    asked: list[Path] = []

    def write(path, writer):
        asked.append(Path(path))
        if len(asked) < nth:
            return atomic_write(path, writer)

        def no_space(file):
            file.write(b"\xff\xd8 part of an image")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return atomic_write(path, no_space)

    monkeypatch.setattr(image_store, "atomic_write", write)
    return asked


def test_an_import_that_runs_out_of_space_is_one_line_and_keeps_no_file(storage, tmp_path, monkeypatch, capsys):
    """Before: `OSError: [Errno 28] No space left on device` with a traceback, and every image written before it
    stayed in the store without a row (16 files on a 3 MB disk)."""
    before_files, before_stats = stored_files(storage), stats(capsys)
    asked = fail_the_nth_image_write(monkeypatch, nth=5)
    folder = write_images(tmp_path / "new", 0, 8)

    assert cli.main(["import", str(folder), "--project", PROJECT]) == 1
    line = one_error_line(capsys)
    assert "ran out of space" in line and "free some space" in line and "nothing from this operation was kept" in line
    assert str(storage) in line  # names the disk by the storage folder
    assert len(asked) == 5  # four new images were written before the disk was full...
    assert stored_files(storage) == before_files  # ...and removed again: no orphan, no temporary file
    assert sorted(before_files) == image_rows(storage)  # what was stored before is intact, file and row
    assert stats(capsys) == before_stats

    monkeypatch.undo()  # room again: the same import now goes through
    monkeypatch.setenv("YOLODEX_STORAGE", str(storage))
    assert cli.main(["import", str(folder), "--project", PROJECT]) == 0
    assert len(stored_files(storage)) == len(image_rows(storage)) == 12


@pytest.fixture
def sqlite_nearly_full():
    """Every new SQLite connection may grow its file by only a few pages (SQLite's own "database or disk is full")."""

    def limit(dbapi_connection, _record):
        pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
        dbapi_connection.execute(f"PRAGMA max_page_count={pages + 2}")

    event.listen(Engine, "connect", limit)
    yield
    event.remove(Engine, "connect", limit)


def test_a_database_that_cannot_grow_rolls_back_and_removes_the_written_images(storage, tmp_path, capsys, request):
    """The images are written, then the rows do not fit: before, the files stayed (orphans) and the error was a
    `database or disk is full` traceback."""
    before_files, before_stats = stored_files(storage), stats(capsys)
    from backend.store import db

    for engine in db._SHARED.values():  # new connections from here on, each with the page limit
        engine.dispose()
    request.getfixturevalue("sqlite_nearly_full")
    folder = write_images(tmp_path / "new", 0, 40, size=(160, 120))

    assert cli.main(["import", str(folder), "--project", PROJECT]) == 1
    line = one_error_line(capsys)
    assert "ran out of space" in line and str(storage) in line and "nothing from this operation was kept" in line
    assert stored_files(storage) == before_files
    assert sorted(before_files) == image_rows(storage)
    assert stats(capsys) == before_stats


def test_the_datasets_page_says_the_disk_is_full_and_keeps_nothing(storage, monkeypatch):
    """The page's own import (small uploads) shows the one line in its error banner, and the grid is unchanged."""
    before_files = stored_files(storage)
    fail_the_nth_image_write(monkeypatch, nth=2)
    app = AppTest.from_file(str(PAGE), default_timeout=60)
    app.query_params["project"] = PROJECT
    app.run()
    files = [(f"new_{seed}.png", encode_image(textured_image(seed)), "image/png") for seed in range(3)]
    app.file_uploader(key="datasets_upload_0").set_value(files).run()
    app.button(key="datasets_import").click().run()
    assert not app.exception, [exception.value for exception in app.exception]
    errors = [element.value for element in app.error]
    assert len(errors) == 1 and errors[0].startswith("Import failed: the disk holding "), errors
    assert "ran out of space" in errors[0] and "Errno" not in errors[0] and "command" not in errors[0]
    assert stored_files(storage) == before_files
    assert sorted(before_files) == image_rows(storage)


# ----------------------------------------------------------------------------------------------------------------
# A real full disk: a 3 MB tmpfs
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MB tmpfs mounted at tmp_path/disk (unmounted afterwards); skipped where mounting is not allowed."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({error}); the injected-ENOSPC tests cover the cleanup")
    if done.returncode != 0:
        pytest.skip(f"mounting a size-limited tmpfs needs root: {done.stderr.strip()} (the injected tests still run)")
    yield mount_point
    from backend.store import db

    for engine in db._SHARED.values():
        engine.dispose()  # no open file on the tmpfs
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def fill(folder: Path, leave_bytes: int = 0) -> Path:
    """Writes a filler file until the disk holding `folder` has about `leave_bytes` free."""
    filler = folder / f"filler-{uuid.uuid4().hex[:6]}"
    with open(filler, "wb") as file:
        try:
            while True:
                free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
                if free <= leave_bytes:
                    break
                file.write(b"\0" * min(64 * 1024, max(free - leave_bytes, 4096)))
                file.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_on_a_real_full_disk_import_fails_cleanly_and_stats_still_works(small_disk, tmp_path, monkeypatch, capsys):
    storage = _storage(small_disk / "storage", tmp_path, monkeypatch)
    before_files, before_stats = stored_files(storage), stats(capsys)
    fill(small_disk, leave_bytes=700_000)
    folder = write_images(tmp_path / "new", 0, 30, size=(256, 192))  # ~3 MB of PNGs: more than is left

    assert cli.main(["import", str(folder), "--project", PROJECT]) == 1
    line = one_error_line(capsys)
    assert "ran out of space" in line and str(small_disk) in line
    assert stored_files(storage) == before_files  # measured before the change: 16 orphan files, here 0
    assert sorted(before_files) == image_rows(storage)

    # Completely full now. A fresh process (no open connection keeps the database's -shm file) reads it: before,
    # even `yolodex dataset stats` failed with "disk I/O error" at PRAGMA journal_mode=WAL.
    from backend.store import db

    for engine in db._SHARED.values():
        engine.dispose()  # this process's pooled connections would keep the -shm file: a fresh start has none
    fill(small_disk)
    env = {**os.environ, "YOLODEX_STORAGE": str(storage)}
    done = subprocess.run(
        [sys.executable, "-m", "backend.cli", "dataset", "stats", "--project", PROJECT, "--json"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == before_stats
    # A write on the full disk is one line too, and changes nothing.
    done = subprocess.run(
        [sys.executable, "-m", "backend.cli", "import", str(folder), "--project", PROJECT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith("yolodex: error: ") and "ran out of space" in done.stderr
    assert stored_files(storage) == before_files
    assert service.stats(PROJECT) == before_stats


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    """Serves a folder without logging each request to stderr (the test reads stderr)."""

    def log_message(self, format: str, *args) -> None:
        pass


def test_a_crawl_that_runs_out_of_space_ends_in_one_line_and_keeps_what_it_stored(
    storage, tmp_path, monkeypatch, capsys
):
    """Before: every later image was downloaded and refused again ("sink_error" for each) and the crawl exited 0."""
    served = write_images(tmp_path / "site", 700, 4)
    handler = functools.partial(QuietFiles, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        urls = tmp_path / "urls.txt"
        urls.write_text(
            "".join(f"http://127.0.0.1:{server.server_port}/{path.name}\n" for path in sorted(served.iterdir()))
        )
        before_files = stored_files(storage)
        asked = fail_the_nth_image_write(monkeypatch, nth=2)

        assert cli.main(["crawl", "--urls", str(urls), "--project", PROJECT, "--allow-private"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    line = one_error_line(capsys)
    assert "ran out of space" in line and "free some space" in line
    assert f"the crawl stopped there and kept the 1 image it had stored in {PROJECT}" in line
    assert len(asked) == 2  # the crawl stopped at the first full-disk refusal
    kept = sorted(set(stored_files(storage)) - set(before_files))
    assert len(kept) == 1 and kept == sorted(set(image_rows(storage)) - set(before_files))  # the first image stayed
    assert all(stored_files(storage)[path] == digest for path, digest in before_files.items())
