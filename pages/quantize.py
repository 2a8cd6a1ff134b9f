"""Quantize page: a run's best.pt → a "quantize" job (budget, method, calibration images) with its live progress and
Cancel; then the run's quant_report.json: the FP32-vs-INT8 table (the shipped model marked), each model on each
runtime, accuracy against latency with the budget line, the layers kept in float and the float fallbacks, the
validation images whose detections changed most (FP32 and INT8 boxes drawn side by side) and the ONNX downloads.

Thin on purpose: the job goes through `backend.jobs.api`, runs come from `backend.catalog`, everything shown is
shaped by `backend.quantization.report_view`. The run stays in `?run=` and the job in `?quantize_job=`.
"""

from pathlib import Path

import pandas as pd
import streamlit as st

from app.widgets import page_settings, project_picker, run_and_report, show_outcome, store_engine
from backend import catalog
from backend.inference import Predictor
from backend.jobs import api as jobs
from backend.jobs import outcome
from backend.quantization import report_view as view
from backend.quantization.pipeline import METHODS, QuantizeOptions
from backend.quantization.ptq import CALIBRATION_METHODS
from backend.store.db import session_scope

RUN_PARAM, JOB_PARAM = "run", "quantize_job"
GALLERY_PER_PAGE = 4
CALIBRATIONS = list(CALIBRATION_METHODS)
METHOD_HELP = {
    "auto": "selective PTQ; QAT only if it misses the budget",
    "ptq": "selective PTQ only (minutes)",
    "qat": "quantization-aware fine-tuning (as long as a tenth of the training)",
}


@st.cache_data(show_spinner=False, max_entries=4)
def read_report(run_dir: str, mtime: float) -> dict | None:
    return view.read_report(run_dir)  # mtime: part of the cache key, a new report of the same run is read again


@st.cache_resource(show_spinner=False, max_entries=4)
def predictor(path: str, mtime: float) -> Predictor:
    return Predictor.from_path(path, threads=1)  # mtime: a model quantized again under the same name loads again


@st.cache_data(show_spinner=False, max_entries=64)
def comparison(image: str, image_mtime: float, fp32: str, int8: str, mtimes: tuple[float, float], threshold: float):
    models = predictor(fp32, mtimes[0]), predictor(int8, mtimes[1])  # the mtimes: a re-quantized file loads again
    return view.compare_jpegs(image, *models, threshold=threshold, max_side=360)


def mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


st.title("Quantize")
settings = page_settings()
engine = store_engine(settings.database_url)
show_outcome("quantize_outcome")
project = project_picker(engine, key="quantize_project")
runs = [run for run in catalog.trained_runs(settings) if (run.path / "best.pt").is_file()]
if project is not None:
    with session_scope(engine) as session:
        runs = catalog.project_runs(session, settings, project, runs)
if not runs:
    st.info(f"No trained run of {project or 'any project'} with a best.pt yet: train one on the [Train](/train) page.")
    st.stop()
names, wanted_run = [run.name for run in runs], st.query_params.get(RUN_PARAM)
index = names.index(wanted_run) if wanted_run in names else 0
run = st.selectbox("Run", runs, index=index, format_func=view.run_label, key=f"quantize_run_{project}")
if st.query_params.get(RUN_PARAM) != run.name:
    st.query_params[RUN_PARAM] = run.name


# ---------------------------------------------------------------------------------------------------- launch form
wanted_job = st.query_params.get(JOB_PARAM, "")
try:
    asked = jobs.get_job(int(wanted_job), settings) if wanted_job.isdigit() else None
except ValueError:  # no such job
    asked = None
job = view.pick_job(run.path, asked, jobs.list_jobs(settings, kind="quantize", limit=20))
busy = job is not None and job.active
with st.form("quantize_form", border=False):
    left, middle, right = st.columns(3)
    budget = left.number_input("Budget (largest mAP50-95 drop, points)", 0.0, 100.0, 0.5, 0.1, key="quantize_budget")
    captions = [METHOD_HELP[name] for name in METHODS]
    method = middle.radio("Method", METHODS, horizontal=True, key="quantize_method", captions=captions)
    calib = right.number_input(
        "Calibration images (training split)", 1, 4096, QuantizeOptions.calib_images, step=16, key="quantize_calib"
    )
    with st.expander("More options"):
        left, middle, right = st.columns(3)
        default = CALIBRATIONS.index(QuantizeOptions.calibration)
        calibration = left.selectbox("Calibration method", CALIBRATIONS, key="quantize_calibration", index=default)
        compare = left.checkbox("Also measure the other calibration methods", True, key="quantize_compare")
        scans = middle.number_input(
            "Sensitivity-scan images", 1, 1024, QuantizeOptions.scan_images, key="quantize_scan_images"
        )
        imgsz = middle.number_input("Input size (0 = the run's)", 0, 2048, 0, step=32, key="quantize_imgsz")
        threads = right.number_input("onnxruntime threads", 1, 64, QuantizeOptions.threads, key="quantize_threads")
        qat_epochs = right.number_input("QAT epochs (0 = a tenth of the run's)", 0, 1000, 0, key="quantize_qat_epochs")
    launch = st.form_submit_button("Quantize", type="primary", disabled=busy, key="quantize_start")

if launch:
    fields = view.job_options(
        method=method,
        calibration=calibration,
        calib_images=calib,
        budget=budget,
        compare_calibrations=compare,
        scan_images=scans,
        threads=threads,
        imgsz=imgsz,
        qat_epochs=qat_epochs,
    )

    def submit() -> dict:
        QuantizeOptions(**fields)  # bad options are an error here, before anything is queued
        params = {"project": project, "run_dir": str(run.path), "options": fields}
        job_id = jobs.submit("quantize", params, settings=settings)
        return outcome.submitted(job_id, f"quantizing {run.name} ({method}, budget {budget:g} points)", settings)

    queued = run_and_report("Quantization job", submit, state_key="quantize_outcome")
    if queued is not None:
        st.query_params[JOB_PARAM] = str(queued["job_id"])
    st.rerun()

# -------------------------------------------------------------------------------------------------- the job, live
if job is not None:
    if st.query_params.get(JOB_PARAM) != str(job.id):
        st.query_params[JOB_PARAM] = str(job.id)

    @st.fragment(run_every=2.0 if busy else None)
    def progress() -> None:
        current = jobs.get_job(job.id, settings)
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


def cancel() -> None:
    if job is not None:
        cancelled = lambda: outcome.cancel_requested(jobs.cancel(job.id, settings))  # noqa: E731
        run_and_report("Cancel", cancelled, state_key="quantize_outcome")


st.button("Cancel", disabled=not busy, key="quantize_cancel", on_click=cancel)

# ------------------------------------------------------------------------------------------------------ the report
report_file = run.path / view.REPORT_FILE
report = read_report(str(run.path), mtime(report_file)) if report_file.is_file() else None
if report is None:
    st.info("This run has no INT8 model yet: press Quantize.")
    st.stop()

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
st.dataframe(pd.DataFrame(rows).drop(columns=["model"]), hide_index=True, key="quantize_table", column_config=columns)
st.plotly_chart(view.scatter_figure(report, rows), key="quantize_scatter")
by_runtime = view.runtime_rows(report)
if by_runtime:
    st.subheader("By runtime")
    st.dataframe(pd.DataFrame(by_runtime), hide_index=True, key="quantize_runtimes")

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

st.subheader("Detections that changed most")
items, paths = view.gallery(report), view.model_paths(report, run.path)
if not items:
    st.caption("No validation image's detections changed between FP32 and the shipped INT8 model.")
    st.stop()
if not (paths["fp32"].is_file() and paths["int8"].is_file()):
    st.warning("The ONNX files of this report are gone: quantize again to see the gallery.")
    st.stop()
pages = -(-len(items) // GALLERY_PER_PAGE)
page = int(st.number_input(f"Page (of {pages}, {len(items)} images)", 1, pages, 1, key="quantize_gallery_page"))
threshold = view.score_threshold(report)
st.caption(f"FP32 boxes blue, INT8 boxes red; detections scoring ≥ {threshold}.")
models = str(paths["fp32"]), str(paths["int8"]), (mtime(paths["fp32"]), mtime(paths["int8"]))
for item in items[(page - 1) * GALLERY_PER_PAGE : page * GALLERY_PER_PAGE]:
    image = Path(item["image"])
    try:
        (fp32_jpeg, _), (int8_jpeg, _) = comparison(str(image), mtime(image), *models, threshold)
    except (OSError, ValueError) as error:
        st.warning(f"{image}: cannot draw ({error})")
        continue
    st.caption(view.gallery_caption(item))
    left, right = st.columns(2)  # equal columns, pictures drawn at one size, each filling its column
    left.image(fp32_jpeg, caption="FP32", width="stretch")
    right.image(int8_jpeg, caption="INT8", width="stretch")
