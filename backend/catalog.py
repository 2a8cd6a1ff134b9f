"""What the storage holds, for the pages and the CLI: runs, their model files, and which model to use by default.

A run folder (architecture: "A run folder") is any folder under `storage/runs/` with a `config.json`; it may hold
`best.pt`, `last.pt`, `eval.json`, `metrics.jsonl` and, after export or quantization, `model_fp32.onnx`,
`model_int8.onnx`, `quant_report.json`. Reading the catalog opens no model: only file names, sizes, times and the
small JSON files.

Each model's validation scores (`RunInfo.model_score`) are that model's own: a checkpoint's and, before quantization,
the FP32 export's come from `eval.json` (the training's evaluation of best.pt), an INT8 model's only from
quant_report.json (never borrowed from FP32).

A run belongs to a project (`run_projects`): the one its `Run` row names (runs started by a job), else the one whose
frozen version it trained on, else the one whose classes are its classes. A run is offered as a model or as start
weights only once it has trained weights (`RunInfo.trained`): a run cancelled in its first epoch has none worth using.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from backend.runs import RunFolder, RunFolderError
from backend.settings import Settings, get_settings

MODEL_KINDS = ("int8", "fp32", "checkpoint")
_KIND_FILES = {"int8": ("model_int8.onnx",), "fp32": ("model_fp32.onnx",), "checkpoint": ("best.pt", "last.pt")}
_KIND_LABEL = {"int8": "INT8 ONNX", "fp32": "FP32 ONNX", "checkpoint": "PyTorch checkpoint"}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class ModelScore:
    """What one model's validation evaluation says of it.

    Attributes:
        map50: mAP at IoU 0.5 (fraction), None when that evaluation did not give it.
        map50_95: mAP50-95 (fraction), None when not given.
        recall: the share of the validation objects it found with their right class (`evaluation.errors.found_share`)
            at `score_threshold`, None when not recorded.
        score_threshold: the confidence above which `recall` counts a detection, None when not recorded.
        source: the file the figures come from ("eval.json" or "quant_report.json").
    """

    map50: float | None
    map50_95: float | None
    recall: float | None
    score_threshold: float | None
    source: str


def score_text(score: ModelScore | None) -> str:
    """A model's validation score for a model list: "mAP50 0.412", or "not evaluated"."""
    if score is None or (score.map50 is None and score.map50_95 is None):
        return "not evaluated"
    if score.map50 is None:
        return f"mAP50 not measured (mAP50-95 {score.map50_95:.3f})"
    return f"mAP50 {score.map50:.3f}"


@dataclass(frozen=True)
class ModelFile:
    """One usable model file.

    Attributes:
        path: the file.
        kind: "int8", "fp32" or "checkpoint".
        run: the run folder's name.
        modified: the file's modification time (UTC).
        bytes: its size.
    """

    path: Path
    kind: str
    run: str
    modified: datetime
    bytes: int

    @property
    def label(self) -> str:
        return f"{self.run} · {_KIND_LABEL[self.kind]} ({self.path.name}, {self.bytes / 1e6:.1f} MB)"


@dataclass
class RunInfo:
    """One run folder, summarised.

    Attributes:
        name: the folder name.
        path: the folder.
        modified: the newest of its files' modification times (UTC).
        config: the `train` part of config.json (size, imgsz, epochs, data, ...).
        class_names: the classes it was trained on.
        best_map: the best validation mAP50-95 in metrics.jsonl or eval.json, None when never evaluated.
        stopped: how training ended ("epochs", "time", "early_stop", "cancelled"), None while running or unknown.
        models: its model files, INT8 first.
        epochs_done: whole epochs trained (the training's own count; while it runs, its epochs so far).
        partial_steps: steps of the epoch a time budget ended part way, with `steps_per_epoch`; 0 when none.
        steps_per_epoch: steps in one epoch, None when unknown.
        time_budget_s: the training's time budget, None without one.
        quant_report: the small facts of quant_report.json this catalog uses (see `quant_facts`), None without one.
        evaluation: the small facts of eval.json (see `eval_facts`), None without one.
    """

    name: str
    path: Path
    modified: datetime
    config: dict[str, Any]
    class_names: list[str]
    best_map: float | None = None
    stopped: str | None = None
    models: list[ModelFile] = field(default_factory=list)
    epochs_done: int = 0
    partial_steps: int = 0
    steps_per_epoch: int | None = None
    time_budget_s: float | None = None
    quant_report: dict[str, Any] | None = None
    evaluation: dict[str, Any] | None = None

    def model(self, kind: str) -> ModelFile | None:
        return next((model for model in self.models if model.kind == kind), None)

    @property
    def trained(self) -> bool:
        """Whether the run has weights worth using: a whole epoch trained, or weights evaluated (best.pt is written
        only by an evaluation, which a time budget also runs when it ends the first epoch part way), or, for a
        folder whose training says nothing (no metrics.jsonl: made elsewhere), exported ONNX models. A run whose
        training ended (or still runs) without either, e.g. cancelled in its first epoch, is not."""
        if self.epochs_done > 0 or self.best_map is not None or (self.path / "best.pt").is_file():
            return True
        if self.stopped is not None or (self.path / "metrics.jsonl").is_file():
            return False
        return any(model.kind != "checkpoint" for model in self.models)

    @property
    def epochs_text(self) -> str:
        """The run's epoch count in words, the same everywhere ("1 of 30 epochs: the 5-minute time budget ended
        the run")."""
        return epochs_text(
            self.epochs_done,
            self.config.get("epochs"),
            self.stopped,
            self.time_budget_s,
            self.partial_steps,
            self.steps_per_epoch,
        )

    def model_map(self, kind: str) -> float | None:
        """The validation mAP50-95 (fraction) of this run's `kind` model: INT8 from its quant_report.json, FP32 from
        there or from the training's evaluation, a checkpoint from the training's evaluation."""
        facts = self.quant_report or {}
        if kind == "int8":
            return facts.get("int8_map")
        if kind == "fp32" and facts.get("fp32_map") is not None:
            return facts["fp32_map"]
        return self.best_map

    def model_score(self, kind: str) -> ModelScore | None:
        """The validation scores of this run's `kind` model, from its own evaluation: INT8 from quant_report.json;
        FP32 from there, else (the export of best.pt) from eval.json; a checkpoint from eval.json. None when that
        model was never evaluated."""
        quant = self.quant_report or {}
        prefix = {"int8": "int8", "fp32": "fp32"}.get(kind)
        if prefix and (quant.get(f"{prefix}_map") is not None or quant.get(f"{prefix}_map50") is not None):
            return ModelScore(
                quant.get(f"{prefix}_map50"),
                quant.get(f"{prefix}_map"),
                quant.get(f"{prefix}_recall"),
                quant.get("score_threshold"),
                "quant_report.json",
            )
        if kind == "int8" or not self.evaluation:
            return None
        facts = self.evaluation
        if facts["map50"] is None and facts["map50_95"] is None:
            return None
        return ModelScore(facts["map50"], facts["map50_95"], facts["recall"], facts["score_threshold"], "eval.json")

    def model_label(self, model: ModelFile) -> str:
        """The model's line in a model list, with its own validation mAP50: "run-1 · INT8 ONNX (model_int8.onnx,
        2.9 MB) · mAP50 0.412", or "... · not evaluated"."""
        return f"{model.label} · {score_text(self.model_score(model.kind))}"


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


def _read_events(path: Path) -> dict[str, Any]:
    """What metrics.jsonl says of a run: best_map, stopped, epochs_done, partial_steps, steps_per_epoch,
    time_budget_s (each None when it does not say)."""
    facts: dict[str, Any] = dict.fromkeys(
        ("best_map", "stopped", "epochs_done", "partial_steps", "steps_per_epoch", "time_budget_s", "evaluated")
    )
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return facts
    for line in lines:  # in order: a resumed run's later events win
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        event = record.get("event")
        if event == "train_start":
            facts.update(
                stopped=None, time_budget_s=record.get("time_budget_s"), steps_per_epoch=record.get("steps_per_epoch")
            )
        elif event == "epoch":
            if record.get("best_epoch") is not None:
                facts["best_map"], facts["evaluated"] = record.get("best_map"), True
            complete = record.get("complete", True)  # events written before "complete" existed: whole epochs
            done = record.get("epochs_done", int(record.get("epoch", 0)) + (1 if complete else 0))
            facts["epochs_done"] = max(facts["epochs_done"] or 0, int(done))
            facts["partial_steps"] = 0 if complete else int(record.get("steps") or 0)
        elif event == "train_end":
            facts["stopped"] = record.get("stopped")
            if record.get("epochs_done") is not None:
                facts["epochs_done"] = int(record["epochs_done"])
            if "partial_steps" in record:
                facts["partial_steps"] = int(record["partial_steps"] or 0)
            facts["steps_per_epoch"] = record.get("steps_per_epoch") or facts["steps_per_epoch"]
            if record.get("best_epoch") is not None or "best_epoch" not in record:
                # Without an evaluation (best_epoch None) its best_map is a placeholder 0.0, not a score.
                facts["best_map"] = record.get("best_map", facts["best_map"])
                facts["evaluated"] = facts["best_map"] is not None
            if record.get("time_budget_s") is not None:
                facts["time_budget_s"] = record["time_budget_s"]
    return facts


def quant_facts(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """From a quant_report.json: fp32_map and int8_map (mAP50-95 of FP32 and of the shipped model_int8.onnx;
    fractions), fp32_map50 / int8_map50, fp32_recall / int8_recall (the share of validation objects found, None in
    reports written before it was measured), score_threshold (at which recall counts: the evaluation's default,
    `REPORT_SCORE_THRESHOLD`, when a recall is there), budget_points (the largest mAP50-95 drop allowed, in points:
    0.5 = 0.005) and within_budget; None without a report."""
    if not report or not isinstance(report.get("models"), dict):
        return None
    models = report["models"]

    def score(name: Any, key: str) -> float | None:
        value = ((models.get(name) or {}).get("metrics") or {}).get(key)
        return float(value) if isinstance(value, int | float) else None

    chosen = report.get("chosen")
    fp32, int8 = score("fp32", "mAP50-95"), score(chosen, "mAP50-95")
    budget = report.get("budget_points")
    within = report.get("within_budget")
    if within is None and fp32 is not None and int8 is not None and budget is not None:
        within = int8 >= fp32 - float(budget) / 100.0 - 1e-9
    recalls = {"fp32_recall": score("fp32", "recall"), "int8_recall": score(chosen, "recall")}
    return {
        "fp32_map": fp32,
        "int8_map": int8,
        "fp32_map50": score("fp32", "mAP50"),
        "int8_map50": score(chosen, "mAP50"),
        **recalls,
        "score_threshold": REPORT_SCORE_THRESHOLD if any(v is not None for v in recalls.values()) else None,
        "budget_points": budget,
        "within_budget": within,
    }


# The score threshold of the quantization's evaluations (backend.quantization.pipeline scores every model with
# evaluate_detections' default), which its report does not repeat.
REPORT_SCORE_THRESHOLD = 0.25


def eval_facts(path: Path) -> dict[str, Any] | None:
    """From an eval.json: map50, map50_95, recall (recorded, or for an older file computed from its confusion
    matrix) and score_threshold; None without a readable file. Read once per file version (eval.json holds every
    image's errors: it can be large, and pages list the catalog on every rerun)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return _eval_facts(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _eval_facts(path: str, mtime_ns: int, size: int) -> dict[str, Any] | None:
    del mtime_ns, size  # the cache key: a new evaluation is read again
    evaluation = _read_json(Path(path))
    if evaluation is None:
        return None
    metrics = evaluation.get("metrics") or {}

    def number(value: Any) -> float | None:
        return float(value) if isinstance(value, int | float) else None

    recall = number(metrics.get("recall"))
    if "recall" not in metrics and evaluation.get("confusion_matrix"):
        from backend.evaluation.errors import found_share  # numpy: only for files written before recall was

        try:
            recall = found_share(evaluation["confusion_matrix"])
        except (ValueError, TypeError):
            recall = None
    threshold = number(evaluation.get("score_threshold"))
    return {
        "map50": number(metrics.get("mAP50")),
        "map50_95": number(metrics.get("mAP50-95")),
        "recall": recall,
        "score_threshold": threshold if recall is not None else None,
    }


def epochs_text(
    epochs_done: int,
    epochs: int | None,
    stopped: str | None,
    time_budget_s: float | None = None,
    partial_steps: int = 0,
    steps_per_epoch: int | None = None,
) -> str:
    """One epoch count in words for the job log, the job's message and the runs table.

    "1 of 30 epochs: the 5-minute time budget ended the run (and 37 of 120 steps of epoch 2)",
    "30 of 30 epochs", "4 of 30 epochs: early stop (the validation mAP stopped improving)",
    "0 of 30 epochs: cancelled", "2 of 30 epochs" (not ended: running, or its worker stopped).
    """
    count = f"{epochs_done} of {epochs} epochs" if epochs else f"{epochs_done} epochs"
    partial = ""
    if partial_steps:
        of = f" of {steps_per_epoch}" if steps_per_epoch else ""
        partial = f" (and {partial_steps}{of} steps of epoch {epochs_done + 1})"
    if stopped == "time":
        return f"{count}: the {budget_text(time_budget_s)} time budget ended the run{partial}"
    if stopped == "early_stop":
        return f"{count}: early stop (the validation mAP stopped improving)"
    if stopped == "cancelled":
        return f"{count}: cancelled{partial}"
    return f"{count}{partial}"  # all the epochs, or not ended yet (running, or its worker died)


def training_end_text(end: dict[str, Any], start: dict[str, Any] | None = None) -> str:
    """A training's end in one line, with the one epoch count (`epochs_text`) and its best score:
    "1 of 30 epochs: the 5-minute time budget ended the run; best mAP50-95 0.123".

    Args:
        end: the "train_end" event or a train job's result (stopped, epochs_done, best_map, best_epoch, and epochs /
            time_budget_s when the trainer gave them).
        start: the "train_start" event (epochs, time_budget_s), for an end that lacks them.
    """
    start = start or {}
    epochs = end.get("epochs") or start.get("epochs")
    budget = end.get("time_budget_s") or start.get("time_budget_s") or start.get("budget")
    text = epochs_text(
        int(end.get("epochs_done") or 0),
        epochs,
        end.get("stopped"),
        budget,
        int(end.get("partial_steps") or 0),
        end.get("steps_per_epoch") or start.get("steps_per_epoch") or start.get("steps"),
    )
    if "best_epoch" in end and end.get("best_epoch") is None:
        return f"{text}; not evaluated"
    return f"{text}; best mAP50-95 {float(end.get('best_map') or 0.0):.3f}"


def budget_text(seconds: float | None) -> str:
    """A time budget in words: "5-minute", "3-second", "1.5-hour"."""
    if not seconds:
        return "no"
    if seconds < 60:
        return f"{seconds:g}-second"
    if seconds < 3600 * 2:
        return f"{round(seconds / 60, 2):g}-minute"
    return f"{round(seconds / 3600, 2):g}-hour"


def run_info(folder: Path) -> RunInfo | None:
    """The summary of one run folder, None when it is not a run (no readable config.json)."""
    try:
        config = RunFolder(folder).read_config()
    except RunFolderError:
        return None
    models = []
    for kind in MODEL_KINDS:
        for name in _KIND_FILES[kind]:
            path = folder / name
            if path.is_file():
                models.append(ModelFile(path, kind, folder.name, _mtime(path), path.stat().st_size))
                break
    facts = _read_events(folder / "metrics.jsonl")
    evaluation = eval_facts(folder / "eval.json")
    best = facts["best_map"] if facts["evaluated"] else None
    if best is None:
        best = (evaluation or {}).get("map50_95")
    times = [_mtime(RunFolder(folder).config_path), *(model.modified for model in models)]
    train = config.get("train") or {}
    budget = facts["time_budget_s"]
    if budget is None and train.get("time_minutes"):
        budget = float(train["time_minutes"]) * 60
    return RunInfo(
        name=folder.name,
        path=folder,
        modified=max(times),
        config=train,
        class_names=list(config.get("class_names") or []),
        best_map=best,
        stopped=facts["stopped"],
        models=models,
        epochs_done=facts["epochs_done"] or 0,
        partial_steps=facts["partial_steps"] or 0,
        steps_per_epoch=facts["steps_per_epoch"],
        time_budget_s=budget,
        quant_report=quant_facts(_read_json(folder / "quant_report.json")),
        evaluation=evaluation,
    )


def list_runs(settings: Settings | None = None) -> list[RunInfo]:
    """Every run under `storage/runs/`, newest first."""
    settings = settings or get_settings()
    if not settings.runs_dir.is_dir():
        return []
    runs = [info for folder in settings.runs_dir.iterdir() if folder.is_dir() and (info := run_info(folder))]
    return sorted(runs, key=lambda info: info.modified, reverse=True)


def trained_runs(settings: Settings | None = None) -> list[RunInfo]:
    """The runs with trained weights (`RunInfo.trained`), newest first: what pages offer as models and weights."""
    return [info for info in list_runs(settings) if info.trained]


def list_models(
    settings: Settings | None = None, kinds: tuple[str, ...] = MODEL_KINDS, runs: list[RunInfo] | None = None
) -> list[ModelFile]:
    """Every model file of every trained run (or of `runs`, trained ones only), INT8 before FP32 before
    checkpoints, newest first within a kind."""
    runs = trained_runs(settings) if runs is None else [info for info in runs if info.trained]
    models = [model for info in runs for model in info.models if model.kind in kinds]
    return sorted(models, key=lambda model: (kinds.index(model.kind), -model.modified.timestamp()))


@dataclass(frozen=True)
class ModelChoice:
    """The model chosen by default, and why, in one line for the page.

    Attributes:
        model: the file.
        run: its run.
        score: its validation mAP50-95 (fraction), None when never evaluated.
        reason: why this one ("best validation mAP50-95 0.410 of 3 runs; INT8, 0.3 points below FP32, within the
            0.5-point budget").
    """

    model: ModelFile
    run: RunInfo
    score: float | None
    reason: str


def best_model(runs: list[RunInfo]) -> ModelChoice | None:
    """The model to use by default among `runs` (trained ones only): the run with the highest validation mAP50-95
    (newest first on a tie; never evaluated runs last), then its INT8 model when its mAP is within the quantization
    budget of its FP32 model (or when no quant_report.json says otherwise), else its FP32 ONNX model, else its
    checkpoint. None when no run has a model."""
    candidates = [info for info in runs if info.trained and info.models]
    if not candidates:
        return None
    newest_first = sorted(candidates, key=lambda info: info.modified, reverse=True)
    run = max(newest_first, key=lambda info: -1.0 if info.best_map is None else info.best_map)  # first max wins
    facts = run.quant_report or {}
    int8, fp32 = run.model("int8"), run.model("fp32")
    evaluated = [info for info in candidates if info.best_map is not None]
    count = f"{len(candidates)} trained run{'s' if len(candidates) != 1 else ''}"
    if run.best_map is None:
        lead = f"none of the {count} has a validation score: the newest run"
    elif len(evaluated) == 1 and len(candidates) == 1:
        lead = f"the only trained run (validation mAP50-95 {run.best_map:.3f})"
    else:
        lead = f"best validation mAP50-95 {run.best_map:.3f} of {count}"
    if int8 is not None and facts.get("within_budget") and facts.get("int8_map") is not None:
        drop = 100.0 * ((facts.get("fp32_map") or 0.0) - facts["int8_map"])
        side = f"{abs(drop):.2f} points {'below' if drop > 0 else 'above'} it" if round(drop, 2) else "the same score"
        detail = (
            f"INT8 ({facts['int8_map']:.3f}), within the {facts.get('budget_points')}-point budget of FP32 ({side})"
            if facts.get("fp32_map") is not None
            else "INT8, within its quantization budget"
        )
        return ModelChoice(int8, run, facts["int8_map"], f"{lead}; {detail}")
    if int8 is not None and run.quant_report is None:  # nothing says it lost accuracy: the model built to ship
        return ModelChoice(int8, run, None, f"{lead}; INT8 (no quantization report to compare it with FP32)")
    chosen = fp32 or run.model("checkpoint") or run.models[0]
    kind = {"fp32": "FP32 ONNX", "checkpoint": "PyTorch checkpoint", "int8": "INT8"}[chosen.kind]
    if int8 is not None and facts.get("within_budget") is False:
        detail = (
            f"{kind}: its INT8 model ({facts.get('int8_map') or 0:.3f}) is outside the "
            f"{facts.get('budget_points')}-point quantization budget"
        )
    elif int8 is not None:
        detail = f"{kind}: its quantization report gives the INT8 model no validation score"
    else:
        detail = f"{kind} (not quantized yet)"
    return ModelChoice(chosen, run, run.model_map(chosen.kind), f"{lead}; {detail}")


def default_model(settings: Settings | None = None, runs: list[RunInfo] | None = None) -> ModelFile | None:
    """The model used unless told otherwise (`best_model` of `runs`, default every trained run); None when nothing
    has been trained."""
    choice = best_model(trained_runs(settings) if runs is None else runs)
    return choice.model if choice else None


# ----------------------------------------------------------------------------------------------------------------
# Runs and projects
# ----------------------------------------------------------------------------------------------------------------


def run_projects(session: Any, settings: Settings, runs: list[RunInfo]) -> dict[Path, str]:
    """{run folder: project name} for the runs whose project can be told: the project of the run's `Run` row (a
    job's run), else the project of the frozen version it trained on, else the project whose class names are the
    run's (in order). Runs matching none are left out."""
    # Imported here: the store only for callers with a database session; the CLI lists runs without loading sqlalchemy.
    from sqlalchemy import select

    from backend.store.models import DatasetVersion, Project, project_classes
    from backend.store.models import Run as RunRow

    by_folder = {
        folder: name
        for folder, name in session.execute(
            select(RunRow.folder, Project.name).join(Project, Project.id == RunRow.project_id).order_by(RunRow.id)
        )
    }
    by_version = {
        (settings.storage / folder).resolve(): name
        for folder, name in session.execute(
            select(DatasetVersion.folder, Project.name).join(Project, Project.id == DatasetVersion.project_id)
        )
    }
    by_classes: dict[tuple[str, ...], str] = {}
    for project in session.scalars(select(Project).order_by(Project.id.desc())):  # the oldest wins a tie
        by_classes[tuple(item.name for item in project_classes(session, project))] = project.name
    found = {}
    storage = settings.storage.resolve()
    for info in runs:
        folder = info.path.resolve()
        # A Run row names its folder relative to storage (absolute when outside it), as the train job wrote it.
        relative = str(folder.relative_to(storage)) if folder.is_relative_to(storage) else str(folder)
        data = info.config.get("data")
        name = (
            by_folder.get(relative)
            or (by_version.get(Path(str(data)).resolve()) if data else None)
            or by_classes.get(tuple(info.class_names))
        )
        if name:
            found[info.path] = name
    return found


def project_runs(session: Any, settings: Settings, project: str | None, runs: list[RunInfo]) -> list[RunInfo]:
    """The runs of `runs` that belong to `project` (see `run_projects`), in the same order."""
    if project is None:
        return []
    owners = run_projects(session, settings, runs)
    return [info for info in runs if owners.get(info.path) == project]
