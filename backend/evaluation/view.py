"""The Evaluate page's view of a run and an evaluation file: the choices it offers (runs, datasets), the figures
(per-class AP bars, precision-recall curves, the confusion matrix) and the error pictures. No Streamlit: plain
values and Plotly figures, shaped from `backend.evaluation.report`'s rows.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from backend.evaluation import report

SPLITS = ("val", "test", "train")
# What a run folder offers to evaluate: its checkpoints, and the ONNX files `yolodex quantize` wrote (run in the
# faster runtime here, docs/runtimes.md).
MODEL_FILES = ("best.pt", "last.pt", "model_fp32.onnx", "model_int8.onnx")


def run_label(info: Any) -> str:
    """A run as the picker shows it: "name (best mAP50-95 0.412, 30/30 epochs)" (a `catalog.RunInfo`)."""
    score = "not evaluated" if info.best_map is None else f"best mAP50-95 {info.best_map:.3f}"
    return f"{info.name} ({score}, {info.epochs_text})"


def dataset_choices(trained_on: Path, versions: list[tuple[str, Path]]) -> tuple[list[tuple[str, Path]], int]:
    """The datasets a run can be evaluated on: the project's frozen versions, and the run's own dataset first when
    it is none of them; and the index of the one the run was trained on (0 when none is)."""
    choices = list(versions)
    if trained_on.is_dir() and all(folder.resolve() != trained_on.resolve() for _, folder in choices):
        choices.insert(0, (f"{trained_on.name} (the run's dataset)", trained_on))
    default = next((index for index, (_, folder) in enumerate(choices) if folder.resolve() == trained_on.resolve()), 0)
    return choices, default


def splits_of(data: Path) -> list[str]:
    """The splits `data` has (val, test, train in that order); ["val"] when it has none of them."""
    return [split for split in SPLITS if (data / f"{split}.json").is_file()] or ["val"]


def counts_caption(name: str, evaluation: dict[str, Any]) -> str:
    counts = evaluation.get("counts") or {}
    return (
        f"{name}: {counts.get('images', '?')} images, {counts.get('ground_truth', '?')} ground-truth boxes, "
        f"{counts.get('predictions', '?')} predictions."
    )


def ap_bars(per_class: list[dict[str, Any]]) -> go.Figure:
    """AP50-95 and AP50 per class, grouped bars."""
    classes = [row["class"] for row in per_class]
    bars = [go.Bar(x=classes, y=[row[metric] for row in per_class], name=metric) for metric in ("AP50-95", "AP50")]
    return go.Figure(bars).update_layout(barmode="group", height=320, margin={"t": 20})


def pr_figure(evaluation: dict[str, Any]) -> go.Figure:
    """Precision-recall curves at IoU 0.5, per class and their mean, each with its operating point (the score
    threshold) marked."""
    curves = go.Figure()
    for curve in report.pr_curves(evaluation):
        curves.add_trace(
            go.Scatter(x=curve.recall, y=curve.precision, mode="lines", name=f"{curve.name} AP {curve.ap:.3f}")
        )
        if curve.operating_point is not None:
            curves.add_trace(
                go.Scatter(
                    x=[curve.operating_point[0]],
                    y=[curve.operating_point[1]],
                    mode="markers",
                    name=f"{curve.name} at score ≥ {evaluation['score_threshold']}",
                )
            )
    return curves.update_layout(
        xaxis_title="recall", yaxis_title="precision", height=380, xaxis_range=[0, 1], yaxis_range=[0, 1.02]
    )


def confusion_figure(confusion: report.ConfusionView, shares: bool) -> go.Figure:
    """The confusion matrix as a heatmap: counts, or each true class's shares."""
    values = confusion.shares if shares else confusion.counts
    heatmap = go.Figure(
        go.Heatmap(
            z=values,
            x=confusion.labels,
            y=confusion.labels,
            colorscale="Blues",
            text=[[f"{v:.2f}" if shares else str(v) for v in row] for row in values],
            texttemplate="%{text}",
        )
    )
    return heatmap.update_layout(xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed", height=420)


def confusion_caption(confusion: report.ConfusionView) -> str:
    totals = confusion.totals
    return (
        f"IoU ≥ {confusion.iou_threshold}, score ≥ {confusion.score_threshold}: {totals['correct']} correct, "
        f"{totals['wrong_class']} wrong class, {totals['false_positives']} false positives (background row), "
        f"{totals['misses']} misses (background column)."
    )


def error_jpeg(item: report.ErrorItem, class_names: tuple[str, ...], max_side: int = 480) -> bytes:
    """One error drawn on its image (`report.draw_error`), as JPEG bytes."""
    buffer = io.BytesIO()
    report.draw_error(item, class_names, max_side=max_side).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
