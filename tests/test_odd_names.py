"""Odd file names and files that are not files (issue 19, finding 4): one of them never spoils the rest.

A folder holding a name that is not UTF-8, a 255-byte emoji name, a named pipe, a socket and a device file imports
its images and reports each odd entry by name; a FIFO never hangs the import. Names written to disk (uploads, the
links Label Studio reads) are cut by bytes, so a name the browser accepts is never refused by the file system.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from backend.browse import discard_uploads, import_uploads, save_uploads
from backend.files import NAME_MAX_BYTES, cut_to_bytes, fit_name, printable_name
from backend.labeling.sync import link_name
from backend.store.db import init_db, session_scope
from backend.store.models import Image
from backend.store.versions import safe_name
from backend.training.presets import new_run_dir
from tests.conftest import encode_image, textured_image

REPO_ROOT = Path(__file__).resolve().parent.parent
# The old importer blocked forever on the FIFO: a generous bound on "it ends", never a timing assertion.
IMPORT_TIMEOUT_S = 120
EMOJI_NAME = "🐍" * 62 + ".png"  # 252 bytes: a valid name on disk, 63 characters


def yolodex_import(storage: Path, *paths: str | bytes) -> dict:
    env = {**os.environ, "YOLODEX_STORAGE": str(storage)}
    env.pop("YOLODEX_DATABASE_URL", None)
    command = [os.fsencode(sys.executable), b"-m", b"backend.cli", b"import", *map(os.fsencode, paths), b"--json"]
    try:
        completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, timeout=IMPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"the import did not end within {IMPORT_TIMEOUT_S} s (blocked on a special file?): {error}")
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")
    return json.loads(completed.stdout)


def stored_images(storage: Path) -> dict[str, Path]:
    engine = init_db(f"sqlite:///{storage / 'yolodex.db'}")
    try:
        with session_scope(engine) as session:
            return {image.original_name: storage / image.path for image in session.scalars(select(Image))}
    finally:
        engine.dispose()


def test_a_folder_of_odd_entries_imports_its_images_and_names_each_skipped_one(tmp_path: Path, monkeypatch) -> None:
    storage = tmp_path / "storage"
    earlier = tmp_path / "earlier.png"
    earlier.write_bytes(encode_image(textured_image(0)))
    assert [item["name"] for item in yolodex_import(storage, str(earlier))["accepted"]] == ["earlier.png"]

    folder = tmp_path / "odd"
    folder.mkdir()
    raw_folder = os.fsencode(folder)
    (folder / "good.png").write_bytes(encode_image(textured_image(1)))
    with open(raw_folder + b"/caf\xe9.png", "wb") as file:  # latin-1 "café.png": not UTF-8
        file.write(encode_image(textured_image(2)))
    (folder / EMOJI_NAME).write_bytes(encode_image(textured_image(3)))
    (folder / ("x" * (NAME_MAX_BYTES - 4) + ".png")).write_bytes(encode_image(textured_image(4)))
    os.mkfifo(folder / "pipe.png")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    monkeypatch.chdir(folder)  # an AF_UNIX address is at most ~107 bytes: bind by a short relative name
    listener.bind("socket.png")
    monkeypatch.chdir(REPO_ROOT)
    has_device = os.geteuid() == 0
    if has_device:  # making a device file needs root: the container's tests run as root
        os.mknod(folder / "null.png", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    try:
        report = yolodex_import(storage, raw_folder)
    finally:
        listener.close()

    accepted = {item["name"] for item in report["accepted"]}
    assert accepted == {"odd/good.png", "odd/caf\\xe9.png", f"odd/{EMOJI_NAME}", f"odd/{'x' * 251}.png"}
    skipped = {item["name"]: item["reason"] for item in report["skipped"]}
    assert "named pipe" in skipped.pop("odd/pipe.png")
    assert "socket" in skipped.pop("odd/socket.png")
    if has_device:
        assert "device file" in skipped.pop("odd/null.png")
    assert skipped == {} and report["rejected"] == []
    assert any("odd/caf\\xe9.png" in warning and "UTF-8" in warning for warning in report["warnings"])

    images = stored_images(storage)
    assert set(images) == {"earlier.png"} | accepted  # what was stored before is still there, with its file
    assert all(path.is_file() for path in images.values())
    assert images["earlier.png"].read_bytes() == earlier.read_bytes()


def test_files_given_by_name_a_fifo_and_a_name_that_is_not_utf8(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    latin1 = os.fsencode(tmp_path) + b"/Pok\xe9mon.png"
    with open(latin1, "wb") as file:
        file.write(encode_image(textured_image(10)))
    report = yolodex_import(tmp_path / "storage", str(tmp_path / "pipe.jpg"), latin1)
    assert [item["name"] for item in report["rejected"]] == [str(tmp_path / "pipe.jpg")]
    assert "named pipe" in report["rejected"][0]["reason"]
    assert [item["name"] for item in report["accepted"]] == ["Pok\\xe9mon.png"]


def test_names_are_cut_by_bytes_keeping_the_extension() -> None:
    assert len(fit_name("x" * 300 + ".jpg").encode()) == 255 and fit_name("x" * 300 + ".jpg").endswith(".jpg")
    emoji = fit_name("🐍" * 100 + ".png")
    assert len(emoji.encode()) <= 255 and emoji.endswith(".png") and set(emoji[:-4]) == {"🐍"}
    accented = fit_name("e\u0301" * 200 + ".jpg")  # never keeps a letter whose accent was cut off
    assert len(accented.encode()) <= 255 and accented[-5] == "\u0301"
    assert fit_name(os.fsdecode(b"caf\xe9.jpg")) == "caf_xe9.jpg"
    assert printable_name(b"caf\xe9.jpg") == "caf\\xe9.jpg"
    assert fit_name("../..") == "file" and fit_name("a\\b/c.png") == "c.png" and fit_name("", "upload_0") == "upload_0"
    assert cut_to_bytes("aé🐍", 6) == "aé" and cut_to_bytes("short", 255) == "short"


def test_label_studio_link_names_fit_the_file_system(tmp_path: Path) -> None:
    image = SimpleNamespace(id=123456, path="images/ab/abcd.png", original_name="🐍" * 90 + ".png", sha256="ab" * 32)
    name = link_name(image)
    assert len(name.encode()) <= NAME_MAX_BYTES and name.startswith("123456_🐍") and name.endswith(".png")
    (tmp_path / name).write_bytes(b"a link")  # the old 80-character cut gave 327 bytes: Errno 36 here
    short = SimpleNamespace(id=7, path="images/ab/abcd.jpg", original_name="photos/Bisasam ポケモン.jpeg", sha256="a")
    assert link_name(short) == "7_Bisasam ポケモン.jpg"  # names that fitted before keep their links' names


def test_an_upload_name_over_255_bytes_is_saved_and_imported(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    engine = init_db(f"sqlite:///{storage / 'yolodex.db'}")
    long_name = "ü" * 150 + ".png"  # 304 bytes: a browser sends it, the file system refuses it
    try:
        with session_scope(engine) as session:
            import_uploads(
                session, storage, "dex", save_uploads(storage, [("first.png", encode_image(textured_image(5)))])
            )
        paths = save_uploads(storage, [(long_name, encode_image(textured_image(6))), ("ok.png", b"not an image")])
        assert len(paths[0].name.encode()) <= NAME_MAX_BYTES and paths[0].name.endswith(".png")
        with session_scope(engine) as session:
            report = import_uploads(session, storage, "dex", paths)
        discard_uploads(storage, paths)
        assert [item["name"] for item in report["accepted"]] == [paths[0].name]
        assert [item["name"] for item in report["rejected"]] == ["ok.png"]
        with session_scope(engine) as session:
            names = set(session.scalars(select(Image.original_name)))
        assert names == {"first.png", paths[0].name}
    finally:
        engine.dispose()


def test_folders_named_after_projects_and_versions_fit_the_file_system(tmp_path: Path) -> None:
    project, version = "𝐏𝐨𝐤𝐞𝐝𝐞𝐱" * 10, "ポケモン図鑑" * 10  # 60 letters each: 240 and 180 bytes
    run_dir = new_run_dir(tmp_path, project, version)
    run_dir.mkdir()  # the old 60-character cuts gave a 437-byte name: Errno 36
    assert len(run_dir.name.encode()) <= NAME_MAX_BYTES and run_dir.name.startswith("𝐏𝐨𝐤𝐞𝐝𝐞𝐱")
    (tmp_path / f"123_{safe_name(project)}.png").write_bytes(b"a frozen image")  # a dataset version's file name
    assert safe_name("cat dog") == "cat_dog"  # names that fitted keep their folders


def test_a_path_over_the_systems_limit_is_reported_and_the_rest_imports(tmp_path: Path, monkeypatch) -> None:
    top = tmp_path / "deep"
    top.mkdir()
    (top / "ok.png").write_bytes(encode_image(textured_image(8)))
    monkeypatch.chdir(top)  # relative steps: the whole path is longer than the system takes (4096 bytes)
    for _ in range(20):
        os.mkdir("d" * 250)
        os.chdir("d" * 250)
    Path("lost.png").write_bytes(encode_image(textured_image(9)))
    monkeypatch.chdir(REPO_ROOT)
    report = yolodex_import(tmp_path / "storage", str(top))
    assert [item["name"] for item in report["accepted"]] == ["deep/ok.png"]
    (rejected,) = report["rejected"]
    assert rejected["name"].startswith("deep/ddd") and "…" in rejected["name"] and len(rejected["name"]) < 300
    assert rejected["reason"] == "cannot read the folder (File name too long)"
