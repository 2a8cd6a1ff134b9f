"""Project, class, ingest and dataset-version operations by project name, each in its own transaction, with
JSON-ready results.

These are what the CLI (`yolodex project|classes|import|crawl|dataset`), the pages and the background jobs call:
plain arguments in, a dict out (with a "summary" sentence where a person reads it), the store opened from the
settings (`YOLODEX_STORAGE`, `YOLODEX_DATABASE_URL`). The class rules live in `backend.store.classes`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from backend.ingest.crawl import CrawledImage, CrawlSettings, crawl_page, crawl_search, crawl_urls
from backend.ingest.importer import import_paths
from backend.ingest.providers import DuckDuckGoImages, SearchError
from backend.ingest.starter import create_starter_project
from backend.settings import Settings, get_settings
from backend.store import classes as class_store
from backend.store.db import DiskFullError, full_disk_message, session_scope, shared_engine
from backend.store.images import add_image_bytes
from backend.store.models import DatasetVersion, Project, get_or_create_project
from backend.store.versions import class_stats, export_coco, export_yolo, freeze_version, version_folder

DEFAULT_PROJECT = "My Pokédex"


class StoreError(ValueError):
    """A project or dataset version that does not exist, or a request that cannot be met; says what to do."""


def open_store(settings: Settings | None = None) -> tuple[Engine, Path]:
    """The metadata database (migrated to the latest schema; this process's one engine for it) and the storage folder
    of `settings`."""
    settings = settings or get_settings()
    settings.ensure_dirs()
    return shared_engine(settings.database_url), settings.storage


def import_into(
    paths: Sequence[str | Path],
    project: str = DEFAULT_PROJECT,
    settings: Settings | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Imports files, folders, zips and labeled COCO/YOLO datasets into `project` (created if missing);
    `on_progress(files handled, total)` as in `importer.import_paths`."""
    engine, storage = open_store(settings)
    with session_scope(engine, write=True) as session:
        target = get_or_create_project(session, project)
        report = import_paths(session, storage, target, list(paths), on_progress=on_progress)
        return {"project": target.name, **report.to_dict()}


def crawl_into(
    *,
    project: str = DEFAULT_PROJECT,
    query: str | None = None,
    limit: int = 50,
    urls: Sequence[str] | None = None,
    page: str | None = None,
    depth: int = 1,
    crawl_settings: CrawlSettings | None = None,
    provider: Any = None,
    settings: Settings | None = None,
    stop_requested: Callable[[], bool] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Crawls images (a keyword search, a list of URLs or a page) into `project`; each kept image goes through the
    same checks and dedupe as an upload and keeps its source URL, page URL and licence hint.

    Each kept image is committed in a transaction of its own, opened after its download: no transaction stays open
    across network I/O, so a slow server never blocks another writer, and a crawl killed midway keeps what it had
    stored. Exactly one of `query`, `urls` and `page` must be given; `stop_requested` (a job's cancel
    flag) ends the crawl early, within about a second even during a download. `on_progress(done, total)`: as the
    crawl function of the source says (hits, URLs or pages).
    """
    if sum(item is not None for item in (query, urls, page)) != 1:
        raise StoreError("give exactly one of a search query (--query), a URL list (--urls) or a page (--page)")
    crawl_settings = crawl_settings or CrawlSettings()
    engine, storage = open_store(settings)
    added: dict[str, int] = {}
    with session_scope(engine, write=True) as session:
        target = get_or_create_project(session, project)
        project_id, project_name = target.id, target.name

    def keep(image: CrawledImage) -> None:
        try:
            with session_scope(engine, write=True) as session:
                result = add_image_bytes(
                    session,
                    storage,
                    session.get_one(Project, project_id),
                    image.data,
                    source="crawl",
                    original_name=image.original_name,
                    source_url=image.source_url,
                    page_url=image.page_url,
                    licence_hint=image.licence_hint,
                )
        except DiskFullError as error:  # ends the crawl (see crawl.py); the images committed before stay
            error_line = full_disk_message(error, storage)
            stored = added.get("accepted", 0)
            raise DiskFullError(
                f"{error_line}; the crawl stopped there and kept the {stored} image{'' if stored == 1 else 's'} "
                f"it had stored in {project_name}"
            ) from error
        added[result.status] = added.get(result.status, 0) + 1

    if query is not None:
        provider = provider or DuckDuckGoImages()
        try:
            report = crawl_search(query, limit, provider, crawl_settings, keep, stop_requested, on_progress)
        except SearchError as error:
            raise StoreError(
                f"the image search failed ({error}); check the internet connection or use --urls"
            ) from error
    elif urls is not None:
        report = crawl_urls(urls, crawl_settings, keep, stop_requested, on_progress)
    else:
        assert page is not None  # exactly one of query, urls and page was checked above
        report = crawl_page(page, depth, crawl_settings, keep, stop_requested, on_progress)
    return {"project": project_name, "stored": added, **report.to_dict()}


def import_outcome(report: dict[str, Any]) -> tuple[str, str]:
    """(level, sentence) for an import report (`ImportReport.to_dict()` with "project"), from its counts only:
    "success" when images (or boxes for images already there) were stored and nothing was rejected, "warning" when
    some files were rejected (or, with nothing rejected, when nothing was new), "error" when files were rejected and
    nothing was stored."""
    counts = report.get("counts", {})
    stored = counts.get("accepted", 0) + counts.get("near_duplicates", 0)
    rejected, project = counts.get("rejected", 0), report.get("project", "the project")
    details = [f"{rejected} rejected (the report below says why)"] if rejected else []
    if counts.get("near_duplicates"):
        details.append(f"{counts['near_duplicates']} of the added are near duplicates")
    if counts.get("annotations"):
        details.append(f"{counts['annotations']} boxes")
    if counts.get("duplicates"):
        details.append(f"{counts['duplicates']} already there (skipped)")
    if counts.get("skipped"):
        details.append(f"{counts['skipped']} skipped")
    if not stored and counts.get("annotations"):  # a labeled set of images the project already had: their boxes
        boxes = counts["annotations"]
        rest = [detail for detail in details if not detail.endswith((" boxes", "(skipped)"))]
        head = (
            f"Added {boxes} box{'' if boxes == 1 else 'es'} to {counts.get('duplicates', 0)} images {project} "
            "already had (no new image)"
        )
        return ("warning" if rejected else "success"), head + (f"; {', '.join(rest)}." if rest else ".")
    if not stored:
        level = "error" if rejected else "warning"
        head = f"Nothing imported into {project}" if rejected else f"Nothing new imported into {project}"
        return level, f"{head}: {', '.join(details) or 'no image found'}."
    head = f"Added {stored} image{'' if stored == 1 else 's'} to {project}"
    return ("warning" if rejected else "success"), head + (f"; {', '.join(details)}." if details else ".")


def next_version_name(names: Sequence[str]) -> str:
    """The next free "vN" after the highest one among `names` ("v1" when there is none)."""
    numbers = [int(name[1:]) for name in names if name[:1] == "v" and name[1:].isdigit()]
    number = max(numbers, default=0) + 1
    while f"v{number}" in names:
        number += 1
    return f"v{number}"


def freeze(
    project: str, name: str, fractions: Sequence[float] = (0.8, 0.2), seed: int = 0, settings: Settings | None = None
) -> dict:
    """Freezes the project's labeled images into a dataset version; returns its folder (what `yolodex train --data`
    takes) and counts."""
    engine, storage = open_store(settings)
    with session_scope(engine, write=True) as session:
        version = freeze_version(session, storage, _project(session, project), name, fractions, seed)
        return {
            "project": project,
            "version": version.name,
            "folder": str(version_folder(storage, version)),
            "counts": version.counts,
        }


def export(project: str, version: str, fmt: str, out: str | Path, settings: Settings | None = None) -> dict:
    """Exports a version as COCO (train.json, val.json, test.json if the version has a test split, images/) or YOLO
    (images/, labels/, data.yaml) under `out`; "path" in the result is the folder."""
    engine, storage = open_store(settings)
    with session_scope(engine) as session:
        frozen = _version(session, _project(session, project), version)
        if fmt == "coco":
            path = export_coco(storage, frozen, Path(out))
        elif fmt == "yolo":
            path = export_yolo(storage, frozen, Path(out))
        else:
            raise StoreError(f"unknown export format {fmt!r}: use coco or yolo")
        return {"project": project, "version": version, "format": fmt, "path": str(path)}


def stats(project: str, version: str | None = None, settings: Settings | None = None) -> dict:
    """Class statistics (images and boxes per class, box sizes, images without boxes) of a project or a version."""
    engine, _ = open_store(settings)
    with session_scope(engine) as session:
        target = _project(session, project)
        return class_stats(session, _version(session, target, version) if version else target)


def starter(settings: Settings | None = None) -> dict:
    """Creates the Starter Pokédex project if it is not there yet (`make run` calls this)."""
    engine, storage = open_store(settings)
    with session_scope(engine, write=True) as session:
        project, report = create_starter_project(session, storage)
        return {"project": project.name, "created": report is not None, "import": report}


def create_project(name: str, classes: Sequence[str | dict[str, Any]], settings: Settings | None = None) -> dict:
    """Creates a project with its classes (at least one; see `classes.create_project`)."""
    engine, _ = open_store(settings)
    with session_scope(engine, write=True) as session:
        project = class_store.create_project(session, name, classes)
        rows = class_store.class_rows(session, project)
        names = ", ".join(row.name for row in rows)
        return {
            "project": project.name,
            "classes": [row.to_dict() for row in rows],
            "summary": f"created project {project.name!r} with {len(rows)} class{'' if len(rows) == 1 else 'es'}: "
            f"{names}",
        }


def list_classes(project: str, settings: Settings | None = None) -> dict:
    """The project's classes in index order, each with its dex entry and how many boxes use it."""
    engine, _ = open_store(settings)
    with session_scope(engine) as session:
        rows = class_store.class_rows(session, _project(session, project))
        return {"project": project, "classes": [row.to_dict() for row in rows]}


def add_class(
    project: str,
    name: str,
    *,
    dex_number: int | str | None = None,
    description: str = "",
    colour: str | None = None,
    settings: Settings | None = None,
) -> dict:
    """Appends a class to the project."""
    engine, _ = open_store(settings)
    with session_scope(engine, write=True) as session:
        added = class_store.add_class(
            session, _project(session, project), name, dex_number=dex_number, description=description, colour=colour
        )
        return {
            "project": project,
            "class": added.name,
            "index": added.index,
            "summary": f"added class {added.name!r} to {project} (index {added.index})",
        }


def rename_class(project: str, old_name: str, new_name: str, settings: Settings | None = None) -> dict:
    """Renames a class; its boxes and dex entry stay with it."""
    engine, _ = open_store(settings)
    with session_scope(engine, write=True) as session:
        renamed = class_store.rename_class(session, _project(session, project), old_name, new_name)
        old = str(old_name).strip()
        return {
            "project": project,
            "class": renamed.name,
            "old_name": old,
            "index": renamed.index,
            "summary": f"renamed class {old!r} to {renamed.name!r} in {project}",
        }


def describe_class(
    project: str,
    name: str,
    *,
    dex_number: int | str | None = class_store.KEEP,
    description: str | None = class_store.KEEP,
    colour: str | None = class_store.KEEP,
    settings: Settings | None = None,
) -> dict:
    """Sets a class's dex number, description and/or colour (fields not given stay; "" clears one)."""
    engine, _ = open_store(settings)
    with session_scope(engine, write=True) as session:
        item, changed = class_store.describe_class(
            session, _project(session, project), name, dex_number=dex_number, description=description, colour=colour
        )
        words = {"dex_number": "dex number", "description": "description", "colour": "colour"}
        summary = (
            f"class {item.name!r}: changed its " + _listed([words[field] for field in changed])
            if changed
            else f"class {item.name!r}: nothing changed (the values given are the ones it has)"
        )
        return {
            "project": project,
            "class": item.name,
            "changed": changed,
            "dex_number": item.dex_number,
            "description": item.description,
            "colour": item.colour,
            "summary": summary,
        }


def edit_class(
    project: str,
    name: str,
    *,
    new_name: str | None = None,
    dex_number: int | str | None = class_store.KEEP,
    description: str | None = class_store.KEEP,
    colour: str | None = class_store.KEEP,
    settings: Settings | None = None,
) -> dict:
    """Renames and/or describes a class in one transaction (all or nothing: a refused rename changes nothing).

    Returns a summary of what changed, with "level" "info" when the values given are the ones the class has."""
    engine, _ = open_store(settings)
    with session_scope(engine, write=True) as session:
        target = _project(session, project)
        item = class_store.find_class(session, target, name)
        old = item.name
        if new_name is not None and new_name.strip() != old:
            class_store.rename_class(session, target, old, new_name)
        _, changed = class_store.describe_class(
            session, target, item.name, dex_number=dex_number, description=description, colour=colour
        )
        words = {"dex_number": "dex number", "description": "description", "colour": "colour"}
        done = [f"renamed {old!r} to {item.name!r}"] if item.name != old else []
        done += [f"changed its {_listed([words[field] for field in changed])}"] if changed else []
        if not done:
            return {
                "project": project,
                "class": old,
                "changed": [],
                "level": "info",
                "summary": f"class {old!r}: nothing to save (the values are the ones it has)",
            }
        return {
            "project": project,
            "class": item.name,
            "old_name": old,
            "changed": changed,
            "summary": f"class {old!r}: " + " and ".join(done),
        }


def remove_class(project: str, name: str, settings: Settings | None = None) -> dict:
    """Removes a class no box uses; the later classes move down one index."""
    engine, _ = open_store(settings)
    with session_scope(engine, write=True) as session:
        target = _project(session, project)
        removed = class_store.find_class(session, target, name).name
        index = class_store.remove_class(session, target, name)
        left = [row.name for row in class_store.class_rows(session, target)]
        summary = f"removed class {removed!r} from {project}; classes now: {', '.join(left) or 'none'}"
        return {"project": project, "class": removed, "index": index, "classes": left, "summary": summary}


def _listed(words: list[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return ", ".join(words[:-1]) + (" and " if len(words) > 1 else "") + words[-1]


def project_exists(project: str, settings: Settings | None = None) -> bool:
    engine, _ = open_store(settings)
    with session_scope(engine) as session:
        return session.scalar(select(Project.id).where(Project.name == project.strip())) is not None


def _project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        known = session.scalars(select(Project.name).order_by(Project.name)).all()
        raise StoreError(
            f"no project called {name!r}; projects: "
            f"{', '.join(known) or 'none yet (create one on the Project page, or: yolodex project create)'}"
        )
    return project


def _version(session: Session, project: Project, name: str) -> DatasetVersion:
    version = session.scalar(
        select(DatasetVersion).where(DatasetVersion.project_id == project.id, DatasetVersion.name == name)
    )
    if version is None:
        known = session.scalars(select(DatasetVersion.name).where(DatasetVersion.project_id == project.id)).all()
        raise StoreError(
            f"project {project.name!r} has no version {name!r}; versions: {', '.join(known) or 'none (freeze one)'}"
        )
    return version
