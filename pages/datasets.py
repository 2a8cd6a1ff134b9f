"""Datasets page: add images (upload, crawl), see what an import did, browse the images, check the class balance and
the training augmentation, freeze a version and export it.

Thin on purpose: queries, thumbnails, uploads, reports and the preview come from `backend.browse`; imports, freezes
and exports from `backend.ingest.service` (and `backend.ingest.importer` through browse); crawls and large imports
run in the worker through the jobs API (`backend.jobs.api`, imported only when a job is submitted or shown).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from sqlalchemy import select

from app.widgets import page_settings, project_names, project_picker, run_and_report, show_outcome, store_engine
from backend import browse
from backend.ingest import service
from backend.store.db import describe_error, session_scope
from backend.store.models import Project
from backend.store.versions import class_stats

logger = logging.getLogger(__name__)

UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "zip"]
MAX_UPLOAD_MB = 200  # the server's default cap (server.maxUploadSize); a widget can only lower it
GRID_COLUMNS = 6
FILTER_LABELS = {"all": "All", "class": "Class", "unlabeled": "Unlabeled", "duplicates": "Near duplicates",
                 "rejected": "Rejected (last import)"}  # fmt: skip
OUTCOME = "datasets_outcome"


def current_project(engine) -> str:
    """The project the page works on (the shared current project); stops the page when there is none: a project is
    created, with its classes, on the Project page."""
    picked = project_picker(engine, key="datasets_project")
    if picked is None:
        st.stop()
    st.caption("A new project, with its classes, is created on the [Project](/project) page.")
    return picked


@st.cache_data(max_entries=3000, show_spinner=False)
def cached_thumbnail(path: str, mtime_ns: int, boxes: tuple) -> bytes:
    """`browse.thumbnail`, cached by path and modification time (and the boxes drawn on it)."""
    return browse.thumbnail(path, browse.THUMBNAIL_SIZE, boxes)


def modified(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


# ---------------------------------------------------------------------------------------------- adding images


def import_uploaded(settings, project: str, uploader_key: str) -> None:
    """on_click of Import: small uploads are imported here, large ones by an import job."""
    files = st.session_state.get(uploader_key) or []
    if not files:
        st.session_state[OUTCOME] = ("error", "Choose or drop files first.")
        return
    if not service.project_exists(project, settings=settings):  # e.g. renamed or removed in another tab
        st.session_state[OUTCOME] = ("error", f"There is no project {project!r} any more: pick one above, or create "
                                              "it with its classes on the Project page.")  # fmt: skip
        return
    total, paths = sum(file.size for file in files), []
    try:
        paths = browse.save_uploads(settings.storage, [(file.name, file.getvalue()) for file in files])
        if total > browse.SYNC_IMPORT_BYTES:
            from backend.jobs import api as jobs_api

            job_id = jobs_api.submit("import", {"project": project, "paths": [str(path) for path in paths]},
                                     settings=settings)  # fmt: skip
            st.session_state["datasets_job"] = job_id
            st.session_state[OUTCOME] = ("info", f"{len(files)} files ({total / 1024**2:.0f} MB) queued as job "
                                                 f"#{job_id}: the worker imports them.")  # fmt: skip
        else:
            with session_scope(store_engine(settings.database_url), write=True) as session:
                report = browse.import_uploads(session, settings.storage, project, paths)
            browse.discard_uploads(settings.storage, paths)
            st.session_state["datasets_report"] = report
            st.session_state[OUTCOME] = service.import_outcome(report)
    except Exception as error:  # shown on the page; the page keeps working
        logger.exception("upload import failed")
        browse.discard_uploads(settings.storage, paths)
        st.session_state[OUTCOME] = ("error", f"Import failed: {describe_error(error)}")
        return
    # A fresh uploader (new key) so the same files are not imported twice.
    st.session_state["datasets_uploader"] = st.session_state.get("datasets_uploader", 0) + 1


def show_report(report: dict[str, Any]) -> None:
    counts = report.get("counts", {})
    labels = ("accepted", "duplicates", "near_duplicates", "rejected", "skipped", "annotations", "classes_added")
    for column, name in zip(st.columns(len(labels)), labels):
        column.metric(name.replace("_", " "), counts.get(name, 0))
    if report.get("classes_added"):
        st.caption("Classes added: " + ", ".join(report["classes_added"]))
    for name, rows in browse.report_tables(report).items():
        st.markdown(f"**{name.replace('_', ' ').capitalize()}** ({len(rows)})")
        st.dataframe(pd.DataFrame(rows), hide_index=True, key=f"datasets_report_{name}")
    for warning in report.get("warnings", []):
        st.warning(warning)


def submit_crawl(settings, project: str) -> None:
    """on_click of the crawl form: one crawl job."""
    mode, text = st.session_state["datasets_crawl_mode"], st.session_state["datasets_crawl_text"].strip()
    if not text:
        st.session_state[OUTCOME] = ("error", "Type a search, some image URLs or a page URL first.")
        return
    params: dict[str, Any] = {"project": project, "limit": int(st.session_state["datasets_crawl_limit"])}
    # The SSRF refusal's advice in this page's words: it has no switch for private addresses (the CLI's flag).
    params["crawl_settings"] = {"private_hint": "the Datasets page crawls public addresses only: to add images "
                                "from your own network, save them and drop them on the upload box above"}  # fmt: skip
    if mode == "Search":
        params["query"] = text
    elif mode == "Image URLs":
        params["urls"] = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        params |= {"page": text, "depth": int(st.session_state["datasets_crawl_depth"])}
    try:
        from backend.jobs import api as jobs_api

        st.session_state["datasets_job"] = jobs_api.submit("crawl", params, settings=settings)
    except Exception as error:
        logger.exception("crawl submit failed")
        st.session_state[OUTCOME] = ("error", f"Could not queue the crawl: {describe_error(error)}")


def show_job(settings) -> None:
    """The last job this tab submitted, live while it runs; the Jobs page has them all."""
    job_id = st.session_state.get("datasets_job")
    if job_id is None:
        return
    from backend.jobs import api as jobs_api

    try:
        active = jobs_api.get_job(job_id, settings).active
    except ValueError:
        return

    @st.fragment(run_every=2.0 if active else None)
    def live() -> None:
        job = jobs_api.get_job(job_id, settings)
        st.markdown(f"**{job.kind.capitalize()} job #{job.id}: {job.state}**. {job.message} "
                    "(all jobs: [Jobs](/jobs))")  # fmt: skip
        st.progress(min(max(job.progress or 0.0, 0.0), 1.0))
        if job.error:
            st.error(job.error)
        if job.result and job.kind == "import":
            show_report(job.result)
        elif job.result:
            show_crawl(job.result)
        if active and not job.active:
            st.rerun()

    live()
    job = jobs_api.get_job(job_id, settings)
    if job.kind == "import" and not job.active:
        finish_import_job(settings, job)
    st.button("Cancel job", key="datasets_job_cancel", disabled=not active,
              on_click=lambda: jobs_api.cancel(job_id, settings))  # fmt: skip


def show_crawl(result: dict[str, Any]) -> None:
    stored = result.get("stored", {})
    figures = {"kept": result.get("kept", 0), "stored": stored.get("accepted", 0) + stored.get("near_duplicate", 0),
               "duplicates": stored.get("duplicate", 0), "skipped": len(result.get("skipped", [])),
               "refused": len(result.get("rejected", [])), "pages": len(result.get("pages_visited", []))}  # fmt: skip
    for column, (name, value) in zip(st.columns(len(figures)), figures.items()):
        column.metric(name, value)
    refusals = [{"what": "skipped", **row} for row in result.get("skipped", [])]
    refusals += [{"what": "refused", **row} for row in result.get("rejected", [])]
    if refusals:
        st.dataframe(pd.DataFrame(refusals), hide_index=True, key="datasets_crawl_refusals")


def finish_import_job(settings, job) -> None:
    """Once an import job has ended: its report becomes the project's last report, its uploads go."""
    if st.session_state.get("datasets_job_finished") == job.id:
        return
    st.session_state["datasets_job_finished"] = job.id
    if job.result:
        browse.save_report(settings.storage, job.result.get("project", job.project or ""), job.result)
    browse.discard_uploads(settings.storage, job.params.get("paths", []))


def add_images(settings, project: str) -> None:
    uploader_key = f"datasets_upload_{st.session_state.get('datasets_uploader', 0)}"
    st.file_uploader("Drop images or zip files (a zip may hold a COCO or YOLO labeled dataset)", type=UPLOAD_TYPES,
                     accept_multiple_files=True, key=uploader_key, max_upload_size=MAX_UPLOAD_MB)  # fmt: skip
    st.button(f"Import into {project}", key="datasets_import", type="primary",
              on_click=import_uploaded, args=(settings, project, uploader_key))  # fmt: skip
    report = st.session_state.get("datasets_report")
    if report and report.get("project") == project:
        st.subheader("Import report")
        show_report(report)

    st.subheader("Crawl the web")
    with st.form("datasets_crawl"):
        st.radio("From", ["Search", "Image URLs", "Page"], key="datasets_crawl_mode", horizontal=True)
        st.text_area("Search words, image URLs (one a line) or a page URL", key="datasets_crawl_text")
        left, right = st.columns(2)
        left.number_input("Most images", 1, 1000, 50, key="datasets_crawl_limit")
        right.number_input("Link depth (page only)", 0, 3, 1, key="datasets_crawl_depth")
        st.form_submit_button("Crawl", on_click=submit_crawl, args=(settings, project))
    show_job(settings)


# ---------------------------------------------------------------------------------------------- the grid


def reset_page() -> None:
    st.session_state["datasets_page"] = 1


def step_page(delta: int) -> None:
    st.session_state["datasets_page"] = st.session_state.get("datasets_page", 1) + delta


def image_grid(engine, settings, project: Project, classes: list[str]) -> list[browse.ImageCard]:
    """The filtered, paged grid; returns the cards shown (the augmentation preview picks from them)."""
    left, middle, right = st.columns([3, 2, 1])
    kind = left.radio("Show", list(FILTER_LABELS), format_func=FILTER_LABELS.get, horizontal=True,
                      key="datasets_filter", on_change=reset_page)  # fmt: skip
    class_name = middle.selectbox("Class", classes, key="datasets_class", on_change=reset_page,
                                  disabled=kind != "class" or not classes)  # fmt: skip
    boxes = right.toggle("Boxes", value=True, key="datasets_boxes")
    if kind == "rejected":
        report = browse.last_report(settings.storage, project.name) or {}
        st.caption("Rejected files are not stored, so they are not in the grid: this is the rejected list of the "
                   "last import into this project.")  # fmt: skip
        if report.get("rejected"):
            st.dataframe(pd.DataFrame(report["rejected"]), hide_index=True, key="datasets_rejected")
        else:
            st.info("The last import rejected nothing." if report else "No import into this project yet.")
        kind = "all"
    image_filter = browse.ImageFilter("class", class_name) if kind == "class" and class_name else None
    image_filter = image_filter or browse.ImageFilter("all" if kind == "class" else kind)
    with session_scope(engine) as session:
        total = browse.count_images(session, project, image_filter)
        pages = max(1, -(-total // browse.PAGE_SIZE))
        st.session_state["datasets_page"] = min(max(int(st.session_state.get("datasets_page", 1)), 1), pages)
        grid = browse.query_images(session, settings.storage, project, image_filter, st.session_state["datasets_page"])

    previous, number, following, summary = st.columns([1, 1, 1, 4])
    previous.button("Previous", key="datasets_previous", on_click=step_page, args=(-1,), disabled=grid.page <= 1)
    number.number_input("Page", 1, grid.pages, key="datasets_page", label_visibility="collapsed")
    following.button("Next", key="datasets_next", on_click=step_page, args=(1,), disabled=grid.page >= grid.pages)
    summary.markdown(f"Page {grid.page} of {grid.pages} · {grid.total} image{'' if grid.total == 1 else 's'}")
    if not grid.cards:
        st.info("No image matches this filter.")
    for start in range(0, len(grid.cards), GRID_COLUMNS):
        for column, card in zip(st.columns(GRID_COLUMNS), grid.cards[start : start + GRID_COLUMNS]):
            drawn = card.boxes if boxes else ()
            column.image(cached_thumbnail(str(card.path), modified(card.path), drawn), caption=card.caption)
    return grid.cards


# ---------------------------------------------------------------------------------------------- statistics


def class_charts(stats: dict[str, Any]) -> None:
    left, middle, right = st.columns(3)
    left.metric("images", stats["images"])
    middle.metric("boxes", stats["boxes"])
    right.metric("images without boxes", stats["images_without_boxes"])
    table = pd.DataFrame(stats["classes"])
    if table.empty:
        st.info(
            "No classes yet: add them on the [Project](/project) page, then label images on the Label page "
            "(or import a labeled dataset)."
        )
        return
    names = table["name"].tolist()  # plain lists: plotly would otherwise ship pandas columns as binary arrays
    per_class = go.Figure([go.Bar(x=names, y=table["images"].tolist(), name="images"),
                           go.Bar(x=names, y=table["boxes"].tolist(), name="boxes")])  # fmt: skip
    per_class.update_layout(title="Images and boxes per class", barmode="group", height=340, margin={"t": 40})
    sizes = go.Figure([go.Bar(x=stats["box_size_bins"], y=counts, name=name)
                       for name, counts in stats["box_size_histogram"].items()])  # fmt: skip
    sizes.update_layout(title="Box size (√area, pixels)", barmode="stack", height=340, margin={"t": 40})
    left, right = st.columns(2)
    left.plotly_chart(per_class, key="datasets_per_class")
    right.plotly_chart(sizes, key="datasets_box_sizes")


# ---------------------------------------------------------------------------------------------- augmentation


def augmentation(engine, settings, project: Project, cards: list[browse.ImageCard]) -> None:
    if not cards:
        st.info("Pick images in the grid above: the preview uses the images of the grid's page.")
        return
    captions = {card.id: f"#{card.id} {card.caption}" for card in cards}
    left, middle, right = st.columns([3, 1, 1])
    image_id = left.selectbox("Image", list(captions), format_func=captions.get, key="datasets_aug_image")
    imgsz = middle.selectbox("Input size", [320, 416, 640], key="datasets_aug_size")
    count = right.number_input("Samples", 1, 16, 8, key="datasets_aug_count")
    mosaic = st.toggle("Mosaic", value=True, key="datasets_aug_mosaic")
    if st.button("Show augmented samples", key="datasets_aug_show"):
        st.session_state["datasets_aug_seed"] = st.session_state.get("datasets_aug_seed", -1) + 1
        options = browse.PreviewOptions(int(count), int(imgsz), st.session_state["datasets_aug_seed"], mosaic)
        with st.spinner("Augmenting…"), session_scope(engine) as session:
            samples = browse.augmentation_preview(session, settings.storage, project, image_id, options)
        st.session_state["datasets_aug"] = (image_id, samples)
    shown = st.session_state.get("datasets_aug")
    if shown and shown[0] == image_id:
        st.caption("The training augmentation (mosaic → scale/translate → HSV → flip). With one image, the "
                   "mosaic's four tiles are all this image; in training they are four images.")  # fmt: skip
        st.image(shown[1], caption=[f"sample {number + 1}" for number in range(len(shown[1]))], width=200)


# ---------------------------------------------------------------------------------------------- versions


def freeze_version(settings, project: str) -> dict[str, Any] | None:
    name = st.session_state["datasets_version_name"].strip()
    val, test = st.session_state["datasets_val"], st.session_state["datasets_test"]
    fractions = (round(1 - val - test, 6), val, test) if test > 0 else (round(1 - val, 6), val)
    seed = int(st.session_state["datasets_seed"])

    def action() -> dict[str, Any]:
        result = service.freeze(project, name, fractions, seed, settings=settings)
        splits = ", ".join(f"{split} {value['images']} images/{value['boxes']} boxes"
                           for split, value in result["counts"]["splits"].items())  # fmt: skip
        return result | {"summary": f"version {name}: {splits}"}

    return run_and_report("Freeze", action, state_key=OUTCOME)


def export_version(settings, project: str) -> None:
    version, fmt = st.session_state["datasets_export_version"], st.session_state["datasets_export_format"]

    def action() -> dict[str, Any]:
        folder = browse.fresh_export_folder(settings.storage, project, version, fmt)
        service.export(project, version, fmt, folder, settings=settings)
        archive = browse.zip_folder(folder)
        st.session_state["datasets_export"] = str(archive)
        return {"summary": f"{archive.name}, {archive.stat().st_size / 1024**2:.1f} MB"}

    run_and_report("Export", action, state_key=OUTCOME)


def versions(engine, settings, project: Project) -> None:
    with session_scope(engine) as session:
        rows = browse.version_rows(session, project)
    # The suggested name follows the versions there are (after freezing v2 it is v3); a name the user typed stays
    # until the next freeze or project change.
    suggested = (project.name, service.next_version_name([row["version"] for row in rows]))
    if st.session_state.get("datasets_version_suggested") != suggested:
        st.session_state["datasets_version_suggested"] = suggested
        st.session_state["datasets_version_name"] = suggested[1]
    with st.form("datasets_freeze"):
        columns = st.columns(4)
        columns[0].text_input("Version name", key="datasets_version_name")
        columns[1].number_input("Validation share", 0.0, 0.9, 0.2, 0.05, key="datasets_val")
        columns[2].number_input("Test share", 0.0, 0.9, 0.0, 0.05, key="datasets_test")
        columns[3].number_input("Seed", 0, 2**31 - 1, 0, key="datasets_seed")
        st.form_submit_button("Freeze the labeled images", on_click=freeze_version, args=(settings, project.name))
    if not rows:
        st.info("No version yet: freeze one to train on it.")
        return
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="datasets_versions")
    left, middle, right = st.columns([2, 1, 1])
    left.selectbox("Export version", [row["version"] for row in rows], key="datasets_export_version")
    middle.radio("Format", ["coco", "yolo"], format_func=str.upper, horizontal=True, key="datasets_export_format")
    right.button("Export", key="datasets_export_button", on_click=export_version, args=(settings, project.name))
    archive = Path(st.session_state.get("datasets_export", "") or "/nonexistent")
    if archive.is_file():
        st.download_button(f"Download {archive.name}", data=archive.read_bytes, file_name=archive.name,
                           mime="application/zip", key="datasets_download", on_click="ignore")  # fmt: skip


# ---------------------------------------------------------------------------------------------- the page

st.title("Datasets")
settings = page_settings()
settings.ensure_dirs()
engine = store_engine(settings.database_url)
project_name = current_project(engine)
show_outcome(OUTCOME)

st.header("Add images")
add_images(settings, project_name)

with session_scope(engine) as session:
    project = session.scalar(select(Project).where(Project.name == project_name))
    classes = browse.class_names(session, project) if project else []
    stats = class_stats(session, project) if project else None
if project is None:
    known = ", ".join(project_names(engine)) or "none yet"
    st.info(f"Project {project_name!r} has no images yet: add some above (projects: {known}).")
    st.stop()

st.header("Images")
cards = image_grid(engine, settings, project, classes)
st.header("Class statistics")
class_charts(stats)
st.header("Augmentation preview")
augmentation(engine, settings, project, cards)
st.header("Versions")
versions(engine, settings, project)
