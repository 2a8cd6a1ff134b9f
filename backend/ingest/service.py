"""Ingest and dataset-version operations by project name, each in its own transaction, with JSON-ready results.

These are what the CLI (`yolodex import|crawl|dataset|starter`) and the background jobs call: plain arguments in,
a dict out, the store opened from the settings (`YOLODEX_STORAGE`, `YOLODEX_DATABASE_URL`).
"""

from __future__ import annotations

from collections.abc import Sequence
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
from backend.store.db import session_scope, shared_engine
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


def import_into(paths: Sequence[str | Path], project: str = DEFAULT_PROJECT, settings: Settings | None = None) -> dict:
    """Imports files, folders, zips and labeled COCO/YOLO datasets into `project` (created if missing)."""
    engine, storage = open_store(settings)
    with session_scope(engine) as session:
        target = get_or_create_project(session, project)
        report = import_paths(session, storage, target, list(paths))
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
) -> dict:
    """Crawls images (a keyword search, a list of URLs or a page) into `project`; each kept image goes through the
    same checks and dedupe as an upload and keeps its source URL, page URL and licence hint.

    Exactly one of `query`, `urls` and `page` must be given.
    """
    if sum(item is not None for item in (query, urls, page)) != 1:
        raise StoreError("give exactly one of a search query (--query), a URL list (--urls) or a page (--page)")
    crawl_settings = crawl_settings or CrawlSettings()
    engine, storage = open_store(settings)
    added: dict[str, int] = {}
    with session_scope(engine) as session:
        target = get_or_create_project(session, project)

        def keep(image: CrawledImage) -> None:
            result = add_image_bytes(
                session, storage, target, image.data, source="crawl", original_name=image.original_name,
                source_url=image.source_url, page_url=image.page_url, licence_hint=image.licence_hint,
            )  # fmt: skip
            added[result.status] = added.get(result.status, 0) + 1

        if query is not None:
            provider = provider or DuckDuckGoImages()
            try:
                report = crawl_search(query, limit, provider, crawl_settings, keep)
            except SearchError as error:
                raise StoreError(
                    f"the image search failed ({error}); check the internet connection or use --urls"
                ) from error

        elif urls is not None:
            report = crawl_urls(urls, crawl_settings, keep)
        else:
            report = crawl_page(page, depth, crawl_settings, keep)
        return {"project": target.name, "stored": added, **report.to_dict()}


def freeze(
    project: str, name: str, fractions: Sequence[float] = (0.8, 0.2), seed: int = 0, settings: Settings | None = None
) -> dict:
    """Freezes the project's labeled images into a dataset version; returns its folder (what `yolodex train --data`
    takes) and counts."""
    engine, storage = open_store(settings)
    with session_scope(engine) as session:
        version = freeze_version(session, storage, _project(session, project), name, fractions, seed)
        return {"project": project, "version": version.name, "folder": str(version_folder(storage, version)),
                "counts": version.counts}  # fmt: skip


def export(project: str, version: str, fmt: str, out: str | Path, settings: Settings | None = None) -> dict:
    """Exports a version as COCO (one json + images/) or YOLO (images/, labels/, data.yaml) under `out`."""
    engine, storage = open_store(settings)
    with session_scope(engine) as session:
        frozen = _version(session, _project(session, project), version)
        if fmt == "coco":
            path = export_coco(storage, frozen, Path(out) / "annotations.json")
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
    with session_scope(engine) as session:
        project, report = create_starter_project(session, storage)
        return {"project": project.name, "created": report is not None, "import": report}


def _project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        known = session.scalars(select(Project.name).order_by(Project.name)).all()
        raise StoreError(
            f"no project called {name!r}; projects: {', '.join(known) or 'none yet (import images first)'}"
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
