"""What the Train page offers and reads: the S/M/L presets, start weights (with the COCO licence they carry), the
run folder of a new run, and the curves of a run's metrics.jsonl.

Nothing here trains: a preset becomes a `TrainConfig` that the "train" job gives to `backend.training.trainer.fit`,
and the curves are read back from the events `fit` appends to `<run>/metrics.jsonl` (see
`backend.training.engine`: "step" carries each loss term, lr, images/s and eta_s; "epoch" the train means, the
validation metrics and best_map).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backend.files import cut_to_bytes
from backend.models.download import COCO_WEIGHTS_LICENCE_NOTE, OFFICIAL_COCO_WEIGHTS
from backend.runs import RunFolder
from backend.training.config import LOSS_TERMS, TrainConfig

DEVICES = ("auto", "cpu", "cuda")
COCO_WEIGHTS = "coco"
FILE_WEIGHTS = "file"  # the weights option whose path the user types (not a TrainConfig value: the path is)
MAX_WEIGHT_CHAIN = 20  # runs started from runs started from runs...: a cycle cannot loop forever


@dataclass(frozen=True)
class TrainPreset:
    """Starting values of the Train form for one model size; every field can still be changed on the page.

    Attributes:
        name: "S", "M" or "L".
        size: the YOLO-NAS size it trains ("s", "m", "l").
        imgsz: square input side in pixels, a multiple of 32.
        epochs: upper bound on epochs.
        batch_size: images per optimizer step.
        time_minutes: wall-clock budget; None trains for all the epochs.
        description: one line for the page.
    """

    name: str
    size: str
    imgsz: int
    epochs: int
    batch_size: int
    time_minutes: float | None
    description: str


# Sized for the machine yolodex is built on (a few CPU cores): S at 320 fine-tunes in minutes there; M and L are
# for a GPU, where the larger input pays off on small objects.
PRESETS: dict[str, TrainPreset] = {
    "S": TrainPreset("S", "s", 320, 30, 16, 30.0, "YOLO-NAS S at 320 px: quick, fine on a CPU"),
    "M": TrainPreset("M", "m", 480, 60, 16, 120.0, "YOLO-NAS M at 480 px: better on small objects, wants a GPU"),
    "L": TrainPreset("L", "l", 640, 100, 8, None, "YOLO-NAS L at 640 px: the most accurate, needs a GPU"),
}


def train_config(data: str | Path, preset: str | TrainPreset = "S", **changes: Any) -> TrainConfig:
    """The `TrainConfig` of a preset on a dataset folder, with the form's changes applied.

    Args:
        data: a dataset folder (a frozen version's folder).
        preset: a key of `PRESETS` or a preset.
        changes: any `TrainConfig` field (imgsz, epochs, batch_size, time_minutes, weights, device, ...).

    Raises:
        ValueError: an unknown preset or field, or a value `TrainConfig` refuses (the message says which).
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    config = TrainConfig(
        data=str(data),
        size=preset.size,
        imgsz=preset.imgsz,
        epochs=preset.epochs,
        batch_size=preset.batch_size,
        time_minutes=preset.time_minutes,
    )
    unknown = set(changes) - set(config.to_dict())
    if unknown:
        raise ValueError(f"TrainConfig has no field {', '.join(sorted(unknown))}")
    if changes.get("device") is not None and not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", changes["device"]):
        raise ValueError(f"device {changes['device']!r}: use auto, cpu or cuda")
    return config.with_changes(**changes)


def _slug(text: str) -> str:
    # 100 bytes each: a run folder `<project>-<version>-<stamp>` stays under a name's 255 bytes (docs/odd_inputs.md).
    return cut_to_bytes(re.sub(r"[^\w.-]+", "_", text, flags=re.UNICODE).strip("._")[:60], 100) or "run"


def new_run_dir(runs_dir: Path, project: str, version: str, now: datetime | None = None) -> Path:
    """A folder name for a new run, `<project>-<version>-<YYYYmmdd-HHMMSS>` under `runs_dir`, not yet taken (a
    second launch in the same second gets `-2`, `-3`, ...). The folder is not created: the job does that."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    base = f"{_slug(project)}-{_slug(version)}-{stamp}"
    candidate, counter = runs_dir / base, 1
    while candidate.exists():
        counter += 1
        candidate = runs_dir / f"{base}-{counter}"
    return candidate


# ----------------------------------------------------------------------------------------------------------------
# Start weights
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsOption:
    """One start-weights choice: `value` is what `TrainConfig.weights` takes (None, "coco" or a run folder); `note`
    says what the page must tell when it is chosen (the COCO file is not on this machine), None when nothing."""

    value: str | None
    label: str
    note: str | None = None


def coco_weights_file(size: str, weights_dir: Path) -> Path:
    """Where the official COCO weights of `size` are kept (and where a user may put them by hand)."""
    return Path(weights_dir) / OFFICIAL_COCO_WEIGHTS[size].name


def weights_options(runs: list[Any], size: str, weights_dir: Path | None = None) -> list[WeightsOption]:
    """None (random initialisation), the official COCO weights, then every earlier trained run of the same size
    (another size cannot be loaded: `load_start_weights` refuses it; a run without trained weights, e.g. cancelled
    in its first epoch, has nothing to start from), and last a checkpoint file named by the user (`FILE_WEIGHTS`:
    the page asks for its path).

    Args:
        runs: `backend.catalog.RunInfo` items, newest first.
        size: the size the new run trains.
        weights_dir: where the COCO weights are kept (`Settings.weights_dir`); when given and the file is not
            there, the COCO option says that the job will have to download it.
    """
    coco_label, coco_note = "COCO (official YOLO-NAS weights, non-commercial licence)", None
    if weights_dir is not None and size in OFFICIAL_COCO_WEIGHTS:
        path = coco_weights_file(size, weights_dir)
        if not path.is_file():
            coco_label = "COCO (official, non-commercial licence): not on this machine, downloaded by the job"
            coco_note = (
                f"{path.name} is not on this machine: the training job will try to download it from "
                f"{OFFICIAL_COCO_WEIGHTS[size].url}. Without internet access the job fails; then choose other start "
                f"weights, or put the file at {path}."
            )
    options = [
        WeightsOption(None, "none: random initialisation (from scratch)"),
        WeightsOption(COCO_WEIGHTS, coco_label, coco_note),
    ]
    for run in runs:
        if run.config.get("size") != size or run.model("checkpoint") is None or not run.trained:
            continue
        best = "not evaluated" if run.best_map is None else f"best mAP50-95 {run.best_map:.3f}"
        epochs = f"{run.epochs_done} epoch{'s' if run.epochs_done != 1 else ''}"
        options.append(WeightsOption(str(run.path), f"run {run.name} ({best}, {epochs})"))
    options.append(WeightsOption(FILE_WEIGHTS, "a checkpoint file (.pt) on this machine"))
    return options


def coco_download_problem(size: str, timeout: float = 3.0) -> str | None:
    """Why the official COCO weights of `size` cannot be downloaded from here, None when their host answers: a HEAD
    request (redirects followed) with a short timeout, so a page can tell before anything is queued. No DNS, a
    refused or timed-out connection, or an HTTP error status (the host has answered 403) are problems."""
    # Imported here: requests only when a start-weights URL is checked.
    import requests

    url = OFFICIAL_COCO_WEIGHTS[size].url
    try:
        response = requests.head(url, timeout=timeout, allow_redirects=True)
    except requests.Timeout:
        return f"{url}: no answer within {timeout:g} s"
    except requests.RequestException as error:
        cause = error.args[0] if error.args else error
        return f"{url}: connection failed ({getattr(cause, 'reason', None) or cause})"
    if response.status_code >= 400:
        return f"{url}: HTTP {response.status_code} {response.reason}"
    return None


def check_start_weights(weights: str | None, size: str, weights_dir: Path, download_problem: str | None = None) -> None:
    """Refuses, before a job is queued, start weights that cannot work: the COCO weights when their file is not in
    `weights_dir` and `download_problem` says they cannot be fetched (`coco_download_problem`), or a checkpoint file
    that is missing, unreadable, fused, or of another model size.

    Raises:
        ValueError: what is wrong and what to choose instead, in the Train page's words.
    """
    if weights is None:
        return
    if weights == COCO_WEIGHTS:
        path = coco_weights_file(size, weights_dir)
        if not path.is_file() and download_problem:
            raise ValueError(
                f"the COCO weights are not on this machine and cannot be downloaded from here ({download_problem}). "
                f"Choose random initialisation (from scratch), an earlier run or a checkpoint file; or put "
                f"{path.name} at {path} first."
            )
        return
    path = Path(weights).expanduser()
    if path.is_dir():
        return  # an earlier run's folder: offered only when it holds trained weights of this size
    if not path.is_file():
        raise ValueError(f"there is no checkpoint file at {path}: give the full path of a .pt file on this machine")
    # Imported here: torch only when a start-weights file is checked; the Train page imports this module.
    from backend.models.checkpoints import (
        CheckpointError,
        extract_state_dict,
        infer_architecture,
        read_checkpoint,
        state_dict_fusion,
    )

    try:
        state_dict, _, _ = extract_state_dict(read_checkpoint(path))
        fused = state_dict_fusion(state_dict) != "none"
        found, _ = infer_architecture(state_dict)
    except (CheckpointError, OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path} is not a YOLO-NAS checkpoint this app can start from: {error}") from error
    if fused:
        raise ValueError(f"{path} holds fused (deployment) weights: training needs an unfused checkpoint")
    if found != size:
        raise ValueError(f"{path} holds YOLO-NAS {found.upper()} weights; this run trains {size.upper()}")


def default_weights(options: list[WeightsOption], preferred_runs: list[Any]) -> int:
    """The index of the start weights a new run is offered first: the best evaluated run among `preferred_runs`
    (the current project's) that `options` holds, else random initialisation. Never the COCO weights: they may not
    be on this machine, and they carry a non-commercial licence the user should choose knowingly."""
    values = [option.value for option in options]
    evaluated = [run for run in preferred_runs if run.best_map is not None and str(run.path) in values]
    if not evaluated:
        return values.index(None)
    best = max(evaluated, key=lambda run: run.best_map)
    return values.index(str(best.path))


def inherits_coco_licence(weights: str | Path | None) -> bool:
    """True when training from `weights` carries the COCO weights' non-commercial licence: "coco" itself, or an
    earlier run (folder or checkpoint in it) that started, directly or through other runs, from them."""
    seen: set[Path] = set()
    for _ in range(MAX_WEIGHT_CHAIN):
        if weights is None:
            return False
        if str(weights) == COCO_WEIGHTS:
            return True
        path = Path(weights)
        folder = path if path.is_dir() else path.parent
        if folder in seen:
            return False
        seen.add(folder)
        train = RunFolder(folder).train_or_none()
        if train is None:
            return False  # not one of our runs: nothing says where it came from
        weights = train.get("weights")
    return False


def licence_note(weights: str | Path | None) -> str | None:
    """The COCO licence note when `weights` carries it (see `inherits_coco_licence`), else None."""
    return COCO_WEIGHTS_LICENCE_NOTE if inherits_coco_licence(weights) else None


# ----------------------------------------------------------------------------------------------------------------
# The curves of metrics.jsonl
# ----------------------------------------------------------------------------------------------------------------


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The events appended to a metrics.jsonl since byte `offset`, and the offset to read from next time.

    Only whole lines are read (a line being written right now waits for the next call), so a live page can poll a
    long run without parsing it again. A missing file gives no events and the same offset.
    """
    try:
        with open(path, "rb") as file:
            file.seek(offset)
            data = file.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a damaged line loses itself, not the chart
        if isinstance(record, dict):
            events.append(record)
    return events, offset + end


@dataclass
class TrainingCurves:
    """A run's events as chart rows.

    Attributes:
        steps: one row per "step" event: global_step, epoch, lr, images_per_s, eta_s and each loss term (LOSS_TERMS).
            Thinned to at most `max_points` rows, evenly spaced, the last one always kept.
        epochs: one row per "epoch" event: epoch (1-based), each train loss mean as "train_<term>", lr, best_map,
            and the validation metrics ("mAP50-95", "mAP50", ...) when that epoch was evaluated.
        loss_terms: the loss terms present in `steps`.
        start: the "train_start" event (device, epochs, steps_per_epoch, ...), empty before it.
        end: the "train_end" event (stopped, best_map, ...), None while training.
    """

    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    loss_terms: list[str] = field(default_factory=list)
    start: dict[str, Any] = field(default_factory=dict)
    end: dict[str, Any] | None = None


def training_curves(events: list[dict[str, Any]], max_points: int = 2000) -> TrainingCurves:
    """Chart rows from metrics.jsonl events (see `TrainingCurves`). A resumed run's repeated steps keep the
    latest value of each global step."""
    curves = TrainingCurves()
    steps: dict[int, dict[str, Any]] = {}
    for event in events:
        name = event.get("event")
        if name == "train_start":
            curves.start, curves.end = event, None
        elif name == "train_end":
            curves.end = event
        elif name == "step" and event.get("global_step") is not None:
            row = {key: event.get(key) for key in ("global_step", "epoch", "lr", "images_per_s", "eta_s")}
            row.update({term: event[term] for term in LOSS_TERMS if term in event})
            steps[int(event["global_step"])] = row
        elif name == "epoch":
            row = {"epoch": int(event.get("epoch", 0)) + 1, "lr": event.get("lr"), "best_map": event.get("best_map")}
            row.update({f"train_{term}": value for term, value in (event.get("train") or {}).items()})
            row.update(event.get("val") or {})
            curves.epochs = [kept for kept in curves.epochs if kept["epoch"] != row["epoch"]] + [row]
    ordered = [steps[key] for key in sorted(steps)]
    curves.steps = thin(ordered, max_points)
    curves.loss_terms = [term for term in LOSS_TERMS if any(term in row for row in ordered)]
    return curves


def thin(rows: list[Any], max_points: int) -> list[Any]:
    """At most `max_points` of `rows`, evenly spaced, first and last kept (a long run's chart stays light)."""
    if len(rows) <= max_points or max_points < 2:
        return rows
    stride = (len(rows) - 1) / (max_points - 1)
    return [rows[round(index * stride)] for index in range(max_points)]


# ----------------------------------------------------------------------------------------------------------------
# The list of runs
# ----------------------------------------------------------------------------------------------------------------

_STOPPED = {
    "epochs": "finished",
    "time": "finished (time budget)",
    "early_stop": "finished (early stop)",
    "cancelled": "cancelled",
}


def run_rows(runs: list[Any], job_states: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The runs table: run, status, best mAP50-95, size, imgsz, epochs (the epochs run, of those asked for, and
    what ended the run: `RunInfo.epochs_text`), dataset, modified.

    Args:
        runs: `backend.catalog.RunInfo` items.
        job_states: {run folder (str): state of its newest train job}; a job that is queued, running, failed or
            interrupted says more than the folder does (a folder without a "train_end" event may be either running
            or dead).
    """
    job_states = job_states or {}
    rows = []
    for run in runs:
        state = job_states.get(str(run.path))
        if state in ("queued", "running", "failed", "interrupted") or (state and run.stopped is None):
            status = state
        else:
            status = _STOPPED.get(run.stopped or "", "stopped before the end")
        data = Path(str(run.config.get("data", "")))
        rows.append(
            {
                "run": run.name,
                "status": status,
                "best mAP50-95": run.best_map,
                "size": str(run.config.get("size", "?")).upper(),
                "imgsz": run.config.get("imgsz"),
                "epochs": run.epochs_text + (" so far" if status in ("queued", "running") else ""),
                "dataset": f"{data.parent.name}/{data.name}" if data.name else "",
                "modified": run.modified,
            }
        )
    return rows


def continuable_runs(
    project_runs: list[Any], all_runs: list[Any], job_states: dict[str, str], wanted: str | None = None
) -> list[Any]:
    """The runs the Train page offers to continue: the project's, plus the run named `wanted` (`?continue=`) when it
    is another project's; each with a config.json and a last.pt, and no train job queued or running on it.

    Args:
        project_runs / all_runs: `backend.catalog.RunInfo` items, newest first.
        job_states: {run folder (str): state of its newest train job}.
    """
    chosen = list(project_runs)
    chosen += [run for run in all_runs if run.name == wanted and run not in chosen]
    return [
        run
        for run in chosen
        if RunFolder(run.path).resumable() and job_states.get(str(run.path)) not in ("queued", "running")
    ]


def more_text(more_minutes: float, more_epochs: int) -> str:
    """ "10 more minutes", "2 more epochs", "10 more minutes or 2 more epochs (whichever ends first)"."""
    minutes = f"{more_minutes:g} more minute{'s' if more_minutes != 1 else ''}" if more_minutes else ""
    epochs = f"{more_epochs} more epoch{'s' if more_epochs != 1 else ''}" if more_epochs else ""
    if minutes and epochs:
        return f"{minutes} or {epochs} (whichever ends first)"
    return minutes or epochs


@dataclass(frozen=True)
class VersionChoice:
    """A frozen dataset version a run can train on: its name, folder, and image counts per split."""

    name: str
    folder: Path
    counts: dict[str, Any]

    @property
    def label(self) -> str:
        splits = self.counts.get("splits") or {}
        sizes = ", ".join(
            f"{split} {value.get('images', '?')}" for split, value in splits.items() if isinstance(value, dict)
        )
        return f"{self.name} ({sizes})" if sizes else self.name


def frozen_versions(session: Any, storage: Path, project: str) -> list[VersionChoice]:
    """The project's frozen dataset versions whose folder is on disk, newest first."""
    # Imported here: the store only for callers with a database session (the CLI's train has none).
    from sqlalchemy import select

    from backend.store.models import DatasetVersion, Project
    from backend.store.versions import version_folder

    rows = session.scalars(
        select(DatasetVersion)
        .join(Project, Project.id == DatasetVersion.project_id)
        .where(Project.name == project)
        .order_by(DatasetVersion.id.desc())
    )
    choices = [VersionChoice(row.name, version_folder(storage, row), dict(row.counts or {})) for row in rows]
    return [choice for choice in choices if choice.folder.is_dir()]


def compact_events(events: list[dict[str, Any]], max_steps: int = 5000) -> list[dict[str, Any]]:
    """`events` with the "step" events thinned to at most `max_steps` (every other event kept): what a live page
    keeps between refreshes, so a long run's history does not grow without bound in every browser session."""
    steps = [event for event in events if event.get("event") == "step"]
    if len(steps) <= max_steps:
        return events
    kept = {id(event) for event in thin(steps, max_steps)}
    return [event for event in events if event.get("event") != "step" or id(event) in kept]
