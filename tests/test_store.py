"""Metadata database (Alembic schema, SQLite settings, sessions) and the checked, content-addressed image store."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from PIL import Image as PILImage
from sqlalchemy import inspect, select, text

from backend.store.db import alembic_config, init_db, session_scope
from backend.store.images import ImageLimits, ImageRejected, add_image_bytes, decode_checked
from backend.store.models import Base, Image, Project, ensure_class, get_or_create_project
from tests.conftest import REPO_ROOT
from tests.conftest import encode_image as encode
from tests.conftest import textured_image as textured


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path: Path):
    """The store on SQLite, and again on a fresh PostgreSQL database (tests.postgres_fixture; skipped without one)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'yolodex.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = init_db(url)
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Path):
    engine = init_db(f"sqlite:///{tmp_path / 'yolodex.db'}")
    yield engine
    engine.dispose()


def test_migration_creates_the_schema_and_running_it_again_is_a_no_op(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh' / 'yolodex.db'}"
    engine = init_db(url)
    tables = set(inspect(engine).get_table_names())
    assert {
        "projects",
        "project_classes",
        "images",
        "annotations",
        "dataset_versions",
        "runs",
        "model_files",
        "labeling_projects",
        "labeling_tasks",
        "jobs",
        "job_metrics",
    } <= tables
    with session_scope(engine) as session:
        get_or_create_project(session, "kept")
    init_db(url)  # a second run must neither fail nor touch the data
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0004"
        assert connection.execute(text("SELECT name FROM projects")).scalars().all() == ["kept"]
        # The migration and the models agree: autogenerate would find nothing to do.
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


MIGRATE_WHEN_TOLD = """
import sys, time
from pathlib import Path
from backend.store.db import init_db
url, folder, name = sys.argv[1:]
Path(folder, name + ".ready").touch()
while not Path(folder, "go").exists():
    time.sleep(0.005)
init_db(url).dispose()
"""


def start_when_ready(
    folder: Path, script: str, arguments: dict[str, list[str]], env: dict[str, str] | None = None
) -> list[subprocess.Popen]:
    """Starts `python -c script` once per {name: arguments} and returns when each has touched `folder/<name>.ready`
    (or after 120 s); the scripts then wait for `folder/go`, so that they act at the same moment."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for args in arguments.values()
    ]
    deadline = time.monotonic() + 120
    while not all((folder / f"{name}.ready").exists() for name in arguments) and time.monotonic() < deadline:
        time.sleep(0.01)
    return processes


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_that_migrate_a_fresh_database_at_once_all_succeed(backend: str, request, tmp_path: Path) -> None:
    """Workers and the app started together (compose, or two consumers) each run `init_db` on a fresh database.
    Without a lock, two saw no schema, both created it, and the others failed: a duplicate "alembic_version" type on
    PostgreSQL, "database is locked" on SQLite (measured: 2 runs of 3 failed on both). A worker's start-up hook failed
    so, and skipped its recovery of dead jobs."""
    url = f"sqlite:///{tmp_path / 'yolodex.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    names = [f"p{n}" for n in range(4)]
    processes = start_when_ready(tmp_path, MIGRATE_WHEN_TOLD, {name: [url, str(tmp_path), name] for name in names})
    (tmp_path / "go").touch()  # all four imported and waiting: they migrate at the same moment
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, "\n".join(outputs)[-4000:]
    engine = init_db(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0004"]
    engine.dispose()


def test_sqlite_runs_in_wal_mode_with_foreign_keys(sqlite_engine) -> None:
    with sqlite_engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
        assert connection.execute(text("PRAGMA busy_timeout")).scalar_one() > 0


def test_session_scope_rolls_back_on_error(engine) -> None:
    with pytest.raises(RuntimeError), session_scope(engine) as session:
        get_or_create_project(session, "lost")
        raise RuntimeError("boom")
    with session_scope(engine) as session:
        assert session.scalars(select(Project)).all() == []


def test_names_longer_than_their_column_are_refused_alike_on_every_backend(engine) -> None:
    with session_scope(engine) as session:
        with pytest.raises(ValueError, match="at most 200 characters"):
            get_or_create_project(session, "p" * 201)
        project = get_or_create_project(session, "p" * 200)
        with pytest.raises(ValueError, match="a class name has at most 200"):
            ensure_class(session, project, "c" * 201)
        assert ensure_class(session, project, "c" * 200)[1]


def test_classes_get_contiguous_indices(engine) -> None:
    with session_scope(engine) as session:
        project = get_or_create_project(session, "dex")
        first, added = ensure_class(session, project, "Bulbasaur", dex_number=1)
        again, added_again = ensure_class(session, project, "Bulbasaur")
        second, _ = ensure_class(session, project, "Charmander", dex_number=4)
        assert (added, added_again, again.id) == (True, False, first.id)
        assert [first.index, second.index] == [0, 1]


@pytest.mark.parametrize(
    ("image_format", "extension"), [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("BMP", "bmp"), ("GIF", "gif")]
)
def test_decode_accepts_the_five_formats(image_format: str, extension: str) -> None:
    decoded = decode_checked(encode(textured(1), image_format))
    assert (decoded.width, decoded.height, decoded.extension) == (96, 64, extension)


def test_decode_takes_the_first_frame_of_an_animated_gif() -> None:
    frames = [PILImage.fromarray(np.full((20, 30, 3), value, np.uint8)) for value in (10, 250)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_checked(buffer.getvalue())
    assert np.asarray(decoded.image.convert("RGB"))[0, 0, 0] < 128


def test_decode_applies_exif_orientation() -> None:
    image = PILImage.fromarray(textured(2, (80, 40)))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90°: displayed 40 wide, 80 tall
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    decoded = decode_checked(buffer.getvalue())
    assert (decoded.width, decoded.height) == (40, 80)


def test_decode_rejects_hostile_and_unsupported_files_with_a_reason() -> None:
    jpeg = encode(textured(3, (200, 150)), "JPEG", quality=90)
    cases = {
        b"": "empty",
        b"just some text, named photo.jpg": "not an image",
        jpeg[: len(jpeg) // 2]: "truncated",
        encode(textured(3), "TIFF"): "TIFF images are not accepted",
    }
    for data, expected in cases.items():
        with pytest.raises(ImageRejected, match=expected):
            decode_checked(data)
    with pytest.raises(ImageRejected, match=r"over the .* limit per image"):
        decode_checked(jpeg, ImageLimits(max_file_bytes=1000))


def test_a_12000x9000_image_is_refused_by_the_pixel_limit_before_decoding() -> None:
    buffer = io.BytesIO()
    PILImage.new("1", (12000, 9000)).save(buffer, "PNG")  # one colour: a few kB on disk, 108 MP decoded
    with pytest.raises(ImageRejected, match=r"12000x9000 is 108\.0 megapixels, over the 50 MP limit"):
        decode_checked(buffer.getvalue())
    with pytest.raises(ValueError, match="MAX_IMAGE_PIXELS"):
        ImageLimits(max_pixels=10**12)


def test_add_image_bytes_stores_content_addressed_and_dedupes(engine, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    data = encode(textured(4))
    sha = hashlib.sha256(data).hexdigest()
    with session_scope(engine) as session:
        project = get_or_create_project(session, "dex")
        other = get_or_create_project(session, "other")
        first = add_image_bytes(
            session,
            storage,
            project,
            data,
            source="crawl",
            original_name="a.png",
            source_url="https://example.org/a.png",
            page_url="https://example.org/",
            licence_hint="CC-BY-4.0",
        )
        again = add_image_bytes(session, storage, project, data, source="upload", original_name="b.png")
        elsewhere = add_image_bytes(session, storage, other, data, source="upload", original_name="b.png")
        bad = add_image_bytes(session, storage, project, b"\x89PNG\r\n\x1a\nnot really", source="upload")
    assert first.status == "accepted"
    assert (again.status, again.image_id) == ("duplicate", first.image_id)
    assert elsewhere.status == "accepted" and elsewhere.image_id != first.image_id  # per-project uniqueness
    assert bad.status == "rejected" and bad.reason
    stored = storage / "images" / sha[:2] / f"{sha}.png"
    assert stored.read_bytes() == data
    assert not list(stored.parent.glob("*.tmp"))
    with session_scope(engine) as session:
        image = session.get(Image, first.image_id)
        assert (image.sha256, image.path, image.width, image.height, image.size_bytes) == (
            sha,
            f"images/{sha[:2]}/{sha}.png",
            96,
            64,
            len(data),
        )
        assert (image.source, image.source_url, image.page_url, image.licence_hint) == (
            "crawl",
            "https://example.org/a.png",
            "https://example.org/",
            "CC-BY-4.0",
        )
        assert len(image.phash) == 16 and image.status == "ok"
        assert session.scalar(select(Image.id).where(Image.project_id == project.id).order_by(Image.id.desc())) == (
            first.image_id
        )


def test_the_migration_renders_for_postgresql() -> None:
    """No SQLite-only SQL: the same migration compiles for PostgreSQL (offline mode, no server needed)."""
    config = alembic_config()
    config.set_main_option("sqlalchemy.url", "postgresql://yolodex@localhost/yolodex")
    config.output_buffer = io.StringIO()
    command.upgrade(config, "head", sql=True)
    sql = config.output_buffer.getvalue()
    assert "CREATE TABLE images" in sql and "CONSTRAINT uq_images_project_sha256 UNIQUE (project_id, sha256)" in sql


WRITE_WHEN_TOLD = """
import sys, time
from pathlib import Path
from backend.ingest import service
folder, name, kind, argument = sys.argv[1:]
Path(folder, name + ".ready").touch()
while not Path(folder, "go").exists():
    time.sleep(0.005)
if kind == "import":
    print(service.import_into([argument], "Shared")["counts"])
else:
    print(service.freeze("Shared", argument)["counts"]["splits"])
"""


def test_three_imports_and_a_freeze_at_once_all_wait_for_the_lock_and_succeed(tmp_path: Path, monkeypatch) -> None:
    """Issue 19: three imports and a freeze started together, while another writer held the SQLite file: 4 of 8
    failed "database is busy" after about 2 s, though the README promises a 10 s wait. They read first in a plain
    (deferred) transaction; once another writer had committed, SQLite refused their first write at once
    (SQLITE_BUSY_SNAPSHOT) instead of waiting. Writers now begin with BEGIN IMMEDIATE and wait their turn."""
    from backend.ingest import service

    storage = tmp_path / "storage"
    monkeypatch.setenv("YOLODEX_STORAGE", str(storage))
    monkeypatch.delenv("YOLODEX_DATABASE_URL", raising=False)
    labeled = tmp_path / "labeled"
    (labeled / "images").mkdir(parents=True)
    for n in range(4):
        (labeled / "images" / f"l{n}.png").write_bytes(encode(textured(700 + n)))
    (labeled / "train.json").write_text(
        json.dumps(
            {
                "images": [{"id": n + 1, "file_name": f"l{n}.png", "width": 96, "height": 64} for n in range(4)],
                "annotations": [
                    {
                        "id": n + 1,
                        "image_id": n + 1,
                        "category_id": 1,
                        "bbox": [8, 8, 30, 20],
                        "area": 600,
                        "iscrowd": 0,
                    }
                    for n in range(4)
                ],
                "categories": [{"id": 1, "name": "Pika"}],
            }
        )
    )
    service.import_into([labeled], "Shared")
    folders = []
    for k in range(3):
        folders.append(tmp_path / f"set{k}")
        folders[-1].mkdir()
        for n in range(3):
            (folders[-1] / f"p{n}.png").write_bytes(encode(textured(800 + 10 * k + n)))
    jobs = [(f"import{k}", "import", str(folder)) for k, folder in enumerate(folders)] + [("freeze", "freeze", "v1")]
    env = {**os.environ, "YOLODEX_STORAGE": str(storage)}
    processes = start_when_ready(tmp_path, WRITE_WHEN_TOLD, {job[0]: [str(tmp_path), *job] for job in jobs}, env)
    # Another writer (say a crawl storing an image) holds the write lock while they start, and commits a change.
    writer = sqlite3.connect(storage / "yolodex.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO projects (name, created_at) VALUES ('Other', CURRENT_TIMESTAMP)")
    (tmp_path / "go").touch()
    time.sleep(1.5)  # they start and read, then wait for the lock
    writer.execute("COMMIT")
    writer.close()
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, "\n".join(outputs)[-4000:]
    # Every image arrived once; what was there before is still there, and the version holds the labeled images.
    summary = service.stats("Shared")
    assert summary["images"] == 4 + 9 and summary["boxes"] == 4
    with sqlite3.connect(storage / "yolodex.db") as connection:
        assert connection.execute("SELECT count(*) FROM projects").fetchone()[0] == 2
    version = json.loads((storage / "datasets" / "Shared" / "v1" / "version.json").read_text())
    assert version["stats"]["images"] == 4 and version["stats"]["boxes"] == 4
