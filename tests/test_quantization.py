"""PTQ (onnxruntime static, QDQ) of a partially fused YOLO-NAS S export, and its calibration reader.

The model is randomly initialised (seeded) at a small input size: what is checked is the mechanics (int8 kernels
run, the float policy is applied, metadata survives, outputs stay close), not accuracy.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from backend.data.folders import load_dataset
from backend.data.synthetic import generate_synthetic_dataset
from backend.export.onnx_export import export_onnx, read_onnx_metadata
from backend.models.yolo_nas import build_model
from backend.quantization import CalibrationImages, default_float_nodes, executed_op_types, quantize_onnx

IMGSZ = 64
CLASS_NAMES = ["circle", "square", "triangle"]
# Head branch convolutions of S: (cls_convs, reg_convs, cls_pred, reg_pred) x 3 heads.
FLOAT_CONVS = 12


@pytest.fixture(scope="module")
def train_records(tmp_path_factory):
    folder = generate_synthetic_dataset(
        tmp_path_factory.mktemp("syn") / "data", num_train=8, num_val=0, image_size=(96, 80)
    )
    return load_dataset(folder)["train"].records


@pytest.fixture(scope="module")
def fp32_path(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("s", 3).eval().fuse()  # partial fusion, as PTQ requires
    with torch.no_grad():
        for head in (model.heads.head1, model.heads.head2, model.heads.head3):
            # Centre the class prior so the sigmoid sits where it is steepest: score errors are not hidden by 0.01.
            head.cls_pred.bias.zero_()
    return export_onnx(
        model, tmp_path_factory.mktemp("fp32") / "s.onnx", imgsz=IMGSZ, fuse=False, class_names=CLASS_NAMES
    )


@pytest.fixture(scope="module")
def int8_path(fp32_path, train_records, tmp_path_factory):
    reader = CalibrationImages(train_records, IMGSZ, count=8)
    return quantize_onnx(fp32_path, tmp_path_factory.mktemp("int8") / "s_int8.onnx", reader, method="minmax")


def _run(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["boxes", "scores"], {"images": images})


def _weight_is_dequantized(graph: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    producers = {output: producer for producer in graph.node for output in producer.output}
    weight = producers.get(node.input[1])
    return weight is not None and weight.op_type == "DequantizeLinear"


def test_default_float_nodes_cover_head_branches_and_decoding(fp32_path):
    model = onnx.load(str(fp32_path))
    names = set(default_float_nodes(model))
    by_name = {node.name: node for node in model.graph.node}
    float_convs = sorted(name for name in names if by_name[name].op_type == "Conv")
    assert len(float_convs) == FLOAT_CONVS
    assert all(any(part in name for part in ("cls_convs", "reg_convs", "cls_pred", "reg_pred")) for name in float_convs)
    for op_type in ("Softmax", "Sigmoid", "ReduceSum"):  # the DFL and the class scores
        assert all(node.name in names for node in model.graph.node if node.op_type == op_type)
    # Backbone, neck and head stems stay quantizable.
    assert not any("/backbone/" in name or "/neck/" in name or "/stem/" in name for name in names)


def test_default_float_nodes_rejects_other_graphs():
    node = onnx.helper.make_node("Relu", ["x"], ["y"], name="relu")
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    with pytest.raises(ValueError, match="yolodex"):
        default_float_nodes(onnx.helper.make_model(graph))


def test_int8_file_runs_with_qdq_and_keeps_metadata(fp32_path, int8_path):
    model = onnx.load(str(int8_path))
    op_types = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types
    metadata = read_onnx_metadata(int8_path)
    assert metadata["class_names"] == CLASS_NAMES
    assert metadata["imgsz"] == [IMGSZ, IMGSZ]
    settings = json.loads(metadata["quantization"])
    assert settings["method"] == "minmax"
    assert settings["calibration_images"] == 8
    assert settings["activation_type"] == "uint8"
    boxes, scores = _run(int8_path, np.zeros((2, 3, IMGSZ, IMGSZ), np.float32))
    assert boxes.shape[0] == scores.shape[0] == 2 and scores.shape[2] == 3


def test_exactly_the_float_nodes_are_left_unquantized(int8_path):
    model = onnx.load(str(int8_path))
    float_nodes = set(json.loads(read_onnx_metadata(int8_path)["quantization"])["float_nodes"])
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    float_convs = [node for node in convs if node.name in float_nodes]
    assert len(float_convs) == FLOAT_CONVS
    for node in convs:
        assert _weight_is_dequantized(model.graph, node) == (node.name not in float_nodes), node.name


def test_int8_file_is_small_and_runs_int8_kernels(fp32_path, int8_path):
    assert int8_path.stat().st_size < 0.4 * fp32_path.stat().st_size
    executed = executed_op_types(int8_path, (1, 3, IMGSZ, IMGSZ))
    assert executed.get("QLinearConv", 0) > 50  # the backbone and neck convolutions run as int8 kernels
    assert executed.get("Conv", 0) + executed.get("FusedConv", 0) == FLOAT_CONVS  # only the float head branches
    assert "QLinearConv" not in executed_op_types(fp32_path, (1, 3, IMGSZ, IMGSZ))


def test_int8_outputs_agree_with_fp32(fp32_path, int8_path, train_records):
    reader = CalibrationImages(train_records, IMGSZ, count=4, seed=1)
    images = np.concatenate([reader.get_next()["images"] for _ in range(4)])
    boxes32, scores32 = _run(fp32_path, images)
    boxes8, scores8 = _run(int8_path, images)
    # A random-init S gives scores of 0.5 +- ~0.002, so the tolerance is relative to that spread (measured error:
    # ~1% of it), and the outputs must differ at all (int8 kernels really changed the arithmetic).
    assert not np.array_equal(scores8, scores32)
    assert np.abs(scores8 - scores32).mean() < 0.1 * scores32.std()
    # Boxes (xyxy, input pixels of a 64 px input): the best-scoring anchors' boxes within 0.5 px on average
    # (measured: ~0.001 px; the box branch is float).
    top = np.argsort(-scores32.max(axis=2), axis=1)[:, :10]
    picked32 = np.take_along_axis(boxes32, top[..., None], axis=1)
    picked8 = np.take_along_axis(boxes8, top[..., None], axis=1)
    assert np.abs(picked8 - picked32).mean() < 0.5


def test_quantizing_everything_is_possible(fp32_path, train_records, tmp_path):
    path = quantize_onnx(
        fp32_path,
        tmp_path / "all.onnx",
        CalibrationImages(train_records, IMGSZ, count=2),
        method="minmax",
        nodes_to_exclude=[],
    )
    model = onnx.load(str(path))
    assert all(_weight_is_dequantized(model.graph, node) for node in model.graph.node if node.op_type == "Conv")


def test_bad_method_is_refused(fp32_path, train_records, tmp_path):
    with pytest.raises(ValueError, match="minmax"):
        quantize_onnx(fp32_path, tmp_path / "x.onnx", CalibrationImages(train_records, IMGSZ, count=1), method="max")


def test_calibration_reads_lazily_and_rewinds(train_records):
    reader = CalibrationImages(train_records, IMGSZ, count=3, seed=0)
    assert len(reader) == 3
    first = reader.get_next()["images"]
    assert first.shape == (1, 3, IMGSZ, IMGSZ) and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert reader.get_next() is not None and reader.get_next() is not None
    assert reader.get_next() is None
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["images"], first)
    same = CalibrationImages(train_records, IMGSZ, count=3, seed=0)
    other = CalibrationImages(train_records, IMGSZ, count=3, seed=5)
    assert [r.path for r in same.records] == [r.path for r in reader.records]
    assert [r.path for r in other.records] != [r.path for r in reader.records]


def test_calibration_with_fewer_images_warns(train_records, caplog):
    with caplog.at_level(logging.WARNING):
        reader = CalibrationImages(train_records, IMGSZ, count=64)
    assert len(reader) == len(train_records)
    assert "only 8" in caplog.text


def test_calibration_without_images_is_a_clear_error():
    with pytest.raises(ValueError, match="training split is empty"):
        CalibrationImages([], IMGSZ)
