"""Train page: a preset (S/M/L) with its image size, epochs, batch, time budget, start weights and device, on a frozen
dataset version → a "train" job; before it, the time an epoch takes on this machine and the recommended budget (from
a measured speed: `backend.training.estimate`), and start weights that cannot work refused before anything is queued;
the training augmentation (the default pipeline or an uploaded albumentations JSON/YAML file) with a preview of 8
samples of the version through it; the job's live progress, ETA and the run's loss/lr/mAP curves; cancel and resume;
Continue training of a run that ended (`?continue=<run folder name>` opens on it); the list of runs.

Thin on purpose: presets, run folders and curves come from `backend.training.presets`, jobs from
`backend.jobs.api`, runs from `backend.catalog`. The chosen job stays in `?job=` so a reload keeps it.
"""

import json

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app.widgets import page_settings, project_picker, run_and_report, show_outcome, store_engine
from backend import browse, catalog
from backend.data.augment import AugmentationError, parse_pipeline_text
from backend.jobs import api as jobs
from backend.jobs import outcome
from backend.store.db import session_scope
from backend.training import estimate, presets
from backend.training.config import TrainingError
from backend.training.world import visible_gpus

JOB_PARAM = "job"
CONTINUE_PARAM = "continue"  # ?continue=<run folder name>: the Continue training section opens on that run
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
device = st.session_state.get("train_device", presets.DEVICES[0])

# -- before a run: the time an epoch takes here, from a measured speed, and the budget it suggests ---------------
try:
    speed_key = estimate.speed_key(preset.size, int(imgsz), int(batch), device)
except TrainingError as error:  # e.g. cuda chosen on a machine without a GPU: the job would say the same
    speed_key, estimated = None, None
    st.caption(f"No time estimate: {error}")
else:
    min_samples = presets.train_config("", preset).min_samples
    folder = version.folder if version is not None else ""
    estimated = estimate.estimate_for(settings.storage, settings.runs_dir, folder, speed_key, min_samples)
budget_key = f"train_budget_{name}"
if budget_key not in st.session_state:  # the first suggestion: the recommended budget when a speed is known
    suggested = estimated.recommended_minutes if estimated is not None and estimated.train_images else None
    st.session_state[budget_key] = float(suggested or preset.time_minutes or 0)
# No help icon on the fields: the estimate below says the rule, and a label stays one element for the browser tests.
budget = left.number_input("Time budget (minutes, 0 = none)", 0.0, 10_000.0, key=budget_key)
device = middle.radio("Device", presets.DEVICES, horizontal=True, key="train_device")
if estimated is not None and estimated.train_images:
    st.info(estimated.text(), icon=":material/timer:")
    if round(budget) != estimated.recommended_minutes:
        st.button(
            f"Use the recommended budget ({estimated.recommended_minutes} min)", key="train_use_budget",
            on_click=lambda: st.session_state.update({budget_key: float(estimated.recommended_minutes)}),
        )  # fmt: skip
elif speed_key is not None and estimated is None:
    st.caption(
        f"No time estimate yet: no earlier run here trained YOLO-NAS {preset.name} at {int(imgsz)} px, batch "
        f"{int(batch)} on {speed_key.device} ({speed_key.precision}), and this machine's speed was not measured."
    )
    if st.button(
        "Measure this machine's speed", key="train_measure",
        help=f"Times {estimate.PROBE_STEPS} training steps of the model on random images (the first one warms up): "
        "about 20 s for S at 320 px, batch 16, on a 2-core CPU; more on a busy machine or for a larger model.",
    ):  # fmt: skip
        run_and_report(
            "Speed measurement",
            lambda: {"summary": estimate.measure_speed(settings.storage, speed_key).detail},
            state_key="train_outcome",
        )
        st.rerun()

# -- start weights: the form refuses what cannot work before anything is queued ----------------------------------
options = presets.weights_options(runs, preset.size, settings.weights_dir)
weights = right.selectbox(
    "Start weights",
    options,
    index=presets.default_weights(options, project_runs),
    format_func=lambda option: option.label,
    key=f"train_weights_{name}_{project}",
)
start_weights, weights_problem = weights.value, None
if weights.value == presets.FILE_WEIGHTS:
    start_weights = st.text_input("Checkpoint file (.pt)", key="train_weights_file").strip() or None
    weights_problem = None if start_weights else "give the path of a checkpoint file"
elif weights.value == presets.COCO_WEIGHTS and weights.note:  # not on this machine: can the job fetch it?
    problems = st.session_state.setdefault("train_coco_problems", {})  # asked once a session per size
    if preset.size not in problems:
        problems[preset.size] = presets.coco_download_problem(preset.size)
    try:
        presets.check_start_weights(weights.value, preset.size, settings.weights_dir, problems[preset.size])
    except ValueError as error:
        weights_problem = str(error)
        st.error(f"Start weights: {error}", icon=":material/cloud_off:")
    else:
        st.info(weights.note, icon=":material/download:")
note = presets.licence_note(start_weights)
if note:
    st.warning(note, icon=":material/gavel:")
gpus, gpu_count = 1, visible_gpus()
if gpu_count > 1:  # several GPUs: DDP, one process each; the batch size above is the global batch
    gpus = left.number_input("GPUs", 1, gpu_count, 1, key="train_gpus", disabled=device == "cpu")

# -- augmentation: the default pipeline or an uploaded one, and 8 samples of the version through it -------------
st.subheader("Augmentation")
pipeline, augment_problem = None, None
source = st.radio("Pipeline", ["Default (the recipe)", "Upload a file"], horizontal=True, key="train_aug_source")
if source == "Upload a file":
    upload = st.file_uploader(
        "Pipeline file: JSON or YAML in albumentations' A.to_dict form", type=["json", "yaml", "yml"],
        key="train_aug_file",
    )  # fmt: skip
    if upload is None:
        augment_problem = "upload a pipeline file, or choose the default"
    else:
        try:
            pipeline = parse_pipeline_text(upload.getvalue().decode("utf-8", "replace"), int(imgsz), upload.name)
        except AugmentationError as error:
            augment_problem = str(error)
            st.error(f"Augmentation: {error}", icon=":material/error:")


@st.cache_data(max_entries=8, show_spinner="Augmenting 8 samples...")
def augmentation_samples(folder: str, pipeline_json: str, size: int, seed: int) -> list:
    return browse.version_augmentation_preview(folder, json.loads(pipeline_json), size, 8, seed)


if version is not None and augment_problem is None and st.toggle("Show the augmentation preview", key="train_aug_show"):
    seed = st.session_state.setdefault("train_aug_seed", 0)
    if st.button("Reseed", key="train_aug_reseed", help="8 other samples through the same pipeline"):
        seed = st.session_state["train_aug_seed"] = seed + 1
    with st.container(key="train_aug_preview"):
        try:
            samples = augmentation_samples(str(version.folder), json.dumps(pipeline), int(imgsz), seed)
        except (AugmentationError, ValueError) as error:
            st.error(f"Augmentation preview: {error}", icon=":material/error:")
        else:
            st.image(samples, width=160, caption=[f"sample {k + 1}" for k in range(len(samples))])


def launch() -> dict:
    problem = st.session_state.get("train_coco_problems", {}).get(preset.size)
    presets.check_start_weights(start_weights, preset.size, settings.weights_dir, problem)  # before queueing
    config = presets.train_config(
        version.folder, preset, imgsz=int(imgsz), epochs=int(epochs), batch_size=int(batch),
        time_minutes=float(budget) or None, weights=start_weights, device=device, augment_pipeline=pipeline,
    )  # fmt: skip
    run_dir = presets.new_run_dir(settings.runs_dir, project, version.name)
    params = {"project": project, "config": config.to_dict(), "run_dir": str(run_dir)}
    if gpus > 1 and device != "cpu":
        params["gpus"] = int(gpus)
    job_id = jobs.submit("train", params, settings=settings)
    return outcome.submitted(job_id, f"training {name} at {int(imgsz)} px on {version.name}", settings)


blocked = version is None or bool(weights_problem) or bool(augment_problem)
if st.button("Start training", type="primary", disabled=blocked, key="train_start"):
    queued = run_and_report("Training job", launch, state_key="train_outcome")
    if queued is not None:
        st.query_params[JOB_PARAM] = str(queued["job_id"])
    st.rerun()  # the outcome (or the refusal) is shown at the top

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

# Buttons outside the live fragment and always drawn: a click inside a fragment that reruns on a timer can be lost.
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

# ----------------------------------------------------------------------------------------------------- continue
states = {}
for train_job in reversed(jobs.list_jobs(settings, kind="train", limit=200)):  # oldest first: newest wins
    states[str(train_job.run_dir)] = train_job.state
st.header("Continue training")
wanted_run = st.query_params.get(CONTINUE_PARAM)
candidates = {run.name: run for run in presets.continuable_runs(project_runs, runs, states, wanted_run)}
names = list(candidates)
if wanted_run and wanted_run not in names:
    st.warning(f"The run {wanted_run} cannot be continued here: it is not a run folder with a last.pt, or it is "
               "still training.")  # fmt: skip
st.caption(
    "A finished, stopped or early-stopped run trains longer in its own folder: its curves go on, best.pt is replaced "
    "only by a better mAP50-95, and the learning rate follows a cosine over the new total. With more minutes and "
    "more epochs, whichever ends first ends it."
)
continue_key = f"train_continue_{wanted_run}"
if st.session_state.get(continue_key) not in names:  # kept from when the runs were others (e.g. one was training)
    st.session_state.pop(continue_key, None)
continued_name = st.selectbox(
    "Run", names, index=names.index(wanted_run) if wanted_run in names else 0,
    format_func=lambda run_name: f"{run_name} ({candidates[run_name].epochs_text})", key=continue_key,
)  # fmt: skip
continued = candidates.get(continued_name) if continued_name else None
more_left, more_right = st.columns(2)
more_minutes = more_left.number_input("More minutes (0 = no time limit)", 0.0, 10_000.0, 10.0, key="train_more_minutes")
more_epochs = more_right.number_input(
    "More epochs (0 = as many as the minutes allow)", 0, 1000, 0, key="train_more_epochs"
)
if st.button(
    "Continue training", key="train_continue", disabled=continued is None or not (more_minutes or more_epochs)
):
    more = presets.more_text(float(more_minutes), int(more_epochs))
    resumed = run_and_report(
        "Continue training",
        lambda: outcome.submitted(
            jobs.continue_training(continued.path, float(more_minutes) or None, int(more_epochs) or None, settings),
            f"continuing {continued.name} for {more}", settings,
        ),
        state_key="train_outcome",
    )  # fmt: skip
    if resumed is not None:
        st.query_params[JOB_PARAM] = str(resumed["job_id"])
    st.rerun()

# ----------------------------------------------------------------------------------------------------- runs
st.header("Runs")
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
