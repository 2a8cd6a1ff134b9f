"""The Quantize page's sections: the launch form, the live job, the FP32-vs-INT8 report, the downloads and the
gallery of changed detections. Plain functions the page calls in order; the data comes from
`backend.views.quantize` and `backend.quantization.report_view`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from app.widgets import run_and_report
from backend import catalog
from backend.inference import Predictor
from backend.jobs import api as jobs
from backend.jobs import outcome
from backend.quantization import report_view as view
from backend.quantization.pipeline import METHODS, QuantizeOptions
from backend.settings import Settings
from backend.views import quantize as data

GALLERY_PER_PAGE = 4
OUTCOME_KEY = "quantize_outcome"


@st.cache_data(show_spinner=False, max_entries=4)
def read_report(run_dir: str, mtime: float) -> dict | None:
    """The run's quant_report.json, cached; `mtime` is part of the key so a new report of the same run is read."""
    return view.read_report(run_dir)


@st.cache_resource(show_spinner=False, max_entries=4)
def predictor(path: str, mtime: float) -> Predictor:
    """One predictor per model file version: a model quantized again under the same name loads again."""
    return Predictor.from_path(path, threads=1)


@st.cache_data(show_spinner=False, max_entries=64)
def comparison(image: str, image_mtime: float, fp32: str, int8: str, mtimes: tuple[float, float], threshold: float):
    """One image's FP32 and INT8 detections drawn as JPEGs, cached per image, model versions and threshold."""
    models = predictor(fp32, mtimes[0]), predictor(int8, mtimes[1])  # the mtimes: a re-quantized file loads again
    return view.compare_jpegs(image, *models, threshold=threshold, max_side=360)


def report_of(run: catalog.RunInfo) -> dict | None:
    """The run's report (cached per file version), None when it has none yet."""
    report_file = run.path / view.REPORT_FILE
    return read_report(str(run.path), data.mtime(report_file)) if report_file.is_file() else None


def launch_form(busy: bool) -> dict[str, Any] | None:
    """The Quantize form (disabled while a job of this run is active); the form's values when it was submitted."""
    with st.form("quantize_form", border=False):
        left, middle, right = st.columns(3)
        budget = left.number_input(
            "Budget (largest mAP50-95 drop, points)", 0.0, 100.0, 0.5, 0.1, key="quantize_budget"
        )
        method = middle.radio("Method", METHODS, horizontal=True, key="quantize_method", captions=data.METHOD_CAPTIONS)
        calib = right.number_input(
            "Calibration images (training split)", 1, 4096, QuantizeOptions.calib_images, step=16, key="quantize_calib"
        )
        with st.expander("More options"):
            left, middle, right = st.columns(3)
            default = data.CALIBRATIONS.index(QuantizeOptions.calibration)
            calibration = left.selectbox(
                "Calibration method", data.CALIBRATIONS, key="quantize_calibration", index=default
            )
            compare = left.checkbox("Also measure the other calibration methods", True, key="quantize_compare")
            scans = middle.number_input(
                "Sensitivity-scan images", 1, 1024, QuantizeOptions.scan_images, key="quantize_scan_images"
            )
            imgsz = middle.number_input("Input size (0 = the run's)", 0, 2048, 0, step=32, key="quantize_imgsz")
            threads = right.number_input("onnxruntime threads", 1, 64, QuantizeOptions.threads, key="quantize_threads")
            qat_epochs = right.number_input(
                "QAT epochs (0 = a tenth of the run's)", 0, 1000, 0, key="quantize_qat_epochs"
            )
        launch = st.form_submit_button("Quantize", type="primary", disabled=busy, key="quantize_start")
    if not launch:
        return None
    return {
        "method": method,
        "calibration": calibration,
        "calib_images": calib,
        "budget": budget,
        "compare_calibrations": compare,
        "scan_images": scans,
        "threads": threads,
        "imgsz": imgsz,
        "qat_epochs": qat_epochs,
    }


def job_progress(job: jobs.JobView, settings: Settings, busy: bool) -> None:
    """The job's progress bar, its error or end state, refreshed every 2 s while it is active; the whole page reruns
    once when it ends, so the report appears and the timer stops."""

    @st.fragment(run_every=2.0 if busy else None)
    def progress() -> None:
        current = data.current_job(settings, job.id)
        st.progress(min(1.0, max(0.0, current.progress or 0.0)), text=view.progress_text(current))
        if current.state == "failed":
            st.error(outcome.error_text(current) or "the quantization failed")
            if current.traceback:
                st.expander("Traceback").code(current.traceback, language="text")
        elif current.state in ("cancelled", "interrupted"):
            st.warning(f"Quantization {current.state}: no new report was written.")
        if busy and not current.active:
            st.rerun()  # the whole page: the report appears, the fragment stops its timer

    progress()


def cancel_button(job: jobs.JobView | None, settings: Settings, busy: bool) -> None:
    """Cancel, outside the timed fragment (a click inside one can be lost); its outcome shows after the rerun."""

    def cancel() -> None:
        if job is not None:
            run_and_report("Cancel", lambda: data.cancel_quantize(settings, job.id), state_key=OUTCOME_KEY)

    st.button("Cancel", disabled=not busy, key="quantize_cancel", on_click=cancel)


def render_report(report: dict[str, Any]) -> None:
    """The summary (green only within budget), the FP32-vs-INT8 table, accuracy against latency, each runtime."""
    st.header("FP32 vs INT8")
    (st.success if report.get("within_budget") is not False else st.warning)(view.summary_line(report))
    st.caption(view.speed_caption(report))
    for note in [*(report.get("not_measured") or []), *(report.get("notes") or [])]:
        st.warning(note)
    rows = view.model_rows(report)
    number = st.column_config.NumberColumn
    columns = {
        "shipped": st.column_config.CheckboxColumn("shipped", help="copied to model_int8.onnx"),
        "mAP50-95": number(format="%.3f", help="on the validation images, a fraction"),
        view.DELTA_COLUMN: number(format="%+.2f", help="INT8 minus FP32, in points (0.01)"),
        "agreement": number(format="%.3f", help="share of FP32's detections INT8 still gives"),
    }
    table = pd.DataFrame(rows).drop(columns=["model"])
    st.dataframe(table, hide_index=True, key="quantize_table", column_config=columns)
    st.plotly_chart(view.scatter_figure(report, rows), key="quantize_scatter")
    by_runtime = view.runtime_rows(report)
    if by_runtime:
        st.subheader("By runtime")
        st.dataframe(pd.DataFrame(by_runtime), hide_index=True, key="quantize_runtimes")


def render_float_parts(report: dict[str, Any]) -> None:
    """The layers the shipped model keeps in float, every float graph node, and the nodes onnxruntime ran in float."""
    st.subheader("Kept in float")
    layers = view.float_layer_rows(report)
    if layers:
        st.dataframe(pd.DataFrame(layers), hide_index=True, key="quantize_float_layers")
    else:
        st.caption("Every quantizable layer of the shipped model runs in INT8 (only the box decoding stays in float).")
    with st.expander(f"All {len(report.get('float_nodes') or [])} graph nodes left in float"):
        st.code("\n".join(report.get("float_nodes") or []) or "(none)", language="text")
    fallbacks = view.fallback_rows(report)
    st.subheader("Float fallbacks")
    if fallbacks:
        st.caption("Quantized nodes onnxruntime still ran in float (its CPU build has no int8 kernel for them).")
        st.dataframe(pd.DataFrame(fallbacks), hide_index=True, key="quantize_fallbacks")
    else:
        st.caption("None: every quantized node ran on an int8 kernel.")


def render_downloads(run: catalog.RunInfo) -> None:
    """A download button per shipped ONNX file (read when clicked), disabled when the file is missing."""
    st.subheader("Downloads")
    for column, (label, path) in zip(st.columns(2), view.downloads(run.path), strict=True):
        column.download_button(
            label,
            data=lambda path=path: path.read_bytes(),
            file_name=f"{run.name}_{path.name}",
            mime="application/octet-stream",
            on_click="ignore",
            disabled=not path.is_file(),
            key=f"quantize_download_{path.name}",
        )


def render_gallery(report: dict[str, Any], run: catalog.RunInfo) -> None:
    """The validation images whose detections changed most, FP32 and INT8 boxes side by side, a page at a time."""
    st.subheader("Detections that changed most")
    items, paths = view.gallery(report), view.model_paths(report, run.path)
    if not items:
        st.caption("No validation image's detections changed between FP32 and the shipped INT8 model.")
        return
    if not (paths["fp32"].is_file() and paths["int8"].is_file()):
        st.warning("The ONNX files of this report are gone: quantize again to see the gallery.")
        return
    pages = -(-len(items) // GALLERY_PER_PAGE)
    page = int(st.number_input(f"Page (of {pages}, {len(items)} images)", 1, pages, 1, key="quantize_gallery_page"))
    threshold = view.score_threshold(report)
    st.caption(f"FP32 boxes blue, INT8 boxes red; detections scoring ≥ {threshold}.")
    models = str(paths["fp32"]), str(paths["int8"]), (data.mtime(paths["fp32"]), data.mtime(paths["int8"]))
    for item in items[(page - 1) * GALLERY_PER_PAGE : page * GALLERY_PER_PAGE]:
        image = Path(item["image"])
        try:
            (fp32_jpeg, _), (int8_jpeg, _) = comparison(str(image), data.mtime(image), *models, threshold)
        except (OSError, ValueError) as error:
            st.warning(f"{image}: cannot draw ({error})")
            continue
        st.caption(view.gallery_caption(item))
        left, right = st.columns(2)  # equal columns, pictures drawn at one size, each filling its column
        left.image(fp32_jpeg, caption="FP32", width="stretch")
        right.image(int8_jpeg, caption="INT8", width="stretch")
