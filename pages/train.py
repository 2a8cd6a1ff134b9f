"""Train page: a preset with its settings on a frozen dataset version → a "train" job, with the time an epoch takes
here and the recommended budget, start weights checked before anything is queued, the augmentation and a preview;
the job's live progress and curves, cancel and resume; Continue training (`?continue=<run>`); the runs. Data and
actions come from `backend.views.train`; the chosen job stays in `?job=` so a reload keeps it."""

import json

import pandas as pd
import streamlit as st

from app.widgets import page_settings, project_picker, run_and_report, show_outcome, store_engine
from backend import browse
from backend.data.augment import AugmentationError, parse_pipeline_text
from backend.jobs import api as jobs
from backend.jobs import outcome
from backend.training import presets
from backend.views import train as view

JOB_PARAM, CONTINUE_PARAM = "job", "continue"
OUTCOME = "train_outcome"
state, params = st.session_state, st.query_params


def start_job(title: str, action) -> None:
    """Runs a step that queues a job; the new job becomes ?job=, the outcome shows at the top after the rerun."""
    queued = run_and_report(title, action, state_key=OUTCOME)
    if queued is not None and "job_id" in queued:
        params[JOB_PARAM] = str(queued["job_id"])
    st.rerun()


@st.cache_data(max_entries=8, show_spinner="Augmenting 8 samples...")
def augmentation_samples(folder: str, pipeline_json: str, size: int, seed: int) -> list:
    return browse.version_augmentation_preview(folder, json.loads(pipeline_json), size, 8, seed)


st.title("Train")
settings = page_settings()
show_outcome(OUTCOME)
project = project_picker(store_engine(settings.database_url), key="train_project")
data = view.train_data(settings, project)

st.header("New run")
if project is not None and not data.versions:
    st.info("This project has no frozen dataset version yet: freeze one on the [Datasets](/datasets) page.")
# Keys carry the project (its own versions and runs) and the preset (choosing another brings back its values).
version = st.selectbox("Dataset version", data.versions, format_func=lambda v: v.label, key=f"train_version_{project}")
name = st.radio("Preset", list(presets.PRESETS), horizontal=True, key="train_preset")
preset = presets.PRESETS[name]
st.caption(preset.description)
left, middle, right = st.columns(3)
sizes = view.IMAGE_SIZES
imgsz = left.selectbox("Image size (px)", sizes, index=sizes.index(preset.imgsz), key=f"train_imgsz_{name}")
epochs = middle.number_input("Epochs", 1, 1000, preset.epochs, key=f"train_epochs_{name}")
batch = right.number_input("Batch size", 1, 256, preset.batch_size, key=f"train_batch_{name}")
timing = view.time_estimate(settings, preset, imgsz, batch, state.get("train_device", presets.DEVICES[0]), version)
known = timing.estimate is not None and timing.estimate.train_images
budget_key = f"train_budget_{name}"
if budget_key not in state:  # the first suggestion: the recommended budget when a speed is known
    state[budget_key] = float((timing.estimate.recommended_minutes if known else None) or preset.time_minutes or 0)
# No help icon on the fields: the estimate says the rule, and a label stays one element for the browser tests.
budget = left.number_input("Time budget (minutes, 0 = none)", 0.0, 10_000.0, key=budget_key)
device = middle.radio("Device", presets.DEVICES, horizontal=True, key="train_device")
if timing.problem:
    st.caption(timing.problem)
elif known:
    st.info(timing.estimate.text(), icon=":material/timer:")
    if round(budget) != (minutes := timing.estimate.recommended_minutes):
        label = f"Use the recommended budget ({minutes} min)"
        st.button(label, key="train_use_budget", on_click=lambda: state.update({budget_key: float(minutes)}))
elif timing.estimate is None:
    st.caption(view.no_estimate_text(preset, imgsz, batch, timing.speed_key))
    if st.button("Measure this machine's speed", key="train_measure", help=view.measure_help()):
        run_and_report("Speed measurement", lambda: view.measure_speed(settings, timing.speed_key), state_key=OUTCOME)
        st.rerun()

options = presets.weights_options(data.runs, preset.size, settings.weights_dir)
weights = right.selectbox(
    "Start weights",
    options,
    index=presets.default_weights(options, data.project_runs),
    format_func=lambda option: option.label,
    key=f"train_weights_{name}_{project}",
)
problems = state.setdefault("train_coco_problems", {})
weights_problem, download_note = view.coco_weights_check(settings, preset, weights, problems)
start_weights = weights.value
if weights.value == presets.FILE_WEIGHTS:
    start_weights = st.text_input("Checkpoint file (.pt)", key="train_weights_file").strip() or None
    weights_problem = None if start_weights else "give the path of a checkpoint file"
elif weights_problem:
    st.error(f"Start weights: {weights_problem}", icon=":material/cloud_off:")
elif download_note:
    st.info(download_note, icon=":material/download:")
if note := view.weights_note(start_weights):
    st.warning(note, icon=":material/gavel:")
gpus = 1
if (gpu_count := view.gpu_count()) > 1:  # several GPUs: DDP, one process each; the batch above is the global batch
    gpus = left.number_input("GPUs", 1, gpu_count, 1, key="train_gpus", disabled=device == "cpu")

st.subheader("Augmentation")
pipeline, augment_problem = None, None
source = st.radio("Pipeline", ["Default (the recipe)", "Upload a file"], horizontal=True, key="train_aug_source")
if source == "Upload a file":
    upload = st.file_uploader(
        "Pipeline file: JSON or YAML in albumentations' A.to_dict form",
        type=["json", "yaml", "yml"],
        key="train_aug_file",
    )
    augment_problem = "upload a pipeline file, or choose the default" if upload is None else None
    try:
        pipeline = upload and parse_pipeline_text(upload.getvalue().decode("utf-8", "replace"), int(imgsz), upload.name)
    except AugmentationError as error:
        augment_problem = str(error)
        st.error(f"Augmentation: {error}", icon=":material/error:")
if version is not None and augment_problem is None and st.toggle("Show the augmentation preview", key="train_aug_show"):
    seed = state.setdefault("train_aug_seed", 0)
    if st.button("Reseed", key="train_aug_reseed", help="8 other samples through the same pipeline"):
        seed = state["train_aug_seed"] = seed + 1
    with st.container(key="train_aug_preview"):
        try:
            samples = augmentation_samples(str(version.folder), json.dumps(pipeline), int(imgsz), seed)
        except (AugmentationError, ValueError) as error:
            st.error(f"Augmentation preview: {error}", icon=":material/error:")
        else:
            st.image(samples, width=160, caption=[f"sample {k + 1}" for k in range(len(samples))])

form = {"imgsz": imgsz, "epochs": epochs, "batch": batch, "budget": budget, "device": device, "gpus": gpus}
form |= {"weights": start_weights, "pipeline": pipeline, "coco_problem": problems.get(preset.size)}
blocked = version is None or bool(weights_problem) or bool(augment_problem)
if st.button("Start training", type="primary", disabled=blocked, key="train_start"):
    start_job("Training job", lambda: view.launch(settings, project, version, name, form))

st.header("Training job")
wanted = params.get(JOB_PARAM)
ids, chosen = view.job_choices(settings, project, wanted)
# The key follows ?job=: a launch or a resume that changes it selects the new job.
job_id = st.selectbox("Job", ids, index=chosen, format_func=lambda value: f"job {value}", key=f"train_job_{wanted}")
job, problem = view.training_job(settings, job_id)
if problem:
    st.warning(problem)
if job_id is not None and str(job_id) != wanted:
    params[JOB_PARAM] = str(job_id)
if job is None:
    st.caption("No training job yet.")
# Buttons outside the live fragment and always drawn: a click inside a fragment that reruns on a timer can be lost.
cancel_column, resume_column = st.columns(2)
if cancel_column.button("Cancel", disabled=job is None or not job.active, key="train_cancel"):
    run_and_report("Cancel", lambda: view.cancel(settings, job.id), state_key=OUTCOME)
    st.rerun()
if resume_column.button("Resume", disabled=job is None or not job.can_resume, key="train_resume"):
    start_job("Resume", lambda: view.resume(settings, job.id))

if job is not None:

    @st.fragment(run_every=2.0 if job.active else None)
    def live() -> None:
        current = jobs.get_job(job.id, settings)
        st.progress(min(1.0, current.progress or 0.0), text=view.progress_text(current))
        curves = presets.TrainingCurves()
        if current.run_dir:
            kept_key = f"train_events_{current.run_dir}"
            state[kept_key], curves = view.read_curves(str(current.run_dir), state.get(kept_key, (0, [])))
        if curves.steps or curves.epochs:
            st.plotly_chart(view.curve_figure(curves), key="train_curves")
        if ended := view.end_banner(curves):
            (st.success if ended[0] else st.warning)(ended[1])
        if current.state == "failed":
            st.error(outcome.error_text(current) or "the job failed")
        if job.active and not current.active:
            st.rerun()  # the whole page: buttons become (dis)abled, the timer stops

    live()
    with st.expander("Job log"):
        st.code("\n".join(job.log_tail) or "(empty)")
        if job.traceback:
            st.code(job.traceback)

states = view.run_states(settings)
st.header("Continue training")
wanted_run = params.get(CONTINUE_PARAM)
candidates = view.continuable(data, states, wanted_run)
names = list(candidates)
if refusal := view.continue_refusal(wanted_run, names):
    st.warning(refusal)
st.caption(view.CONTINUE_CAPTION)
continue_key = f"train_continue_{wanted_run}"
if state.get(continue_key) not in names:  # kept from when the runs were others (e.g. one was training)
    state.pop(continue_key, None)
continued_name = st.selectbox(
    "Run",
    names,
    index=names.index(wanted_run) if wanted_run in names else 0,
    key=continue_key,
    format_func=lambda run: f"{run} ({candidates[run].epochs_text})",
)
continued = candidates.get(continued_name) if continued_name else None
more_left, more_right = st.columns(2)
more_minutes = more_left.number_input("More minutes (0 = no time limit)", 0.0, 10_000.0, 10.0, key="train_more_minutes")
more_epochs = more_right.number_input(
    "More epochs (0 = as many as the minutes allow)", 0, 1000, 0, key="train_more_epochs"
)
if st.button(
    "Continue training", key="train_continue", disabled=continued is None or not (more_minutes or more_epochs)
):
    start_job("Continue training", lambda: view.continue_training(settings, continued, more_minutes, more_epochs))

st.header("Runs")
rows = presets.run_rows(data.project_runs, states)
if caption := view.runs_caption(project, data):
    st.caption(caption)
if rows:
    st.dataframe(
        pd.DataFrame(rows),
        key="train_runs",
        hide_index=True,
        column_config={"best mAP50-95": st.column_config.NumberColumn(format="%.4f")},
    )
else:
    st.caption("No run yet.")
