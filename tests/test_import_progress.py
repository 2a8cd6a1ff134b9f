"""An import's progress: the total it estimates from listings, and the (done, total) calls it makes as it goes."""

from __future__ import annotations

from pathlib import Path

from backend.data.synthetic import generate_synthetic_dataset
from backend.ingest.importer import estimate_entries, import_paths
from backend.store.db import init_db, session_scope
from backend.store.models import get_or_create_project
from tests.conftest import encode_image, textured_image
from tests.test_import import zip_bytes


def test_the_estimate_counts_files_zip_members_and_labeled_images(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for name in ("a.png", "nested/b.png", "notes.txt"):
        (folder / name).write_bytes(b"x")
    (folder / "pack.zip").write_bytes(zip_bytes({"c.png": b"x", "d.png": b"x", "e/": b""}))
    labeled = generate_synthetic_dataset(tmp_path / "shapes", num_train=5, num_val=2, image_size=(64, 64), seed=1)
    assert estimate_entries([folder]) == 5  # 3 files + the zip's 2 members (its folder entry is none)
    assert estimate_entries([labeled]) == 7  # a labeled dataset: its images only, not the JSON files
    assert estimate_entries([labeled / "train.json"]) == 5  # a COCO file: its image entries
    assert estimate_entries([tmp_path / "missing.png", folder / "pack.zip"]) == 3


def test_import_reports_each_file_and_ends_at_done_equals_total(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed in range(6):
        (folder / f"{seed}.png").write_bytes(encode_image(textured_image(seed)))
    (folder / "broken.jpg").write_bytes(b"not an image")
    (folder / ".DS_Store").write_bytes(b"clutter")
    calls: list[tuple[int, int]] = []
    engine = init_db(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with session_scope(engine) as session:
        project = get_or_create_project(session, "dex")
        report = import_paths(
            session, tmp_path / "storage", project, [folder], on_progress=lambda *call: calls.append(call)
        )
    engine.dispose()
    assert calls[0] == (0, 8) and calls[-1] == (8, 8)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert all(0 <= done <= total == 8 for done, total in calls)
    assert report.counts()["accepted"] == 6 and report.counts()["rejected"] == 1 and report.counts()["skipped"] == 1
