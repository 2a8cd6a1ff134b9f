"""Quantize page: a run's best.pt → a "quantize" job (budget, method, calibration images) with its live progress and
Cancel; then the run's quant_report.json: the FP32-vs-INT8 table (the shipped model marked), each model on each
runtime, accuracy against latency with the budget line, the layers kept in float and the float fallbacks, the
validation images whose detections changed most (FP32 and INT8 boxes drawn side by side) and the ONNX downloads.

Thin on purpose: the runs, the job and its launch come from `backend.views.quantize`, the sections are drawn by
`app.quantize_sections` from what `backend.quantization.report_view` shapes. The run stays in `?run=` and the job in
`?quantize_job=`.
"""

from functools import partial

import streamlit as st

from app import quantize_sections as sections
from app.widgets import page_settings, project_picker, run_and_report, show_outcome, store_engine
from backend.quantization import report_view as view
from backend.views import quantize as data

RUN_PARAM, JOB_PARAM = "run", "quantize_job"

st.title("Quantize")
settings = page_settings()
show_outcome(sections.OUTCOME_KEY)
project = project_picker(store_engine(settings.database_url), key="quantize_project")
runs = data.quantizable_runs(settings, project)
if not runs:
    st.info(f"No trained run of {project or 'any project'} with a best.pt yet: train one on the [Train](/train) page.")
    st.stop()
names, wanted_run = [run.name for run in runs], st.query_params.get(RUN_PARAM)
index = names.index(wanted_run) if wanted_run in names else 0
run = st.selectbox("Run", runs, index=index, format_func=view.run_label, key=f"quantize_run_{project}")
if st.query_params.get(RUN_PARAM) != run.name:
    st.query_params[RUN_PARAM] = run.name

job = data.followed_job(settings, run.path, st.query_params.get(JOB_PARAM, ""))
busy = job is not None and job.active
form = sections.launch_form(busy)
if form is not None:
    submit = partial(data.submit_quantize, settings, project, run, form)
    queued = run_and_report("Quantization job", submit, state_key=sections.OUTCOME_KEY)
    if queued is not None:
        st.query_params[JOB_PARAM] = str(queued["job_id"])
    st.rerun()

if job is not None:
    if st.query_params.get(JOB_PARAM) != str(job.id):
        st.query_params[JOB_PARAM] = str(job.id)
    sections.job_progress(job, settings, busy)
sections.cancel_button(job, settings, busy)

report = sections.report_of(run)
if report is None:
    st.info("This run has no INT8 model yet: press Quantize.")
    st.stop()
sections.render_report(report)
sections.render_float_parts(report)
sections.render_downloads(run)
sections.render_gallery(report, run)
