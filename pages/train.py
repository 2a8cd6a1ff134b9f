"""Train page: a preset (S/M/L) with its image size, epochs, batch, time budget, start weights and device, on a frozen
dataset version → a "train" job; the job's live progress, ETA and the run's loss/lr/mAP curves; cancel and resume;
the list of runs.

Thin on purpose: presets, run folders and curves come from `backend.training.presets`, jobs from
`backend.jobs.api`, runs from `backend.catalog`. The chosen job stays in `?job=` so a reload keeps it.
"""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app.widgets import page_settings, project_picker, run_and_report, show_outcome, store_engine
from backend import catalog
from backend.jobs import api as jobs
from backend.jobs import outcome
from backend.store.db import session_scope
from backend.training import presets
from backend.training.distributed import visible_gpus

JOB_PARAM = "job"
REFRESH_S = 2.0
IMAGE_SIZES = (64, 128, 192, 256, 320, 384, 416, 480, 512, 640, 768, 896, 1024)

st.title("Train")
settings = page_settings()
engine = store_engine(settings.database_url)
show_outcome("train_outcome")
project = project_picker(engine, key="train_project")
runs = catalog.list_runs(settings)
with session_scope(engine) as session:
    versions = presets.frozen_versions(session, settings.storage, project) if project else []
    project_runs = catalog.project_runs(session, settings, project, runs) if project else runs

# ---------------------------------------------------------------------------------------------------- launch form
st.header("New run")
if project is not None and not versions:
    st.info("This project has no frozen dataset version yet: freeze one on the [Datasets](/datasets) page.")
# Keys carry the project: another project's versions and runs are other options, each project keeps its choice.
version = st.selectbox(
    "Dataset version", versions, format_func=lambda choice: choice.label, key=f"train_version_{project}"
)
name = st.radio("Preset", list(presets.PRESETS), horizontal=True, key="train_preset")
preset = presets.PRESETS[name]
st.caption(preset.description)
# Keys carry the preset, so choosing another preset brings back its values.
left, middle, right = st.columns(3)
imgsz = left.selectbox("Image size (px)", IMAGE_SIZES, index=IMAGE_SIZES.index(preset.imgsz), key=f"train_imgsz_{name}")
epochs = middle.number_input("Epochs", 1, 1000, preset.epochs, key=f"train_epochs_{name}")
batch = right.number_input("Batch size", 1, 256, preset.batch_size, key=f"train_batch_{name}")
budget = left.number_input(
    "Time budget (minutes, 0 = none)", 0.0, 10_000.0, float(preset.time_minutes or 0), key=f"train_budget_{name}"
)
device = middle.radio("Device", presets.DEVICES, horizontal=True, key="train_device")
options = presets.weights_options(runs, preset.size, settings.weights_dir)
weights = right.selectbox(
    "Start weights",
    options,
    index=presets.default_weights(options, project_runs),
    format_func=lambda option: option.label,
    key=f"train_weights_{name}_{project}",
)
if weights.note:
    st.info(weights.note, icon=":material/download:")
note = presets.licence_note(weights.value)
if note:
    st.warning(note, icon=":material/gavel:")
gpus, gpu_count = 1, visible_gpus()
if gpu_count > 1:  # several GPUs: DDP, one process each; the batch size above is the global batch
    gpus = left.number_input("GPUs", 1, gpu_count, 1, key="train_gpus", disabled=device == "cpu")


def launch() -> dict:
    config = presets.train_config(
        version.folder, preset, imgsz=int(imgsz), epochs=int(epochs), batch_size=int(batch),
        time_minutes=float(budget) or None, weights=weights.value, device=device,
    )  # fmt: skip
    run_dir = presets.new_run_dir(settings.runs_dir, project, version.name)
    params = {"project": project, "config": config.to_dict(), "run_dir": str(run_dir)}
    if gpus > 1 and device != "cpu":
        params["gpus"] = int(gpus)
    job_id = jobs.submit("train", params, settings=settings)
    return outcome.submitted(job_id, f"training {name} at {int(imgsz)} px on {version.name}", settings)


if st.button("Start training", type="primary", disabled=version is None, key="train_start"):
    queued = run_and_report("Training job", launch, state_key="train_outcome")
    if queued is not None:
        st.query_params[JOB_PARAM] = str(queued["job_id"])
        st.rerun()

# ----------------------------------------------------------------------------------------------------- the job
st.header("Training job")
recent = jobs.list_jobs(settings, kind="train", project=project, limit=20)
wanted = st.query_params.get(JOB_PARAM)
ids = [job.id for job in recent]
if wanted and wanted.isdigit() and int(wanted) not in ids:
    ids.insert(0, int(wanted))  # another project's job, or an old one: still show what ?job= names
chosen = ids.index(int(wanted)) if wanted and wanted.isdigit() else 0
# The key follows ?job=: a launch or a resume that changes it selects the new job.
job_id = st.selectbox("Job", ids, index=chosen, format_func=lambda value: f"job {value}", key=f"train_job_{wanted}")
job = None
if job_id is not None:
    try:
        job = jobs.get_job(job_id, settings)
    except ValueError as error:
        st.warning(f"{error}")
    if job is not None and job.kind != "train":
        st.warning(f"job {job.id} is a {job.kind} job: see it on the [Jobs](/jobs) page")
        job = None
    if str(job_id) != wanted:
        st.query_params[JOB_PARAM] = str(job_id)
if job is None:
    st.caption("No training job yet.")

# Buttons outside the live fragment and always drawn (recipe §1): a click inside a timed fragment can be lost.
cancel_column, resume_column = st.columns(2)
if cancel_column.button("Cancel", disabled=job is None or not job.active, key="train_cancel"):
    run_and_report("Cancel", lambda: outcome.cancel_requested(jobs.cancel(job.id, settings)), state_key="train_outcome")
    st.rerun()
if resume_column.button("Resume", disabled=job is None or not job.can_resume, key="train_resume"):
    resumed = run_and_report(
        "Resume",
        lambda: outcome.submitted(jobs.resume(job.id, settings), f"continuing job {job.id}'s run", settings),
        state_key="train_outcome",
    )
    if resumed is not None:
        st.query_params[JOB_PARAM] = str(resumed["job_id"])
    st.rerun()


def curve_figure(curves: presets.TrainingCurves) -> go.Figure:
    figure = make_subplots(rows=1, cols=3, subplot_titles=("Loss terms", "Learning rate", "Validation mAP"))
    steps = pd.DataFrame(curves.steps)
    for term in curves.loss_terms:
        figure.add_trace(go.Scatter(x=steps["global_step"], y=steps[term], name=term, mode="lines"), row=1, col=1)
    if not steps.empty:
        figure.add_trace(go.Scatter(x=steps["global_step"], y=steps["lr"], name="lr", mode="lines"), row=1, col=2)
    epochs_table = pd.DataFrame(curves.epochs)
    for metric in ("mAP50-95", "mAP50"):
        if metric in epochs_table:
            figure.add_trace(
                go.Scatter(x=epochs_table["epoch"], y=epochs_table[metric], name=metric, mode="lines+markers"),
                row=1, col=3,
            )  # fmt: skip
    figure.update_xaxes(title_text="step", row=1, col=1).update_xaxes(title_text="step", row=1, col=2)
    figure.update_xaxes(title_text="epoch", row=1, col=3)
    return figure.update_layout(height=340, margin={"t": 40, "b": 0})


def read_run(run_dir: str) -> presets.TrainingCurves:
    """New lines of the run's metrics.jsonl only: a long run is not parsed again every refresh."""
    offset, events = st.session_state.get(f"train_events_{run_dir}", (0, []))
    new, offset = presets.read_events(f"{run_dir}/metrics.jsonl", offset)
    events = presets.compact_events(events + new)
    st.session_state[f"train_events_{run_dir}"] = (offset, events)
    return presets.training_curves(events)


if job is not None:
    was_active = job.active

    @st.fragment(run_every=REFRESH_S if was_active else None)
    def live() -> None:
        current = jobs.get_job(job.id, settings)
        eta = f" · ETA {current.eta_s / 60:.1f} min" if current.eta_s and current.active else ""
        # A failed job's message is its error: shown once, below, not in the bar too.
        message = "" if current.state == "failed" else f": {current.message or ''}"
        st.progress(min(1.0, current.progress or 0.0), text=f"job {current.id} {current.state}{message}{eta}")
        curves = read_run(str(current.run_dir)) if current.run_dir else presets.TrainingCurves()
        if curves.steps or curves.epochs:
            st.plotly_chart(curve_figure(curves), key="train_curves")
        if curves.end:
            ended = f"Run ended: {catalog.training_end_text(curves.end, curves.start)}."
            cancelled, evaluated = curves.end.get("stopped") == "cancelled", curves.end.get("best_epoch") is not None
            (st.success if evaluated and not cancelled else st.warning)(ended)
        if current.state == "failed":
            st.error(outcome.error_text(current) or "the job failed")
        if was_active and not current.active:
            st.rerun()  # the whole page: buttons become (dis)abled, the timer stops

    live()
    with st.expander("Job log"):
        st.code("\n".join(job.log_tail) or "(empty)")
        if job.traceback:
            st.code(job.traceback)

# ----------------------------------------------------------------------------------------------------- runs
st.header("Runs")
states = {}
for train_job in reversed(jobs.list_jobs(settings, kind="train", limit=200)):  # oldest first: newest wins
    states[str(train_job.run_dir)] = train_job.state
rows = presets.run_rows(project_runs, states)
if project is not None and len(project_runs) < len(runs):
    st.caption(f"The runs of {project}; {len(runs) - len(project_runs)} more belong to other projects.")
if rows:
    st.dataframe(
        pd.DataFrame(rows),
        key="train_runs",
        hide_index=True,
        column_config={"best mAP50-95": st.column_config.NumberColumn(format="%.4f")},
    )
else:
    st.caption("No run yet.")
