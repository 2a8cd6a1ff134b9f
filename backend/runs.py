"""A training run's folder: where each of its files lives, and its config.json, read and written in one place.

A run folder (docs/contracts.md §4) holds:

- `config.json`: {"train": the resolved TrainConfig as a dict, "class_names": [...], "start": ..., "notes": [...],
  "data": the data report, "continued": [...] once a run was trained longer};
- `last.pt` (written every epoch and every few minutes) and `best.pt` (the best mAP50-95 so far);
- `metrics.jsonl`: every training event, one JSON object a line;
- `eval.json`: best.pt on the validation split of the data it trained on; other evaluations in `evals/`;
- `export/`: the models exported or quantized from it.

This module sits low (it needs only the files helpers) so that every layer can read a run: training, evaluation,
the catalog, quantization, the jobs and the CLI. It hands back the "train" part as a dict; callers that need the
typed form convert it once with `TrainConfig.from_dict`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.files import atomic_write_json

CONFIG_FILE = "config.json"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
EVALS_DIR = "evals"
EXPORT_DIR = "export"


class RunFolderError(ValueError):
    """A run folder's config.json is missing or unreadable; the message names the folder and what is wrong."""


@dataclass(frozen=True)
class RunFolder:
    """The files of one training run, by name; nothing is read until a method asks."""

    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    # -- paths ----------------------------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def last(self) -> Path:
        return self.path / LAST_CHECKPOINT

    @property
    def best(self) -> Path:
        return self.path / BEST_CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def eval_json(self) -> Path:
        return self.path / EVAL_FILE

    @property
    def evals_dir(self) -> Path:
        return self.path / EVALS_DIR

    @property
    def export_dir(self) -> Path:
        return self.path / EXPORT_DIR

    def checkpoint(self) -> Path:
        """best.pt, else last.pt; best.pt when neither is there, so a missing file is reported under that name."""
        return next((path for path in (self.best, self.last) if path.is_file()), self.best)

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def resumable(self) -> bool:
        """A run that can go on: config.json and last.pt are both there."""
        return self.has_config() and self.last.is_file()

    def holds_run(self) -> bool:
        """Something of a run is there already (config.json or last.pt): a new training must not start in it."""
        return self.config_path.exists() or self.last.exists()

    # -- config.json ----------------------------------------------------------------------------------------------

    def read_config(self) -> dict[str, Any]:
        """The whole config.json.

        Raises:
            RunFolderError: no config.json, not JSON, or no "train" object in it.
        """
        try:
            text = self.config_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RunFolderError(f"{self.path} is not a training run folder: it has no {CONFIG_FILE}") from None
        except OSError as error:
            raise RunFolderError(f"cannot read {self.config_path}: {error.strerror or error}") from error
        try:
            config = json.loads(text)
        except ValueError as error:
            raise RunFolderError(f"{self.config_path} is not valid JSON ({error})") from error
        if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
            raise RunFolderError(f'{self.config_path} holds no training settings (its "train" object is missing)')
        return config

    def train(self) -> dict[str, Any]:
        """config.json's "train" part (a TrainConfig as a dict); raises `RunFolderError` like `read_config`."""
        return dict(self.read_config()["train"])

    def train_or_none(self) -> dict[str, Any] | None:
        """Like `train`, but None for a folder that is not (or no longer) a readable run: for readers that skip it."""
        try:
            return self.train()
        except RunFolderError:
            return None

    def write_config(self, config: dict[str, Any]) -> Path:
        """Writes config.json atomically (a reader never sees half of it); `config` must have a "train" object."""
        if not isinstance(config.get("train"), dict):
            raise ValueError('a run\'s config needs its "train" object (TrainConfig.to_dict())')
        return atomic_write_json(self.config_path, config)

    def dataset(self) -> Path | None:
        """The dataset the run trained on (config.json's train.data), None when unknown."""
        data = (self.train_or_none() or {}).get("data")
        return Path(data) if isinstance(data, str) and data else None

    # -- evaluations ----------------------------------------------------------------------------------------------

    def eval_file(self, model: str | Path, data: str | Path, split: str) -> Path:
        """The JSON file an evaluation of `model` on `data`'s `split` is written to and read from.

        The run's own `eval.json` is its best.pt on the validation split of the data it trained on (training writes
        it); any other combination goes to `evals/<model file>-<dataset folder>-<split>.json`.
        """
        model, data = Path(model), Path(data)
        trained_on = self.dataset()
        if model == self.best and split == "val" and trained_on is not None and _same(trained_on, data):
            return self.eval_json
        label = "_".join(re.sub(r"[^\w.-]+", "_", part) for part in (data.parent.name, data.name) if part)
        return self.evals_dir / f"{model.name.replace('.', '_')}-{label}-{split}.json"


def _same(first: Path, second: Path) -> bool:
    try:
        return first.resolve() == second.resolve()
    except OSError:
        return first == second
