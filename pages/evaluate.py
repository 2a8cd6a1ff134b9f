"""Evaluate page: a run's checkpoint on a frozen dataset version's split → the mAP table, per-class AP, PR curves,
the confusion matrix and a paged error browser (false positives, misses, wrong class) with boxes drawn on the
server and a "fix in Label Studio" link per error.

Thin on purpose: an evaluation is an "evaluate" job (`backend.jobs.api`) that writes a JSON file, or a file already
there (a run's eval.json); everything shown is read from it by `backend.evaluation.report`.
"""

from pathlib import Path

import pandas as pd
import streamlit as st

from app.widgets import page_settings, project_picker, run_and_report, show_outcome, store_engine
from backend import catalog
from backend.evaluation import report, view
from backend.evaluation.coco_eval import load_evaluation
from backend.jobs import api as jobs
from backend.jobs import outcome
from backend.labeling.server import labelstudio_url
from backend.labeling.sync import task_links
from backend.store.db import session_scope
from backend.training import presets

RUN_PARAM, JOB_PARAM = "run", "eval_job"
PER_PAGE = 8


@st.cache_data(show_spinner=False, max_entries=8)
def read_evaluation(path: str, mtime: float) -> dict:
    del mtime  # part of the cache key: a new evaluation of the same file is read again
    return load_evaluation(path)


@st.cache_data(show_spinner=False, max_entries=256)
def error_picture(key: str, mtime: float, _item: report.ErrorItem, class_names: tuple[str, ...]) -> bytes:
    return view.error_jpeg(_item, class_names, max_side=480)  # key, mtime: the item's repr and its image's time


st.title("Evaluate")
settings = page_settings()
engine = store_engine(settings.database_url)
show_outcome("evaluate_outcome")
project = project_picker(engine, key="evaluate_project")
runs = [run for run in catalog.trained_runs(settings) if run.model("checkpoint") is not None]
if project is not None:
    with session_scope(engine) as session:
        runs = catalog.project_runs(session, settings, project, runs)
if not runs:
    st.info(f"No trained run of {project or 'any project'} yet: train one on the [Train](/train) page.")
    st.stop()
names, wanted = [run.name for run in runs], st.query_params.get(RUN_PARAM)
index = names.index(wanted) if wanted in names else 0
# Keys carry the project: another project's runs and versions are other options.
run = st.selectbox("Run", runs, index=index, format_func=view.run_label, key=f"evaluate_run_{project}")
if st.query_params.get(RUN_PARAM) != run.name:
    st.query_params[RUN_PARAM] = run.name
checkpoints = [run.path / name for name in view.MODEL_FILES if (run.path / name).is_file()]
model = st.radio("Checkpoint", checkpoints, format_func=lambda path: path.name, horizontal=True, key="evaluate_model")
with session_scope(engine) as session:
    versions = presets.frozen_versions(session, settings.storage, project) if project else []
choices, default = view.dataset_choices(Path(str(run.config.get("data", ""))), [(v.name, v.folder) for v in versions])
if not choices:
    st.info("No dataset to evaluate on: freeze a version of this project on the [Datasets](/datasets) page.")
    st.stop()
left, right = st.columns(2)
_, data = left.selectbox(
    "Dataset version", choices, index=default, format_func=lambda c: c[0], key=f"evaluate_data_{project}"
)
split = right.radio("Split", view.splits_of(data), horizontal=True, key="evaluate_split")
out = report.evaluation_file(run.path, model, data, split)

job_id = st.query_params.get(JOB_PARAM, "")
try:
    job = jobs.get_job(int(job_id), settings) if job_id.isdigit() else None
except ValueError:  # no such job
    job = None
if job is not None and job.params.get("out") != str(out):
    job = None  # that job evaluated another choice
busy = job is not None and job.active
label = "Evaluate again" if out.is_file() else "Evaluate"
if st.button(label, type="primary", disabled=busy, key="evaluate_start"):
    params = {"project": project, "model": str(model), "data": str(data), "split": split, "out": str(out)}

    def submit() -> dict:
        job_id = jobs.submit("evaluate", params, settings=settings)
        return outcome.submitted(job_id, f"evaluating {run.name}'s {model.name} on {data.name} [{split}]", settings)

    queued = run_and_report("Evaluation job", submit, state_key="evaluate_outcome")
    if queued is not None:
        st.query_params[JOB_PARAM] = str(queued["job_id"])
    st.rerun()

if job is not None:

    @st.fragment(run_every=2.0 if busy else None)
    def progress() -> None:
        current = jobs.get_job(job.id, settings)
        message = "" if current.state == "failed" else f": {current.message or ''}"  # the error is shown below
        st.progress(min(1.0, current.progress or 0.0), text=f"evaluation job {current.id} {current.state}{message}")
        if current.state == "failed":
            st.error(outcome.error_text(current) or "the evaluation failed")
        if busy and not current.active:
            st.rerun()

    progress()

if not out.is_file():
    st.info("Not evaluated on this dataset and split yet: press Evaluate.")
    st.stop()
evaluation = read_evaluation(str(out), out.stat().st_mtime)
class_names = tuple(evaluation["class_names"])
st.caption(view.counts_caption(out.name, evaluation))
for warning in evaluation.get("warnings") or []:
    st.warning(warning)

st.header("Metrics")
value = {"value": st.column_config.NumberColumn(format="%.4f")}
st.dataframe(pd.DataFrame(report.metric_rows(evaluation)), key="evaluate_metrics", hide_index=True, column_config=value)
per_class = report.per_class_rows(evaluation)
st.subheader("Per class")
st.dataframe(pd.DataFrame(per_class), key="evaluate_per_class", hide_index=True)
st.plotly_chart(view.ap_bars(per_class), key="evaluate_ap_bars")

st.header("Precision-recall (IoU 0.5)")
st.plotly_chart(view.pr_figure(evaluation), key="evaluate_pr_curves")

st.header("Confusion matrix")
confusion = report.confusion_view(evaluation)
shares = st.toggle("Show shares of each true class", key="evaluate_shares")
st.plotly_chart(view.confusion_figure(confusion, shares), key="evaluate_confusion")
st.caption(view.confusion_caption(confusion))

st.header("Errors")
kinds = list(report.ERROR_KINDS)
kinds = st.multiselect("Show", kinds, default=kinds, key="evaluate_kinds", format_func=report.ERROR_LABELS.get)
items = report.error_items(evaluation, kinds)
if not items:
    st.success("No error of these kinds at this score threshold.")
    st.stop()
pages = -(-len(items) // PER_PAGE)
page = st.number_input(f"Page (of {pages}, {len(items)} errors)", 1, pages, 1, key="evaluate_page")
shown, _ = report.page_of(items, int(page), PER_PAGE)
with session_scope(engine) as session:
    links = task_links(session, [item.store_image_id for item in shown], labelstudio_url(settings))
columns = st.columns(2)
for index, item in enumerate(shown):
    with columns[index % 2]:
        try:
            picture = error_picture(repr(item), Path(item.path).stat().st_mtime, item, class_names)
            st.image(picture, caption=report.describe_error(item, class_names))
        except (OSError, ValueError) as error:
            st.warning(f"{item.path}: cannot draw ({error})")
        link = links.get(item.store_image_id)
        if link:
            st.markdown(f"[Fix in Label Studio]({link})")
        else:
            st.caption("Not in Label Studio: sync the project on the Label page to fix it there.")
