"""backend.browse: paged and filtered image queries, thumbnails, uploads with their kept report, versions, export zips
and the augmentation preview, on small stores built here."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import delete, select, update

from backend import browse
from backend.ingest import service
from backend.ingest.starter import STARTER_NAME
from backend.settings import Settings
from backend.store.db import session_scope
from backend.store.models import Annotation, Image, Project, ProjectClass
from tests.conftest import encode_image, textured_image


@pytest.fixture(scope="module")
def starter_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The Starter Pokédex (64 labeled images, 3 classes), shared read-only by the tests that only query it."""
    settings = Settings.from_env({"YOLODEX_STORAGE": str(tmp_path_factory.mktemp("browse") / "storage")})
    service.starter(settings)
    return settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env({"YOLODEX_STORAGE": str(tmp_path / "storage")})


def open_project(settings: Settings, name: str = STARTER_NAME):
    engine, _ = service.open_store(settings)
    session_context = session_scope(engine)
    session = session_context.__enter__()
    return session_context, session, session.scalar(select(Project).where(Project.name == name))


@pytest.fixture
def starter(starter_settings: Settings):
    context, session, project = open_project(starter_settings)
    yield session, starter_settings.storage, project
    session.rollback()  # the module's store stays as the starter made it
    context.__exit__(None, None, None)


def test_pages_cover_every_image_once_in_id_order(starter):
    session, storage, project = starter
    all_ids = list(session.scalars(select(Image.id).where(Image.project_id == project.id).order_by(Image.id)))
    assert len(all_ids) == 64

    pages = [browse.query_images(session, storage, project, page=number, page_size=24) for number in (1, 2, 3)]
    assert [(page.page, page.pages, page.total, len(page.cards)) for page in pages] == [
        (1, 3, 64, 24),
        (2, 3, 64, 24),
        (3, 3, 64, 16),
    ]
    assert [card.id for page in pages for card in page.cards] == all_ids
    assert [page.first for page in pages] == [1, 25, 49]
    # Out-of-range pages are clamped, not empty: a filter change can leave the page number past the end.
    assert browse.query_images(session, storage, project, page=9).page == 3
    assert browse.query_images(session, storage, project, page=0).page == 1


def test_cards_carry_name_size_and_boxes(starter):
    session, storage, project = starter
    card = browse.query_images(session, storage, project, page_size=1).cards[0]
    image = session.get(Image, card.id)
    rows = session.execute(
        select(Annotation.x1, Annotation.y1, Annotation.x2, Annotation.y2, ProjectClass.index)
        .join(ProjectClass, ProjectClass.id == Annotation.class_id)
        .where(Annotation.image_id == card.id)
        .order_by(Annotation.id)
    ).all()
    assert card.path == storage / image.path and card.path.is_file()
    assert [(list(box), label) for box, label in card.boxes] == [
        ([x1, y1, x2, y2], label) for x1, y1, x2, y2, label in rows
    ]
    assert card.caption == f"{image.original_name} · 320×320 · {len(rows)} boxes"


def test_class_filter_matches_the_class_counts(starter):
    session, storage, project = starter
    stats = service.stats(STARTER_NAME, settings=Settings.from_env({"YOLODEX_STORAGE": str(storage)}))
    for entry in stats["classes"]:
        image_filter = browse.ImageFilter("class", entry["name"])
        assert browse.count_images(session, project, image_filter) == entry["images"]
        grid = browse.query_images(session, storage, project, image_filter, page_size=100)
        assert all(any(label == entry["index"] for _, label in card.boxes) for card in grid.cards)
    with pytest.raises(browse.BrowseError, match="no class 'pikachu'"):
        browse.count_images(session, project, browse.ImageFilter("class", "pikachu"))
    with pytest.raises(browse.BrowseError, match="unknown image filter"):
        browse.ImageFilter("blurry")


def test_unlabeled_filter_finds_images_nobody_labeled(starter):
    session, storage, project = starter
    assert browse.count_images(session, project, browse.ImageFilter("unlabeled")) == 0
    first_ids = list(session.scalars(select(Image.id).where(Image.project_id == project.id).order_by(Image.id)))[:3]
    session.execute(delete(Annotation).where(Annotation.image_id.in_(first_ids)))
    # Image 0 keeps labeled=True: a background image a person confirmed is labeled, not unlabeled.
    session.execute(update(Image).where(Image.id.in_(first_ids[1:])).values(labeled=False))
    grid = browse.query_images(session, storage, project, browse.ImageFilter("unlabeled"))
    assert [card.id for card in grid.cards] == first_ids[1:]
    assert all(card.caption.endswith("· unlabeled") for card in grid.cards)
    assert browse.image_card(session, storage, project, first_ids[0]).caption.endswith("· no boxes")


def test_duplicates_filter_keeps_near_groups_together(settings):
    engine, storage = service.open_store(settings)
    base = [textured_image(seed) for seed in range(3)]
    files = [
        ("a.png", encode_image(base[0])),
        ("b.png", encode_image(base[1])),
        ("c.png", encode_image(base[2])),
        ("a_again.jpg", encode_image(base[0], "JPEG", quality=90)),  # same picture, other bytes: a near duplicate
        ("b_again.jpg", encode_image(base[1], "JPEG", quality=90)),
    ]
    paths = browse.save_uploads(storage, files)
    with session_scope(engine) as session:
        report = browse.import_uploads(session, storage, "Dupes", paths)
    assert report["counts"]["accepted"] == 3 and report["counts"]["near_duplicates"] == 2
    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == "Dupes"))
        grid = browse.query_images(session, storage, project, browse.ImageFilter("duplicates"))
        names = [card.name for card in grid.cards]
        assert names == ["a.png", "a_again.jpg", "b.png", "b_again.jpg"]  # group by group, c.png has no group
        assert grid.cards[1].caption.endswith(f"· unlabeled · near #{grid.cards[0].id}")


def test_uploads_keep_their_names_and_the_report_is_kept(settings):
    engine, storage = service.open_store(settings)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("inside/one.png", encode_image(textured_image(10)))
        zipped.writestr("inside/two.png", encode_image(textured_image(11)))
    files = [
        ("../../evil/photo.png", encode_image(textured_image(12))),  # a path in the name never escapes the folder
        ("set.zip", archive.getvalue()),
        ("notes.jpg", b"these are my notes, not a JPEG"),
        ("photo.png", encode_image(textured_image(12))),  # same name and bytes: a duplicate, not a collision
    ]
    paths = browse.save_uploads(storage, files)
    assert [path.name for path in paths] == ["photo.png", "set.zip", "notes.jpg", "photo.png"]
    assert all(path.is_relative_to(storage / browse.UPLOADS_DIR) for path in paths)
    with session_scope(engine) as session:
        report = browse.import_uploads(session, storage, "Uploads", paths)
    elsewhere = storage.parent / "mine" / "0123456789abcdef0123456789abcdef" / "0" / "photo.png"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_bytes(b"a user's own file")
    browse.discard_uploads(storage, [*paths, elsewhere, storage / "images"])
    assert not any(path.exists() for path in paths) and not (storage / browse.UPLOADS_DIR / paths[0].parts[-3]).exists()
    assert elsewhere.is_file() and (storage / "images").is_dir()  # only upload folders are removed

    counts = report["counts"]
    assert (counts["accepted"], counts["duplicates"], counts["rejected"]) == (3, 1, 1)
    assert report["rejected"][0]["name"] == "notes.jpg" and "not an image" in report["rejected"][0]["reason"].lower()
    assert browse.last_report(storage, "Uploads") == report
    assert browse.last_report(storage, "Other") is None
    assert list(browse.report_tables(report)) == ["accepted", "duplicates", "rejected"]
    with session_scope(engine) as session:
        sources = set(session.scalars(select(Image.source)))
    assert sources == {"upload"}


def test_thumbnail_is_small_oriented_and_survives_a_broken_file(tmp_path: Path):
    pixels = np.zeros((300, 600, 3), np.uint8)  # stored 600 wide, 300 high
    pixels[:, :300] = (255, 0, 0)  # left half red
    exif = PILImage.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display: 300 wide, 600 high, red on top
    path = tmp_path / "rotated.jpg"
    PILImage.fromarray(pixels).save(path, "JPEG", quality=95, exif=exif)

    thumb = PILImage.open(io.BytesIO(browse.thumbnail(path, 160)))
    assert thumb.format == "JPEG" and thumb.size == (80, 160)
    top, bottom = np.asarray(thumb)[10, 40], np.asarray(thumb)[150, 40]
    assert top[0] > 200 and top[1] < 60 and bottom.max() < 60

    boxed = np.asarray(PILImage.open(io.BytesIO(browse.thumbnail(path, 160, [((0, 300, 300, 600), 1)]))))
    assert tuple(boxed[120, 1]) != tuple(np.asarray(thumb)[120, 1])  # the box's left edge is drawn at x 0

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    assert PILImage.open(io.BytesIO(browse.thumbnail(broken, 64))).size == (64, 64)


def test_version_rows_and_export_zip(settings):
    service.starter(settings)
    service.freeze(STARTER_NAME, "v1", (0.75, 0.25), seed=1, settings=settings)
    service.freeze(STARTER_NAME, "v2", (0.6, 0.2, 0.2), seed=2, settings=settings)
    engine, storage = service.open_store(settings)
    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == STARTER_NAME))
        rows = browse.version_rows(session, project)
    assert [row["version"] for row in rows] == ["v2", "v1"]
    v2 = rows[0]
    assert v2["fractions"] == "0.6/0.2/0.2" and v2["seed"] == 2 and v2["classes"] == 3
    assert v2["train images"] + v2["val images"] + v2["test images"] == v2["images"] == 64
    assert rows[1]["test images"] == 0 and rows[1]["fractions"] == "0.75/0.25"

    folder = browse.fresh_export_folder(storage, STARTER_NAME, "v1", "yolo")
    service.export(STARTER_NAME, "v1", "yolo", folder, settings=settings)
    archive = browse.zip_folder(folder)
    with zipfile.ZipFile(archive) as zipped:
        names = zipped.namelist()
    assert f"{folder.name}/data.yaml" in names
    assert sum(name.endswith(".txt") for name in names) == sum(name.endswith(".png") for name in names) == 64
    assert not list(archive.parent.glob(".*"))  # no temporary zip left


def test_augmentation_preview_uses_the_training_pipeline(starter):
    session, storage, project = starter
    card = browse.query_images(session, storage, project, page_size=1).cards[0]
    options = browse.PreviewOptions(count=3, imgsz=128, seed=5, mosaic=False)
    samples = browse.augmentation_preview(session, storage, project, card.id, options)
    assert len(samples) == 3 and all(sample.shape == (128, 128, 3) and sample.dtype == np.uint8 for sample in samples)
    again = browse.augmentation_preview(session, storage, project, card.id, options)
    assert all(np.array_equal(first, second) for first, second in zip(samples, again))  # seeded
    other = browse.augmentation_preview(session, storage, project, card.id, browse.PreviewOptions(3, 128, 6, False))
    assert not all(np.array_equal(first, second) for first, second in zip(samples, other))
    with pytest.raises(browse.BrowseError, match="has no image 99999"):
        browse.augmentation_preview(session, storage, project, 99999, options)
