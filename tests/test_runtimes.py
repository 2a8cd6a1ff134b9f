"""OpenVINO beside onnxruntime behind one Predictor: the choice of runtime, its fallback, and agreement of their
detections on a model that really detects (the session's `detecting_run`), FP32 and INT8 QDQ alike."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest

from backend import runtimes
from backend.data.folders import load_dataset
from backend.evaluation.coco_eval import evaluate_detections
from backend.evaluation.matching import greedy_match
from backend.export.onnx_export import export_onnx
from backend.inference import Predictor
from backend.models.checkpoints import load_model
from backend.processing import PostprocessConfig, box_iou_numpy
from backend.quantization.calibration import CalibrationImages
from backend.quantization.ptq import default_float_nodes, quantize_onnx
from backend.training.engine import EVAL_POSTPROCESS

OPENVINO_PROBLEM = runtimes.openvino_problem()
needs_openvino = pytest.mark.skipif(OPENVINO_PROBLEM is not None, reason=f"{OPENVINO_PROBLEM}")
SHOWN = PostprocessConfig(conf_threshold=0.25, iou_threshold=0.7, max_detections=100)


@pytest.fixture(scope="module")
def detector_models(detecting_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session detector exported (FP32, partially fused as quantization starts from) and quantized (INT8 QDQ,
    the default float policy), plus its validation set's folder."""
    import json

    out = tmp_path_factory.mktemp("runtimes")
    config = json.loads((detecting_run / "config.json").read_text())
    data = Path(config["train"]["data"])
    model, report = load_model(detecting_run / "best.pt")
    imgsz = report.imgsz
    fp32 = export_onnx(model.eval().fuse(), out / "fp32.onnx", imgsz=imgsz, class_names=report.class_names, fuse=False)
    records = load_dataset(data)["train"].records
    int8 = quantize_onnx(
        fp32, out / "int8.onnx", CalibrationImages(records, imgsz, count=8), nodes_to_exclude=default_float_nodes(fp32)
    )
    return {"fp32": fp32, "int8": int8, "data": data}


def _matched(reference, other, iou: float = 0.5) -> tuple[int, np.ndarray, np.ndarray]:
    """Greedy same-class matches of `other`'s detections to `reference`'s: (count, box |Δ| px, score |Δ|)."""
    if len(reference.boxes) == 0 or len(other.boxes) == 0:
        return 0, np.zeros(0), np.zeros(0)
    ious = box_iou_numpy(reference.boxes, other.boxes)
    allowed = reference.class_ids[:, None] == other.class_ids[None, :]
    match = greedy_match(ious, np.argsort(-reference.scores, kind="stable"), iou, allowed=allowed)
    rows, columns = match.pairs[:, 0], match.pairs[:, 1]
    box_error = np.abs(reference.boxes[rows] - other.boxes[columns]).max(axis=1)
    return len(rows), box_error, np.abs(reference.scores[rows] - other.scores[columns])


def test_auto_uses_onnxruntime_with_one_log_line_where_openvino_cannot_load(
    detector_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def missing():
        raise ImportError("No module named 'openvino'")

    monkeypatch.setattr(runtimes, "_openvino_core", missing)
    monkeypatch.delenv(runtimes.RUNTIME_ENV, raising=False)
    runtimes._log_fallback_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="backend.runtimes"):
        first = Predictor.from_path(detector_models["int8"])
        second = Predictor.from_path(detector_models["fp32"])
    assert (first.engine, second.engine) == ("onnxruntime", "onnxruntime")
    assert first.runtime_label == "onnxruntime"
    fallbacks = [record for record in caplog.records if "run in onnxruntime" in record.getMessage()]
    assert len(fallbacks) == 1 and "not installed" in fallbacks[0].getMessage()
    with pytest.raises(runtimes.RuntimeUnavailable, match="not installed"):
        Predictor.from_path(detector_models["int8"], runtime="openvino")
    with pytest.raises(ValueError, match="unknown runtime"):
        Predictor.from_path(detector_models["int8"], runtime="tensorrt")


@needs_openvino
def test_auto_picks_openvino_and_the_environment_can_override_it(
    detector_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(runtimes.RUNTIME_ENV, raising=False)
    predictor = Predictor.from_path(detector_models["int8"])
    assert (predictor.engine, predictor.runtime_label) == ("openvino", "OpenVINO")
    monkeypatch.setenv(runtimes.RUNTIME_ENV, "onnxruntime")
    assert Predictor.from_path(detector_models["int8"]).engine == "onnxruntime"


@needs_openvino
def test_bf16_is_refused_in_words_where_the_cpu_has_no_native_bf16(detector_models: dict[str, Path]) -> None:
    if runtimes.native_bf16():
        predictor = Predictor.from_path(detector_models["fp32"], runtime="openvino", compute="bf16")
        assert predictor.runtime_label == "OpenVINO bf16"
    else:
        with pytest.raises(runtimes.RuntimeUnavailable, match="no native bfloat16"):
            Predictor.from_path(detector_models["fp32"], runtime="openvino", compute="bf16")
    with pytest.raises(runtimes.RuntimeUnavailable, match="OpenVINO only"):
        Predictor.from_path(detector_models["fp32"], runtime="onnxruntime", compute="bf16")


@needs_openvino
@pytest.mark.parametrize(
    ("kind", "box_px", "score", "map_points"),
    [
        # FP32: the same arithmetic up to summation order.
        ("fp32", 0.05, 1e-4, 0.1),
        # INT8: both run the same QDQ graph, but each fuses and rounds its own way (onnxruntime's U8S8 kernels
        # against OpenVINO's low-precision transformations).
        ("int8", 2.0, 0.03, 2.0),
    ],
)
def test_openvino_agrees_with_onnxruntime(
    detector_models: dict[str, Path], kind: str, box_px: float, score: float, map_points: float
) -> None:
    dataset = load_dataset(detector_models["data"])["val"]
    paths = [str(record.path) for record in dataset.records]
    shown = {
        name: Predictor.from_path(detector_models[kind], runtime=name, postprocess=SHOWN, threads=1).predict(paths)
        for name in ("onnxruntime", "openvino")
    }
    reference_count = sum(len(item.boxes) for item in shown["onnxruntime"])
    assert reference_count >= len(paths), "the detector must find objects for the comparison to mean anything"
    for image, (reference, other) in enumerate(zip(shown["onnxruntime"], shown["openvino"])):
        count, box_error, score_error = _matched(reference, other)
        # Every detection has its counterpart, except one sitting right at the 0.25 threshold in one runtime.
        assert abs(len(reference.boxes) - len(other.boxes)) <= 1, image
        assert count >= min(len(reference.boxes), len(other.boxes)) - 1, image
        assert box_error.max(initial=0.0) <= box_px, (image, box_error)
        assert score_error.max(initial=0.0) <= score, (image, score_error)
    maps = {}
    for name in ("onnxruntime", "openvino"):
        predictor = Predictor.from_path(detector_models[kind], runtime=name, postprocess=EVAL_POSTPROCESS, threads=1)
        maps[name] = evaluate_detections(dataset, predictor.predict(paths)).metrics["mAP50-95"]
    assert maps["onnxruntime"] > 0.2
    assert abs(maps["openvino"] - maps["onnxruntime"]) * 100 <= map_points, maps


@needs_openvino
def test_openvino_outputs_do_not_change_under_a_later_call(detector_models: dict[str, Path]) -> None:
    """The arrays OpenVINO returns are views of its request's buffers; the session must hand out copies."""
    session = runtimes.open_onnx(detector_models["fp32"], runtime="openvino", threads=1)
    rng = np.random.default_rng(0)
    first_input, second_input = (rng.random((1, 3, 96, 96), dtype=np.float32) for _ in range(2))
    first = session.run(None, {"images": first_input})
    kept = [array.copy() for array in first]
    session.run(None, {"images": second_input})
    for before, after in zip(kept, first):
        np.testing.assert_array_equal(before, after)


@needs_openvino
def test_openvino_ir_export_runs_like_the_onnx(detector_models: dict[str, Path], tmp_path: Path) -> None:
    import openvino

    xml = runtimes.save_openvino_ir(detector_models["int8"], tmp_path / "model_int8.xml")
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    batch = np.random.default_rng(1).random((1, 3, 96, 96), dtype=np.float32)
    compiled = openvino.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    from_ir = compiled.create_infer_request().infer({"images": batch})
    from_onnx = runtimes.open_onnx(detector_models["int8"], runtime="openvino", threads=1).run(None, {"images": batch})
    for index, output in enumerate(compiled.outputs):
        np.testing.assert_allclose(from_ir[output], from_onnx[index], atol=1e-4)


@pytest.mark.parametrize("runtime", ["onnxruntime", pytest.param("openvino", marks=needs_openvino)])
def test_a_serialized_model_opens_like_its_file(runtime: str, tmp_path: Path) -> None:
    """The sensitivity scan hands its one-layer variants over as bytes: they run as the same model from a file."""
    from backend.models import build_model

    path = export_onnx(build_model("s", 3).eval(), tmp_path / "model.onnx", imgsz=64)
    batch = {"images": np.random.default_rng(2).random((2, 3, 64, 64), dtype=np.float32)}
    from_file = runtimes.open_onnx(path, runtime=runtime, threads=1).run(None, batch)
    from_bytes = runtimes.open_onnx(path.read_bytes(), runtime=runtime, threads=1)
    assert from_bytes.runtime == runtime and not list(Path(tempfile.gettempdir()).glob("yolodex-onnx-*"))
    for expected, got in zip(from_file, from_bytes.run(None, batch), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
