"""What the Datasets page shows and does, without a screen: paged image queries with filters, server-side thumbnails,
upload import with a kept report, the versions table, export zips and the augmentation preview.

Boxes: xyxy in original-image pixels after EXIF orientation (x2/y2 the right/bottom pixel edges), as the store
keeps them (`backend.store.models.Annotation`); thumbnails scale them into thumbnail pixels; the augmentation
preview returns images with boxes drawn in training-input pixels (`backend.data.loader.render_augmented_samples`).
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import uuid
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw
from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql import Select

from backend.files import atomic_write_text, fit_name
from backend.ingest.importer import ImportReport, import_paths
from backend.palette import palette_rgb
from backend.processing import load_image
from backend.store.models import (
    GROUND_TRUTH_SOURCES,
    Annotation,
    DatasetVersion,
    Image,
    Project,
    ProjectClass,
    get_or_create_project,
    project_classes,
)
from backend.store.versions import safe_name

PAGE_SIZE = 24
CAPTION_NAME_CHARS = 40  # longer original names are shortened in captions
THUMBNAIL_SIZE = 160
CURRENT_STATUSES = ("ok", "near_duplicate")  # what the grid, class_stats and freeze count as the project's images
IMAGE_FILTERS = ("all", "class", "unlabeled", "duplicates")
SYNC_IMPORT_BYTES = 25 * 1024**2  # larger uploads are imported by a job in the worker: a page never blocks long
UPLOADS_DIR = "uploads"  # under storage: uploads waiting for (or being read by) an import
EXPORTS_DIR = "exports"  # under storage: exported versions and their zips
REPORTS_DIR = "reports"  # under uploads/: the last import report of each project


class BrowseError(ValueError):
    """A request the Datasets page cannot meet (an unknown image or filter); the message says what to do."""


# ----------------------------------------------------------------------------------------------------------------
# The image grid
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFilter:
    """Which of a project's images the grid shows.

    Attributes:
        kind: "all"; "class" (images with at least one ground-truth box of `class_name`); "unlabeled" (no person
            has labeled it: not marked labeled and no ground-truth box, what a freeze leaves out); "duplicates"
            (images in a near-duplicate group, the group's first image included, groups kept together).
        class_name: the class, for kind "class".
    """

    kind: str = "all"
    class_name: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in IMAGE_FILTERS:
            raise BrowseError(f"unknown image filter {self.kind!r}: use one of {', '.join(IMAGE_FILTERS)}")
        if self.kind == "class" and not self.class_name:
            raise BrowseError("the class filter needs a class name")


@dataclass(frozen=True)
class ImageCard:
    """One image of the grid.

    Attributes:
        boxes: ground-truth boxes as (xyxy original-image pixels after EXIF orientation, class index).
    """

    id: int
    path: Path
    original_name: str | None
    width: int
    height: int
    size_bytes: int
    source: str
    status: str
    labeled: bool
    near_group: int | None
    duplicate_of_id: int | None
    boxes: tuple[tuple[tuple[float, float, float, float], int], ...] = ()

    @property
    def name(self) -> str:
        return self.original_name or f"image {self.id}"

    @property
    def caption(self) -> str:
        """One line: name, pixel size, label state (and near-duplicate link)."""
        name = self.name
        if len(name) > CAPTION_NAME_CHARS:  # keep the file name: archive and folder prefixes are the long part
            name = "…/" + name.replace("\\", "/").rsplit("/", 1)[-1]
        if len(name) > CAPTION_NAME_CHARS:
            half = CAPTION_NAME_CHARS // 2 - 1
            name = name[:half] + "…" + name[-half:]
        if self.boxes:
            label = f"{len(self.boxes)} box" + ("es" if len(self.boxes) != 1 else "")
        else:
            label = "no boxes" if self.labeled else "unlabeled"
        text = f"{name} · {self.width}×{self.height} · {label}"
        if self.status == "near_duplicate" and self.duplicate_of_id is not None:
            text += f" · near #{self.duplicate_of_id}"
        return text


@dataclass(frozen=True)
class ImagePage:
    """One page of the grid: `page` is 1-based, `pages` at least 1 (an empty result has one empty page)."""

    cards: list[ImageCard]
    page: int
    pages: int
    total: int
    page_size: int

    @property
    def first(self) -> int:
        """1-based position of the first card of the page in the whole result (0 when empty)."""
        return (self.page - 1) * self.page_size + 1 if self.cards else 0


def _has_ground_truth() -> Any:
    return exists().where(Annotation.image_id == Image.id, Annotation.source.in_(GROUND_TRUTH_SOURCES))


def _filtered(session: Session, project: Project, image_filter: ImageFilter) -> Select:
    query = select(Image).where(Image.project_id == project.id, Image.status.in_(CURRENT_STATUSES))
    if image_filter.kind == "class":
        class_id = session.scalar(
            select(ProjectClass.id).where(
                ProjectClass.project_id == project.id, ProjectClass.name == image_filter.class_name
            )
        )
        if class_id is None:
            raise BrowseError(f"project {project.name!r} has no class {image_filter.class_name!r}")
        query = query.where(
            exists().where(
                Annotation.image_id == Image.id,
                Annotation.class_id == class_id,
                Annotation.source.in_(GROUND_TRUTH_SOURCES),
            )
        )
    elif image_filter.kind == "unlabeled":
        query = query.where(Image.labeled.is_(False), ~_has_ground_truth())
    elif image_filter.kind == "duplicates":
        return query.where(Image.near_group.is_not(None)).order_by(Image.near_group, Image.id)
    return query.order_by(Image.id)


def count_images(session: Session, project: Project, image_filter: ImageFilter | None = None) -> int:
    """How many of the project's current images pass `image_filter` (all when None)."""
    query = _filtered(session, project, image_filter or ImageFilter())
    return int(session.scalar(select(func.count()).select_from(query.order_by(None).subquery())) or 0)


def query_images(
    session: Session,
    storage: Path,
    project: Project,
    image_filter: ImageFilter | None = None,
    page: int = 1,
    page_size: int = PAGE_SIZE,
) -> ImagePage:
    """One page of the project's current images (status ok or near_duplicate) that pass `image_filter`.

    Args:
        session: an open session.
        storage: the storage folder (cards carry absolute paths).
        project: the project.
        image_filter: which images; None for all.
        page: 1-based; clamped into 1..pages, so a page past the end (after a filter change) shows the last one.
        page_size: cards per page, at least 1.

    Returns:
        The page; ordered by image id (duplicates: by near group, then id), each card with its ground-truth boxes.
    """
    if page_size < 1:
        raise BrowseError(f"page size must be at least 1, got {page_size}")
    image_filter = image_filter or ImageFilter()
    total = count_images(session, project, image_filter)
    pages = max(1, math.ceil(total / page_size))
    page = min(max(int(page), 1), pages)
    query = _filtered(session, project, image_filter).offset((page - 1) * page_size).limit(page_size)
    images = list(session.scalars(query))
    boxes = _boxes_by_image(session, project, [image.id for image in images])
    cards = [
        ImageCard(
            id=image.id,
            path=storage / image.path,
            original_name=image.original_name,
            width=image.width,
            height=image.height,
            size_bytes=image.size_bytes,
            source=image.source,
            status=image.status,
            labeled=bool(image.labeled),
            near_group=image.near_group,
            duplicate_of_id=image.duplicate_of_id,
            boxes=tuple(boxes.get(image.id, ())),
        )
        for image in images
    ]
    return ImagePage(cards, page, pages, total, page_size)


def image_card(session: Session, storage: Path, project: Project, image_id: int) -> ImageCard:
    """The card of one image of the project (for the augmentation preview's picker)."""
    image = session.get(Image, int(image_id))
    if image is None or image.project_id != project.id:
        raise BrowseError(f"project {project.name!r} has no image {image_id}")
    boxes = _boxes_by_image(session, project, [image.id]).get(image.id, [])
    return ImageCard(
        image.id,
        storage / image.path,
        image.original_name,
        image.width,
        image.height,
        image.size_bytes,
        image.source,
        image.status,
        bool(image.labeled),
        image.near_group,
        image.duplicate_of_id,
        tuple(boxes),
    )


def _boxes_by_image(
    session: Session, project: Project, image_ids: Sequence[int]
) -> dict[int, list[tuple[tuple[float, float, float, float], int]]]:
    """{image id: [(xyxy original-image pixels, class index)]} of ground-truth boxes, in annotation order."""
    if not image_ids:
        return {}
    rows = session.execute(
        select(Annotation.image_id, Annotation.x1, Annotation.y1, Annotation.x2, Annotation.y2, ProjectClass.index)
        .join(ProjectClass, ProjectClass.id == Annotation.class_id)
        .where(Annotation.image_id.in_(list(image_ids)), Annotation.source.in_(GROUND_TRUTH_SOURCES))
        .order_by(Annotation.id)
    )
    boxes: dict[int, list[tuple[tuple[float, float, float, float], int]]] = {}
    for image_id, x1, y1, x2, y2, label in rows:
        boxes.setdefault(image_id, []).append(((float(x1), float(y1), float(x2), float(y2)), int(label)))
    return boxes


def class_names(session: Session, project: Project) -> list[str]:
    """The project's class names in index order."""
    return [project_class.name for project_class in project_classes(session, project)]


# ----------------------------------------------------------------------------------------------------------------
# Thumbnails
# ----------------------------------------------------------------------------------------------------------------


def thumbnail(
    path: str | Path,
    size: int = THUMBNAIL_SIZE,
    boxes: Iterable[tuple[Sequence[float], int]] = (),
) -> bytes:
    """A JPEG thumbnail whose longer side is at most `size`, EXIF orientation applied, boxes outlined.

    Large JPEGs are decoded at a reduced scale (Pillow's draft mode), so a 4000x3000 photo costs a few ms.

    Args:
        path: the image file.
        size: the longest side of the thumbnail in pixels.
        boxes: (xyxy in original-image pixels after EXIF orientation, class index) to outline.

    Returns:
        The encoded JPEG; an unreadable file gives a grey placeholder (the grid keeps going).
    """
    try:
        with PILImage.open(path) as opened:
            width, height = _oriented_size(opened)
            # draft() keeps the decoded size >= the request, so the result still covers `size` after orientation
            opened.draft("RGB", (size, size))
            pixels = load_image(opened, name=str(path))
    except Exception:  # one broken file must not break the grid; the placeholder shows it is broken
        picture = PILImage.new("RGB", (size, size), (128, 128, 128))
        ImageDraw.Draw(picture).line([(0, 0), (size, size)], fill=(200, 60, 60), width=3)
        return _jpeg(picture)
    picture = PILImage.fromarray(pixels)
    picture.thumbnail((size, size), PILImage.Resampling.LANCZOS)
    boxes = list(boxes)
    if boxes:
        draw = ImageDraw.Draw(picture)
        scale_x, scale_y = picture.width / max(width, 1), picture.height / max(height, 1)
        for (x1, y1, x2, y2), label in boxes:
            outline = palette_rgb(int(label))
            draw.rectangle(
                [x1 * scale_x, y1 * scale_y, max(x2 * scale_x - 1, x1 * scale_x), max(y2 * scale_y - 1, y1 * scale_y)],
                outline=outline,
                width=2,
            )
    return _jpeg(picture)


def _oriented_size(opened: PILImage.Image) -> tuple[int, int]:
    """(width, height) of an opened image after its EXIF orientation (5-8 swap the sides)."""
    orientation = opened.getexif().get(0x0112, 1)
    return (opened.height, opened.width) if orientation in (5, 6, 7, 8) else (opened.width, opened.height)


def _jpeg(picture: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Uploads and the import report
# ----------------------------------------------------------------------------------------------------------------


def save_uploads(storage: Path, files: Iterable[tuple[str, bytes]]) -> list[Path]:
    """Writes uploaded files under `storage/uploads/<random>/<n>/<original name>` (one folder per file, so two
    uploads with the same name never collide and the import report shows the names the user chose).

    Args:
        storage: the storage folder.
        files: (file name as uploaded, content); only the name's last path part is kept, cut to 255 bytes with
            its extension (`backend.files.fit_name`: a browser sends names the file system would refuse).

    Returns:
        The written paths, in order. The caller removes their folder (`discard_uploads`) once imported.
    """
    batch = storage / UPLOADS_DIR / uuid.uuid4().hex
    paths = []
    for number, (name, data) in enumerate(files):
        target = batch / str(number) / fit_name(str(name), f"upload_{number}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        paths.append(target)
    return paths


def discard_uploads(storage: Path, paths: Sequence[str | Path]) -> None:
    """Removes the upload folders `save_uploads` made for `paths`; any other path is left alone (job parameters
    may name a user's own folders)."""
    uploads = (Path(storage) / UPLOADS_DIR).resolve()
    for path in paths:
        folder = Path(path).resolve().parent.parent
        if folder.parent == uploads and re.fullmatch(r"[0-9a-f]{32}", folder.name):
            shutil.rmtree(folder, ignore_errors=True)


def import_uploads(session: Session, storage: Path, project_name: str, paths: Sequence[Path]) -> dict[str, Any]:
    """Imports uploaded files (images, zips, labeled datasets in a zip) into the project (created if missing) as
    source "upload", and keeps the report as the project's last import report (`last_report`).

    The caller commits. Returns the report as `ImportReport.to_dict()` plus "project".
    """
    project = get_or_create_project(session, project_name)
    report: ImportReport = import_paths(session, storage, project, list(paths), source="upload")
    result = {"project": project.name, **report.to_dict()}
    save_report(storage, project.name, result)
    return result


def _report_path(storage: Path, project_name: str) -> Path:
    return storage / UPLOADS_DIR / REPORTS_DIR / f"{safe_name(project_name, 'project')}.json"


def save_report(storage: Path, project_name: str, report: dict[str, Any]) -> None:
    """Keeps `report` (an import report dict) as the project's last import report."""
    atomic_write_text(_report_path(storage, project_name), json.dumps(report, ensure_ascii=False, indent=1))


def last_report(storage: Path, project_name: str) -> dict[str, Any] | None:
    """The project's last import report kept by `save_report`, or None."""
    path = _report_path(storage, project_name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


REPORT_TABLES = ("accepted", "duplicates", "near_duplicates", "rejected", "skipped")


def report_tables(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The non-empty lists of an import report by name ("accepted", ..., "skipped"), rows ready for a table."""
    return {name: list(report.get(name) or []) for name in REPORT_TABLES if report.get(name)}


# ----------------------------------------------------------------------------------------------------------------
# Versions and exports
# ----------------------------------------------------------------------------------------------------------------


def version_rows(session: Session, project: Project) -> list[dict[str, Any]]:
    """One row per frozen version of the project, newest first: name, created, seed, fractions, images and boxes
    per split and in total, classes."""
    rows = []
    versions = session.scalars(
        select(DatasetVersion).where(DatasetVersion.project_id == project.id).order_by(DatasetVersion.id.desc())
    )
    for version in versions:
        counts = version.counts or {}
        splits = counts.get("splits", {})
        row: dict[str, Any] = {
            "version": version.name,
            "created": version.created_at,
            "seed": version.seed,
            "fractions": "/".join(
                f"{value:g}" for value in (version.train_fraction, version.val_fraction, version.test_fraction) if value
            ),
        }
        for split in ("train", "val", "test"):
            row[f"{split} images"] = splits.get(split, {}).get("images", 0)
            row[f"{split} boxes"] = splits.get(split, {}).get("boxes", 0)
        row["images"] = sum(split.get("images", 0) for split in splits.values())
        row["boxes"] = sum(split.get("boxes", 0) for split in splits.values())
        row["classes"] = len(counts.get("classes", []))
        rows.append(row)
    return rows


def export_folder(storage: Path, project_name: str, version: str, fmt: str) -> Path:
    """Where an export of a version goes: storage/exports/<project>/<version>-<fmt>/ (emptied first by the caller
    through `fresh_export_folder`)."""
    return storage / EXPORTS_DIR / safe_name(project_name, "project") / f"{safe_name(version, 'version')}-{fmt}"


def fresh_export_folder(storage: Path, project_name: str, version: str, fmt: str) -> Path:
    """`export_folder`, emptied (a version never changes, but an interrupted export may have left files)."""
    folder = export_folder(storage, project_name, version, fmt)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def zip_folder(folder: Path, zip_path: Path | None = None) -> Path:
    """Zips `folder` (its content at the archive root, one folder named after it) to `zip_path`
    (default: `<folder>.zip`), written under a temporary name first so a half-written zip is never offered.

    Images are stored, not deflated: JPEG/PNG do not shrink, and storing is much faster.
    """
    folder = Path(folder)
    zip_path = Path(zip_path) if zip_path else folder.with_suffix(".zip")
    temporary = zip_path.with_name(f".{zip_path.name}.{uuid.uuid4().hex[:8]}")
    try:
        with zipfile.ZipFile(temporary, "w") as archive:
            for path in sorted(folder.rglob("*")):
                if not path.is_file():
                    continue
                arcname = Path(folder.name) / path.relative_to(folder)
                text = path.suffix.lower() in (".json", ".txt", ".yaml")
                archive.write(path, arcname.as_posix(), zipfile.ZIP_DEFLATED if text else zipfile.ZIP_STORED)
        temporary.replace(zip_path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return zip_path


# ----------------------------------------------------------------------------------------------------------------
# Augmentation preview
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreviewOptions:
    """The augmentation preview's settings.

    Attributes:
        count: how many samples.
        imgsz: the training input size (a multiple of 32).
        seed: a different seed shows different samples.
        mosaic: False shows single-image samples (mosaic probability 0); the rest of the pipeline is the default.
    """

    count: int = 8
    imgsz: int = 320
    seed: int = 0
    mosaic: bool = True


def augmentation_preview(
    session: Session, storage: Path, project: Project, image_id: int, options: PreviewOptions | None = None
) -> list[np.ndarray]:
    """Training samples made from one image by the default training augmentation (`backend.data.augment`), boxes
    and class names drawn, through `backend.data.loader.render_augmented_samples` (the dataset's own code path).

    The preview has one image, so a mosaic's four tiles are all this image (in training they are four images).

    Returns:
        `options.count` (imgsz, imgsz, 3) uint8 RGB images; boxes drawn in training-input pixels.
    """
    from backend.data.augment import default_pipeline  # deferred: the loader imports torch
    from backend.data.loader import render_augmented_samples
    from backend.data.records import ImageRecord

    options = options or PreviewOptions()
    card = image_card(session, storage, project, image_id)
    names = class_names(session, project)
    record = ImageRecord(
        card.path,
        card.id,
        card.width,
        card.height,
        np.asarray([box for box, _ in card.boxes], dtype=np.float32).reshape(-1, 4),
        np.asarray([label for _, label in card.boxes], dtype=np.int64),
    )
    pipeline = default_pipeline(options.imgsz, mosaic_prob=1.0 if options.mosaic else 0.0)
    return render_augmented_samples([record], names, options.imgsz, options.count, pipeline, options.seed)


def version_augmentation_preview(
    folder: str | Path, pipeline: dict[str, Any] | None, imgsz: int, count: int = 8, seed: int = 0
) -> list[np.ndarray]:
    """Training samples of a dataset version's train split through an augmentation pipeline, boxes and class names
    drawn (`backend.data.loader.render_augmented_samples`, the training dataset's own code path).

    Args:
        folder: the version's dataset folder.
        pipeline: the pipeline in `A.to_dict` form (checked: `backend.data.augment.pipeline_from_dict`); None the
            default one.
        imgsz: the training input size.
        count: how many samples.
        seed: a different seed shows different samples.

    Returns:
        `count` (imgsz, imgsz, 3) uint8 RGB images; boxes drawn in training-input pixels.

    Raises:
        AugmentationError: the pipeline cannot augment imgsz x imgsz training samples.
        DatasetError: the folder holds no readable train split.
    """
    from backend.data.augment import training_pipeline  # deferred: the loader imports torch
    from backend.data.folders import load_dataset
    from backend.data.loader import render_augmented_samples

    train_set = load_dataset(folder)["train"]
    augment = training_pipeline(pipeline, imgsz)
    return render_augmented_samples(train_set.records, train_set.class_names, imgsz, count, augment, seed)
