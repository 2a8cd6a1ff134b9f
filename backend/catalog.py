"""What the storage holds, for the pages and the CLI: runs, their model files, and which model to use by default.

A run folder (architecture: "A run folder") is any folder under `storage/runs/` with a `config.json`; it may hold
`best.pt`, `last.pt`, `eval.json`, `metrics.jsonl` and, after export or quantization, `model_fp32.onnx`,
`model_int8.onnx`, `quant_report.json`. Reading the catalog opens no model: only file names, sizes, times and the
small JSON files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
    """

    name: str
    path: Path
    modified: datetime
    config: dict[str, Any]
    class_names: list[str]
    best_map: float | None = None
    stopped: str | None = None
    models: list[ModelFile] = field(default_factory=list)

    def model(self, kind: str) -> ModelFile | None:
        return next((model for model in self.models if model.kind == kind), None)


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


def _last_events(path: Path) -> tuple[float | None, str | None]:
    """(best mAP50-95, how it stopped) from a metrics.jsonl, reading it from the end."""
    best, stopped = None, None
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None, None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if record.get("event") == "train_end":
            stopped = stopped or record.get("stopped")
            best = record.get("best_map") if best is None else best
        elif record.get("event") == "epoch" and best is None and record.get("best_map") is not None:
            best = record["best_map"]
        if best is not None and stopped is not None:
            break
    return best, stopped


def run_info(folder: Path) -> RunInfo | None:
    """The summary of one run folder, None when it is not a run (no readable config.json)."""
    config = _read_json(folder / "config.json")
    if config is None:
        return None
    models = []
    for kind in MODEL_KINDS:
        for name in _KIND_FILES[kind]:
            path = folder / name
            if path.is_file():
                models.append(ModelFile(path, kind, folder.name, _mtime(path), path.stat().st_size))
                break
    best, stopped = _last_events(folder / "metrics.jsonl")
    if best is None:
        evaluation = _read_json(folder / "eval.json") or {}
        best = (evaluation.get("metrics") or {}).get("mAP50-95")
    times = [_mtime(folder / "config.json"), *(model.modified for model in models)]
    return RunInfo(
        name=folder.name,
        path=folder,
        modified=max(times),
        config=config.get("train") or {},
        class_names=list(config.get("class_names") or []),
        best_map=best,
        stopped=stopped,
        models=models,
    )


def list_runs(settings: Settings | None = None) -> list[RunInfo]:
    """Every run under `storage/runs/`, newest first."""
    settings = settings or get_settings()
    if not settings.runs_dir.is_dir():
        return []
    runs = [info for folder in settings.runs_dir.iterdir() if folder.is_dir() and (info := run_info(folder))]
    return sorted(runs, key=lambda info: info.modified, reverse=True)


def list_models(settings: Settings | None = None, kinds: tuple[str, ...] = MODEL_KINDS) -> list[ModelFile]:
    """Every model file of every run, the default choice first: INT8 before FP32 before checkpoints, newest first
    within a kind."""
    models = [model for info in list_runs(settings) for model in info.models if model.kind in kinds]
    return sorted(models, key=lambda model: (kinds.index(model.kind), -model.modified.timestamp()))


def default_model(settings: Settings | None = None) -> ModelFile | None:
    """The model the Pokédex uses unless told otherwise: the newest INT8, else the newest FP32 ONNX, else the newest
    checkpoint; None when nothing has been trained."""
    models = list_models(settings)
    return models[0] if models else None
