"""The Train page's sections: the time budget, the start weights, the augmentation and its preview, the live training
job with cancel and resume, Continue training and the runs table. Each draws its widgets (their keys are the page's)
and asks `backend.views.train`; the page arranges them."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from app.widgets import run_and_report
from backend import browse
from backend.data.augment import AugmentationError, parse_pipeline_text
from backend.jobs import api as jobs
from backend.jobs import outcome
from backend.settings import Settings
from backend.training import presets
from backend.views import train as view

JOB_PARAM, CONTINUE_PARAM = "job", "continue"
OUTCOME = "train_outcome"
state, params = st.session_state, st.query_params


def start_job(title: str, action: Callable[[], Any]) -> None:
    """Runs a step that queues a job; the new job becomes ?job=, the outcome shows at the top after the rerun."""
    queued = run_and_report(title, action, state_key=OUTCOME)
    if queued is not None and "job_id" in queued:
        params[JOB_PARAM] = str(queued["job_id"])
    st.rerun()


@st.cache_data(max_entries=8, show_spinner="Augmenting 8 samples...")
def augmentation_samples(folder: str, pipeline_json: str, size: int, seed: int) -> list:
    """8 samples of the version through the pipeline, cached by all four arguments: a rerun does not augment again."""
    return browse.version_augmentation_preview(folder, json.loads(pipeline_json), size, 8, seed)


def time_budget(
    settings: Settings,
    preset: presets.TrainPreset,
    imgsz: int,
    batch: int,
    version: presets.VersionChoice | None,
    left: DeltaGenerator,
    middle: DeltaGenerator,
) -> tuple[float, str]:
    """The time budget (first suggested from this machine's speed) and the device, with the time an epoch takes here
    or a way to measure it. Returns (budget in minutes, device)."""
    timing = view.time_estimate(settings, preset, imgsz, batch, state.get("train_device", presets.DEVICES[0]), version)
    budget_key = f"train_budget_{preset.name}"
    if budget_key not in state:  # the first suggestion: the recommended budget when a speed is known
        state[budget_key] = view.suggested_budget(timing, preset)
    # No help icon on the fields: the estimate says the rule, and a label stays one element for the browser tests.
    budget = left.number_input("Time budget (minutes, 0 = none)", 0.0, 10_000.0, key=budget_key)
    device = middle.radio("Device", presets.DEVICES, horizontal=True, key="train_device")
    if timing.problem:
        st.caption(timing.problem)
    elif timing.known:
        st.info(timing.estimate.text(), icon=":material/timer:")
        if round(budget) != (minutes := timing.estimate.recommended_minutes):
            label = f"Use the recommended budget ({minutes} min)"
            st.button(label, key="train_use_budget", on_click=lambda: state.update({budget_key: float(minutes)}))
    elif timing.estimate is None:
        st.caption(view.no_estimate_text(preset, imgsz, batch, timing.speed_key))
        if st.button("Measure this machine's speed", key="train_measure", help=view.measure_help()):
            run_and_report(
                "Speed measurement", lambda: view.measure_speed(settings, timing.speed_key), state_key=OUTCOME
            )
            st.rerun()
    return budget, device


def start_weights(
    settings: Settings, data: view.TrainData, preset: presets.TrainPreset, project: str | None, column: DeltaGenerator
) -> tuple[str | None, str | None, str | None]:
    """The start weights: a choice in `column` (a checkpoint file asks for its path), checked before anything is
    queued. Returns (the weights, the problem that blocks the launch or None, the COCO download problem or None)."""
    options = presets.weights_options(data.runs, preset.size, settings.weights_dir)
    weights = column.selectbox(
        "Start weights",
        options,
        index=presets.default_weights(options, data.project_runs),
        format_func=lambda option: option.label,
        key=f"train_weights_{preset.name}_{project}",
    )
    problems = state.setdefault("train_coco_problems", {})
    weights_problem, download_note = view.coco_weights_check(settings, preset, weights, problems)
    chosen = weights.value
    if weights.value == presets.FILE_WEIGHTS:
        chosen = st.text_input("Checkpoint file (.pt)", key="train_weights_file").strip() or None
        weights_problem = None if chosen else "give the path of a checkpoint file"
    elif weights_problem:
        st.error(f"Start weights: {weights_problem}", icon=":material/cloud_off:")
    elif download_note:
        st.info(download_note, icon=":material/download:")
    if note := view.weights_note(chosen):
        st.warning(note, icon=":material/gavel:")
    return chosen, weights_problem, problems.get(preset.size)


def augmentation(version: presets.VersionChoice | None, imgsz: int) -> tuple[Any, str | None]:
    """The augmentation pipeline (the recipe's, or an uploaded file) and its preview on the version. Returns (the
    uploaded pipeline or None for the default, the problem that blocks the launch or None)."""
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
            pipeline = upload and parse_pipeline_text(
                upload.getvalue().decode("utf-8", "replace"), int(imgsz), upload.name
            )
        except AugmentationError as error:
            augment_problem = str(error)
            st.error(f"Augmentation: {error}", icon=":material/error:")
    if (
        version is not None
        and augment_problem is None
        and st.toggle("Show the augmentation preview", key="train_aug_show")
    ):
        augmentation_preview(version, pipeline, imgsz)
    return pipeline, augment_problem


def augmentation_preview(version: presets.VersionChoice, pipeline: Any, imgsz: int) -> None:
    """8 augmented samples of the version; Reseed draws 8 others through the same pipeline."""
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


def training_job(settings: Settings, project: str | None) -> None:
    """The chosen training job (kept in ?job= so a reload keeps it): Cancel and Resume, its live progress and curves,
    its log."""
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
        live_job(settings, job)
        with st.expander("Job log"):
            st.code("\n".join(job.log_tail) or "(empty)")
            if job.traceback:
                st.code(job.traceback)


def live_job(settings: Settings, job: jobs.JobView) -> None:
    """The job's progress, curves and end, redrawn every 2 s while it runs (a fragment: only this part reruns); when
    the job ends, the whole page reruns so its buttons follow and the timer stops."""

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


def continue_training(settings: Settings, data: view.TrainData, states: dict[str, str]) -> None:
    """Continue training (`?continue=<run>` preselects a run): a finished run trains for more minutes or epochs."""
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
    minutes = more_left.number_input("More minutes (0 = no time limit)", 0.0, 10_000.0, 10.0, key="train_more_minutes")
    epochs = more_right.number_input(
        "More epochs (0 = as many as the minutes allow)", 0, 1000, 0, key="train_more_epochs"
    )
    if st.button("Continue training", key="train_continue", disabled=continued is None or not (minutes or epochs)):
        start_job("Continue training", lambda: view.continue_training(settings, continued, minutes, epochs))


def runs_table(project: str | None, data: view.TrainData, states: dict[str, str]) -> None:
    """The project's runs with their state and best mAP, and how many belong to other projects."""
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
