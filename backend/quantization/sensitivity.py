"""Which layers to keep in float: a per-layer sensitivity scan and the automatic policy within an mAP budget.

The scan works on one calibration (`ptq.calibrate`), so every variant below shares the same activation ranges and
only the precision of the layers changes:

1. reference: the pre-processed FP32 graph's outputs on a few validation images;
2. for each layer (a Conv/ConvTranspose and the activation right after it) alone: the graph with only that layer
   quantized (its input tensor, weights and output tensor get the Q/DQ pairs onnxruntime's quantizer would write,
   `quantized_alone`), run in onnxruntime, and its output error against the reference: the layer's *cost*;
3. for information, the error with every layer quantized (the decoding stays in float in every variant,
   `ptq.decoding_nodes`).

"Quantized alone" rather than "left alone in float": onnxruntime quantizes a tensor as soon as its producer or any
consumer is quantized, so leaving one conv in float inside an all-int8 graph still leaves its input and output
quantized and measures little; quantizing one layer alone measures exactly what its Q/DQ pairs do.

`choose_float_nodes` then keeps the smallest prefix of the ranking (most costly first) in float whose mAP50-95 on the
validation set is within the budget of FP32's, found by doubling then bisecting the prefix length (it assumes that
more float layers never hurt, which holds up to evaluation noise). It is greedy: the fewest layers *along the
ranking*, not an exhaustive search over subsets.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization.calibrate import load_tensors_data

from backend.processing import box_iou_numpy
from backend.quantization.ptq import INPUT_RANGE, Calibration, decoding_nodes, quantize_calibrated, weighted_nodes
from backend.runtimes import open_onnx

logger = logging.getLogger(__name__)

# Anchors per image the output error looks at: the FP32 model's most confident ones, where detections come from.
ERROR_TOP_ANCHORS = 100
SCAN_BATCH = 8
# The scan opens one new model per layer and runs it on a few images, so a runtime's load-and-compile time counts
# more than its speed per image: onnxruntime opens an S model in 0.7 s, OpenVINO compiles it in 2.7 s for a 12 %
# faster batch (docs/runtimes.md, "Bulk work"). The scan therefore runs in onnxruntime, through the same
# `open_onnx` as everything else.
SCAN_RUNTIME = "onnxruntime"
_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish")

ProgressCallback = Callable[..., None]


@dataclass(frozen=True)
class LayerSensitivity:
    """How much one layer's quantization costs, measured by quantizing it alone.

    Attributes:
        node: ONNX node name, e.g. "/model/heads/head1/cls_pred/Conv".
        module: the model's module path, e.g. "heads.head1.cls_pred".
        op_type: "Conv" or "ConvTranspose".
        parameters: weights and bias of the layer (kept in float they cost 4 bytes each instead of ~1).
        cost: output error against FP32 with this layer alone quantized (`output_error`).
    """

    node: str
    module: str
    op_type: str
    parameters: int
    cost: float


@dataclass
class ScanResult:
    """The scan's outcome: layers by decreasing cost, and the error with all of them quantized."""

    layers: list[LayerSensitivity]
    base_error: float
    images: int
    decoding: list[str] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base_error": float(f"{self.base_error:.4g}"),
            "images": self.images,
            "layers": [{**asdict(layer), "cost": float(f"{layer.cost:.4g}")} for layer in self.layers],
        }


def output_error(
    reference: tuple[np.ndarray, np.ndarray], outputs: tuple[np.ndarray, np.ndarray], top: int = ERROR_TOP_ANCHORS
) -> float:
    """How far a quantized model's raw outputs are from FP32's, in [0, 2]; 0 = identical.

    On each image's `top` anchors by FP32 max class score: the mean absolute score difference over every class,
    plus the FP32-score-weighted mean of (1 - IoU) between the two boxes of each anchor. Both terms are in [0, 1]
    and need no threshold, so small changes register before they flip a detection.

    Args:
        reference: FP32 (boxes (B, A, 4) xyxy in input pixels, scores (B, A, C) sigmoid).
        outputs: the quantized model's, same shapes.
    """
    ref_boxes, ref_scores = reference
    boxes, scores = outputs
    errors: list[float] = []
    for image in range(ref_scores.shape[0]):
        confidence = ref_scores[image].max(axis=1)
        anchors = np.argsort(-confidence)[: min(top, confidence.size)]
        score_error = float(np.abs(scores[image, anchors] - ref_scores[image, anchors]).mean())
        ious = np.diag(box_iou_numpy(ref_boxes[image, anchors], boxes[image, anchors])) if anchors.size else np.zeros(0)
        weights = confidence[anchors]
        box_error = float(np.sum(weights * (1.0 - np.asarray(ious))) / max(float(weights.sum()), 1e-9))
        errors.append(score_error + box_error)
    return float(np.mean(errors))


def run_model(
    path: str | Path | bytes, images: np.ndarray, threads: int | None = None, runtime: str = SCAN_RUNTIME
) -> tuple[np.ndarray, np.ndarray]:
    """(boxes, scores) of an ONNX file (or serialized model) on `images` (N, 3, H, W) float32, in batches, in
    `runtime` (`backend.runtimes.open_onnx`)."""
    session = open_onnx(path, runtime=runtime, threads=threads)
    # The export without NMS has two outputs, boxes then scores (docs/contracts.md §3).
    parts = [session.run(None, {"images": images[i : i + SCAN_BATCH]}) for i in range(0, len(images), SCAN_BATCH)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def scan_sensitivity(
    calibration: Calibration,
    images: np.ndarray,
    *,
    candidates: Sequence[str] | None = None,
    threads: int | None = None,
    on_progress: ProgressCallback | None = None,
    stop_requested: Callable[[], bool] | None = None,
    runtime: str = SCAN_RUNTIME,
) -> ScanResult:
    """Ranks layers by the output error each causes when quantized alone (module docstring).

    Args:
        calibration: the ranges every variant shares (`ptq.calibrate` on the pre-processed FP32 graph).
        images: validation inputs (N, 3, H, W) float32 RGB in [0, 1], letterboxed like at inference.
        candidates: node names to scan (default: every Conv/ConvTranspose of the model, `ptq.weighted_nodes`).
        threads: intra-op threads.
        on_progress: called as on_progress("scan", done=i, total=n, node=name) after each layer.
        stop_requested: checked between layers; True stops the scan with what it has measured.
        runtime: the runtime the variants run in (`SCAN_RUNTIME`'s reason).

    Returns:
        ScanResult with layers sorted by decreasing cost (ties in graph order).
    """
    graph = onnx.load(str(calibration.model_path))
    decoding = decoding_nodes(graph)
    candidates = list(candidates) if candidates is not None else weighted_nodes(graph)
    unknown = sorted(set(candidates) - set(weighted_nodes(graph)))
    if unknown:
        raise ValueError(f"not Conv/ConvTranspose nodes of the model: {unknown[:5]}")
    by_name = {node.name: node for node in graph.graph.node}
    initializers = {item.name: item for item in graph.graph.initializer}
    reference = run_model(calibration.model_path, images, threads, runtime)
    ranges: dict[str, tuple[float, float]] = {
        name: (_scalar(data.range_value[0]), _scalar(data.range_value[1]))  # (lowest, highest) of the calibration
        for name, data in load_tensors_data(calibration.cache_path).data.items()
    }
    ranges.update(INPUT_RANGE)
    layers: list[LayerSensitivity] = []
    with tempfile.TemporaryDirectory(prefix="yolodex-scan-") as scratch:
        base = quantize_calibrated(calibration, Path(scratch) / "base.onnx", nodes_to_exclude=decoding)
        base_error = output_error(reference, run_model(base, images, threads, runtime))
    for index, name in enumerate(candidates):
        if stop_requested is not None and stop_requested():
            break
        node = by_name[name]
        variant = quantized_alone(graph, name, ranges)
        layers.append(
            LayerSensitivity(
                node=name,
                module=module_path(name),
                op_type=node.op_type,
                parameters=sum(_size(initializers[i]) for i in node.input[1:] if i in initializers),
                cost=output_error(reference, run_model(variant, images, threads, runtime)),
            )
        )
        if on_progress is not None:
            on_progress("scan", done=index + 1, total=len(candidates), node=name)
    order = {name: index for index, name in enumerate(candidates)}
    layers.sort(key=lambda layer: (-layer.cost, order[layer.node]))
    return ScanResult(layers=layers, base_error=base_error, images=len(images), decoding=decoding)


@dataclass
class PolicyChoice:
    """What `choose_float_nodes` settled on.

    Attributes:
        float_layers: the layers kept in float, most sensitive first.
        float_nodes: every node name kept in float (the layers and the decoding), for `quantize_calibrated`.
        fp32_map: mAP50-95 of the FP32 model on the validation set.
        map: mAP50-95 of the chosen INT8 model.
        within_budget: map >= fp32_map - budget.
        tried: every prefix length evaluated, in order: {"float_layers": k, "map": value}.
        path: the chosen INT8 file.
    """

    float_layers: list[LayerSensitivity]
    float_nodes: list[str]
    fp32_map: float
    map: float
    within_budget: bool
    tried: list[dict[str, Any]]
    path: Path


def choose_float_nodes(
    calibration: Calibration,
    scan: ScanResult,
    evaluate_map: Callable[[Path], float],
    fp32_map: float,
    budget: float,
    out_path: str | Path,
    *,
    metadata_from: str | Path | None = None,
    on_progress: ProgressCallback | None = None,
) -> PolicyChoice:
    """The shortest prefix of the scan's ranking kept in float whose INT8 mAP50-95 is within `budget` of FP32's.

    Prefix lengths are tried 0, 1, 2, 4, ... until one is within budget (or every layer is float), then the gap to
    the last failing length is bisected. The INT8 file of the chosen prefix is left at `out_path`; if no prefix
    meets the budget, the one with the highest mAP is kept and `within_budget` is False.

    Args:
        calibration: the ranges to quantize with (the scan's).
        scan: from `scan_sensitivity`.
        evaluate_map: mAP50-95 (a fraction) of an INT8 ONNX file on the validation set.
        fp32_map: the FP32 model's mAP50-95 on the same set.
        budget: the largest acceptable drop, as a fraction (0.005 = half a point).
        out_path: where the chosen INT8 file goes.
    """
    out_path = Path(out_path)
    graph = onnx.load(str(calibration.model_path), load_external_data=False)
    scores: dict[int, float] = {}
    files: dict[int, Path] = {}
    tried: list[dict[str, Any]] = []

    def measure(k: int) -> float:
        if k not in scores:
            files[k] = quantize_calibrated(
                calibration,
                out_path.with_name(f".{out_path.stem}.k{k}.onnx"),
                nodes_to_exclude=_float_nodes(graph, scan, k),
                metadata_from=metadata_from,
            )
            scores[k] = evaluate_map(files[k])
            tried.append({"float_layers": k, "map": round(scores[k], 5)})
            if on_progress is not None:
                on_progress("policy", float_layers=k, map=scores[k], fp32_map=fp32_map)
        return scores[k]

    passing = _shortest_passing_prefix(lambda k: measure(k) >= fp32_map - budget, len(scan.layers))
    chosen = passing if passing is not None else max(scores, key=lambda length: (scores[length], -length))
    files.pop(chosen).replace(out_path)  # the chosen prefix's file is the result; the others go
    for path in files.values():
        path.unlink()
    return PolicyChoice(
        float_layers=scan.layers[:chosen],
        float_nodes=_float_nodes(graph, scan, chosen),
        fp32_map=fp32_map,
        map=scores[chosen],
        within_budget=passing is not None,
        tried=tried,
        path=out_path,
    )


def _float_nodes(graph: onnx.ModelProto, scan: ScanResult, k: int) -> list[str]:
    """The nodes kept in float with the first `k` layers of the scan's ranking: those layers' and the decoding's."""
    return list(
        dict.fromkeys([*(node for layer in scan.layers[:k] for node in layer_nodes(graph, layer.node)), *scan.decoding])
    )


def _shortest_passing_prefix(passes: Callable[[int], bool], longest: int) -> int | None:
    """The smallest prefix length in 0..`longest` that `passes`, or None when even `longest` fails.

    Lengths 0, 1, 2, 4, ... are tried until one passes, then the gap to the last failing length is bisected: about
    2 log2(answer) calls instead of one per length. This assumes that a longer prefix never fails where a shorter one
    passes (more float layers never cost accuracy), which holds up to evaluation noise.
    """
    low, high = -1, None  # largest known failing length, smallest known passing length
    k = 0
    while high is None:
        if passes(k):
            high = k
        elif k >= longest:
            return None
        else:
            low = k
            k = min(longest, max(1, 2 * k))
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high


def _scalar(value: Any) -> float:
    return float(np.asarray(value).reshape(-1)[0])


def quantized_alone(graph: onnx.ModelProto, name: str, ranges: dict[str, tuple[float, float]]) -> bytes:
    """The FP32 graph with one layer quantized the way onnxruntime's QDQ quantizer writes it, as a serialized model.

    The layer's input tensor (for this layer only) and output tensor (after its activation, for every consumer) get a
    QuantizeLinear/DequantizeLinear pair, uint8 asymmetric with the calibrated range (rmin <= 0 <= rmax, scale
    (rmax - rmin) / 255); its weights are int8 symmetric per output channel (scale max|w| / 127, axis 0, axis 1
    for ConvTranspose). The bias stays float (onnxruntime's int32 bias, scale = input scale x weight scale, adds
    an error orders of magnitude smaller). Writing the pairs directly costs milliseconds, where a `quantize_static`
    call with every other node excluded costs seconds; the policy search then uses the real quantizer.

    Args:
        graph: the pre-processed FP32 graph the ranges belong to.
        name: a Conv/ConvTranspose node name.
        ranges: tensor name → (lowest, highest) from the calibration.
    """
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    conv = next(node for node in model.graph.node if node.name == name)
    layer = layer_nodes(graph, name)
    last = next(node for node in model.graph.node if node.name == layer[-1])
    initializers = {item.name: item for item in model.graph.initializer}
    before: list[onnx.NodeProto] = []
    after: list[onnx.NodeProto] = []

    def constant(suffix: str, value: np.ndarray) -> str:
        tensor_name = f"{name}_{suffix}"
        model.graph.initializer.append(numpy_helper.from_array(value, tensor_name))
        return tensor_name

    def qdq(tensor: str, suffix: str, into: list[onnx.NodeProto], range_of: str | None = None) -> str:
        low, high = ranges[range_of or tensor]
        low, high = min(low, 0.0), max(high, 0.0)
        scale = (high - low) / 255.0 or 1.0
        zero_point = int(np.clip(round(-low / scale), 0, 255))
        scale_name = constant(f"{suffix}_scale", np.array(scale, dtype=np.float32))
        zero_name = constant(f"{suffix}_zero_point", np.array(zero_point, dtype=np.uint8))
        into.append(helper.make_node("QuantizeLinear", [tensor, scale_name, zero_name], [f"{name}_{suffix}_q"]))
        into.append(
            helper.make_node("DequantizeLinear", [f"{name}_{suffix}_q", scale_name, zero_name], [f"{name}_{suffix}_dq"])
        )
        return f"{name}_{suffix}_dq"

    conv.input[0] = qdq(conv.input[0], "input", before)
    weights = numpy_helper.to_array(initializers[conv.input[1]])
    axis = 1 if conv.op_type == "ConvTranspose" else 0
    reduce = tuple(index for index in range(weights.ndim) if index != axis)
    absmax = np.abs(weights).max(axis=reduce)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    shape = [1] * weights.ndim
    shape[axis] = -1
    quantized = np.clip(np.round(weights / scale.reshape(shape)), -127, 127).astype(np.int8)
    names = [
        constant("w_int8", quantized),
        constant("w_scale", scale),
        constant("w_zero", np.zeros_like(quantized, shape=scale.shape)),
    ]
    before.append(helper.make_node("DequantizeLinear", names, [f"{name}_w_dq"], axis=axis))
    float_weight = conv.input[1]
    conv.input[1] = f"{name}_w_dq"
    if not any(float_weight in node.input for node in model.graph.node):  # unused now: drop it
        model.graph.initializer.remove(initializers[float_weight])
    output = last.output[0]
    last.output[0] = f"{output}_float"
    qdq(last.output[0], "output", after, range_of=output)
    after[-1].output[0] = output  # every consumer reads the quantized output
    nodes = []
    for node in model.graph.node:
        nodes.extend([*before, node] if node is conv else [node])
        if node is last:
            nodes.extend(after)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model.SerializeToString()


def layer_nodes(graph: onnx.ModelProto, name: str) -> list[str]:
    """A layer's nodes: the Conv/ConvTranspose `name` and the activation (ReLU...) that alone consumes its output,
    which onnxruntime's QDQ quantizer folds into the layer's output quantization."""
    consumers = [node for node in graph.graph.node if any(output in node.input for output in _outputs(graph, name))]
    if len(consumers) == 1 and consumers[0].op_type in _ACTIVATIONS:
        return [name, consumers[0].name]
    return [name]


def _outputs(graph: onnx.ModelProto, name: str) -> list[str]:
    return next(list(node.output) for node in graph.graph.node if node.name == name)


def module_path(node_name: str) -> str:
    """The model's module path of a node of a yolodex export, e.g. "/model/heads/head1/cls_pred/Conv" →
    "heads.head1.cls_pred" and "/model/heads/head1/cls_convs/cls_convs.0/seq/conv/Conv" →
    "heads.head1.cls_convs.0.seq.conv".

    The tracing exporter names a node after its module scopes, but a Sequential/ModuleList child appears as
    "<list>.<index>", under the list's own scope only when the list itself was called; this undoes both. A name
    outside the "/model/" scope is returned unchanged.
    """
    if not node_name.startswith("/model/"):
        return node_name
    segments: list[str] = []
    for segment in node_name[len("/model/") :].split("/")[:-1]:
        parts = segment.split(".")
        if len(parts) > 1 and segments and segments[-1] == parts[0]:
            segments.pop()
        segments.extend(parts)
    return ".".join(segments)


def _size(initializer: onnx.TensorProto) -> int:
    return int(np.prod(initializer.dims, dtype=np.int64))
