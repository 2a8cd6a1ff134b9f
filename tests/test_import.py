"""Import of files, folders, zip archives and labeled datasets: every hostile input gets a clear outcome."""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import func, select

from backend.data.synthetic import generate_synthetic_dataset
from backend.ingest import importer
from backend.ingest.importer import ImportLimits, import_paths
from backend.store.db import init_db, session_scope
from backend.store.images import add_image_bytes
from backend.store.models import Annotation, Image, ProjectClass, get_or_create_project
from tests.conftest import encode_image as encode
from tests.conftest import textured_image as textured


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
    return buffer.getvalue()


@pytest.fixture
def env(tmp_path: Path):
    engine = init_db(f"sqlite:///{tmp_path / 'yolodex.db'}")
    with session_scope(engine) as session:
        get_or_create_project(session, "dex")
    yield engine, tmp_path / "storage"
    engine.dispose()


def run_import(env, paths, **kwargs):
    engine, storage = env
    with session_scope(engine) as session:
        project = get_or_create_project(session, "dex")
        return import_paths(session, storage, project, paths, **kwargs)


def reasons(report) -> dict[str, str]:
    return {item["name"]: item["reason"] for item in report.rejected}


def test_folder_with_unicode_names_duplicates_and_junk(env, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "sub dir").mkdir(parents=True)
    same = encode(textured(1))
    (folder / "Bisasam ポケモン.png").write_bytes(same)
    (folder / "sub dir" / "copy of it.png").write_bytes(same)  # the same image under two names
    (folder / "other.jpg").write_bytes(encode(textured(2), "JPEG"))
    (folder / "notes.jpg").write_text("a text file named .jpg")
    jpeg = encode(textured(3, (300, 200)), "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    report = run_import(env, [folder])
    assert sorted(item["name"] for item in report.accepted) == ["photos/Bisasam ポケモン.png", "photos/other.jpg"]
    assert [item["name"] for item in report.duplicates] == ["photos/sub dir/copy of it.png"]
    assert "not an image" in reasons(report)["photos/notes.jpg"]
    assert "truncated" in reasons(report)["photos/truncated.jpg"]
    assert [item["name"] for item in report.skipped] == ["photos/.DS_Store"]
    json.dumps(report.to_dict())  # serialisable for the job queue and --json
    engine, _ = env
    with session_scope(engine) as session:
        names = set(session.scalars(select(Image.original_name)))
    assert names == {"photos/Bisasam ポケモン.png", "photos/other.jpg"}


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinks_in_folders_are_skipped(env, tmp_path: Path) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(encode(textured(4)))
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "link.png").symlink_to(outside)
    (folder / "linked_dir").symlink_to(tmp_path, target_is_directory=True)
    report = run_import(env, [folder])
    assert report.accepted == []
    assert {item["name"] for item in report.skipped} == {"photos/link.png", "photos/linked_dir"}
    assert all("symbolic link" in item["reason"] for item in report.skipped)


def test_hostile_zip_members_are_refused_and_good_ones_kept(env, tmp_path: Path) -> None:
    good = encode(textured(5))
    members = {"ok/ good ü.png": good, "../evil.jpg": good, "/etc/x.jpg": good, "C:/windows/y.jpg": good}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data)
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
        archive.writestr("__MACOSX/ok/._ good ü.png", b"resource fork")
    path = tmp_path / "upload.zip"
    path.write_bytes(buffer.getvalue())
    report = run_import(env, [path])
    assert [item["name"] for item in report.accepted] == ["upload.zip/ok/ good ü.png"]
    why = reasons(report)
    assert "zip slip" in why["upload.zip/../evil.jpg"]
    assert "absolute path" in why["upload.zip//etc/x.jpg"]
    assert "absolute path" in why["upload.zip/C:/windows/y.jpg"]
    assert "symbolic link" in why["upload.zip/link.jpg"]
    assert len(report.skipped) == 1
    assert not (tmp_path / "evil.jpg").exists()


def test_empty_zip_nested_zips_and_a_corrupt_zip(env, tmp_path: Path) -> None:
    (tmp_path / "empty.zip").write_bytes(zip_bytes({}))
    inner = zip_bytes({"inner.png": encode(textured(6))})
    innermost = zip_bytes({"deep.zip": zip_bytes({"deepest.png": encode(textured(7))})})
    (tmp_path / "outer.zip").write_bytes(zip_bytes({"inner.zip": inner, "deeper.zip": innermost}))
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 this is not really a zip")
    report = run_import(env, [tmp_path / "empty.zip", tmp_path / "outer.zip", tmp_path / "broken.zip"])
    assert [item["name"] for item in report.accepted] == ["outer.zip/inner.zip/inner.png"]
    why = reasons(report)
    assert "empty" in why["empty.zip"]
    assert "nested more than 1 level" in why["outer.zip/deeper.zip/deep.zip"]
    assert "not a readable zip" in why["broken.zip"]


def test_archive_limits(env, tmp_path: Path) -> None:
    members = {f"{index}.png": encode(textured(index)) for index in range(4)}
    (tmp_path / "many.zip").write_bytes(zip_bytes(members))
    (tmp_path / "bomb.zip").write_bytes(zip_bytes({"zeros.png": b"\0" * 3_000_000}))  # compresses to ~3 kB
    limits = ImportLimits(max_archive_members=3)
    report = run_import(env, [tmp_path / "many.zip"], limits=limits)
    assert report.accepted == [] and "4 entries, over the limit of 3" in reasons(report)["many.zip"]
    small = ImportLimits(image=importer.ImageLimits(max_file_bytes=1_000_000), max_archive_bytes=2_000_000)
    report = run_import(env, [tmp_path / "bomb.zip"], limits=small)
    assert "unpacks to 3.0 MB, over the 2.0 MB left" in reasons(report)["bomb.zip"]
    report = run_import(env, [tmp_path / "bomb.zip"], limits=ImportLimits(image=small.image))
    assert "3.0 MB unpacked, over the 1.0 MB limit" in reasons(report)["bomb.zip/zeros.png"]


def test_nothing_stored_before_is_lost_after_a_failed_import(env, tmp_path: Path, monkeypatch) -> None:
    engine, storage = env
    with session_scope(engine) as session:
        kept = add_image_bytes(
            session, storage, get_or_create_project(session, "dex"), encode(textured(8)), source="upload"
        )
    folder = tmp_path / "batch"
    folder.mkdir()
    for index in range(3):
        (folder / f"{index}.png").write_bytes(encode(textured(20 + index)))
    calls = {"count": 0}
    real_add = importer.add_image_bytes

    def failing_add(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2:
            raise OSError("disk full")  # not a bad file: a failure of the import itself
        return real_add(*args, **kwargs)

    monkeypatch.setattr(importer, "add_image_bytes", failing_add)
    with pytest.raises(OSError, match="disk full"):
        run_import(env, [folder])
    with session_scope(engine) as session:
        images = session.scalars(select(Image)).all()
    assert [image.id for image in images] == [kept.image_id]  # the failed import left nothing half-done
    assert (storage / images[0].path).is_file()


def test_labeled_coco_folder_imports_boxes_and_adds_classes(env, tmp_path: Path) -> None:
    dataset = generate_synthetic_dataset(tmp_path / "shapes", num_train=4, num_val=2, image_size=(96, 96), seed=1)
    engine, _ = env
    with session_scope(engine) as session:
        project = get_or_create_project(session, "dex")
        from backend.store.models import ensure_class

        ensure_class(session, project, "square")  # already there: reused, keeps index 0
    report = run_import(env, [dataset])
    expected_boxes = sum(len(json.loads((dataset / f"{s}.json").read_text())["annotations"]) for s in ("train", "val"))
    assert len(report.accepted) == 6 and report.rejected == []
    assert report.annotations == expected_boxes > 0
    assert report.classes_added == ["circle", "triangle"]
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).select_from(Annotation)) == expected_boxes
        assert [c.name for c in session.scalars(select(ProjectClass).order_by(ProjectClass.index))] == [
            "square",
            "circle",
            "triangle",
        ]
        assert all(image.labeled for image in session.scalars(select(Image)))
    again = run_import(env, [dataset])  # importing the same dataset twice does not double the boxes
    assert len(again.duplicates) == 6 and again.annotations == 0


def test_labeled_yolo_zip_with_a_wrapping_folder(env, tmp_path: Path) -> None:
    image = textured(9, (100, 50))
    members = {
        "export/data.yaml": b"names: [pikachu, eevee]\n",
        "export/images/train/a b.png": encode(image),
        "export/labels/train/a b.txt": b"1 0.5 0.5 0.2 0.4\n",
        "export/images/train/bad.jpg": b"not an image",
    }
    (tmp_path / "yolo.zip").write_bytes(zip_bytes(members))
    report = run_import(env, [tmp_path / "yolo.zip"])
    assert [item["name"] for item in report.accepted] == ["yolo.zip/images/train/a b.png"]
    assert report.annotations == 1 and report.classes_added == ["pikachu", "eevee"]
    assert any("bad.jpg" in name for name in reasons(report))
    engine, _ = env
    with session_scope(engine) as session:
        box = session.scalars(select(Annotation)).one()
        assert (box.x1, box.y1, box.x2, box.y2) == pytest.approx((40, 15, 60, 35))  # xyxy original pixels
        assert box.project_class.name == "eevee" and box.source == "import"


def test_a_broken_labeled_dataset_is_rejected_with_the_reason(env, tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "train.json").write_text("{not json")
    report = run_import(env, [folder, tmp_path / "missing.png"])
    why = reasons(report)
    assert "not valid JSON" in why["broken"]
    assert why[str(tmp_path / "missing.png")] == "not found"
