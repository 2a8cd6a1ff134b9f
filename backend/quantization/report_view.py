"""The Quantize page's view of a `quant_report.json` (written by `backend.quantization.pipeline.quantize_run`).

Plain functions from the report dict to table rows, plot points and pictures; no Streamlit. mAP is shown as the
COCO fraction the report stores (0.405), as on every other page; only a change of mAP (and the budget, as the user
gives it) is in *points*, and every such value is labelled "points" (1 point = 0.01).

Box convention: detections drawn here come from `backend.inference.Predictor`, xyxy in original-image pixels (EXIF
orientation applied); the pictures are the original image scaled to fit `max_side`, boxes scaled with it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from PIL import Image, ImageDraw

from backend.catalog import RunInfo, score_text
from backend.processing import Detections, load_image
from backend.runtimes import runtime_label

REPORT_FILE = "quant_report.json"
DELTA_COLUMN = "Δ mAP50-95 (points)"
MODEL_FILES = ("model_fp32.onnx", "model_int8.onnx")
FP32_COLOUR = (30, 110, 230)
INT8_COLOUR = (230, 60, 30)
ROW_LABELS = {
    "fp32": "FP32",
    "ptq_percentile": "PTQ percentile (default policy)",
    "ptq_minmax": "PTQ min/max (default policy)",
    "ptq_entropy": "PTQ entropy (default policy)",
    "ptq_selective": "PTQ selective policy",
    "qat": "QAT",
}


def read_report(run_dir: str | Path) -> dict[str, Any] | None:
    """The run folder's quant_report.json, None when it has none (or it cannot be read: a half-written file is
    never there, the pipeline writes it atomically)."""
    path = Path(run_dir) / REPORT_FILE
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and isinstance(report.get("models"), dict) else None


def row_label(name: str) -> str:
    return ROW_LABELS.get(name, name)


def _points(value: float | None) -> float | None:
    return None if value is None else round(100.0 * value, 2)


def _fraction(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def model_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model of the report, FP32 first then the report's order: the FP32-vs-INT8 table.

    Columns: model (report key), label, shipped (the one copied to model_int8.onnx), "mAP50-95" (a fraction, as
    everywhere), "Δ mAP50-95 (points)" (INT8 minus FP32; None for FP32 or unmeasured), "p50 ms", "p95 ms", "b8 img/s",
    "size MB", agreement (mean share of FP32 detections kept, 0..1; None for FP32 or without validation),
    "float layers" (how many quantizable layers it keeps in float; 0 for FP32, meaning not applicable).
    """
    models = report["models"]
    names = sorted(models, key=lambda name: name != "fp32")  # stable: the report's order after FP32
    rows = []
    for name in names:
        row = models[name]
        metrics = row.get("metrics") or {}
        deltas = (row.get("deltas") or {}).get("metrics") or {}
        agreement = row.get("agreement") or {}
        rows.append(
            {
                "model": name,
                "label": row_label(name),
                "shipped": name == report.get("chosen"),
                "mAP50-95": _fraction(metrics.get("mAP50-95")),
                DELTA_COLUMN: _points(deltas.get("mAP50-95")),
                "p50 ms": row.get("latency_ms_p50"),
                "p95 ms": row.get("latency_ms_p95"),
                "b8 img/s": row.get("throughput_b8_images_per_s"),
                "size MB": None if row.get("bytes") is None else round(row["bytes"] / 1e6, 2),
                "agreement": agreement.get("mean_agreement"),
                "float layers": len(row.get("float_layers") or []),
            }
        )
    return rows


def shipped_runtime(report: dict[str, Any]) -> str:
    """The runtime the shipped model was chosen for, as pages name it (reports written before runtimes were
    compared measured onnxruntime only)."""
    return str(report.get("runtime_label") or runtime_label(str(report.get("runtime") or "onnxruntime")))


def speed_caption(report: dict[str, Any]) -> str:
    """How the table's numbers were measured: images, input size, runtimes and threads, calibration, time."""
    calibration = report.get("calibration") or {}
    measured = [runtime_label(name) for name in report.get("runtimes") or [report.get("runtime") or "onnxruntime"]]
    return (
        f"{report.get('validation_images', '?')} validation images at {report.get('imgsz')} px; latency at batch 1 "
        f"and throughput at batch 8 on {' and '.join(measured)} with {report.get('threads')} threads, measured side "
        f"by side; the table shows {shipped_runtime(report)}, the runtime the shipped model runs on; calibration "
        f"{calibration.get('selected')} on {calibration.get('images')} training images; "
        f"{report.get('seconds', '?')} s in all."
    )


def runtime_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each model in each runtime the report measured, FP32 first: model label, runtime, "mAP50-95", "mAP50"
    (fractions), "p50 ms", "p95 ms", "b8 img/s", and "ships on" (the runtime the shipped model was chosen for). Empty
    for reports written before runtimes were compared."""
    models = report["models"]
    shipped_on = report.get("runtime")
    rows = []
    for name in sorted(models, key=lambda name: name != "fp32"):
        for runtime, measured in (models[name].get("runtimes") or {}).items():
            rows.append(
                {
                    "model": row_label(name),
                    "runtime": runtime_label(runtime),
                    "mAP50-95": _fraction(measured.get("mAP50-95")),
                    "mAP50": _fraction(measured.get("mAP50")),
                    "p50 ms": measured.get("latency_ms_p50"),
                    "p95 ms": measured.get("latency_ms_p95"),
                    "b8 img/s": measured.get("throughput_b8_images_per_s"),
                    "ships on": runtime == shipped_on,
                }
            )
    return rows


def budget_floor(report: dict[str, Any]) -> float | None:
    """The lowest acceptable INT8 mAP50-95, a fraction (FP32's minus the budget's points / 100); None without
    validation."""
    fp32 = (report["models"].get("fp32") or {}).get("metrics") or {}
    if fp32.get("mAP50-95") is None:
        return None
    return round(float(fp32["mAP50-95"]) - float(report.get("budget_points", 0.0)) / 100.0, 4)


def summary_line(report: dict[str, Any]) -> str:
    """One sentence: what shipped, its accuracy change and speed-up against FP32, and whether within budget."""
    chosen = report.get("chosen")
    row = report["models"].get(chosen) or {}
    deltas = row.get("deltas") or {}
    parts = [f"Shipped: {row_label(str(chosen))} (model_int8.onnx)"]
    delta = _points((deltas.get("metrics") or {}).get("mAP50-95"))
    if delta is not None:
        parts.append(f"mAP50-95 {delta:+.2f} points vs FP32")
    if deltas.get("latency_ratio_p50"):
        parts.append(f"latency x{deltas['latency_ratio_p50']:.2f}")
    if deltas.get("size_ratio"):
        parts.append(f"size x{deltas['size_ratio']:.2f}")
    within = report.get("within_budget")
    budget = report.get("budget_points")
    if within is not None:
        parts.append(f"{'within' if within else 'OUTSIDE'} the {budget} point budget")
    return ", ".join(parts) + "."


def float_layer_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The quantizable layers the shipped model keeps in float, with what each costs.

    For the selective policy: the layers the sensitivity scan chose, each with its output error when quantized
    alone ("cost"), its parameter count and the bytes it keeps in float (3 extra bytes per parameter vs int8).
    For the default policy or QAT: the layer names only (no scan ran for them).
    """
    chosen = report.get("chosen")
    row = report["models"].get(chosen) or {}
    sensitivity = report.get("sensitivity") or {}
    if row.get("policy") == "selective" and sensitivity.get("float_layers") is not None:
        return [
            {
                "layer": layer.get("module"),
                "node": layer.get("node"),
                "parameters": layer.get("parameters"),
                "cost": layer.get("cost"),
                "float KB": None if layer.get("float_bytes") is None else round(layer["float_bytes"] / 1e3, 1),
            }
            for layer in sensitivity["float_layers"]
        ]
    return [
        {"layer": module, "node": None, "parameters": None, "cost": None, "float KB": None}
        for module in row.get("float_layers") or []
    ]


def fallback_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Quantized nodes onnxruntime still ran in float (no int8 kernel), per INT8 model: model, node, op, kernel."""
    return [
        {"model": name, "node": item.get("node"), "op": item.get("op_type"), "kernel": item.get("kernel")}
        for name, row in report["models"].items()
        if name != "fp32"
        for item in row.get("float_fallbacks") or []
    ]


def model_paths(report: dict[str, Any], run_dir: str | Path) -> dict[str, Path]:
    """{"fp32": path, "int8": path} of the shipped files: the report's paths, else the run folder's files (the run
    may have moved since)."""
    run_dir = Path(run_dir)
    found = {}
    for kind, key, name in (("fp32", "model_fp32", MODEL_FILES[0]), ("int8", "model_int8", MODEL_FILES[1])):
        stored = Path(str(report.get(key) or ""))
        found[kind] = stored if report.get(key) and stored.is_file() else run_dir / name
    return found


def gallery(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The validation images whose detections changed most between FP32 and the shipped INT8 model, most changed
    first: each {"image", "matched", "class_changed", "lost", "new", "agreement", "change", ...}."""
    return [item for item in report.get("gallery") or [] if item.get("image")]


def gallery_caption(item: dict[str, Any]) -> str:
    """One line for a gallery image: its name and what changed."""
    return (
        f"{Path(item['image']).name}: agreement {float(item.get('agreement', 0.0)):.2f} · "
        f"{item.get('matched', 0)} same, {item.get('class_changed', 0)} class changed, "
        f"{item.get('lost', 0)} lost, {item.get('new', 0)} new"
    )


def score_threshold(report: dict[str, Any]) -> float:
    """The score under which detections were ignored when the report compared FP32 and INT8 (0.25 by default)."""
    chosen = report["models"].get(report.get("chosen")) or {}
    return float((chosen.get("agreement") or {}).get("score_threshold", 0.25))


@dataclass(frozen=True)
class Picture:
    """A drawn image and how many boxes were drawn on it."""

    image: Image.Image
    boxes: int


def draw_detections(
    image: str | Path,
    detections: Detections,
    class_names: Sequence[str],
    *,
    colour: tuple[int, int, int],
    title: str,
    max_side: int = 360,
) -> Picture:
    """The image (EXIF orientation applied) scaled so its long side is `max_side`, its detections drawn and labelled,
    and `title` written in the top-left corner.

    Args:
        detections: boxes (N, 4) xyxy in original-image pixels.

    Raises:
        FileNotFoundError / backend.processing.ImageLoadError: the image cannot be read.
    """
    picture = Image.fromarray(load_image(image))
    # Scaled to the long side `max_side` whatever the image's size (up or down): the FP32 and INT8 pictures of an
    # image, and every image of the gallery, are drawn at one size.
    scale = max_side / max(picture.size)
    if scale != 1.0:
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
    draw = ImageDraw.Draw(picture)
    width = max(1, round(max(picture.size) / 160))
    for box, score, class_id in zip(detections.boxes, detections.scores, detections.class_ids, strict=True):
        corners = [float(value) * scale for value in box]
        draw.rectangle(corners, outline=colour, width=width)
        name = class_names[class_id] if 0 <= class_id < len(class_names) else f"#{class_id}"
        text = f"{name} {score:.2f}"
        top = max(0.0, corners[1] - 12)
        draw.rectangle(draw.textbbox((corners[0], top), text), fill=colour)
        draw.text((corners[0], top), text, fill=(255, 255, 255))
    draw.rectangle(draw.textbbox((2, 2), title), fill=(0, 0, 0))
    draw.text((2, 2), title, fill=(255, 255, 255))
    return Picture(picture, len(detections))


def compare_pictures(
    image: str | Path,
    fp32: Any,
    int8: Any,
    *,
    threshold: float,
    max_side: int = 360,
) -> tuple[Picture, Picture]:
    """FP32's and INT8's detections of one image, drawn side by side (FP32 blue, INT8 red).

    Args:
        fp32, int8: `backend.inference.Predictor`s of the two ONNX files.
        threshold: detections scoring below it are not drawn (the report's comparison threshold).
    """
    pictures = []
    for predictor, colour, title in ((fp32, FP32_COLOUR, "FP32"), (int8, INT8_COLOUR, "INT8")):
        detections = predictor.predict([image])[0]
        keep = detections.scores >= threshold
        kept = Detections(detections.boxes[keep], detections.scores[keep], detections.class_ids[keep])
        pictures.append(
            draw_detections(image, kept, predictor.class_names, colour=colour, title=title, max_side=max_side)
        )
    return pictures[0], pictures[1]


def compare_jpegs(image: str | Path, fp32: Any, int8: Any, *, threshold: float, max_side: int = 360) -> list:
    """`compare_pictures` encoded for a page: [(FP32 JPEG bytes, boxes), (INT8 JPEG bytes, boxes)]."""
    encoded = []
    for picture in compare_pictures(image, fp32, int8, threshold=threshold, max_side=max_side):
        buffer = io.BytesIO()
        picture.image.save(buffer, format="JPEG", quality=85)
        encoded.append((buffer.getvalue(), picture.boxes))
    return encoded


def run_label(info: RunInfo) -> str:
    """ "run · best.pt mAP50 0.412 · INT8 mAP50 0.405": each model of a run with its own validation score."""
    trained = f"{info.name} · best.pt {score_text(info.model_score('checkpoint'))}"
    return trained + (f" · INT8 {score_text(info.model_score('int8'))}" if info.model("int8") else "")


def downloads(run_dir: Path) -> list[tuple[str, Path]]:
    """The download buttons' labels and files: each shipped ONNX file with its size, or "(missing)"."""
    files = [run_dir / name for name in MODEL_FILES]
    return [
        (f"Download {path.name}" + (f" ({path.stat().st_size / 1e6:.1f} MB)" if path.is_file() else " (missing)"), path)
        for path in files
    ]


def scatter_figure(report: dict[str, Any], rows: list[dict[str, Any]]) -> go.Figure:
    """Accuracy against batch-1 latency, one point per model (the shipped one a star), the budget as a dashed
    line. Names in the legend and on hover, not as text beside the points: close points' labels overlapped."""
    figure = go.Figure()
    for row in rows:
        if row["mAP50-95"] is None or row["p50 ms"] is None:
            continue
        name = row["label"] + (" (shipped)" if row["shipped"] else "")
        figure.add_trace(
            go.Scatter(
                x=[row["p50 ms"]],
                y=[row["mAP50-95"]],
                mode="markers",
                name=name,
                hovertemplate=f"{name}<br>p50 %{{x:.1f}} ms<br>mAP50-95 %{{y:.3f}}<extra></extra>",
                marker={"size": 16 if row["shipped"] else 11, "symbol": "star" if row["shipped"] else "circle"},
            )
        )
    floor = budget_floor(report)
    if floor is not None:
        figure.add_hline(
            y=floor,
            line_dash="dash",
            annotation_text=f"budget: FP32 − {report.get('budget_points')} points",
            annotation_position="bottom right",
        )
    figure.update_layout(
        xaxis_title="latency p50 at batch 1 (ms)",
        yaxis_title="mAP50-95",
        yaxis_tickformat=".3f",
        height=420,
        margin={"t": 30, "b": 40, "l": 60, "r": 20},
        legend={"orientation": "h", "y": -0.25, "yanchor": "top"},
    )
    return figure


def pick_job(run_dir: Path, asked: Any, recent: Sequence[Any]) -> Any:
    """The quantize job the page follows: `asked` (the job in the page's address) when it quantizes this run, else
    this run's newest quantize job among `recent` (newest first), else None."""
    if asked is not None and asked.kind == "quantize" and asked.params.get("run_dir") == str(run_dir):
        return asked
    return next((job for job in recent if job.params.get("run_dir") == str(run_dir)), None)


def job_options(**fields: Any) -> dict[str, Any]:
    """The Quantize form's values as a quantize job's options (0 for input size or QAT epochs: the run's own)."""
    kinds = {"calib_images": int, "budget": float, "compare_calibrations": bool, "scan_images": int, "threads": int}
    options = {name: kinds.get(name, lambda value: value)(value) for name, value in fields.items()}
    return options | {"imgsz": int(fields["imgsz"]) or None, "qat_epochs": int(fields["qat_epochs"]) or None}


def progress_text(job: Any) -> str:
    """The progress bar's line: "quantization job 7 running: scan 12/100 · ETA 40 s" (a failure's error is shown
    apart, once)."""
    eta = f" · ETA {job.eta_s:.0f} s" if job.active and job.eta_s is not None else ""
    message = "" if job.state == "failed" else f": {job.message or ''}"
    return f"quantization job {job.id} {job.state}{message}{eta}"
