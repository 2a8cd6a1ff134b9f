"""Post-training static INT8 quantization of an exported YOLO-NAS ONNX file with onnxruntime (QDQ format).

The FP32 input is the partially fused export (backend.export.onnx_export with the model fused by
`model.eval().fuse()`), without NMS: input `images` float32 (B, 3, H, W) RGB in [0, 1] letterboxed, outputs `boxes`
(B, A, 4) xyxy in input pixels and `scores` (B, A, C) sigmoid. The INT8 file has the same I/O contract: only the
inside changes (QuantizeLinear/DequantizeLinear pairs around the quantized nodes, which onnxruntime fuses into
int8 kernels at ORT_ENABLE_ALL), so every consumer of the FP32 file runs it unchanged.

Default precision policy (../shared/yolo_nas_facts.md §6): the heads' classification and regression branches
(`cls_convs`, `reg_convs`), the prediction convolutions (`cls_pred`, `reg_pred`) and the whole decoding stay in
float; the backbone, the neck and the head stems are quantized.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
DEFAULT_PERCENTILE = 99.99
# Activation types: unsigned activations with signed weights (U8S8) is the combination onnxruntime's x86 int8
# kernels (VNNI/AMX) run natively; signed activations (S8S8) measured slower than FP32 on this CPU (see report).
ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}

# The torch tracing exporter names each node after the module path, e.g. "/model/heads/head1/cls_pred/Conv".
_FLOAT_BRANCH = re.compile(r"/heads/head\d+/(cls_convs|reg_convs|cls_pred|reg_pred)/")
_PREDICTION = re.compile(r"/heads/head\d+/(cls_pred|reg_pred)/")
_MODEL_SCOPE = "/model/"


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


def default_float_nodes(onnx_model: onnx.ModelProto | str | Path) -> list[str]:
    """Names of the nodes the default policy keeps in float, in graph order.

    They are: every node of the heads' `cls_convs`, `reg_convs`, `cls_pred` and `reg_pred` modules; every node
    downstream of a prediction convolution (the reshapes, concats, DFL softmax/multiply/sum, box arithmetic,
    sigmoid); and every node outside the `/model/` scope, i.e. the decoding the export wrapper adds (anchor
    grids included, which hang off the input's Shape rather than the prediction convs).

    Args:
        onnx_model: a yolodex FP32 export without NMS (a model or a path).

    Raises:
        ValueError: the graph does not look like a yolodex export (no `cls_pred`/`reg_pred` convolutions).
    """
    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(str(onnx_model), load_external_data=False)
    nodes = list(onnx_model.graph.node)
    predictions = [node for node in nodes if node.op_type == "Conv" and _PREDICTION.search(node.name)]
    if not predictions:
        raise ValueError(
            "no '/heads/headN/cls_pred' or 'reg_pred' convolutions found: default_float_nodes needs a yolodex "
            "FP32 export (backend.export.onnx_export.export_onnx) of a partially fused model"
        )
    # Forward closure from the prediction outputs: every node that consumes (transitively) their results.
    downstream_tensors = {output for node in predictions for output in node.output}
    downstream_nodes: set[str] = set()
    for node in nodes:  # ONNX graphs are topologically sorted, so one pass finds the closure
        if any(name in downstream_tensors for name in node.input):
            downstream_nodes.add(node.name)
            downstream_tensors.update(node.output)
    return [
        node.name
        for node in nodes
        if _FLOAT_BRANCH.search(node.name) or node.name in downstream_nodes or not node.name.startswith(_MODEL_SCOPE)
    ]


def quantize_onnx(
    fp32_path: str | Path,
    int8_path: str | Path,
    calibration_reader: CalibrationDataReader,
    *,
    method: str = "percentile",
    nodes_to_exclude: list[str] | None = None,
    per_channel: bool = True,
    activation_type: str = "uint8",
    percentile: float = DEFAULT_PERCENTILE,
    preprocess: bool = True,
) -> Path:
    """Static INT8 quantization (QDQ) of a yolodex FP32 export; I/O contract unchanged (module docstring).

    Weights: symmetric int8, per output channel when `per_channel`. Activations: per tensor, `activation_type`
    (asymmetric uint8 by default), ranges from `calibration_reader` with `method`.

    Args:
        fp32_path: the FP32 export of a partially fused model, without NMS.
        int8_path: where to write the INT8 file (written to a temporary name, then renamed).
        calibration_reader: e.g. `CalibrationImages` over the training split; read once (twice for some methods).
        method: "percentile" (`percentile`, default 99.99), "minmax" or "entropy".
        nodes_to_exclude: node names to keep in float; None → `default_float_nodes`, [] → quantize everything.
        per_channel: per-channel weight scales (axis 0).
        activation_type: "uint8" (fast on x86) or "int8".
        percentile: the percentile for method "percentile".
        preprocess: run onnxruntime's quant_pre_process (shape inference and graph optimisation) first.

    Returns:
        `int8_path`. Its metadata keeps the FP32 file's yolodex metadata and adds `quantization`
        (JSON of QuantizationSettings).
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; use one of {sorted(CALIBRATION_METHODS)}")
    if activation_type not in ACTIVATION_TYPES:
        raise ValueError(f"unknown activation type {activation_type!r}; use one of {sorted(ACTIVATION_TYPES)}")
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    source = onnx.load(str(fp32_path))
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    counting_reader = _CountingReader(calibration_reader)
    with tempfile.TemporaryDirectory(prefix="yolodex-ptq-") as scratch:
        model_input = fp32_path
        if preprocess:
            model_input = Path(scratch) / "preprocessed.onnx"
            quant_pre_process(str(fp32_path), str(model_input), skip_symbolic_shape=True)
        float_nodes = default_float_nodes(onnx.load(str(model_input))) if nodes_to_exclude is None else nodes_to_exclude
        temporary = Path(scratch) / "int8.onnx"
        extra_options = {"ActivationSymmetric": False, "WeightSymmetric": True}
        if method == "percentile":
            extra_options["CalibPercentile"] = percentile
        if method == "entropy":
            # Known gap: quantize_static does not pass histogram sizes to the entropy calibrator, which then keeps
            # its defaults (128 bins, 128 quantized bins): one candidate threshold, the full range, so the scales
            # equal MinMax's (measured: all 162 activation scales identical). A real KL search needs
            # create_calibrator(num_bins=2048) run here and its ranges handed to the QDQ quantizer.
            logger.warning("entropy calibration currently gives the same ranges as minmax (onnxruntime defaults)")
        quantize_static(
            str(model_input),
            str(temporary),
            counting_reader,
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=ACTIVATION_TYPES[activation_type],
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(float_nodes),
            calibrate_method=CALIBRATION_METHODS[method],
            extra_options=extra_options,
        )
        quantized = onnx.load(str(temporary))
    settings = QuantizationSettings(
        method=method,
        calibration_images=counting_reader.count,
        float_nodes=list(float_nodes),
        per_channel=per_channel,
        activation_type=activation_type,
        weight_type="int8",
        percentile=percentile if method == "percentile" else None,
        preprocessed=preprocess,
    )
    del quantized.metadata_props[:]
    for prop in source.metadata_props:
        if prop.key != "quantization":
            quantized.metadata_props.add(key=prop.key, value=prop.value)
    quantized.metadata_props.add(key="quantization", value=json.dumps(settings.__dict__))
    staged = int8_path.with_name(f".{int8_path.name}.tmp")
    onnx.save(quantized, str(staged))
    staged.replace(int8_path)
    return int8_path


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


def executed_op_types(
    onnx_path: str | Path,
    input_shape: tuple[int, int, int, int],
    threads: int = 2,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> dict[str, int]:
    """Op types of the kernels onnxruntime (CPU) executed in one run, with counts, from its profiler.

    After ORT_ENABLE_ALL, a quantized conv shows up as QLinearConv (or a fused int8 kernel) instead of
    DequantizeLinear + Conv; a report uses this to show which parts really ran in int8.

    Args:
        onnx_path: the model; its input is fed random values in [0, 1] of `input_shape` (B, 3, H, W).
        threads: intra-op threads.
        optimization: the session's graph optimisation level.

    Returns:
        {op type: number of executed nodes of that type}, sorted by type.
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
    nodes: dict[str, str] = {}
    for event in events:
        args = event.get("args", {})
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time") and "op_name" in args:
            nodes[event["name"]] = args["op_name"]
    return dict(sorted(Counter(nodes.values()).items()))
