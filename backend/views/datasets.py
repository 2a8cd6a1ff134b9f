"""The Datasets page's data: the project's grid, statistics and versions, upload imports (small ones here, large
ones by a job), crawl jobs, freezes and exports, each one call that opens its own database session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from sqlalchemy import select

from backend import browse
from backend.ingest import service
from backend.jobs import api as jobs_api
from backend.jobs.api import JobView
from backend.settings import Settings
from backend.store.db import describe_error, session_scope, shared_engine
from backend.store.models import Project
from backend.store.versions import class_stats

IMPORT_COUNTS = ("accepted", "duplicates", "near_duplicates", "rejected", "skipped", "annotations", "classes_added")
CRAWL_MODES = ("Search", "Image URLs", "Page")
# The SSRF refusal's advice in this page's words: it has no switch for private addresses (the CLI's flag).
CRAWL_PRIVATE_HINT = (
    "the Datasets page crawls public addresses only: to add images from your own network, save them and drop them on "
    "the upload box above"
)


@dataclass
class ProjectData:
    """A project as the page's sections need it; `project` is None while it has no row (no image yet)."""

    project: Project | None
    classes: list[str]
    stats: dict[str, Any] | None


def project_data(settings: Settings, name: str) -> ProjectData:
    with session_scope(shared_engine(settings.database_url)) as session:
        project = session.scalar(select(Project).where(Project.name == name))
        if project is None:
            return ProjectData(None, [], None)
        return ProjectData(project, browse.class_names(session, project), class_stats(session, project))


def import_files(settings: Settings, project: str, files: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Imports uploaded (name, bytes) files into `project`: at once when small, by an import job when their total is
    over `browse.SYNC_IMPORT_BYTES`. Returns {"outcome": (level, text)} and "report" (imported here) or "job_id"."""
    if not files:
        return {"outcome": ("error", "Choose or drop files first.")}
    if not service.project_exists(project, settings=settings):  # e.g. renamed or removed in another tab
        text = f"There is no project {project!r} any more: pick one above, or create it with its classes on the "
        text += "Project page."
        return {"outcome": ("error", text)}
    total = sum(len(data) for _, data in files)
    paths = browse.save_uploads(settings.storage, files)
    try:
        if total > browse.SYNC_IMPORT_BYTES:
            params = {"project": project, "paths": [str(path) for path in paths]}
            job_id = jobs_api.submit("import", params, settings=settings)
            text = f"{len(files)} files ({total / 1024**2:.0f} MB) queued as job #{job_id}: the worker imports them."
            return {"outcome": ("info", text), "job_id": job_id}
        with session_scope(shared_engine(settings.database_url), write=True) as session:
            report = browse.import_uploads(session, settings.storage, project, paths)
        browse.discard_uploads(settings.storage, paths)
        return {"outcome": service.import_outcome(report), "report": report}
    except Exception:
        browse.discard_uploads(settings.storage, paths)
        raise


def report_counts(report: dict[str, Any]) -> dict[str, int]:
    """The import report's figures, by their label on the page."""
    counts = report.get("counts", {})
    return {name.replace("_", " "): counts.get(name, 0) for name in IMPORT_COUNTS}


def crawl_params(project: str, mode: str, text: str, limit: int, depth: int) -> dict[str, Any]:
    """The crawl job's parameters from the form: a search, image URLs (one a line) or a page and its link depth."""
    text = text.strip()
    if not text:
        raise ValueError("Type a search, some image URLs or a page URL first.")
    params: dict[str, Any] = {
        "project": project,
        "limit": int(limit),
        "crawl_settings": {"private_hint": CRAWL_PRIVATE_HINT},
    }
    if mode == "Search":
        return params | {"query": text}
    if mode == "Image URLs":
        return params | {"urls": [line.strip() for line in text.splitlines() if line.strip()]}
    return params | {"page": text, "depth": int(depth)}


def queue_crawl(
    settings: Settings, project: str, mode: str, text: str, limit: int, depth: int
) -> tuple[int | None, str | None]:
    """Queues one crawl job from the form. Returns (its id, None), or (None, what to do) when nothing was typed or the
    queue refused it: the page shows that text and keeps the form."""
    try:
        params = crawl_params(project, mode, text, limit, depth)
    except ValueError as error:  # nothing typed
        return None, str(error)
    try:
        return jobs_api.submit("crawl", params, settings=settings), None
    except Exception as error:  # shown on the page, which keeps working
        return None, f"Could not queue the crawl: {describe_error(error)}"


def crawl_figures(result: dict[str, Any]) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """A crawl job's result: its figures by label, and the skipped and refused URLs as table rows."""
    stored = result.get("stored", {})
    figures = {
        "kept": result.get("kept", 0),
        "stored": stored.get("accepted", 0) + stored.get("near_duplicate", 0),
        "duplicates": stored.get("duplicate", 0),
        "skipped": len(result.get("skipped", [])),
        "refused": len(result.get("rejected", [])),
        "pages": len(result.get("pages_visited", [])),
    }
    refusals = [{"what": "skipped", **row} for row in result.get("skipped", [])]
    refusals += [{"what": "refused", **row} for row in result.get("rejected", [])]
    return figures, refusals


def finish_import_job(settings: Settings, job: JobView) -> None:
    """Once an import job has ended: its report becomes the project's last report, its uploads go."""
    if job.result:
        browse.save_report(settings.storage, job.result.get("project", job.project or ""), job.result)
    browse.discard_uploads(settings.storage, job.params.get("paths", []))


def image_page(settings: Settings, project: Project, kind: str, class_name: str | None, page: int) -> browse.ImagePage:
    """The grid's page (clamped to the pages there are) of the project's images under one filter."""
    image_filter = browse.ImageFilter("class", class_name) if kind == "class" and class_name else None
    image_filter = image_filter or browse.ImageFilter("all" if kind in ("class", "rejected") else kind)
    with session_scope(shared_engine(settings.database_url)) as session:
        total = browse.count_images(session, project, image_filter)
        page = min(max(page, 1), max(1, -(-total // browse.PAGE_SIZE)))
        return browse.query_images(session, settings.storage, project, image_filter, page)


def modification_times(cards: list[browse.ImageCard]) -> dict[int, int]:
    """Each card's file modification time in ns (-1 when the file is gone): the thumbnail cache's key, so an image
    changed on disk is drawn again."""
    return {card.id: card.path.stat().st_mtime_ns if card.path.exists() else -1 for card in cards}


def stats_figures(stats: dict[str, Any]) -> dict[str, int]:
    """The class statistics' three figures by label."""
    return {"images": stats["images"], "boxes": stats["boxes"], "images without boxes": stats["images_without_boxes"]}


def class_figures(stats: dict[str, Any]) -> tuple[go.Figure, go.Figure] | None:
    """The per-class bars (images and boxes) and the box-size histogram; None when the project has no class."""
    if not stats["classes"]:
        return None
    names = [row["name"] for row in stats["classes"]]  # plain lists: plotly would ship pandas columns as binary
    per_class = go.Figure(
        [
            go.Bar(x=names, y=[row["images"] for row in stats["classes"]], name="images"),
            go.Bar(x=names, y=[row["boxes"] for row in stats["classes"]], name="boxes"),
        ]
    )
    per_class.update_layout(title="Images and boxes per class", barmode="group", height=340, margin={"t": 40})
    sizes = go.Figure(
        [go.Bar(x=stats["box_size_bins"], y=counts, name=name) for name, counts in stats["box_size_histogram"].items()]
    )
    sizes.update_layout(title="Box size (√area, pixels)", barmode="stack", height=340, margin={"t": 40})
    return per_class, sizes


def augmentation_samples(
    settings: Settings, project: Project, image_id: int, options: browse.PreviewOptions
) -> list[Any]:
    with session_scope(shared_engine(settings.database_url)) as session:
        return browse.augmentation_preview(session, settings.storage, project, image_id, options)


def versions(settings: Settings, project: Project) -> tuple[list[dict[str, Any]], str]:
    """The project's frozen versions as table rows (newest first) and the next free version name."""
    with session_scope(shared_engine(settings.database_url)) as session:
        rows = browse.version_rows(session, project)
    return rows, service.next_version_name([row["version"] for row in rows])


def freeze(settings: Settings, project: str, name: str, val: float, test: float, seed: int) -> dict[str, Any]:
    """Freezes a version with validation (and test) shares; "summary" counts each split."""
    fractions = (round(1 - val - test, 6), val, test) if test > 0 else (round(1 - val, 6), val)
    result = service.freeze(project, name.strip(), fractions, int(seed), settings=settings)
    splits = ", ".join(
        f"{split} {value['images']} images/{value['boxes']} boxes"
        for split, value in result["counts"]["splits"].items()
    )
    return result | {"summary": f"version {name.strip()}: {splits}"}


def export_zip(settings: Settings, project: str, version: str, fmt: str) -> dict[str, Any]:
    """Exports a version (COCO or YOLO) to a fresh folder and zips it; "archive" is the zip's path."""
    folder = browse.fresh_export_folder(settings.storage, project, version, fmt)
    service.export(project, version, fmt, folder, settings=settings)
    archive = browse.zip_folder(folder)
    return {"archive": str(archive), "summary": f"{archive.name}, {archive.stat().st_size / 1024**2:.1f} MB"}


def last_rejected(settings: Settings, project: str) -> tuple[list[dict[str, Any]], bool]:
    """The rejected files of the last import into the project, and whether there was an import."""
    report = browse.last_report(settings.storage, project) or {}
    return list(report.get("rejected") or []), bool(report)


def archive_path(value: str | None) -> Path | None:
    path = Path(value) if value else None
    return path if path is not None and path.is_file() else None


REJECTED_CAPTION = (
    "Rejected files are not stored, so they are not in the grid: this is the rejected list of the last import into "
    "this project."
)
AUGMENT_CAPTION = (
    "The training augmentation (mosaic → scale/translate → HSV → flip). With one image, the mosaic's four tiles are "
    "all this image; in training they are four images."
)
NO_CLASSES = (
    "No classes yet: add them on the [Project](/project) page, then label images on the Label page (or import a "
    "labeled dataset)."
)
