"""The whole INT8 pipeline: calibration methods, the sensitivity scan and the automatic policy, QAT, the report.

The model is the session's detector (`detecting_run`: YOLO-NAS S at 96 px that finds the shapes of its eight
synthetic images), so besides every stage really running on onnxruntime and the report holding what it promises,
the tests bound the mAP each INT8 model loses: a quantization that broke the model would exceed those bounds.
Accuracy on real photos is `bench/quantize.py`'s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from backend import runtimes
from backend.data.folders import load_dataset
from backend.data.records import DatasetError
from backend.data.synthetic import generate_synthetic_dataset
from backend.export.onnx_export import export_onnx
from backend.models.yolo_nas import build_model
from backend.quantization.calibration import CalibrationImages
from backend.quantization.pipeline import QuantizeOptions, _choose, quantize_run
from backend.quantization.ptq import calibrate, preprocess_fp32, weighted_nodes
from backend.quantization.sensitivity import (
    LayerSensitivity,
    ScanResult,
    choose_float_nodes,
    module_path,
    scan_sensitivity,
)
from tests.conftest import DETECTOR_IMGSZ, DETECTOR_MIN_MAP50, REPO_ROOT

IMGSZ = DETECTOR_IMGSZ
VALIDATION_IMAGES = 8  # the detector's validation split
# The most mAP50 an INT8 model may lose against FP32 on the detector's images. Measured on 4 calibration images:
# FP32 0.623, percentile 0.622, minmax 0.619, entropy 0.424 (entropy clips harder: its own, looser bound); with
# every range divided by 8 (a wrong scale), all three fall to 0.
MAX_MAP50_DROP = 0.1
MAX_ENTROPY_MAP50_DROP = 0.3
# The budget the automatic policy is given here, in mAP50-95 points: within reach of the scanned layers.
BUDGET_POINTS = 2.0
CLASS_NAMES = ["circle", "square", "triangle"]
# The fragile pair of the scan test: a bottleneck's first conv, whose output channel 0 is made huge, and the second
# conv, which alone reads that output: quantizing either quantizes the tensor between them.
FRAGILE = "backbone.stage2.blocks.bottlenecks.0.cv2.rbr_reparam"
PRODUCER = "backbone.stage2.blocks.bottlenecks.0.cv1"
OTHERS = [
    "backbone.stage1.blocks.conv1.conv",
    "backbone.stage3.blocks.conv2.conv",
    "neck.neck1.blocks.conv1.conv",
    "heads.head2.stem.seq.conv",
]


@pytest.fixture(scope="module")
def run_dir(detecting_run) -> Path:
    return detecting_run


@pytest.fixture(scope="module")
def scan_nodes(run_dir) -> list[str]:
    export = export_onnx(build_model("s", 3).eval().fuse(), run_dir.parent / "names.onnx", imgsz=IMGSZ, fuse=False)
    by_module = {module_path(name): name for name in weighted_nodes(export)}
    return [by_module[module] for module in [FRAGILE, *OTHERS, f"{PRODUCER}.rbr_reparam"]]


@pytest.fixture(scope="module")
def ptq_report(run_dir, scan_nodes, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ptq")
    options = QuantizeOptions(
        method="ptq",
        calib_images=4,
        scan_images=3,
        scan_layers=tuple(scan_nodes),
        latency_runs=3,
        budget=BUDGET_POINTS,
    )
    events = []
    report = quantize_run(run_dir, out, options, on_event=lambda name, **data: events.append((name, data)))
    report["_events"] = events
    return report


def test_report_holds_every_field(ptq_report):
    report = ptq_report
    assert (
        json.loads(Path(report["model_int8"]).with_name("quant_report.json").read_text())["chosen"] == report["chosen"]
    )
    assert set(report["models"]) == {"fp32", "ptq_percentile", "ptq_minmax", "ptq_entropy", "ptq_selective"}
    assert report["threads"] == 2 and report["validation_images"] == VALIDATION_IMAGES
    assert report["not_measured"] == []
    assert report["calibration"]["images"] == 4 and set(report["calibration"]["seconds"]) == {
        "percentile",
        "minmax",
        "entropy",
    }
    fp32_bytes = report["models"]["fp32"]["bytes"]
    for name, row in report["models"].items():
        assert Path(row["path"]).is_file() and row["bytes"] == Path(row["path"]).stat().st_size
        assert {"mAP50-95", "mAP50"} <= set(row["metrics"]) and set(row["per_class_ap"]) == set(CLASS_NAMES)
        assert row["latency_ms_p95"] >= row["latency_ms_p50"] > 0 and row["throughput_b8_images_per_s"] > 0
        if name == "fp32":
            continue
        assert row["bytes"] < 0.45 * fp32_bytes
        assert row["deltas"]["size_ratio"] == round(row["bytes"] / fp32_bytes, 3)
        assert set(row["deltas"]["metrics"]) == set(row["metrics"]) and set(row["deltas"]["per_class_ap"]) == set(
            CLASS_NAMES
        )
        assert row["executed_op_types"].get("QLinearConv", 0) > 50  # int8 kernels really ran
        # onnxruntime's CPU build has no int8 ConvTranspose: the report names the two upsampling layers.
        assert [item["kernel"] for item in row["float_fallbacks"]] == ["ConvTranspose", "ConvTranspose"]
        agreement = row["agreement"]
        assert len(agreement["per_image"]) == VALIDATION_IMAGES and 0.0 <= agreement["mean_agreement"] <= 1.0
        assert all(item["change"] > 0 for item in agreement["most_changed"])
    assert report["gallery"] == report["models"][report["chosen"]]["agreement"]["most_changed"]


def test_report_measures_every_runtime_side_by_side(ptq_report):
    report = ptq_report
    deploy = runtimes.resolve_runtime("auto")
    assert report["runtime"] == deploy and report["runtime_label"] == runtimes.runtime_label(deploy)
    expected = ["onnxruntime"] + (["openvino"] if runtimes.openvino_problem() is None else [])
    assert report["runtimes"] == expected and report["model_int8_openvino"] is None  # no IR unless asked
    for name, row in report["models"].items():
        assert set(row["runtimes"]) == set(expected), name
        for runtime, measured in row["runtimes"].items():
            assert measured["latency_ms_p95"] >= measured["latency_ms_p50"] > 0, (name, runtime)
            assert measured["throughput_b8_images_per_s"] > 0 and 0.0 <= measured["mAP50-95"] <= 1.0
        # the top level is the runtime the model ships on: its speed and its mAP
        shipped_on = row["runtimes"][deploy]
        assert row["latency_ms_p50"] == shipped_on["latency_ms_p50"]
        assert row["metrics"]["mAP50-95"] == shipped_on["mAP50-95"]
    if "openvino" in expected:  # the two runtimes score the same files within a point or two of mAP50
        for name, row in report["models"].items():
            on = row["runtimes"]
            assert abs(on["openvino"]["mAP50"] - on["onnxruntime"]["mAP50"]) <= 0.05, (name, on)


def test_calibration_methods_give_different_ranges(ptq_report):
    # Entropy used to equal minmax (onnxruntime's quantize_static did not pass its bin counts): now three methods,
    # three different INT8 files.
    files = {
        name: Path(ptq_report["models"][f"ptq_{name}"]["path"]).read_bytes()
        for name in ("minmax", "percentile", "entropy")
    }
    assert len(set(files.values())) == 3


def test_int8_models_keep_the_detectors_accuracy(ptq_report):
    """Every INT8 model finds what the FP32 model finds: mAP50 within `MAX_MAP50_DROP` of FP32's. A wrong scale,
    range or rounding in the quantization costs more (checked by breaking it on purpose)."""
    fp32 = ptq_report["models"]["fp32"]["metrics"]
    assert fp32["mAP50"] >= DETECTOR_MIN_MAP50
    for name, row in ptq_report["models"].items():
        print(f"{name}: mAP50 {row['metrics']['mAP50']:.3f}, mAP50-95 {row['metrics']['mAP50-95']:.3f}")
        bound = MAX_ENTROPY_MAP50_DROP if name == "ptq_entropy" else MAX_MAP50_DROP
        assert row["metrics"]["mAP50"] >= fp32["mAP50"] - bound, (name, row["metrics"], fp32)


def test_selective_policy_meets_the_budget(ptq_report):
    report = ptq_report
    sensitivity = report["sensitivity"]
    assert len(sensitivity["layers"]) == 6 and sensitivity["images"] == 3
    costs = [layer["cost"] for layer in sensitivity["layers"]]
    assert costs == sorted(costs, reverse=True) and max(costs) > 0
    fp32_map = report["models"]["fp32"]["metrics"]["mAP50-95"]
    budget = BUDGET_POINTS / 100
    selective = report["models"]["ptq_selective"]
    kept = [layer["module"] for layer in sensitivity["float_layers"]]
    assert selective["float_layers"] == kept == [layer["module"] for layer in sensitivity["layers"][: len(kept)]]
    assert selective["within_budget"] == (selective["metrics"]["mAP50-95"] >= fp32_map - budget - 1e-9)
    assert sensitivity["tried"][0]["float_layers"] == 0
    assert [name for name, data in report["_events"] if name == "scan"] == ["scan"] * 6
    # The shipped model is within the budget, and says so.
    assert report["within_budget"] is True
    assert report["models"][report["chosen"]]["metrics"]["mAP50-95"] >= fp32_map - budget - 1e-9


def test_sensitivity_scan_ranks_a_fragile_layer_first(tmp_path, scan_nodes):
    """A tensor made fragile on purpose (channel 0 of a conv's output set to 1000, and not read by the next conv:
    the float model is unchanged apart from that channel, but its per-tensor int8 range now drowns every other
    channel) puts the two layers that quantize it, its producer and its consumer, first by far."""
    torch.manual_seed(0)
    model = build_model("s", 3).eval().fuse()
    producer, fragile = model.get_submodule(PRODUCER), model.get_submodule(FRAGILE)
    with torch.no_grad():
        for head in (model.heads.head1, model.heads.head2, model.heads.head3):
            head.cls_pred.bias.zero_()  # scores near 0.5, where the sigmoid shows every change
        producer.post_bn.bias[0] = 1000.0
        fragile.weight[:, 0] = 0.0
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", imgsz=IMGSZ, fuse=False, class_names=CLASS_NAMES)
    folder = generate_synthetic_dataset(tmp_path / "data", num_train=6, num_val=0, image_size=(96, 80))
    records = load_dataset(folder)["train"].records
    prepared = preprocess_fp32(fp32, tmp_path / "pre.onnx")
    calibration = calibrate(prepared, CalibrationImages(records, IMGSZ, count=6), tmp_path / "r.json", method="minmax")
    reader = CalibrationImages(records, IMGSZ, count=4, seed=1)
    images = np.concatenate([reader.get_next()["images"] for _ in range(4)])
    shuffled = [scan_nodes[index] for index in (2, 4, 0, 1, 5, 3)]
    scan = scan_sensitivity(calibration, images, candidates=shuffled)
    assert {layer.module for layer in scan.layers[:2]} == {FRAGILE, f"{PRODUCER}.rbr_reparam"}
    assert min(layer.cost for layer in scan.layers[:2]) > 50 * max(layer.cost for layer in scan.layers[2:])


def test_policy_search_keeps_the_shortest_prefix_within_budget(tmp_path, scan_nodes, run_dir):
    """The search over prefix lengths, on a real quantization, scored by how many of the three most sensitive
    layers a file keeps in float (read from its metadata): the budget then needs exactly three."""
    export = Path(run_dir) / "model_fp32.onnx"
    if not export.is_file():
        export = export_onnx(build_model("s", 3).eval().fuse(), tmp_path / "fp32.onnx", imgsz=IMGSZ, fuse=False)
    prepared = preprocess_fp32(export, tmp_path / "pre.onnx")
    records = load_dataset(generate_synthetic_dataset(tmp_path / "d", num_train=2, num_val=0))["train"].records
    calibration = calibrate(prepared, CalibrationImages(records, IMGSZ, count=2), tmp_path / "r.json", method="minmax")
    layers = [
        LayerSensitivity(node=name, module=module_path(name), op_type="Conv", parameters=1, cost=1.0 - index / 10)
        for index, name in enumerate(scan_nodes)
    ]
    scan = ScanResult(layers=layers, base_error=1.0, images=1, decoding=[])
    important = set(scan_nodes[:3])

    def score(path: Path) -> float:
        model = onnx.load(str(path))
        meta = {prop.key: prop.value for prop in model.metadata_props}
        kept = set(json.loads(meta["quantization"])["float_nodes"])
        return 0.5 - 0.01 * len(important - kept)

    choice = choose_float_nodes(calibration, scan, score, fp32_map=0.5, budget=0.005, out_path=tmp_path / "sel.onnx")
    assert [layer.node for layer in choice.float_layers] == scan_nodes[:3] and choice.within_budget
    assert [item["float_layers"] for item in choice.tried] == [0, 1, 2, 4, 3]  # doubling, then bisection
    assert choice.path.is_file() and not list(tmp_path.glob(".sel.k*.onnx"))
    strict = choose_float_nodes(
        calibration, scan, lambda path: 0.4, fp32_map=0.5, budget=0.005, out_path=tmp_path / "none.onnx"
    )
    assert not strict.within_budget and strict.float_layers == []  # nothing helps: the smallest model is kept


def test_qat_through_the_cli(run_dir, tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "backend.cli",
            "quantize",
            run_dir,
            "--method",
            "qat",
            "--calib",
            "4",
            "--no-compare",
            "--qat-epochs",
            "1",
            "--calibration",
            "minmax",
            "--out",
            tmp_path,
            "--json",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert set(report["models"]) == {"fp32", "ptq_minmax", "qat"} and report["sensitivity"] is None
    qat = report["qat"]
    assert qat["config"]["epochs"] == 1 and qat["epochs_done"] == 1 and qat["ranges_from_qat"] > 50
    row = report["models"]["qat"]
    assert (
        row["executed_op_types"].get("QLinearConv", 0) > 50 and row["bytes"] < 0.45 * report["models"]["fp32"]["bytes"]
    )
    assert len(row["float_layers"]) == 12  # QAT keeps the default policy's head branches in float
    fp32 = report["models"]["fp32"]["metrics"]
    assert row["metrics"]["mAP50"] >= fp32["mAP50"] - MAX_MAP50_DROP, (row["metrics"], fp32)
    assert report["chosen"] in report["models"] and (tmp_path / "model_int8.onnx").is_file()


def test_run_without_validation_images_reports_what_it_can(run_dir, tmp_path):
    lonely = generate_synthetic_dataset(tmp_path / "one", num_train=1, num_val=0, image_size=(96, 96), seed=2)
    options = QuantizeOptions(
        method="auto", calib_images=8, compare_calibrations=False, data=str(lonely), latency_runs=2
    )
    report = quantize_run(run_dir, tmp_path / "out", options)
    assert report["validation_images"] == 0 and report["chosen"] == "ptq_percentile"
    assert report["within_budget"] is None and report["sensitivity"] is None and report["qat"] is None
    assert "no validation images" in report["not_measured"][0]
    assert report["calibration"]["images"] == 1 and report["calibration"]["asked"] == 8  # fewer than asked: all there
    int8 = report["models"]["ptq_percentile"]
    assert "metrics" not in int8 and int8["latency_ms_p50"] > 0 and int8["deltas"]["size_ratio"] < 0.45


@pytest.mark.skipif(runtimes.openvino_problem() is not None, reason=f"{runtimes.openvino_problem()}")
def test_format_openvino_writes_the_shipped_model_as_ir(run_dir, tmp_path):
    lonely = generate_synthetic_dataset(tmp_path / "one", num_train=2, num_val=0, image_size=(96, 96), seed=2)
    out = tmp_path / "out"
    command = ["quantize", run_dir, "--method", "ptq", "--calib", "2", "--no-compare", "--data", lonely]
    command += ["--out", out, "--format", "openvino", "--json"]
    completed = subprocess.run(
        [sys.executable, "-m", "backend.cli", *command], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    xml = out / "model_int8.xml"
    assert report["model_int8_openvino"] == str(xml) and xml.is_file() and xml.with_suffix(".bin").is_file()
    # The IR computes what the ONNX file computes in OpenVINO.
    import openvino

    core = openvino.Core()
    feed = np.random.default_rng(0).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    from_ir = core.compile_model(core.read_model(str(xml)), "CPU", config)(feed)
    from_onnx = core.compile_model(core.read_model(str(out / "model_int8.onnx")), "CPU", config)(feed)
    for ir_output, onnx_output in zip(from_ir.to_tuple(), from_onnx.to_tuple(), strict=True):
        np.testing.assert_allclose(ir_output, onnx_output, atol=1e-4)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="auto, ptq, qat"):
        QuantizeOptions(method="fast")
    with pytest.raises(ValueError, match="points"):
        QuantizeOptions(budget=-1)


def test_the_shipped_model_is_the_fastest_within_budget():
    def row(map50_95, latency, size):
        return {"metrics": {"mAP50-95": map50_95}, "latency_ms_p50": latency, "bytes": size}

    rows = {
        "fp32": row(0.50, 40, 100),
        "ptq_percentile": row(0.499, 21, 36),
        "ptq_selective": row(0.497, 20, 27),
        "qat": row(0.501, 25, 27),
    }
    assert _choose(rows, 0.50, 0.005, "percentile") == "ptq_selective"  # fastest (ties within 5 %: smaller)
    rows["ptq_selective"] = row(0.48, 18, 27)  # faster but outside the budget
    assert _choose(rows, 0.50, 0.005, "percentile") == "ptq_percentile"
    rows["ptq_percentile"] = row(0.47, 21, 36)
    rows["qat"] = row(0.49, 25, 27)  # nothing within budget: the most accurate
    assert _choose(rows, 0.50, 0.005, "percentile") == "qat"
    assert _choose(rows, None, 0.005, "percentile") == "ptq_percentile"  # no validation: the default policy


def test_a_run_whose_dataset_moved_says_to_pass_data(run_dir, tmp_path):
    moved = tmp_path / "moved_run"
    moved.mkdir()
    (moved / "best.pt").write_bytes((run_dir / "best.pt").read_bytes())
    config = json.loads((run_dir / "config.json").read_text())
    config["train"]["data"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    with pytest.raises(DatasetError, match="--data"):
        quantize_run(moved, tmp_path / "out", QuantizeOptions(method="ptq"))
