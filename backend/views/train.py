"""The Train page's data: the project's frozen versions and runs, the time estimate, the job to launch (checked
before it is queued), the chosen job, the curves of a run as plotly figures, the runs that can be continued."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from backend import catalog
from backend.jobs import api as jobs
from backend.jobs import outcome
from backend.settings import Settings
from backend.store.db import session_scope, shared_engine
from backend.training import estimate as estimates
from backend.training import presets
from backend.training.config import TrainingError
from backend.training.world import visible_gpus

IMAGE_SIZES = (64, 128, 192, 256, 320, 384, 416, 480, 512, 640, 768, 896, 1024)


@dataclass
class TrainData:
    """Every run, the project's runs (every run without a project) and the project's frozen versions."""

    runs: list[catalog.RunInfo]
    project_runs: list[catalog.RunInfo]
    versions: list[presets.VersionChoice] = field(default_factory=list)


def train_data(settings: Settings, project: str | None) -> TrainData:
    runs = catalog.list_runs(settings)
    if project is None:
        return TrainData(runs, runs)
    with session_scope(shared_engine(settings.database_url)) as session:
        versions = presets.frozen_versions(session, settings.storage, project)
        return TrainData(runs, catalog.project_runs(session, settings, project, runs), versions)


@dataclass
class TimeEstimate:
    """What the page says about an epoch's time: `estimate` (None when unknown), `speed_key` (None when the
    settings cannot train here) and the reason there is none."""

    estimate: estimates.Estimate | None
    speed_key: estimates.SpeedKey | None
    problem: str | None = None

    @property
    def known(self) -> bool:
        """A speed is known and the version has training images: the page shows the epoch's time and its budget."""
        return self.estimate is not None and bool(self.estimate.train_images)


def time_estimate(
    settings: Settings, preset: presets.TrainPreset, imgsz: int, batch: int, device: str, version: Any
) -> TimeEstimate:
    try:
        key = estimates.speed_key(preset.size, int(imgsz), int(batch), device)
    except TrainingError as error:  # e.g. cuda chosen on a machine without a GPU: the job would say the same
        return TimeEstimate(None, None, f"No time estimate: {error}")
    min_samples = presets.train_config("", preset).min_samples
    folder = version.folder if version is not None else ""
    return TimeEstimate(estimates.estimate_for(settings.storage, settings.runs_dir, folder, key, min_samples), key)


def suggested_budget(timing: TimeEstimate, preset: presets.TrainPreset) -> float:
    """The budget first put in the form: the recommended one when this machine's speed is known, else the preset's
    (0 = none)."""
    recommended = timing.estimate.recommended_minutes if timing.known and timing.estimate is not None else None
    return float(recommended or preset.time_minutes or 0)


def no_estimate_text(preset: presets.TrainPreset, imgsz: int, batch: int, key: estimates.SpeedKey) -> str:
    return (
        f"No time estimate yet: no earlier run here trained YOLO-NAS {preset.name} at {int(imgsz)} px, batch "
        f"{int(batch)} on {key.device} ({key.precision}), and this machine's speed was not measured."
    )


def measure_help() -> str:
    return (
        f"Times {estimates.PROBE_STEPS} training steps of the model on random images (the first one warms up): "
        "about 20 s for S at 320 px, batch 16, on a 2-core CPU; more on a busy machine or for a larger model."
    )


def gpu_count() -> int:
    """GPUs this machine's torch sees (several: DDP, one process each)."""
    return visible_gpus()


def launch(
    settings: Settings, project: str, version: presets.VersionChoice, name: str, form: dict[str, Any]
) -> dict[str, Any]:
    """Queues a "train" job for `version` with preset `name` and the form's values (imgsz, epochs, batch, budget,
    weights, device, pipeline, gpus, coco_problem); the start weights are checked first. The job's banner result."""
    preset = presets.PRESETS[name]
    presets.check_start_weights(form["weights"], preset.size, settings.weights_dir, form.get("coco_problem"))
    config = presets.train_config(
        version.folder,
        preset,
        imgsz=int(form["imgsz"]),
        epochs=int(form["epochs"]),
        batch_size=int(form["batch"]),
        time_minutes=float(form["budget"]) or None,
        weights=form["weights"],
        device=form["device"],
        augment_pipeline=form["pipeline"],
    )
    run_dir = presets.new_run_dir(settings.runs_dir, project, version.name)
    params: dict[str, Any] = {"project": project, "config": config.to_dict(), "run_dir": str(run_dir)}
    if form.get("gpus", 1) > 1 and form["device"] != "cpu":
        params["gpus"] = int(form["gpus"])
    job_id = jobs.submit("train", params, settings=settings)
    return outcome.submitted(job_id, f"training {name} at {int(form['imgsz'])} px on {version.name}", settings)


def job_choices(settings: Settings, project: str | None, wanted: str | None) -> tuple[list[int], int]:
    """The project's recent training jobs (and the one ?job= names, whatever its project) and the chosen index."""
    ids = [job.id for job in jobs.list_jobs(settings, kind="train", project=project, limit=20)]
    if wanted and wanted.isdigit() and int(wanted) not in ids:
        ids.insert(0, int(wanted))  # another project's job, or an old one: still show what ?job= names
    return ids, ids.index(int(wanted)) if wanted and wanted.isdigit() else 0


def training_job(settings: Settings, job_id: int | None) -> tuple[jobs.JobView | None, str | None]:
    """The chosen training job, or None and why (gone, or another kind of job)."""
    if job_id is None:
        return None, None
    try:
        job = jobs.get_job(job_id, settings)
    except ValueError as error:
        return None, str(error)
    if job.kind != "train":
        return None, f"job {job.id} is a {job.kind} job: see it on the [Jobs](/jobs) page"
    return job, None


def progress_text(job: jobs.JobView) -> str:
    eta = f" · ETA {job.eta_s / 60:.1f} min" if job.eta_s and job.active else ""
    message = "" if job.state == "failed" else f": {job.message or ''}"  # a failure's message is its error, shown once
    return f"job {job.id} {job.state}{message}{eta}"


def read_curves(
    run_dir: str, kept: tuple[int, list[dict[str, Any]]]
) -> tuple[tuple[int, list[dict[str, Any]]], presets.TrainingCurves]:
    """The run's curves from the lines of metrics.jsonl after `kept` = (offset, events) only (a long run is not
    parsed again every refresh); returns the new (offset, events) to keep and the curves."""
    offset, events = kept
    new, offset = presets.read_events(f"{run_dir}/metrics.jsonl", offset)
    events = presets.compact_events(events + new)
    return (offset, events), presets.training_curves(events)


def end_banner(curves: presets.TrainingCurves) -> tuple[bool, str] | None:
    """(good, text) of a run's end: good when it was evaluated and not cancelled; None while it has not ended."""
    if not curves.end:
        return None
    cancelled, evaluated = curves.end.get("stopped") == "cancelled", curves.end.get("best_epoch") is not None
    return evaluated and not cancelled, f"Run ended: {catalog.training_end_text(curves.end, curves.start)}."


def curve_figure(curves: presets.TrainingCurves) -> go.Figure:
    figure = make_subplots(rows=1, cols=3, subplot_titles=("Loss terms", "Learning rate", "Validation mAP"))
    steps = pd.DataFrame(curves.steps)
    for term in curves.loss_terms:
        figure.add_trace(go.Scatter(x=steps["global_step"], y=steps[term], name=term, mode="lines"), row=1, col=1)
    if not steps.empty:
        figure.add_trace(go.Scatter(x=steps["global_step"], y=steps["lr"], name="lr", mode="lines"), row=1, col=2)
    epochs = pd.DataFrame(curves.epochs)
    for metric in ("mAP50-95", "mAP50"):
        if metric in epochs:
            line = go.Scatter(x=epochs["epoch"], y=epochs[metric], name=metric, mode="lines+markers")
            figure.add_trace(line, row=1, col=3)
    figure.update_xaxes(title_text="step", row=1, col=1).update_xaxes(title_text="step", row=1, col=2)
    figure.update_xaxes(title_text="epoch", row=1, col=3)
    return figure.update_layout(height=340, margin={"t": 40, "b": 0})


def run_states(settings: Settings) -> dict[str, str]:
    """Each run folder's latest training job state."""
    states = {}
    for job in reversed(jobs.list_jobs(settings, kind="train", limit=200)):  # oldest first: newest wins
        states[str(job.run_dir)] = job.state
    return states


def continue_training(settings: Settings, run: catalog.RunInfo, minutes: float, epochs: int) -> dict[str, Any]:
    more = presets.more_text(float(minutes), int(epochs))
    job_id = jobs.continue_training(run.path, float(minutes) or None, int(epochs) or None, settings)
    return outcome.submitted(job_id, f"continuing {run.name} for {more}", settings)


def runs_caption(project: str | None, data: TrainData) -> str | None:
    others = len(data.runs) - len(data.project_runs)
    return f"The runs of {project}; {others} more belong to other projects." if project is not None and others else None


def weights_note(path: str | Path | None) -> str | None:
    return presets.licence_note(path)


def coco_weights_check(
    settings: Settings, preset: presets.TrainPreset, weights: presets.WeightsOption, problems: dict[str, str | None]
) -> tuple[str | None, str | None]:
    """For COCO weights not on this machine: (the problem that blocks the launch, or None; the note saying they will
    be downloaded, or None). `problems` keeps the download check's answer per size (asked once a session)."""
    if weights.value != presets.COCO_WEIGHTS or not weights.note:
        return None, None
    if preset.size not in problems:
        problems[preset.size] = presets.coco_download_problem(preset.size)
    try:
        presets.check_start_weights(weights.value, preset.size, settings.weights_dir, problems[preset.size])
    except ValueError as error:
        return str(error), None
    return None, weights.note


CONTINUE_CAPTION = (
    "A finished, stopped or early-stopped run trains longer in its own folder: its curves go on, best.pt is replaced "
    "only by a better mAP50-95, and the learning rate follows a cosine over the new total. With more minutes and "
    "more epochs, whichever ends first ends it."
)


def continue_refusal(wanted_run: str | None, names: list[str]) -> str | None:
    if not wanted_run or wanted_run in names:
        return None
    reason = "it is not a run folder with a last.pt, or it is still training"
    return f"The run {wanted_run} cannot be continued here: {reason}."


def cancel(settings: Settings, job_id: int) -> dict[str, Any]:
    return outcome.cancel_requested(jobs.cancel(job_id, settings))


def resume(settings: Settings, job_id: int) -> dict[str, Any]:
    return outcome.submitted(jobs.resume(job_id, settings), f"continuing job {job_id}'s run", settings)


def continuable(data: TrainData, states: dict[str, str], wanted_run: str | None) -> dict[str, catalog.RunInfo]:
    """The runs that can train longer, by name (the one ?continue= names among them when it can)."""
    return {run.name: run for run in presets.continuable_runs(data.project_runs, data.runs, states, wanted_run)}


def measure_speed(settings: Settings, key: estimates.SpeedKey) -> dict[str, Any]:
    """Times a few training steps of the model here; the summary says what was measured."""
    return {"summary": estimates.measure_speed(settings.storage, key).detail}
