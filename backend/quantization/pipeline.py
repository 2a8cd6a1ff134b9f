"""From a training run to an INT8 model you can trust: calibrate, choose what stays in float, fine-tune if needed,
and measure every candidate against FP32.

Run folder in, files out (docs/contracts.md §4): `model_fp32.onnx` (the partially fused export: QARepVGG branches
merged, post-BN kept, as docs/quantization_policy.md §1 describes), `model_int8.onnx` (the chosen INT8 model),
`int8_variants/*.onnx` (every other candidate), `quant_report.json`, and with `openvino_ir` the shipped model as an
OpenVINO IR (`model_int8.xml` + `.bin`). Every ONNX file keeps the ONNX I/O contract, so the Pokédex and
`yolodex predict` run any of them unchanged.

Candidates (report rows):
- `ptq_<calibration>`: static PTQ with the default float policy (head branches and decoding), one row per
  calibration method (minmax, percentile, entropy) when comparing;
- `ptq_selective`: PTQ with the automatic policy: a sensitivity scan, then the fewest layers kept in float for the
  mAP50-95 drop to stay within the budget (backend.quantization.sensitivity);
- `qat`: quantization-aware fine-tuning (backend.quantization.qat), run by `method="qat"`, or by `method="auto"`
  when selective PTQ misses the budget.
For each: mAP50-95, mAP50, per-class AP and deltas to FP32; latency p50/p95 at batch 1 and throughput at batch 8
side by side (threads stated); file size; the agreement of its detections with FP32's and the images that changed
most; the kernels onnxruntime executed and the quantized layers that still ran in float.

Runtimes (docs/runtimes.md): the report measures every candidate's speed and mAP in each runtime that loads here
(onnxruntime always, OpenVINO when it loads), side by side, under "runtimes". Everything else (the policy search,
the top-level metrics and speed, the agreement, the choice of the shipped model) is measured on the runtime the
shipped model will run on: what `runtime="auto"` resolves to here (the report's "runtime").
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from backend.data.records import DatasetError, DetectionSet
from backend.evaluation.coco_eval import evaluate_detections
from backend.export.onnx_export import export_onnx, read_onnx_metadata
from backend.files import atomic_write_json
from backend.inference import Predictor
from backend.models.checkpoints import CheckpointError, ensure_room, load_model
from backend.models.yolo_nas import YoloNAS
from backend.processing import Detections
from backend.quantization.agreement import detection_agreement
from backend.quantization.calibration import CalibrationImages
from backend.quantization.ptq import (
    CALIBRATION_METHODS,
    Calibration,
    calibrate,
    decoding_nodes,
    default_float_nodes,
    executed_kernels,
    float_fallbacks,
    op_type_counts,
    preprocess_fp32,
    quantize_calibrated,
    weighted_nodes,
)
from backend.quantization.sensitivity import choose_float_nodes, module_path, scan_sensitivity
from backend.runs import RunFolder
from backend.runtimes import (
    RuntimeUnavailable,
    open_onnx,
    openvino_problem,
    resolve_runtime,
    runtime_label,
    save_openvino_ir,
)
from backend.training.engine import EVAL_POSTPROCESS
from backend.training.trainer import load_splits

logger = logging.getLogger(__name__)

METHODS = ("auto", "ptq", "qat")
SPEED_BLOCK = 4  # timed runs per model per turn, after one untimed run
THROUGHPUT_BATCH = 8
THROUGHPUT_RUNS = 4
GALLERY_SIZE = 12
SPEED_KEYS = ("latency_ms_p50", "latency_ms_p95", "throughput_b8_images_per_s")

EventCallback = Callable[..., None]


@dataclass(frozen=True)
class QuantizeOptions:
    """What `quantize_run` does (the CLI's `yolodex quantize` flags).

    Attributes:
        method: "auto" (selective PTQ, then QAT only if it misses the budget), "ptq" (selective PTQ) or "qat".
        calibration: the calibration method of the chosen model: "percentile" (99.99), "minmax" or "entropy".
        calib_images: calibration images drawn from the training split (validation pre-processing).
        budget: the largest acceptable mAP50-95 drop, in points (0.5 = 0.005 as a fraction).
        compare_calibrations: also calibrate and measure the other methods (one report row each).
        scan_images: validation images the sensitivity scan compares outputs on.
        scan_layers: restrict the scan to these node names (default: every Conv/ConvTranspose).
        qat_epochs: QAT epochs (default: docs/quantization_policy.md §3's rule, a tenth of the run's, at least 1).
        threads: intra-op threads of every runtime, for evaluation, latency and throughput.
        latency_runs: timed batch-1 runs per model, models taking turns.
        data: the dataset, when it moved since training (default: the run's config.json).
        imgsz: the input size to export, calibrate and measure at (default: the run's); a multiple of 32. The
            model is fully convolutional, so a model trained at 320 can be deployed at 640 and the reverse.
        openvino_ir: also write the shipped model as an OpenVINO IR (model_int8.xml + .bin beside the ONNX).
    """

    method: str = "auto"
    calibration: str = "percentile"
    calib_images: int = 64
    budget: float = 0.5
    compare_calibrations: bool = True
    scan_images: int = 16
    scan_layers: tuple[str, ...] | None = None
    qat_epochs: int | None = None
    threads: int = 2
    latency_runs: int = 20
    data: str | None = None
    imgsz: int | None = None
    openvino_ir: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.calibration not in CALIBRATION_METHODS:
            raise ValueError(f"unknown calibration {self.calibration!r}; use one of {', '.join(CALIBRATION_METHODS)}")
        if self.budget < 0:
            raise ValueError(f"the budget is a drop in mAP points and cannot be negative (got {self.budget})")
        if self.imgsz is not None and (self.imgsz < 32 or self.imgsz % 32):
            raise ValueError(f"imgsz must be a positive multiple of 32 (got {self.imgsz})")
        if self.calib_images < 1:
            raise ValueError(f"calibration needs at least 1 image (got --calib {self.calib_images})")


@dataclass
class Candidate:
    """One model of the report: the FP32 export or an INT8 candidate, and what was measured of it.

    Attributes:
        name: the report key ("fp32", "ptq_percentile", "ptq_selective", "qat", ...).
        kind: "fp32", "ptq" or "qat".
        path: its ONNX file.
        calibration / policy: how an INT8 candidate was made (None for FP32).
        float_layers: the quantizable layers (module paths) it keeps in float (None for FP32).
        within_budget: the selective policy's own verdict (None for the others).
        scores: mAP50-95 and the other COCO metrics, per-class AP and the detections, on the deployment runtime.
        runtimes: per runtime, batch-1 latency p50/p95 (ms), batch-8 throughput (images/s) and mAP50-95/mAP50.
    """

    name: str
    kind: str
    path: Path
    calibration: str | None = None
    policy: str | None = None
    float_layers: list[str] | None = None
    within_budget: bool | None = None
    scores: dict[str, Any] = field(default_factory=dict)
    runtimes: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def map(self) -> float | None:
        return None if "metrics" not in self.scores else float(self.scores["metrics"]["mAP50-95"])

    def row(self, runtime: str) -> dict[str, Any]:
        """The report row: how it was made, its scores and file size, and its speed on `runtime` at the top level
        (the runtime it ships on) with every measured runtime under "runtimes"."""
        entry: dict[str, Any] = {"kind": self.kind}
        for key in ("calibration", "policy", "float_layers", "within_budget"):
            if getattr(self, key) is not None:
                entry[key] = getattr(self, key)
        entry["path"] = str(self.path)
        entry.update({key: value for key, value in self.scores.items() if key != "predictions"})
        entry["bytes"] = self.path.stat().st_size
        speed = self.runtimes.get(runtime, {})
        entry.update({key: speed[key] for key in SPEED_KEYS if key in speed})
        entry["runtimes"] = self.runtimes
        return entry


@dataclass
class _Run:
    """The training run being quantized: its checkpoint and model, its config and its data."""

    directory: Path
    checkpoint: Path
    train_config: dict[str, Any]
    model: YoloNAS
    class_names: list[str]
    imgsz: int
    train_set: DetectionSet
    val_set: DetectionSet
    notes: list[str]


def quantize_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    options: QuantizeOptions | None = None,
    *,
    on_event: EventCallback | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Quantizes a run's best.pt to INT8 and returns (and writes) the FP32-vs-INT8 report (module docstring).

    Args:
        run_dir: a training run folder (best.pt or last.pt, and config.json naming its dataset).
        out_dir: where the ONNX files and quant_report.json go (default: the run folder).
        options: see QuantizeOptions.
        on_event: progress, called as on_event(name, **data): "stage", "scan", "policy", QAT's training events.
        stop_requested: checked between stages, scan layers and QAT steps; True ends the run with
            QuantizeCancelled at the next stage (files written so far stay; no report is written).

    Raises:
        CheckpointError: not a run folder, or fully fused weights.
        ValueError: bad options, or no calibration image.
        QuantizeCancelled: stop_requested() became True.
    """
    options = options or QuantizeOptions()
    emit = on_event or (lambda name, **data: None)
    stage = _stage_gate(emit, stop_requested)
    if options.openvino_ir and openvino_problem() is not None:
        raise RuntimeUnavailable(f"cannot write an OpenVINO IR: {openvino_problem()}")
    run = _open_run(Path(run_dir), options)
    out_dir = Path(out_dir) if out_dir else run.directory
    not_measured = _unmeasured(run)
    work, variants = _make_folders(run, out_dir, options)
    deploy, measured_runtimes = deployment_runtimes()
    started = time.perf_counter()
    try:
        evaluator = _Evaluator(run.val_set, options.threads, deploy)
        search = _ptq(run, options, out_dir, work, variants, evaluator, emit, stage, stop_requested)
        _qat(run, options, search, work, variants, emit, stage, stop_requested)
        stage("measure")
        _measure(search.candidates, evaluator, run.imgsz, options, measured_runtimes)
        shipped = _ship_best(search, out_dir, options, deploy, evaluator, run)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = _report(run, options, search, shipped, (deploy, measured_runtimes), not_measured, started)
    atomic_write_json(out_dir / "quant_report.json", report)
    emit("stage", stage="done", chosen=shipped.chosen)
    return report


@dataclass
class _Search:
    """What the export, calibration, selective-policy and QAT stages found: the candidates and how they were made."""

    fp32_path: Path
    fp32_map: float | None  # None: no labelled validation images
    candidates: dict[str, Candidate]
    calibrations: dict[str, Calibration]
    selected: str  # the calibration the selective policy and QAT build on
    sensitivity: dict[str, Any] | None = None
    qat_summary: dict[str, Any] | None = None


@dataclass
class _Shipped:
    """The chosen candidate, its shipped files and every candidate's report row."""

    chosen: str
    int8_path: Path
    openvino_path: Path | None
    models: dict[str, dict[str, Any]]


def _stage_gate(emit: EventCallback, stop_requested: Callable[[], bool] | None) -> Callable[..., None]:
    """The "stage" event, after a last look at stop_requested (a cancelled run stops between stages)."""

    def stage(name: str, **data: Any) -> None:
        if stop_requested is not None and stop_requested():
            raise QuantizeCancelled(f"quantization cancelled before the {name} stage")
        emit("stage", stage=name, **data)

    return stage


def _unmeasured(run: _Run) -> list[str]:
    """What the report cannot measure on this run, in words."""
    if len(run.val_set) > 0:
        return []
    return [
        "no validation images: mAP, per-class AP, detection agreement, the sensitivity scan, the automatic "
        "policy and QAT's model selection need labelled validation images (add a val split and run again); "
        "the default float policy was used"
    ]


def _make_folders(run: _Run, out_dir: Path, options: QuantizeOptions) -> tuple[Path, Path]:
    """Checks the disk has room, then makes out_dir, an empty work folder (removed at the end) and int8_variants/."""
    ensure_room(out_dir, _bytes_needed(run.model, out_dir, options), "the quantization's ONNX files")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".quantize_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    variants = out_dir / "int8_variants"
    variants.mkdir(exist_ok=True)
    return work, variants


def _ptq(
    run: _Run,
    options: QuantizeOptions,
    out_dir: Path,
    work: Path,
    variants: Path,
    evaluator: _Evaluator,
    emit: EventCallback,
    stage: Callable[..., None],
    stop_requested: Callable[[], bool] | None,
) -> _Search:
    """The FP32 export, one default-policy PTQ candidate per calibration and, when asked and measurable, the
    selective policy on the best calibration."""
    stage("export")
    fp32_path = export_onnx(
        run.model,
        out_dir / "model_fp32.onnx",
        imgsz=run.imgsz,
        class_names=run.class_names,
        run_id=run.directory.name,
        fuse=False,
    )
    prepared = preprocess_fp32(fp32_path, work / "fp32_pre.onnx")
    candidates = {"fp32": Candidate("fp32", "fp32", fp32_path)}
    calibrations = _calibrate(run, options, prepared, fp32_path, work, variants, candidates, stage)
    fp32_map = evaluator.map(fp32_path) if evaluator.available else None
    selected = _best_calibration(calibrations, candidates, evaluator, options.calibration)
    search = _Search(fp32_path, fp32_map, candidates, calibrations, selected)
    if options.method in ("auto", "ptq") and fp32_map is not None:  # None: no evaluator
        selective, search.sensitivity = _selective(
            run, options, calibrations[selected], evaluator, fp32_map, fp32_path, variants, emit, stage, stop_requested
        )
        candidates[selective.name] = selective
    return search


def _qat(
    run: _Run,
    options: QuantizeOptions,
    search: _Search,
    work: Path,
    variants: Path,
    emit: EventCallback,
    stage: Callable[..., None],
    stop_requested: Callable[[], bool] | None,
) -> None:
    """QAT when asked (--method qat), or on auto when the selective policy missed the budget: adds the "qat"
    candidate and its summary to `search`."""
    candidates = search.candidates
    if not (
        options.method == "qat"
        or (
            options.method == "auto" and "ptq_selective" in candidates and not candidates["ptq_selective"].within_budget
        )
    ):
        return
    stage("qat")
    float_modules = candidates[f"ptq_{search.selected}"].float_layers or []  # the default policy: QAT trains the rest
    path, search.qat_summary = _quantization_aware(
        run,
        float_modules,
        options,
        search.selected,
        search.fp32_path,
        work,
        variants / "qat.onnx",
        emit,
        stop_requested,
    )
    candidates["qat"] = Candidate("qat", "qat", path, search.selected, "qat", float_modules)


def _ship_best(
    search: _Search, out_dir: Path, options: QuantizeOptions, deploy: str, evaluator: _Evaluator, run: _Run
) -> _Shipped:
    """Chooses among the measured candidates (`_choose`), copies it to model_int8.onnx (and the OpenVINO IR when
    asked) and builds the report rows."""
    chosen = _choose(
        {name: item.row(deploy) for name, item in search.candidates.items()},
        search.fp32_map,
        options.budget / 100.0,
        options.calibration,
    )
    int8_path = _ship(search.candidates[chosen].path, out_dir / "model_int8.onnx")
    openvino_path = save_openvino_ir(int8_path, out_dir / "model_int8.xml") if options.openvino_ir else None
    models = _report_rows(search.candidates, deploy, evaluator, run, options)
    return _Shipped(chosen, int8_path, openvino_path, models)


def _report(
    run: _Run,
    options: QuantizeOptions,
    search: _Search,
    shipped: _Shipped,
    runtimes: tuple[str, list[str]],
    not_measured: list[str],
    started: float,
) -> dict[str, Any]:
    """quant_report.json (docs/contracts.md §4)."""
    deploy, measured_runtimes = runtimes
    chosen, models = shipped.chosen, shipped.models
    return {
        "run": str(run.directory),
        "checkpoint": str(run.checkpoint),
        "imgsz": run.imgsz,
        "method": options.method,
        "options": json.loads(json.dumps(asdict(options))),
        "budget_points": options.budget,
        "threads": options.threads,
        "runtime": deploy,
        "runtime_label": runtime_label(deploy),
        "runtimes": measured_runtimes,
        "validation_images": len(run.val_set),
        "chosen": chosen,
        "model_int8": str(shipped.int8_path),
        "model_fp32": str(search.fp32_path),
        "model_int8_openvino": None if shipped.openvino_path is None else str(shipped.openvino_path),
        "within_budget": _within(models[chosen], search.fp32_map, options.budget / 100.0),
        "calibration": {
            "method": options.calibration,
            "selected": search.selected,
            "asked": options.calib_images,
            "split": "train",
            "images": search.calibrations[search.selected].images,
            "seconds": {name: item.seconds for name, item in search.calibrations.items()},
        },
        "float_nodes": _float_nodes(shipped.int8_path),
        "sensitivity": search.sensitivity,
        "qat": search.qat_summary,
        "gallery": models[chosen].get("agreement", {}).get("most_changed", []),
        "models": models,
        "notes": run.notes,
        "not_measured": not_measured,
        "seconds": round(time.perf_counter() - started, 1),
    }


def deployment_runtimes() -> tuple[str, list[str]]:
    """The runtime the shipped model will run on (what "auto" resolves to here) and the runtimes the report
    measures side by side: onnxruntime (the reference) always, OpenVINO when it loads."""
    measured = ["onnxruntime"] + (["openvino"] if openvino_problem() is None else [])
    deploy = resolve_runtime("auto")
    return deploy, measured if deploy in measured else [*measured, deploy]


def _open_run(run_dir: Path, options: QuantizeOptions) -> _Run:
    """The run's checkpoint, partially fused (the form the pipeline works on), its config and its splits."""
    folder = RunFolder(run_dir)
    checkpoint = folder.checkpoint()
    if not checkpoint.is_file() or not folder.has_config():
        raise CheckpointError(f"{run_dir} is not a training run folder (best.pt/last.pt and config.json expected)")
    train_config = folder.train()
    model, loaded = load_model(checkpoint)
    if model.fusion == "full":
        raise CheckpointError(f"{checkpoint} is fully fused; quantization needs unfused or partially fused weights")
    if model.fusion == "none":
        model.eval().fuse()  # partial fusion
    data = options.data or train_config["data"]
    if not options.data and not Path(data).exists():
        raise DatasetError(f"the run's dataset {data} is not there any more: give its new location with --data")
    train_set, val_set, notes = load_splits(data, int(train_config.get("seed", 0)), allow_empty_val=True)
    imgsz = int(options.imgsz or train_config["imgsz"])
    return _Run(run_dir, checkpoint, train_config, model, list(loaded.class_names), imgsz, train_set, val_set, notes)


def _calibrate(
    run: _Run,
    options: QuantizeOptions,
    prepared: Path,
    fp32_path: Path,
    work: Path,
    variants: Path,
    candidates: dict[str, Candidate],
    stage: Callable[..., None],
) -> dict[str, Calibration]:
    """Calibrates with the asked method (and the others when comparing) and adds one default-policy PTQ candidate
    per method to `candidates`."""
    methods = [options.calibration]
    if options.compare_calibrations:
        methods += [name for name in CALIBRATION_METHODS if name != options.calibration]
    weighted = set(weighted_nodes(prepared))
    default_layers = [module_path(name) for name in default_float_nodes(prepared) if name in weighted]
    calibrations: dict[str, Calibration] = {}
    for name in methods:
        stage("calibrate", calibration=name)
        reader = CalibrationImages(run.train_set.records, run.imgsz, count=options.calib_images)
        calibrations[name] = calibrate(prepared, reader, work / f"ranges_{name}.json", method=name)
        path = quantize_calibrated(calibrations[name], variants / f"ptq_{name}.onnx", metadata_from=fp32_path)
        candidates[f"ptq_{name}"] = Candidate(f"ptq_{name}", "ptq", path, name, "default", list(default_layers))
    return calibrations


def _best_calibration(
    calibrations: dict[str, Calibration], candidates: dict[str, Candidate], evaluator: _Evaluator, asked: str
) -> str:
    """The calibration the selective policy and QAT build on: the one that did best with the default policy (ties:
    the one asked for). On one model percentile wins, on another minmax (measured: -2.8 vs +0.5 points at 640)."""
    if not evaluator.available or len(calibrations) == 1:
        return asked
    return max(calibrations, key=lambda name: (evaluator.map(candidates[f"ptq_{name}"].path), name == asked))


def _selective(
    run: _Run,
    options: QuantizeOptions,
    calibration: Calibration,
    evaluator: _Evaluator,
    fp32_map: float,
    fp32_path: Path,
    variants: Path,
    emit: EventCallback,
    stage: Callable[..., None],
    stop_requested: Callable[[], bool] | None,
) -> tuple[Candidate, dict[str, Any]]:
    """The sensitivity scan, then the fewest layers in float for the drop to stay within the budget: the
    `ptq_selective` candidate and the report's "sensitivity" section."""
    stage("scan")
    images = _stack(CalibrationImages(run.val_set.records, run.imgsz, count=options.scan_images, seed=1))
    scan = scan_sensitivity(
        calibration,
        images,
        candidates=options.scan_layers,
        threads=options.threads,
        on_progress=emit,
        stop_requested=stop_requested,
    )
    stage("policy")
    choice = choose_float_nodes(
        calibration,
        scan,
        evaluator.map,
        fp32_map,
        options.budget / 100.0,
        variants / "ptq_selective.onnx",
        metadata_from=fp32_path,
        on_progress=emit,
    )
    candidate = Candidate(
        "ptq_selective",
        "ptq",
        choice.path,
        calibration.method,
        "selective",
        [layer.module for layer in choice.float_layers],
        choice.within_budget,
    )
    sensitivity = {
        **scan.to_dict(),
        "budget_points": options.budget,
        "fp32_map": round(fp32_map, 5),
        "tried": choice.tried,
        "within_budget": choice.within_budget,
        "float_layers": [
            {
                "module": layer.module,
                "node": layer.node,
                "parameters": layer.parameters,
                "cost": float(f"{layer.cost:.4g}"),
                "float_bytes": 3 * layer.parameters,
            }
            for layer in choice.float_layers
        ],
    }
    return candidate, sensitivity


def _measure(
    candidates: dict[str, Candidate],
    evaluator: _Evaluator,
    imgsz: int,
    options: QuantizeOptions,
    runtimes: list[str],
) -> None:
    """Scores every candidate on the deployment runtime, its mAP on the other runtimes, and the speed of every
    candidate on every runtime, side by side."""
    speed = measure_speeds(
        {name: item.path for name, item in candidates.items()},
        imgsz,
        options.threads,
        options.latency_runs,
        runtimes=runtimes,
    )
    for name, item in candidates.items():
        item.scores = evaluator.evaluate(item.path) if evaluator.available else {}
        item.runtimes = {}
        for runtime in runtimes:
            item.runtimes[runtime] = dict(speed[name][runtime])
            if evaluator.available:
                metrics = evaluator.evaluate(item.path, runtime)["metrics"]
                item.runtimes[runtime].update({key: metrics[key] for key in ("mAP50-95", "mAP50")})


def _ship(source: Path, int8_path: Path) -> Path:
    """Copies the chosen candidate to model_int8.onnx, atomically."""
    staged = int8_path.with_name(f".{int8_path.name}.tmp")
    shutil.copyfile(source, staged)
    staged.replace(int8_path)
    return int8_path


def _report_rows(
    candidates: dict[str, Candidate], deploy: str, evaluator: _Evaluator, run: _Run, options: QuantizeOptions
) -> dict[str, dict[str, Any]]:
    """The report's "models": each candidate's row, and for INT8 ones the kernels onnxruntime executed, the
    quantized nodes it ran in float, the deltas to FP32 and the agreement of their detections with FP32's."""
    rows: dict[str, dict[str, Any]] = {}
    fp32 = candidates["fp32"]
    for name, item in candidates.items():
        entry = item.row(deploy)
        if name != "fp32":
            kernels = executed_kernels(item.path, (1, 3, run.imgsz, run.imgsz), threads=options.threads)
            entry["executed_op_types"] = op_type_counts(kernels)
            entry["float_fallbacks"] = float_fallbacks(item.path, kernels)
            entry["deltas"] = _deltas(rows["fp32"], entry)
            if evaluator.available:
                entry["agreement"] = detection_agreement(
                    fp32.scores["predictions"],
                    item.scores["predictions"],
                    [str(record.path) for record in run.val_set.records],
                    top_k=GALLERY_SIZE,
                )
        rows[name] = entry
    return rows


def _bytes_needed(model: YoloNAS, out_dir: Path, options: QuantizeOptions) -> int:
    """The most the quantization's files take at once in `out_dir`, estimated from the model's weight bytes: FP32
    exports (model_fp32.onnx and its pre-processed copy; QAT's two more), and INT8 files (one per calibration
    method, the selective one, QAT's, model_int8.onnx and its staged copy) at up to half the FP32 size (the layers
    kept in float, scales). Less the files of an earlier quantization this one replaces."""
    weights = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    qat = options.method in ("auto", "qat")
    calibrations = len(CALIBRATION_METHODS) if options.compare_calibrations else 1
    fp32_files = 2 + (2 if qat else 0)
    int8_files = calibrations + 1 + (1 if qat else 0) + 2
    replaced = [out_dir / "model_fp32.onnx", out_dir / "model_int8.onnx", *out_dir.glob("int8_variants/*.onnx")]
    present = sum(path.stat().st_size for path in replaced if path.is_file())
    return fp32_files * weights + int8_files * weights // 2 - present


def evaluate_onnx(
    path: Path, dataset: DetectionSet, threads: int | None = None, runtime: str = "auto"
) -> dict[str, Any]:
    """COCO metrics and per-class AP50-95 of an ONNX model on `dataset`, through the shared pre/post-processing
    (Predictor, the validation post-processing of training), in `runtime`."""
    return _score(dataset, predict_onnx(path, dataset, threads, runtime))


def predict_onnx(
    path: Path, dataset: DetectionSet, threads: int | None = None, runtime: str = "auto"
) -> list[Detections]:
    """Detections of an ONNX model for every record, boxes (N, 4) xyxy in original-image pixels."""
    predictor = Predictor.from_path(path, postprocess=EVAL_POSTPROCESS, threads=threads, runtime=runtime)
    return [predictor.predict([record.path])[0] for record in dataset.records]


def measure_speed(
    paths: dict[str, Path],
    imgsz: int,
    threads: int,
    runs: int = 20,
    throughput_runs: int = THROUGHPUT_RUNS,
    runtime: str = "onnxruntime",
) -> dict[str, dict[str, float]]:
    """Batch-1 latency p50/p95 (ms) and batch-8 throughput (images/s) of each model in one runtime, measured side
    by side (`measure_speeds`)."""
    speeds = measure_speeds(paths, imgsz, threads, runs, throughput_runs, runtimes=[runtime])
    return {name: speed[runtime] for name, speed in speeds.items()}


def measure_speeds(
    paths: dict[str, Path],
    imgsz: int,
    threads: int,
    runs: int = 20,
    throughput_runs: int = THROUGHPUT_RUNS,
    *,
    runtimes: Sequence[str] = ("onnxruntime",),
) -> dict[str, dict[str, dict[str, float]]]:
    """Batch-1 latency p50/p95 (ms) and batch-8 throughput (images/s) of each model in each runtime:
    {model: {runtime: speed}}, measured side by side.

    Every (model, runtime) pair takes turns in blocks (a block: one untimed run that brings the model's weights back
    into the caches, then `SPEED_BLOCK` timed runs), so machine load falls on all of them alike while each is timed
    warm, as it runs when it serves photo after photo; ratios between them are what the numbers mean.
    """
    sessions = {
        (name, runtime): open_onnx(path, runtime=runtime, threads=threads)
        for name, path in paths.items()
        for runtime in runtimes
    }
    rng = np.random.default_rng(0)
    single = rng.random((1, 3, imgsz, imgsz), dtype=np.float32)
    batch = rng.random((THROUGHPUT_BATCH, 3, imgsz, imgsz), dtype=np.float32)

    def timed(feed: np.ndarray, count: int) -> dict[tuple[str, str], list[float]]:
        seconds: dict[tuple[str, str], list[float]] = {key: [] for key in sessions}
        for _ in range(max(1, -(-count // SPEED_BLOCK))):
            for key, session in sessions.items():
                session.run(None, {"images": feed})  # warm-up of this block
                for _ in range(SPEED_BLOCK):
                    started = time.perf_counter()
                    session.run(None, {"images": feed})
                    seconds[key].append(time.perf_counter() - started)
        return seconds

    latency = timed(single, runs)
    throughput = timed(batch, throughput_runs)
    speeds: dict[str, dict[str, dict[str, float]]] = {name: {} for name in paths}
    for name, runtime in sessions:
        speeds[name][runtime] = {
            "latency_ms_p50": round(1000 * float(np.percentile(latency[name, runtime], 50)), 2),
            "latency_ms_p95": round(1000 * float(np.percentile(latency[name, runtime], 95)), 2),
            "throughput_b8_images_per_s": round(THROUGHPUT_BATCH / float(np.median(throughput[name, runtime])), 1),
        }
    return speeds


class QuantizeCancelled(Exception):
    """The caller asked `quantize_run` to stop."""


class _Evaluator:
    """Evaluates ONNX files on the validation set once each per runtime (keyed by path, modification time and
    runtime); `runtime` is the one the shipped model runs on."""

    def __init__(self, dataset: DetectionSet, threads: int, runtime: str):
        self.dataset, self.threads, self.runtime = dataset, threads, runtime
        self.available = len(dataset) > 0
        self._cache: dict[tuple[str, int, str], dict[str, Any]] = {}

    def evaluate(self, path: Path, runtime: str | None = None) -> dict[str, Any]:
        runtime = runtime or self.runtime
        key = (str(path), Path(path).stat().st_mtime_ns, runtime)
        if key not in self._cache:
            predictions = predict_onnx(Path(path), self.dataset, self.threads, runtime)
            self._cache[key] = {**_score(self.dataset, predictions), "predictions": predictions}
        return self._cache[key]

    def map(self, path: Path) -> float:
        return float(self.evaluate(path)["metrics"]["mAP50-95"])


def _score(dataset: DetectionSet, predictions: list[Detections]) -> dict[str, Any]:
    result = evaluate_detections(dataset, predictions)
    per_class = {item["class_name"]: item["AP50-95"] for item in result.to_dict()["per_class"]}
    return {"metrics": dict(result.metrics), "per_class_ap": per_class}


def _quantization_aware(
    run: _Run,
    float_modules: list[str],
    options: QuantizeOptions,
    calibration_method: str,
    fp32_path: Path,
    work: Path,
    out_path: Path,
    emit: EventCallback,
    stop_requested: Callable[[], bool] | None,
) -> tuple[Path, dict[str, Any]]:
    """QAT from the partially fused model, then the same onnxruntime QDQ quantization as PTQ with the activation
    ranges QAT trained with (so the INT8 file computes what the fine-tuning simulated) and the other tensors'
    ranges calibrated on the fine-tuned model."""
    import torch  # reason: QAT only; the PTQ path needs no torch beyond the export

    from backend.quantization import qat  # reason: QAT's trainer stack loads only when QAT runs

    imgsz = run.imgsz
    reader = CalibrationImages(run.train_set.records, imgsz, count=options.calib_images)
    images = [torch.from_numpy(item["images"]) for item in iter(reader.get_next, None)]
    convs = {name for name, module in run.model.named_modules() if isinstance(module, torch.nn.Conv2d)}
    qat_model = qat.prepare_qat(run.model, images, float_modules=set(float_modules) & convs)
    changes = {"imgsz": imgsz} | ({} if options.qat_epochs is None else {"epochs": options.qat_epochs})
    config = qat.qat_config(run.train_config, **changes)
    result = qat.qat_finetune(
        qat_model, run.train_set, run.val_set, config, on_event=emit, stop_requested=stop_requested
    )
    ranges = qat.activation_ranges(qat_model)
    float_model = qat.to_float_model(qat_model)
    tuned = export_onnx(
        float_model,
        work / "qat_fp32.onnx",
        imgsz=imgsz,
        class_names=run.class_names,
        run_id=run.directory.name,
        fuse=False,
    )
    prepared = preprocess_fp32(tuned, work / "qat_fp32_pre.onnx")
    calibration = calibrate(
        prepared,
        CalibrationImages(run.train_set.records, imgsz, count=options.calib_images),
        work / "ranges_qat.json",
        method=calibration_method,
    )
    graph = onnx.load(str(prepared), load_external_data=False)
    overrides: dict[str, tuple[float, float]] = {}
    float_nodes = list(decoding_nodes(graph))
    for node in graph.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        module = module_path(node.name)
        if module in float_modules:
            float_nodes.append(node.name)
        elif module in ranges:
            overrides[node.input[0]] = ranges[module]
    path = quantize_calibrated(
        calibration, out_path, nodes_to_exclude=float_nodes, metadata_from=fp32_path, range_overrides=overrides
    )
    summary = {
        "config": {key: value for key, value in asdict(config).items()},
        "float_layers": float_modules,
        "ranges_from_qat": len(overrides),
        **result,
    }
    return path, json.loads(json.dumps(summary, default=str))


def _choose(rows: dict[str, dict[str, Any]], fp32_map: float | None, budget: float, calibration: str) -> str:
    """The INT8 model to ship: without validation, the default policy with `calibration`; otherwise, of the INT8
    candidates within the budget, the fastest at batch 1 (p50; within 5 %, the smaller file); if none is within the
    budget, the most accurate."""
    if fp32_map is None:
        return f"ptq_{calibration}"
    candidates = [name for name in rows if name != "fp32"]
    passing = [name for name in candidates if _within(rows[name], fp32_map, budget)]
    if not passing:
        return max(candidates, key=lambda name: rows[name]["metrics"]["mAP50-95"])
    fastest = min(rows[name]["latency_ms_p50"] for name in passing)
    close = [name for name in passing if rows[name]["latency_ms_p50"] <= 1.05 * fastest]
    return min(close, key=lambda name: (rows[name]["bytes"], rows[name]["latency_ms_p50"]))


def _within(row: dict[str, Any], fp32_map: float | None, budget: float) -> bool | None:
    if fp32_map is None or "metrics" not in row:
        return None
    return bool(row["metrics"]["mAP50-95"] >= fp32_map - budget - 1e-9)


def _float_nodes(int8_path: Path) -> list[str]:
    """The node names an INT8 file keeps in float (its `quantization` metadata)."""
    return list(json.loads(read_onnx_metadata(int8_path)["quantization"])["float_nodes"])


def _stack(reader: CalibrationImages) -> np.ndarray:
    return np.concatenate([item["images"] for item in iter(reader.get_next, None)])


def _deltas(fp32: dict[str, Any], int8: dict[str, Any]) -> dict[str, Any]:
    """INT8 minus FP32 for each metric and class AP (fractions; x100 for points), and the size/speed ratios."""

    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 4)

    deltas: dict[str, Any] = {
        "size_ratio": round(int8["bytes"] / fp32["bytes"], 3),
        "latency_ratio_p50": round(int8["latency_ms_p50"] / fp32["latency_ms_p50"], 3),
        "throughput_ratio_b8": round(int8["throughput_b8_images_per_s"] / fp32["throughput_b8_images_per_s"], 3),
    }
    if "metrics" in int8 and "metrics" in fp32:
        deltas["metrics"] = {key: minus(fp32["metrics"].get(key), value) for key, value in int8["metrics"].items()}
        deltas["per_class_ap"] = {
            name: minus(fp32["per_class_ap"].get(name), ap) for name, ap in int8["per_class_ap"].items()
        }
    return deltas
