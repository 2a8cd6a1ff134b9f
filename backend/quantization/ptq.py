"""Post-training static INT8 quantization of an exported YOLO-NAS ONNX file with onnxruntime (QDQ format).

The FP32 input is the partially fused export (backend.export.onnx_export with the model fused by
`model.eval().fuse()`), without NMS: input `images` float32 (B, 3, H, W) RGB in [0, 1] letterboxed, outputs `boxes`
(B, A, 4) xyxy in input pixels and `scores` (B, A, C) sigmoid. The INT8 file has the same I/O contract: only the
inside changes (QuantizeLinear/DequantizeLinear pairs around the quantized nodes, which onnxruntime fuses into
int8 kernels at ORT_ENABLE_ALL), so every consumer of the FP32 file runs it unchanged.

Default precision policy (docs/quantization_policy.md §2): the heads' classification and regression branches
(`cls_convs`, `reg_convs`), the prediction convolutions (`cls_pred`, `reg_pred`) and the whole decoding stay in
float; the backbone, the neck and the head stems are quantized.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import re
import tempfile
import time
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    create_calibrator,
    quantize_static,
)
from onnxruntime.quantization.calibrate import save_tensors_data
from onnxruntime.quantization.shape_inference import quant_pre_process

from backend.quantization.entropy import uint8_entropy_tensors_data

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
DEFAULT_PERCENTILE = 99.99
ENTROPY_BINS = 2048
# Images per calibrator pass: onnxruntime keeps every intermediate tensor of a pass in memory (S at 640: ~0.3 GB
# per image) before folding it into the running statistics.
CALIBRATION_CHUNK = 8
# Activation types: unsigned activations with signed weights (U8S8) is the combination onnxruntime's x86 int8
# kernels (VNNI/AMX) run natively; signed activations (S8S8) measured slower than FP32 on this CPU (see report).
ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}

# The torch tracing exporter names each node after the module path, e.g. "/model/heads/head1/cls_pred/Conv".
_FLOAT_BRANCH = re.compile(r"/heads/head\d+/(cls_convs|reg_convs|cls_pred|reg_pred)/")
_PREDICTION = re.compile(r"/heads/head\d+/(cls_pred|reg_pred)/")
_MODEL_SCOPE = "/model/"
_TOKEN_SUFFIX = re.compile(r"_token_\d+$")
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_INT8_KERNELS = frozenset(
    {
        "QLinearConv",
        "QLinearConvTranspose",
        "ConvInteger",
        "QLinearMatMul",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "QGemm",
        "NhwcQLinearConv",
    }
)
# The model's input is an 8-bit image divided by 255: quantized with exactly this range it loses nothing.
INPUT_RANGE = {"images": (0.0, 1.0)}


@dataclass(frozen=True)
class QuantizationSettings:
    """What `quantize_onnx` did, also written to the INT8 file's `quantization` metadata.

    Attributes:
        method: calibration method (minmax, percentile, entropy).
        calibration_images: images the calibrator read.
        float_nodes: node names left in float.
        per_channel: weights quantized per output channel (axis 0).
        activation_type: "uint8" or "int8", per-tensor.
        weight_type: always "int8" (symmetric).
        percentile: the percentile, for method "percentile".
        preprocessed: onnxruntime's quant_pre_process ran first.
    """

    method: str
    calibration_images: int
    float_nodes: list[str]
    per_channel: bool
    activation_type: str
    weight_type: str
    percentile: float | None
    preprocessed: bool


def decoding_nodes(onnx_model: onnx.ModelProto | str | Path | list[onnx.NodeProto]) -> list[str]:
    """Names of the decoding nodes, in graph order: every policy keeps them in float.

    They are every node downstream of a prediction convolution (`cls_pred`/`reg_pred`: the reshapes, concats, DFL
    softmax/multiply/sum, box arithmetic, sigmoid) and every node outside the `/model/` scope, i.e. what the export
    wrapper adds (anchor grids included, which hang off the input's Shape rather than the prediction convs). The
    prediction convolutions themselves are not included.

    Args:
        onnx_model: a yolodex FP32 export without NMS (a model, a path or its graph's nodes), pre-processed or not.

    Raises:
        ValueError: the graph does not look like a yolodex export (no `cls_pred`/`reg_pred` convolutions).
    """
    nodes = _graph_nodes(onnx_model)
    predictions = [node for node in nodes if node.op_type == "Conv" and _PREDICTION.search(node.name)]
    if not predictions:
        raise ValueError(
            "no '/heads/headN/cls_pred' or 'reg_pred' convolutions found: quantization needs a yolodex FP32 export "
            "(backend.export.onnx_export.export_onnx) of a partially fused model"
        )
    # Forward closure from the prediction outputs: every node that consumes (transitively) their results.
    downstream_tensors = {output for node in predictions for output in node.output}
    downstream_nodes: set[str] = set()
    for node in nodes:  # ONNX graphs are topologically sorted, so one pass finds the closure
        if any(name in downstream_tensors for name in node.input):
            downstream_nodes.add(node.name)
            downstream_tensors.update(node.output)
    return [node.name for node in nodes if node.name in downstream_nodes or not node.name.startswith(_MODEL_SCOPE)]


def default_float_nodes(onnx_model: onnx.ModelProto | str | Path) -> list[str]:
    """Names of the nodes the default policy (docs/quantization_policy.md §2) keeps in float, in graph order:
    every node of the heads' `cls_convs`, `reg_convs`, `cls_pred` and `reg_pred` modules, and the decoding
    (`decoding_nodes`).

    Raises:
        ValueError: the graph does not look like a yolodex export.
    """
    nodes = _graph_nodes(onnx_model)
    decoding = set(decoding_nodes(nodes))
    return [node.name for node in nodes if _FLOAT_BRANCH.search(node.name) or node.name in decoding]


def weighted_nodes(onnx_model: onnx.ModelProto | str | Path) -> list[str]:
    """Names of the Conv and ConvTranspose nodes inside the model (the layers a precision policy chooses between),
    in graph order."""
    return [
        node.name
        for node in _graph_nodes(onnx_model)
        if node.op_type in ("Conv", "ConvTranspose") and node.name.startswith(_MODEL_SCOPE)
    ]


def _graph_nodes(onnx_model: onnx.ModelProto | str | Path | list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    if isinstance(onnx_model, list):
        return onnx_model
    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(str(onnx_model), load_external_data=False)
    return list(onnx_model.graph.node)


@dataclass(frozen=True)
class Calibration:
    """Activation ranges of one pre-processed FP32 graph, computed once and reused by every quantization of it.

    Attributes:
        method: "minmax", "percentile" or "entropy".
        images: images the calibrator read.
        model_path: the pre-processed FP32 graph the ranges belong to (tensor names are its own).
        cache_path: onnxruntime's JSON calibration cache (TensorsData) that `quantize_static` reads instead of
            calibrating again.
        percentile: the percentile, for method "percentile".
        seconds: wall time of the calibration.
    """

    method: str
    images: int
    model_path: Path
    cache_path: Path
    percentile: float | None
    seconds: float


def preprocess_fp32(fp32_path: str | Path, out_path: str | Path) -> Path:
    """onnxruntime's quantization pre-processing (shape inference, Conv+BN folding and other basic graph
    optimisations) of a yolodex FP32 export. Node names are kept, so the float policies apply to either file.

    Without it the quantized graph keeps float ops between the Q/DQ pairs that onnxruntime cannot fuse into int8
    kernels: measured 1.05x the FP32 latency instead of ~0.55x on raccoon at 320.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    return out_path


def calibrate(
    model_path: str | Path,
    reader: CalibrationDataReader,
    cache_path: str | Path,
    *,
    method: str = "percentile",
    percentile: float = DEFAULT_PERCENTILE,
    chunk: int = CALIBRATION_CHUNK,
) -> Calibration:
    """Runs `reader` through `model_path` once and stores each tensor's quantization range in `cache_path`.

    The images are fed `chunk` at a time and folded into running statistics (histograms or min/max), so memory
    stays bounded whatever the number of images. Entropy (KL divergence, TensorRT's method) uses 2048 histogram
    bins and our vectorised threshold search against the uint8 grid the activations really use
    (backend.quantization.entropy.uint8_entropy_tensors_data): onnxruntime's own search is a Python loop over
    every candidate, assumes the int8 symmetric grid, and `quantize_static` does not even pass it the bin counts.

    Args:
        model_path: a pre-processed FP32 graph (`preprocess_fp32`).
        reader: calibration inputs, e.g. `CalibrationImages`.
        cache_path: where the ranges go (JSON, onnxruntime's calibration cache format).
        method: "percentile" (of |x|, at `percentile`), "minmax" or "entropy".

    Raises:
        ValueError: an unknown method, or a reader that gave no image.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; use one of {sorted(CALIBRATION_METHODS)}")
    started = time.perf_counter()
    model_path, cache_path = Path(model_path), Path(cache_path)
    options: dict[str, Any] = {}
    if method == "percentile":
        options = {"percentile": percentile, "num_bins": 2048}
    elif method == "entropy":
        options = {"num_bins": ENTROPY_BINS}  # the search against the uint8 grid sets its own quantized bins
    counting = _CountingReader(reader)
    with tempfile.TemporaryDirectory(prefix="yolodex-calib-") as scratch:
        calibrator = create_calibrator(
            str(model_path),
            augmented_model_path=str(Path(scratch) / "augmented.onnx"),
            calibrate_method=CALIBRATION_METHODS[method],
            extra_options=options,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime prints progress lines per chunk
            while True:
                piece = _Chunk(counting, chunk)
                if piece.peek() is None:
                    break
                calibrator.collect_data(piece)
            if counting.count == 0:
                raise ValueError("the calibration reader gave no image: at least one is needed")
            tensors = uint8_entropy_tensors_data(calibrator) if method == "entropy" else calibrator.compute_data()
        del calibrator
    save_tensors_data(tensors, cache_path)
    return Calibration(
        method=method,
        images=counting.count,
        model_path=model_path,
        cache_path=cache_path,
        percentile=percentile if method == "percentile" else None,
        seconds=round(time.perf_counter() - started, 2),
    )


def quantize_calibrated(
    calibration: Calibration,
    int8_path: str | Path,
    *,
    nodes_to_exclude: Collection[str] | None = None,
    per_channel: bool = True,
    activation_type: str = "uint8",
    metadata_from: str | Path | None = None,
    range_overrides: dict[str, tuple[float, float]] | None = None,
) -> Path:
    """Static INT8 quantization (QDQ) of `calibration.model_path` with its stored ranges; no calibration runs.

    Weights: symmetric int8, per output channel when `per_channel`. Activations: per tensor, `activation_type`
    (asymmetric uint8 by default), ranges from the calibration, except the input image, always [0, 1] (an 8-bit
    image / 255 is then quantized without loss), and `range_overrides` (tensor name → (lo, hi), which
    quantization-aware training uses to keep the ranges it trained with).

    Args:
        calibration: from `calibrate`.
        int8_path: where to write (a temporary name, then renamed).
        nodes_to_exclude: node names kept in float; None → `default_float_nodes`, [] → quantize everything.
        metadata_from: the FP32 export whose yolodex metadata the INT8 file keeps (default: the calibrated graph).

    Returns:
        `int8_path`; its metadata adds `quantization` (JSON of QuantizationSettings).
    """
    if activation_type not in ACTIVATION_TYPES:
        raise ValueError(f"unknown activation type {activation_type!r}; use one of {sorted(ACTIVATION_TYPES)}")
    int8_path = Path(int8_path)
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    graph = onnx.load(str(calibration.model_path))
    float_nodes = default_float_nodes(graph) if nodes_to_exclude is None else list(nodes_to_exclude)
    extra_options: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True}
    overrides = {**INPUT_RANGE, **(range_overrides or {})}
    extra_options["TensorQuantOverrides"] = {
        name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for name, (lo, hi) in overrides.items()
    }
    with tempfile.TemporaryDirectory(prefix="yolodex-ptq-") as scratch:
        temporary = Path(scratch) / "int8.onnx"
        quantize_static(
            str(calibration.model_path),
            str(temporary),
            None,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=ACTIVATION_TYPES[activation_type],
            weight_type=QuantType.QInt8,
            nodes_to_exclude=float_nodes,
            calibrate_method=CALIBRATION_METHODS[calibration.method],
            calibration_cache_path=str(calibration.cache_path),
            extra_options=extra_options,
        )
        quantized = onnx.load(str(temporary))
    settings = QuantizationSettings(
        method=calibration.method,
        calibration_images=calibration.images,
        float_nodes=float_nodes,
        per_channel=per_channel,
        activation_type=activation_type,
        weight_type="int8",
        percentile=calibration.percentile,
        preprocessed=True,
    )
    source = onnx.load(str(metadata_from or calibration.model_path), load_external_data=False)
    del quantized.metadata_props[:]
    for prop in source.metadata_props:
        if prop.key != "quantization":
            quantized.metadata_props.add(key=prop.key, value=prop.value)
    quantized.metadata_props.add(key="quantization", value=json.dumps(dataclasses.asdict(settings)))
    staged = int8_path.with_name(f".{int8_path.name}.tmp")
    onnx.save(quantized, str(staged))
    staged.replace(int8_path)
    return int8_path


def quantize_onnx(
    fp32_path: str | Path,
    int8_path: str | Path,
    calibration_reader: CalibrationDataReader,
    *,
    method: str = "percentile",
    nodes_to_exclude: Collection[str] | None = None,
    per_channel: bool = True,
    activation_type: str = "uint8",
    percentile: float = DEFAULT_PERCENTILE,
) -> Path:
    """Pre-process, calibrate and quantize a yolodex FP32 export in one call (scratch files removed).

    The I/O contract is unchanged (module docstring); see `calibrate` and `quantize_calibrated` for the options.
    """
    with tempfile.TemporaryDirectory(prefix="yolodex-ptq-") as scratch:
        prepared = preprocess_fp32(fp32_path, Path(scratch) / "fp32_pre.onnx")
        calibration = calibrate(
            prepared, calibration_reader, Path(scratch) / "ranges.json", method=method, percentile=percentile
        )
        return quantize_calibrated(
            calibration,
            int8_path,
            nodes_to_exclude=nodes_to_exclude,
            per_channel=per_channel,
            activation_type=activation_type,
            metadata_from=fp32_path,
        )


class _Chunk(CalibrationDataReader):
    """At most `size` items of another reader, then None: one `collect_data` call's worth."""

    def __init__(self, reader: CalibrationDataReader, size: int):
        self.reader, self.left, self._next = reader, size, None
        self._peeked = False

    def peek(self):
        if not self._peeked:
            self._next, self._peeked = self.reader.get_next(), True
        return self._next

    def get_next(self):
        if self.left <= 0:
            return None
        item = self.peek()
        self._peeked = False
        if item is not None:
            self.left -= 1
        return item


class _CountingReader(CalibrationDataReader):
    """Passes another reader through and counts the distinct images it gave (rewinds do not double count)."""

    def __init__(self, reader: CalibrationDataReader):
        self.reader = reader
        self.count = 0
        self._position = 0

    def get_next(self):
        item = self.reader.get_next()
        if item is not None:
            self._position += 1
            self.count = max(self.count, self._position)
        return item

    def rewind(self) -> None:
        self._position = 0
        self.reader.rewind()


def executed_kernels(
    onnx_path: str | Path,
    input_shape: tuple[int, int, int, int],
    threads: int = 2,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> dict[str, str]:
    """The kernels onnxruntime (CPU) executed in one run, from its profiler: {node name: op type}.

    After ORT_ENABLE_ALL a quantized conv shows up as QLinearConv (named after the graph's Conv plus a
    "_token_N" suffix, which is removed here) instead of DequantizeLinear + Conv.

    Args:
        onnx_path: the model; its input is fed random values in [0, 1] of `input_shape` (B, 3, H, W).
        threads: intra-op threads.
        optimization: the session's graph optimisation level.
    """
    with tempfile.TemporaryDirectory(prefix="yolodex-profile-") as scratch:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = optimization
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "profile")
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.random.default_rng(0).random(input_shape, dtype=np.float32)}
        session.run(None, feed)
        profile_path = session.end_profiling()
        events = json.loads(Path(profile_path).read_text())
    kernels: dict[str, str] = {}
    for event in events:
        args = event.get("args", {})
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time") and "op_name" in args:
            kernels[_TOKEN_SUFFIX.sub("", name.removesuffix("_kernel_time"))] = args["op_name"]
    return kernels


def executed_op_types(
    onnx_path: str | Path,
    input_shape: tuple[int, int, int, int],
    threads: int = 2,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> dict[str, int]:
    """{op type: number of executed kernels of that type}, sorted by type (see `executed_kernels`)."""
    return op_type_counts(executed_kernels(onnx_path, input_shape, threads, optimization))


def op_type_counts(kernels: dict[str, str]) -> dict[str, int]:
    """{op type: count} of `executed_kernels`' result, sorted by type."""
    return dict(sorted(Counter(kernels.values()).items()))


def float_fallbacks(onnx_model: onnx.ModelProto | str | Path, kernels: dict[str, str]) -> list[dict[str, str]]:
    """The quantized layers that onnxruntime nevertheless ran with a float kernel.

    A layer is quantized in the QDQ graph when its weight comes from a DequantizeLinear; it ran in int8 when its
    kernel is an integer one (QLinearConv, ConvInteger, ...). Layers onnxruntime has no int8 kernel for on this
    build (e.g. ConvTranspose on CPU) show up here with the float kernel that ran instead.

    Args:
        onnx_model: the INT8 (QDQ) graph.
        kernels: `executed_kernels` of it.

    Returns:
        [{"node": name, "op_type": graph op, "kernel": executed op}] in graph order.
    """
    model = onnx_model if isinstance(onnx_model, onnx.ModelProto) else onnx.load(str(onnx_model))
    producers = {output: node.op_type for node in model.graph.node for output in node.output}
    fallbacks = []
    for node in model.graph.node:
        if (
            node.op_type not in _WEIGHTED_OPS
            or len(node.input) < 2
            or producers.get(node.input[1]) != "DequantizeLinear"
        ):
            continue
        kernel = kernels.get(node.name)
        if kernel is not None and kernel not in _INT8_KERNELS:
            fallbacks.append({"node": node.name, "op_type": node.op_type, "kernel": kernel})
    return fallbacks
