"""Evaluate page: a run's checkpoint on a frozen dataset version's split → the mAP table, per-class AP, PR curves,
the confusion matrix and a paged error browser (false positives, misses, wrong class) with boxes drawn on the
server and a "fix in Label Studio" link per error.

Thin on purpose: an evaluation is an "evaluate" job that writes a JSON file, or a file already there (a run's
eval.json); the runs, datasets and job come from `backend.views.evaluate`, the sections are drawn by
`app.evaluate_sections` from what `backend.evaluation.report` reads.
"""

from functools import partial

import streamlit as st

from app import evaluate_sections as sections
from app.widgets import page_settings, project_picker, run_and_report, show_outcome, store_engine
from backend.evaluation import report, view
from backend.views import evaluate as data

RUN_PARAM, JOB_PARAM = "run", "eval_job"

st.title("Evaluate")
settings = page_settings()
show_outcome("evaluate_outcome")
project = project_picker(store_engine(settings.database_url), key="evaluate_project")
runs = data.evaluable_runs(settings, project)
if not runs:
    st.info(f"No trained run of {project or 'any project'} yet: train one on the [Train](/train) page.")
    st.stop()
names, wanted = [run.name for run in runs], st.query_params.get(RUN_PARAM)
index = names.index(wanted) if wanted in names else 0
# Keys carry the project: another project's runs and versions are other options.
run = st.selectbox("Run", runs, index=index, format_func=view.run_label, key=f"evaluate_run_{project}")
if st.query_params.get(RUN_PARAM) != run.name:
    st.query_params[RUN_PARAM] = run.name
checkpoints = data.model_files(run)
model = st.radio("Checkpoint", checkpoints, format_func=lambda path: path.name, horizontal=True, key="evaluate_model")
choices, default = data.dataset_choices(settings, project, run)
if not choices:
    st.info("No dataset to evaluate on: freeze a version of this project on the [Datasets](/datasets) page.")
    st.stop()
left, right = st.columns(2)
_, dataset = left.selectbox(
    "Dataset version", choices, index=default, format_func=lambda c: c[0], key=f"evaluate_data_{project}"
)
split = right.radio("Split", view.splits_of(dataset), horizontal=True, key="evaluate_split")
out = report.evaluation_file(run.path, model, dataset, split)

job = data.followed_job(settings, st.query_params.get(JOB_PARAM, ""), out)
busy = job is not None and job.active
label = "Evaluate again" if out.is_file() else "Evaluate"
if st.button(label, type="primary", disabled=busy, key="evaluate_start"):
    submit = partial(data.submit_evaluation, settings, project, run, model, dataset, split, out)
    queued = run_and_report("Evaluation job", submit, state_key="evaluate_outcome")
    if queued is not None:
        st.query_params[JOB_PARAM] = str(queued["job_id"])
    st.rerun()
if job is not None:
    sections.job_progress(job, settings, busy)

if not out.is_file():
    st.info("Not evaluated on this dataset and split yet: press Evaluate.")
    st.stop()
evaluation = sections.read_evaluation(str(out), out.stat().st_mtime)
st.caption(view.counts_caption(out.name, evaluation))
for warning in evaluation.get("warnings") or []:
    st.warning(warning)
sections.render_metrics(evaluation)
sections.render_curves(evaluation)
sections.render_errors(evaluation, settings)
