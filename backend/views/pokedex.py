"""The Pokédex page's data: the models it offers (the current project's first, its best by default), the dex
entries of a model's classes, the FP32/INT8 pair of a run, and the timings in words."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from backend import catalog
from backend.pokedex import DexEntry, PokedexResult, dex_entries, plain_entries
from backend.settings import Settings
from backend.store.db import session_scope, shared_engine

logger = logging.getLogger(__name__)

KIND_TITLE = {"int8": "INT8", "fp32": "FP32", "checkpoint": "PyTorch"}


@dataclass
class ModelChoices:
    """The models offered (by path), the runs they come from, the default and why; `others` when the project has no
    model of its own and these are other projects' models."""

    models: dict[str, catalog.ModelFile]
    runs: dict[Any, catalog.RunInfo]
    default: str | None
    choice: catalog.ModelChoice | None
    others: bool = False

    def label(self, path: str) -> str:
        model = self.models[path]
        return self.runs[model.path.parent].model_label(model)

    def score(self, path: str) -> catalog.ModelScore | None:
        model = self.models[path]
        return self.runs[model.path.parent].model_score(model.kind)

    def default_text(self) -> str | None:
        if self.choice is None:
            return None
        return f"Default: {self.choice.run.name} · {KIND_TITLE[self.choice.model.kind]}: {self.choice.reason}."


def model_choices(settings: Settings, project: str | None) -> ModelChoices:
    runs = catalog.trained_runs(settings)
    candidates, others = runs, False
    if project:
        with session_scope(shared_engine(settings.database_url)) as session:
            candidates = catalog.project_runs(session, settings, project, runs)
        if not catalog.list_models(runs=candidates) and catalog.list_models(runs=runs):
            candidates, others = runs, True
    models = {str(model.path): model for model in catalog.list_models(runs=candidates)}
    choice = catalog.best_model(candidates)
    default = str(choice.model.path) if choice else next(iter(models), None)
    return ModelChoices(models, {info.path: info for info in candidates}, default, choice, others)


def entries_for(settings: Settings, class_names: list[str], project: str | None) -> tuple[list[DexEntry], bool]:
    """The dex entries of the model's classes (the current project's first), and False with names only when the
    database cannot be read (the page still works)."""
    try:
        with session_scope(shared_engine(settings.database_url)) as session:
            return dex_entries(session, class_names, project), True
    except Exception:
        logger.exception("reading the dex entries failed")
        return plain_entries(class_names), False


def comparison_pair(model: catalog.ModelFile) -> dict[str, catalog.ModelFile]:
    """The run's FP32 and INT8 models, {} when it does not have both."""
    info = catalog.run_info(model.path.parent)
    pair = {kind: info.model(kind) for kind in ("fp32", "int8")} if info else {}
    return {kind: file for kind, file in pair.items() if file is not None} if all(pair.values()) else {}


def latency_text(result: PokedexResult) -> str:
    timings = result.timings
    return (
        f"model run {timings['infer_ms']:.0f} ms in {result.runtime} · total {timings['total_ms']:.0f} ms "
        f"(decode {timings['decode_ms']:.0f}, pre/post-processing {timings['predict_ms'] - timings['infer_ms']:.0f}, "
        f"drawing {timings['draw_ms']:.0f})"
    )


def speedup_text(pair: dict[str, PokedexResult]) -> str:
    ratio = pair["fp32"].timings["infer_ms"] / max(pair["int8"].timings["infer_ms"], 1e-6)
    return (
        f"INT8 runs the model {ratio:.2f}x as fast as FP32 on this machine (this photo, each model warmed up "
        "once when it loaded)."
    )
