"""The Datasets page's sections: adding images (upload, crawl, the import or crawl job), the image grid, class
statistics, the augmentation preview and the versions with their freeze and export forms. Each draws its widgets
(their keys are the page's) and asks `backend.views.datasets`; the page arranges them. The buttons' callbacks take
the settings and the project as arguments: Streamlit runs them before the next run of the page."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import widgets
from backend import browse
from backend.jobs import api as jobs_api
from backend.settings import Settings
from backend.views import datasets as view

UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "zip"]
MAX_UPLOAD_MB = 200  # the server's default cap (server.maxUploadSize); a widget can only lower it
GRID_COLUMNS = 6
FILTERS = {"all": "All", "class": "Class", "unlabeled": "Unlabeled", "duplicates": "Near duplicates"}
FILTERS["rejected"] = "Rejected (last import)"
OUTCOME = "datasets_outcome"
state = st.session_state


@st.cache_data(max_entries=3000, show_spinner=False)
def cached_thumbnail(path: str, mtime_ns: int, boxes: tuple) -> bytes:
    """`browse.thumbnail`, cached by path and modification time (and the boxes drawn on it)."""
    return browse.thumbnail(path, browse.THUMBNAIL_SIZE, boxes)


def add_images(settings: Settings, name: str) -> None:
    """Upload (images or zips) with the last import's report, the crawl form, and the live import or crawl job."""
    uploader_key = f"datasets_upload_{state.get('datasets_uploader', 0)}"
    st.file_uploader(
        "Drop images or zip files (a zip may hold a COCO or YOLO labeled dataset)",
        type=UPLOAD_TYPES,
        accept_multiple_files=True,
        key=uploader_key,
        max_upload_size=MAX_UPLOAD_MB,
    )
    import_args = (settings, name, uploader_key)
    st.button(f"Import into {name}", key="datasets_import", type="primary", on_click=import_uploaded, args=import_args)
    if (state.get("datasets_report") or {}).get("project") == name:
        st.subheader("Import report")
        show_report(state["datasets_report"])
    st.subheader("Crawl the web")
    with st.form("datasets_crawl"):
        st.radio("From", list(view.CRAWL_MODES), key="datasets_crawl_mode", horizontal=True)
        st.text_area("Search words, image URLs (one a line) or a page URL", key="datasets_crawl_text")
        left, right = st.columns(2)
        left.number_input("Most images", 1, 1000, 50, key="datasets_crawl_limit")
        right.number_input("Link depth (page only)", 0, 3, 1, key="datasets_crawl_depth")
        st.form_submit_button("Crawl", on_click=submit_crawl, args=(settings, name))
    if state.get("datasets_job") is not None:
        job = widgets.live_job(
            state["datasets_job"], settings, render=show_job_result, cancel_key="datasets_job_cancel"
        )
        if job is not None and job.kind == "import" and not job.active and state.get("datasets_job_finished") != job.id:
            state["datasets_job_finished"] = job.id
            view.finish_import_job(settings, job)


def import_uploaded(settings: Settings, name: str, uploader_key: str) -> None:
    """on_click of Import: small uploads are imported here, large ones by an import job."""
    files = [(file.name, file.getvalue()) for file in state.get(uploader_key) or []]
    result = widgets.outcome_of("Import", lambda: view.import_files(settings, name, files), state_key=OUTCOME)
    if result and ("report" in result or "job_id" in result):
        state["datasets_report"] = result.get("report", state.get("datasets_report"))
        state["datasets_job"] = result.get("job_id", state.get("datasets_job"))
        state["datasets_uploader"] = state.get("datasets_uploader", 0) + 1  # a fresh uploader: no second import


def show_report(report: dict) -> None:
    """An import's report: its counts and a table per list of files."""
    counts, tables = view.report_counts(report), browse.report_tables(report)
    widgets.import_report(report, counts, tables, key="datasets_report")


def submit_crawl(settings: Settings, name: str) -> None:
    """on_click of the crawl form: one crawl job (or the reason there is none, shown at the top)."""
    form = (state[f"datasets_crawl_{k}"] for k in ("mode", "text", "limit", "depth"))
    job_id, problem = view.queue_crawl(settings, name, *form)
    if problem is not None:
        state[OUTCOME] = ("error", problem)
    else:
        state["datasets_job"] = job_id


def show_job_result(job: jobs_api.JobView) -> None:
    """What an import job (its report) or a crawl job (its counts and the pages it refused) brought."""
    if job.result and job.kind == "import":
        show_report(job.result)
    elif job.result:
        figures, refusals = view.crawl_figures(job.result)
        widgets.metrics_row(figures)
        if refusals:
            st.dataframe(pd.DataFrame(refusals), hide_index=True, key="datasets_crawl_refusals")


def image_grid(settings: Settings, name: str, data: view.ProjectData) -> list[browse.ImageCard]:
    """The filtered, paged grid; returns the cards shown (the augmentation preview picks from them)."""
    left, middle, right = st.columns([3, 2, 1])
    reset = {"on_change": lambda: state.update(datasets_page=1)}
    kind = left.radio("Show", list(FILTERS), format_func=FILTERS.get, horizontal=True, key="datasets_filter", **reset)
    disabled = kind != "class" or not data.classes
    class_name = middle.selectbox("Class", data.classes, key="datasets_class", disabled=disabled, **reset)
    boxes = right.toggle("Boxes", value=True, key="datasets_boxes")
    if kind == "rejected":
        rejected, imported = view.last_rejected(settings, name)
        st.caption(view.REJECTED_CAPTION)
        if rejected:
            st.dataframe(pd.DataFrame(rejected), hide_index=True, key="datasets_rejected")
        else:
            st.info("The last import rejected nothing." if imported else "No import into this project yet.")
    grid = view.image_page(settings, data.project, kind, class_name, int(state.get("datasets_page", 1)))
    state["datasets_page"] = grid.page
    widgets.pager(grid.page, grid.pages, grid.total, key="datasets_page")
    if not grid.cards:
        st.info("No image matches this filter.")
    mtime = view.modification_times(grid.cards)
    thumbnails = [cached_thumbnail(str(card.path), mtime[card.id], card.boxes if boxes else ()) for card in grid.cards]
    widgets.image_grid(list(zip(thumbnails, [card.caption for card in grid.cards])), GRID_COLUMNS)
    return grid.cards


def class_statistics(data: view.ProjectData) -> None:
    """The project's counts, then boxes per class and box sizes (or how to get classes)."""
    widgets.metrics_row(view.stats_figures(data.stats))
    figures = view.class_figures(data.stats)
    if figures is None:
        st.info(view.NO_CLASSES)
    else:
        left, right = st.columns(2)
        left.plotly_chart(figures[0], key="datasets_per_class")
        right.plotly_chart(figures[1], key="datasets_box_sizes")


def augmentation(settings: Settings, data: view.ProjectData, cards: list[browse.ImageCard]) -> None:
    """Augmented samples of one image of the grid's page, drawn when the button is pressed and kept until then."""
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
        state["datasets_aug_seed"] = state.get("datasets_aug_seed", -1) + 1
        options = browse.PreviewOptions(int(count), int(imgsz), state["datasets_aug_seed"], mosaic)
        with st.spinner("Augmenting…"):
            state["datasets_aug"] = (image_id, view.augmentation_samples(settings, data.project, image_id, options))
    shown = state.get("datasets_aug")
    if shown and shown[0] == image_id:
        st.caption(view.AUGMENT_CAPTION)
        st.image(shown[1], caption=[f"sample {number + 1}" for number in range(len(shown[1]))], width=200)


def versions(settings: Settings, name: str, data: view.ProjectData) -> None:
    """The freeze form (with the next free version name), the versions table and the export of one version."""
    rows, suggested = view.versions(settings, data.project)
    # The suggested name follows the versions there are (after v2 it is v3); a typed name stays until the next freeze.
    if state.get("datasets_version_suggested") != (name, suggested):
        state["datasets_version_suggested"], state["datasets_version_name"] = (name, suggested), suggested
    with st.form("datasets_freeze"):
        columns = st.columns(4)
        columns[0].text_input("Version name", key="datasets_version_name")
        columns[1].number_input("Validation share", 0.0, 0.9, 0.2, 0.05, key="datasets_val")
        columns[2].number_input("Test share", 0.0, 0.9, 0.0, 0.05, key="datasets_test")
        columns[3].number_input("Seed", 0, 2**31 - 1, 0, key="datasets_seed")
        st.form_submit_button("Freeze the labeled images", on_click=freeze_version, args=(settings, name))
    if not rows:
        st.info("No version yet: freeze one to train on it.")
        return
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="datasets_versions")
    left, middle, right = st.columns([2, 1, 1])
    left.selectbox("Export version", [row["version"] for row in rows], key="datasets_export_version")
    middle.radio("Format", ["coco", "yolo"], format_func=str.upper, horizontal=True, key="datasets_export_format")
    right.button("Export", key="datasets_export_button", on_click=export_version, args=(settings, name))
    archive = view.archive_path(state.get("datasets_export"))
    if archive is not None:
        widgets.download_zip(archive, key="datasets_download")


def freeze_version(settings: Settings, name: str) -> None:
    """on_click of Freeze: freezes the labeled images with the form's name, shares and seed."""
    form = [state[f"datasets_{field}"] for field in ("version_name", "val", "test", "seed")]
    widgets.run_and_report("Freeze", lambda: view.freeze(settings, name, *form), state_key=OUTCOME)


def export_version(settings: Settings, name: str) -> None:
    """on_click of Export: zips the chosen version in the chosen format; the download button then offers it."""
    version, fmt = state["datasets_export_version"], state["datasets_export_format"]
    result = widgets.run_and_report("Export", lambda: view.export_zip(settings, name, version, fmt), state_key=OUTCOME)
    state["datasets_export"] = result["archive"] if result else state.get("datasets_export")
