"""Vectorised entropy (KL) calibration thresholds against onnxruntime's own HistogramCollector."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import (
    CalibrationMethod,
    HistogramCollector,
    create_calibrator,
    load_tensors_data,
    save_tensors_data,
)

from backend.quantization.entropy import (
    entropy_ranges,
    entropy_tensors_data,
    entropy_threshold,
    uint8_entropy_tensors_data,
)

# Small histograms keep onnxruntime's Python loop fast enough for a unit test.
NUM_BINS, NUM_QUANTIZED_BINS = 256, 64


def collector(num_bins: int = NUM_BINS, num_quantized_bins: int = NUM_QUANTIZED_BINS) -> HistogramCollector:
    return HistogramCollector(
        method="entropy",
        symmetric=False,
        num_bins=num_bins,
        num_quantized_bins=num_quantized_bins,
        percentile=99.999,
        scenario="same",
    )


def sample(kind: str, rng: np.random.Generator, size: int = 20_000) -> np.ndarray:
    if kind == "gaussian":
        values = rng.normal(0.3, 1.0, size)
    elif kind == "heavy_tailed":
        values = rng.standard_t(1.5, size)
    elif kind == "post_relu":
        values = np.maximum(rng.normal(0.0, 1.0, size), 0.0)
    elif kind == "single_value":  # every count in one bin (the last: the value is the range's right edge)
        values = np.full(size, -2.5)
    elif kind == "zeros":  # range (0, 0) → numpy widens it to (-0.5, 0.5), everything in the middle bin
        values = np.zeros(size)
    elif kind == "few_values":  # mostly empty bins
        values = rng.normal(0.0, 1.0, 25)
    else:
        raise AssertionError(kind)
    return values.astype(np.float32)


def histogram(values: np.ndarray, num_bins: int = NUM_BINS) -> tuple:
    """What HistogramCollector.collect_value stores for one batch: (hist, edges, min, max, threshold)."""
    holder = collector(num_bins=num_bins)
    holder.collect_value({"x": values})
    return holder.histogram_dict["x"]


KINDS = ["gaussian", "heavy_tailed", "post_relu", "single_value", "zeros", "few_values"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("num_bins", "num_quantized_bins"), [(256, 64), (255, 64), (130, 128), (256, 65)])
def test_threshold_equals_onnxruntime(kind: str, num_bins: int, num_quantized_bins: int) -> None:
    rng = np.random.default_rng(sum(map(ord, kind)) + num_bins + num_quantized_bins)
    for _ in range(2):
        hist, edges, min_value, max_value, _threshold = histogram(sample(kind, rng), num_bins)
        expected = collector(num_bins, num_quantized_bins).get_entropy_threshold(
            (hist, edges, min_value, max_value, _threshold), num_quantized_bins
        )
        lo, hi = entropy_threshold(hist, edges, num_quantized_bins, min_value=min_value, max_value=max_value)
        # Not just close: the same candidate wins, so the values are the same float32 numbers.
        assert (lo, hi) == (float(expected[0]), float(expected[1]))
        assert min_value <= lo <= hi <= max_value


def test_threshold_with_synthetic_counts() -> None:
    """Counts not made by np.histogram: random sparse integers, an empty histogram, and no clipping."""
    rng = np.random.default_rng(7)
    edges = np.linspace(-3.0, 3.0, NUM_BINS + 1, dtype=np.float32)
    cases = [
        rng.poisson(rng.uniform(0, 3, NUM_BINS)),
        np.where(rng.random(NUM_BINS) < 0.1, rng.integers(1, 1000, NUM_BINS), 0),
        np.zeros(NUM_BINS, dtype=np.int64),  # every KL is inf → onnxruntime keeps the first (narrowest) window
    ]
    for hist in cases:
        hist = hist.astype(np.int64)
        inf = np.float32(np.inf)
        expected = collector().get_entropy_threshold((hist, edges, -inf, inf, None), NUM_QUANTIZED_BINS)
        assert entropy_threshold(hist, edges, NUM_QUANTIZED_BINS) == (float(expected[0]), float(expected[1]))


def test_merged_histograms_and_ranges() -> None:
    """Several batches with growing ranges (the histogram grows past num_bins) through entropy_ranges."""
    rng = np.random.default_rng(3)
    holder = collector()
    for scale in (0.5, 1.0, 3.0):
        holder.collect_value({"a": rng.normal(0, scale, 4000).astype(np.float32), "b": sample("post_relu", rng)})
    assert holder.histogram_dict["a"][0].size > NUM_BINS
    ranges = entropy_ranges(holder.histogram_dict, NUM_QUANTIZED_BINS)
    for name, histogram_tuple in holder.histogram_dict.items():
        expected = holder.get_entropy_threshold(histogram_tuple, NUM_QUANTIZED_BINS)
        assert ranges[name] == (float(expected[0]), float(expected[1]))


def test_invalid_histograms_raise() -> None:
    edges = np.linspace(-1, 1, 65, dtype=np.float32)
    with pytest.raises(ValueError, match="fewer than num_quantized_bins"):
        entropy_threshold(np.ones(64, dtype=np.int64), edges, 128)
    with pytest.raises(ValueError, match="edges"):
        entropy_threshold(np.ones(64, dtype=np.int64), edges[:-1], 32)
    with pytest.raises(ValueError, match="integers"):
        entropy_threshold(np.full(64, 0.5), edges, 32)


# ----------------------------------------------------------------------------------------------------------------
# End to end with onnxruntime's calibrator
# ----------------------------------------------------------------------------------------------------------------


def conv_relu_model(path: Path) -> None:
    """(1, 3, 8, 8) → Conv 3→4, 3x3, pad 1 → Relu → (1, 4, 8, 8)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["images", "weight", "bias"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["conv"], ["output"]),
        ],
        "conv_relu",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, 8, 8])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


class RandomImages(CalibrationDataReader):
    def __init__(self, count: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.batches = iter([{"images": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)} for _ in range(count)])

    def get_next(self) -> dict | None:
        return next(self.batches, None)


def conv_relu_calibrator(tmp_path: Path, num_bins: int, num_quantized_bins: int) -> tuple[Path, Any]:
    """The Conv+ReLU model written under `tmp_path` and an entropy calibrator on it (nothing collected yet)."""
    model_path = tmp_path / "conv_relu.onnx"
    conv_relu_model(model_path)
    calibrator = create_calibrator(
        model_path,
        augmented_model_path=str(tmp_path / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": num_bins, "num_quantized_bins": num_quantized_bins},
    )
    return model_path, calibrator


def test_tensors_data_equals_compute_data(tmp_path: Path) -> None:
    model_path, calibrator = conv_relu_calibrator(tmp_path, NUM_BINS, NUM_QUANTIZED_BINS)
    calibrator.collect_data(RandomImages(3, seed=1))
    calibrator.collect_data(RandomImages(2, seed=2))  # a second call merges into the same histograms

    ours = entropy_tensors_data(calibrator)
    theirs = calibrator.compute_data()
    assert ours.calibration_method == theirs.calibration_method == CalibrationMethod.Entropy
    assert set(ours.data) == set(theirs.data) == {"images", "conv", "output"}
    for name, data in ours.data.items():
        expected = theirs.data[name]
        assert (data.lowest, data.highest) == (expected.lowest, expected.highest)
        assert data.lowest.dtype == expected.lowest.dtype and data.highest.dtype == expected.highest.dtype
        np.testing.assert_array_equal(data.hist, expected.hist)
        np.testing.assert_array_equal(data.bins, expected.bins)
        _hist, _edges, min_value, max_value, _threshold = calibrator.collector.histogram_dict[name]
        assert min_value <= data.lowest < data.highest <= max_value

    # The cache onnxruntime's quantize_static reads instead of calibrating again.
    cache = tmp_path / "calibration.json"
    save_tensors_data(ours, cache)
    loaded = load_tensors_data(cache)
    assert loaded.data["output"].range_value == pytest.approx(ours.data["output"].range_value)
    quantized_path = tmp_path / "int8.onnx"
    quantize_static(
        str(model_path),
        str(quantized_path),
        calibration_data_reader=None,
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.Entropy,
        calibration_cache_path=cache,
    )
    op_types = {node.op_type for node in onnx.load(quantized_path).graph.node}
    assert "QuantizeLinear" in op_types


def test_needs_collected_entropy_histograms() -> None:
    class Empty:
        collector = None

    with pytest.raises(ValueError, match="collect_data"):
        entropy_tensors_data(Empty())


def test_speed_against_onnxruntime() -> None:
    """Prints the speed ratio at the production setting (2048 / 128 bins); timings are not asserted."""
    rng = np.random.default_rng(0)
    holder = collector(2048, 128)
    holder.collect_value({"x": rng.standard_t(3, 50_000).astype(np.float32)})
    histogram_tuple = holder.histogram_dict["x"]
    start = time.perf_counter()
    ours = entropy_threshold(*histogram_tuple[:2], 128, min_value=histogram_tuple[2], max_value=histogram_tuple[3])
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    expected = holder.get_entropy_threshold(histogram_tuple, 128)
    theirs_s = time.perf_counter() - start
    assert ours == (float(expected[0]), float(expected[1]))
    print(
        f"entropy threshold 2048/128 bins: ours {ours_s * 1e3:.1f} ms, onnxruntime {theirs_s * 1e3:.1f} ms, "
        f"{theirs_s / ours_s:.0f}x"
    )


def test_uint8_ranges_fit_the_grid_the_activations_use(tmp_path: Path) -> None:
    """Never-negative tensors (the ReLU output) get [0, T]; the search against 255 levels clips less than the int8
    symmetric one (64 levels on the positive side), and every range stays inside the observed min/max."""
    _, calibrator = conv_relu_calibrator(tmp_path, 2048, 128)
    calibrator.collect_data(RandomImages(4, seed=3))
    int8 = entropy_tensors_data(calibrator).data
    uint8 = uint8_entropy_tensors_data(calibrator).data
    assert set(uint8) == set(int8)
    _hist, _edges, relu_min, relu_max, _threshold = calibrator.collector.histogram_dict["output"]
    assert relu_min >= 0 and float(uint8["output"].lowest) == float(relu_min)
    assert float(int8["output"].highest) < float(uint8["output"].highest) <= float(relu_max)
    for name, data in uint8.items():
        _hist, _edges, low, high, _threshold = calibrator.collector.histogram_dict[name]
        assert low <= data.lowest < data.highest <= high
