"""The Pokédex page under AppTest: the guidance without a model, an uploaded photo's boxes and dex entry cards, the
FP32/INT8 comparison (each model warmed up once when it loads), a bad upload, each model's validation mAP50 in the
model list and the notice on a model still learning. The model is a tiny real export (tests/test_export.py's
spread-score detector) placed in a run folder the way training and quantization leave it; its evaluations are real
(`evaluate_detections` of its own predictions on three photos against ground truth made for the test)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from backend.data.records import DetectionSet, ImageRecord, LoadReport
from backend.evaluation.coco_eval import evaluate_detections
from backend.export.onnx_export import export_onnx
from backend.inference import Predictor
from backend.models.yolo_nas import build_model
from backend.pokedex import MAX_CARD_CROPS, STILL_LEARNING_MAP50, detect, percent
from backend.runtimes import resolve_runtime, runtime_label
from backend.settings import Settings
from backend.store.db import init_db, session_scope
from backend.store.models import ensure_class, get_or_create_project
from backend.training.engine import EVAL_POSTPROCESS
from tests.labelstudio_fixture import free_port
from tests.test_export import CLASS_NAMES, detector_with_spread_scores
from tests.test_pokedex import CANCELLED_AT_EPOCH_0, huge_png, smooth_photo, write_run

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "pages" / "pokedex.py"
IMGSZ = 128
DESCRIPTIONS = {"bulbasaur": "A strange seed.", "charmander": "Its tail burns.", "squirtle": "Shoots water."}

# The runtime that runs ONNX models here (docs/runtimes.md): the page names it beside every latency.
RUNTIME = runtime_label(resolve_runtime("auto"))
COMPARE_METRICS = {f"FP32 model run ({RUNTIME})", "FP32 total", f"INT8 model run ({RUNTIME})", "INT8 total"}


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    return export_onnx(detector_with_spread_scores(), folder / "model.onnx", imgsz=IMGSZ, class_names=CLASS_NAMES)


@pytest.fixture
def storage(tmp_path, monkeypatch) -> Settings:
    monkeypatch.setenv("YOLODEX_STORAGE", str(tmp_path))
    monkeypatch.setenv("YOLODEX_LS_PORT", str(free_port()))
    return Settings.from_env({"YOLODEX_STORAGE": str(tmp_path)})


@pytest.fixture
def run_with_models(storage, onnx_model) -> Path:
    """A run folder with config.json and both ONNX files (the same FP32 graph twice: the page's wiring is under test,
    not quantization), and a project whose classes are the model's."""
    run = storage.runs_dir / "run-1"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {"size": "s", "imgsz": IMGSZ}, "class_names": CLASS_NAMES}))
    shutil.copy(onnx_model, run / "model_fp32.onnx")
    shutil.copy(onnx_model, run / "model_int8.onnx")
    with session_scope(init_db(storage.database_url)) as session:
        project = get_or_create_project(session, "Starters")
        for number, name in zip((1, 4, 7), CLASS_NAMES):
            ensure_class(session, project, name, dex_number=number, description=DESCRIPTIONS[name])
    return run


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth_photo((200, 120))).save(buffer, "PNG")
    return buffer.getvalue()


def texts(app: AppTest) -> list[str]:
    return [element.value for element in [*app.markdown, *app.caption, *app.info, *app.warning, *app.error]]


def start() -> AppTest:
    app = AppTest.from_file(str(PAGE), default_timeout=120).run()
    assert not app.exception, [exception.value for exception in app.exception]
    return app


def test_without_a_model_the_page_says_to_train_and_quantize(storage):
    app = start()
    (message,) = [info for info in app.info if "No model yet" in info.value]
    assert "**Train** page" in message.value and "**Quantize** page" in message.value
    assert not app.file_uploader  # nothing to upload to yet


def test_upload_shows_boxes_and_one_card_per_detection(run_with_models):
    app = start()
    assert app.selectbox(key="pokedex_model_Starters").value == str(run_with_models / "model_int8.onnx")
    app.slider(key="pokedex_conf").set_value(0.85).run()
    photo = png_bytes()
    app.file_uploader(key="pokedex_upload").set_value(("photo.png", photo, "image/png")).run()
    assert not app.exception, [exception.value for exception in app.exception]

    expected = detect(Predictor.from_path(run_with_models / "model_int8.onnx"), photo, 0.85)
    assert 0 < len(expected) <= MAX_CARD_CROPS
    main, *crops = app.image
    (caption,) = main.captions
    assert caption.startswith(f"photo.png · 200×120 px · {len(expected)} detections above 0.85")
    assert len(crops) == len(expected)  # one card (with its crop) per detection

    shown = texts(app)
    numbers = {"bulbasaur": 1, "charmander": 4, "squirtle": 7}
    titles = [text for text in shown if text.startswith("**No. ")]
    confidences = [text for text in shown if text.startswith("Confidence: ")]
    names = [CLASS_NAMES[int(class_id)] for class_id in expected.class_ids]
    assert titles == [f"**No. {numbers[name]:03d} · {name}**" for name in names]
    assert confidences == [f"Confidence: **{score:.1%}**" for score in expected.scores]
    assert set(names) <= {name for name in DESCRIPTIONS if DESCRIPTIONS[name] in shown}
    assert any(text.startswith("model run ") and f" ms in {RUNTIME} · total " in text for text in shown)


def test_compare_shows_fp32_and_int8_latencies(run_with_models):
    app = start()
    app.file_uploader(key="pokedex_upload").set_value(("photo.png", png_bytes(), "image/png")).run()
    app.toggle(key="pokedex_compare").set_value(True).run()
    assert not app.exception, [exception.value for exception in app.exception]
    metrics = {metric.label: metric.value for metric in app.metric}
    assert set(metrics) == COMPARE_METRICS
    for value in metrics.values():
        assert value.endswith(" ms") and float(value.removesuffix(" ms")) >= 0
    fp32, int8 = (image.captions[0] for image in app.image[:2])
    assert fp32.startswith("FP32: ") and int8.startswith("INT8: ")
    assert fp32.removeprefix("FP32") == int8.removeprefix("INT8")  # the same graph finds the same boxes
    assert any("as fast as FP32" in text for text in texts(app))


def test_compare_without_a_pair_says_so(run_with_models):
    (run_with_models / "model_fp32.onnx").unlink()
    app = start()
    app.file_uploader(key="pokedex_upload").set_value(("photo.png", png_bytes(), "image/png")).run()
    app.toggle(key="pokedex_compare").set_value(True).run()
    assert any("no FP32 and INT8 pair" in message.value for message in app.info)
    assert not app.metric


def test_a_file_that_is_not_an_image_is_a_clear_error(run_with_models):
    app = start()
    app.file_uploader(key="pokedex_upload").set_value(("broken.png", b"not a picture", "image/png")).run()
    assert not app.exception
    (error,) = app.error
    assert "could not read 'broken.png'" in error.value


def test_a_damaged_model_file_is_one_error_with_the_way_out(run_with_models):
    for name in ("model_fp32.onnx", "model_int8.onnx"):  # cut short, as an interrupted copy leaves it
        model = run_with_models / name
        model.write_bytes(model.read_bytes()[:5000])
    app = start()
    assert not app.exception
    (error,) = app.error
    assert "is not a valid ONNX model (" in error.value and "Pick another model above" in error.value
    assert "DecodeError" not in error.value


def test_a_small_png_with_a_huge_picture_is_refused_not_decoded(run_with_models, tmp_path):
    bomb = huge_png(tmp_path / "bomb.png", 13000, 13000)  # 519 KB; decoding it took 2.2 GB
    app = start()
    app.file_uploader(key="pokedex_upload").set_value(("bomb.png", bomb.read_bytes(), "image/png")).run()
    assert not app.exception
    (error,) = app.error
    assert error.value.startswith("could not read 'bomb.png': 13000x13000 is 169 megapixels, over the 50 MP")


def add_project(storage: Settings, name: str, classes: list[str]) -> None:
    with session_scope(init_db(storage.database_url)) as session:
        project = get_or_create_project(session, name)
        for number, class_name in enumerate(classes, start=1):
            ensure_class(session, project, class_name, dex_number=number)


def test_the_default_is_the_best_model_of_the_current_project(storage, onnx_model):
    """Several runs of the project (the newest one worse, one cancelled in its first epoch) and a better run of
    another project: the default is the project's best validation mAP, its INT8 model within the budget."""
    add_project(storage, "Starters", CLASS_NAMES)
    add_project(storage, "Raccoons", ["raccoon"])
    runs = storage.runs_dir
    write_run(runs, "first", CLASS_NAMES, best_map=0.41, quant=(0.41, 0.405, 1.0), onnx=onnx_model, age_s=300)
    write_run(runs, "newer", CLASS_NAMES, best_map=0.12, quant=(0.12, 0.118, 0.5), onnx=onnx_model, age_s=100)
    write_run(runs, "cancelled", CLASS_NAMES, events=CANCELLED_AT_EPOCH_0, checkpoint="last.pt", age_s=0)
    write_run(runs, "raccoons", ["raccoon"], best_map=0.9, quant=(0.9, 0.9, 0.5), onnx=onnx_model, age_s=0)

    app = AppTest.from_file(str(PAGE), default_timeout=120)
    app.query_params["project"] = "Starters"
    app.run()
    assert not app.exception, [exception.value for exception in app.exception]

    picker = app.selectbox(key="pokedex_model_Starters")
    assert picker.value == str(runs / "first" / "model_int8.onnx")
    labels = picker.options  # "run · INT8 ONNX (...) · mAP50 not measured (mAP50-95 0.405)": a report without mAP50
    assert {label.split(" · ")[0] for label in labels} == {"first", "newer"}  # no 0-epoch run, no other project's
    (reason,) = [caption.value for caption in app.caption if caption.value.startswith("Default: ")]
    assert "first · INT8" in reason and "best validation mAP50-95 0.410 of 2 trained runs" in reason
    assert "within the 1.0-point budget of FP32" in reason


# ----------------------------------------------------------------------------------------------------------------
# Each model's validation mAP50, and a model still learning
# ----------------------------------------------------------------------------------------------------------------

TINY = 8  # px: a ground-truth box this small matches none of the detector's boxes (about 40 px) at IoU 0.5


def evaluate_model(onnx: Path, folder: Path, ground_truth: str) -> dict:
    """A real evaluation of `onnx` on three photos (as eval.json holds it), against ground truth made for the test:
    "own": the model's own detections above 0.5 (so it finds nearly all of them); "quarter": the five best
    detections of the first photo and fifteen 8-px boxes nothing can match (so it finds five of twenty)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(3):
        paths.append(folder / f"val_{seed}.png")
        Image.fromarray(smooth_photo((200, 120), seed=seed)).save(paths[-1])
    found = Predictor.from_path(onnx, postprocess=EVAL_POSTPROCESS).predict(paths)  # the training's evaluation
    records = []
    for index, (path, detections) in enumerate(zip(paths, found)):
        if ground_truth == "own":
            boxes, labels = detections.boxes[detections.scores > 0.5], detections.class_ids[detections.scores > 0.5]
        else:
            tiny = np.array([[20 + 30 * k, 50, 20 + 30 * k + TINY, 50 + TINY] for k in range(5)], dtype=np.float32)
            best = 5 if index == 0 else 0
            boxes = np.concatenate([detections.boxes[:best], tiny])
            labels = np.concatenate([detections.class_ids[:best], np.arange(5) % len(CLASS_NAMES)])
        records.append(ImageRecord(path, index + 1, 200, 120, boxes.reshape(-1, 4), labels.astype(np.int64)))
    dataset = DetectionSet(records, CLASS_NAMES, [1, 2, 3], LoadReport())
    return evaluate_detections(dataset, found).to_dict()


def evaluated_run(runs_dir: Path, name: str, onnx: Path, evaluation: dict | None) -> Path:
    """A run as training leaves it before quantization: config.json, eval.json (`evaluation`), the FP32 export."""
    run = runs_dir / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {"size": "s", "imgsz": IMGSZ}, "class_names": CLASS_NAMES}))
    shutil.copy(onnx, run / "model_fp32.onnx")
    if evaluation is not None:
        (run / "eval.json").write_text(json.dumps(evaluation))
    return run


@pytest.fixture(scope="module")
def quarter_evaluation(onnx_model, tmp_path_factory) -> dict:
    evaluation = evaluate_model(onnx_model, tmp_path_factory.mktemp("quarter"), "quarter")
    assert evaluation["metrics"]["recall"] == 0.25  # five of twenty, by construction
    assert evaluation["metrics"]["mAP50"] < STILL_LEARNING_MAP50
    return evaluation


def continue_links(app: AppTest) -> list[tuple[str, str, str]]:
    return [(link.proto.label, link.proto.page, link.proto.query_string) for link in app.get("page_link")]


def test_each_model_shows_its_map50_and_a_model_still_learning_a_notice(storage, onnx_model, quarter_evaluation):
    add_project(storage, "Starters", CLASS_NAMES)
    evaluated_run(storage.runs_dir, "learning", onnx_model, quarter_evaluation)
    evaluated_run(storage.runs_dir, "unevaluated", onnx_model, None)  # an export from elsewhere, never evaluated
    map50 = quarter_evaluation["metrics"]["mAP50"]

    app = start()
    picker = app.selectbox(key="pokedex_model_Starters")
    assert picker.value == str(storage.runs_dir / "learning" / "model_fp32.onnx")  # the evaluated run
    assert sorted(picker.options) == [
        f"learning · FP32 ONNX (model_fp32.onnx, {(onnx_model.stat().st_size / 1e6):.1f} MB) · mAP50 {map50:.3f}",
        f"unevaluated · FP32 ONNX (model_fp32.onnx, {(onnx_model.stat().st_size / 1e6):.1f} MB) · not evaluated",
    ]
    (notice,) = [warning.value for warning in app.warning if warning.value.startswith("Still learning")]
    assert notice.startswith(
        f"Still learning: it finds 25% of the objects in its validation photos (confidence 0.25 or more; validation "
        f"mAP50 {map50:.3f}, under 0.3)."
    )
    # The link continues this run on the Train page, in this tab (a page link, not a Markdown one).
    assert continue_links(app) == [("Continue training learning", "train", "continue=learning")]

    picker.set_value(str(storage.runs_dir / "unevaluated" / "model_fp32.onnx")).run()
    assert not [warning for warning in app.warning if warning.value.startswith("Still learning")]
    assert not continue_links(app)


def test_a_model_that_has_learned_carries_no_notice(storage, onnx_model, tmp_path):
    add_project(storage, "Starters", CLASS_NAMES)
    evaluation = evaluate_model(onnx_model, tmp_path / "val", "own")
    map50 = evaluation["metrics"]["mAP50"]
    assert map50 >= STILL_LEARNING_MAP50 and evaluation["metrics"]["recall"] > 0.9
    evaluated_run(storage.runs_dir, "ready", onnx_model, evaluation)
    app = start()
    (label,) = app.selectbox(key="pokedex_model_Starters").options
    assert label.endswith(f"· mAP50 {map50:.3f}")
    assert not [warning for warning in app.warning if "Still learning" in warning.value]
    assert not continue_links(app)


@pytest.fixture(scope="module")
def silent_model(tmp_path_factory) -> Path:
    """A fresh (untrained) detector: every score is the class prior, about 0.01, below the slider's lowest value."""
    folder = tmp_path_factory.mktemp("silent")
    return export_onnx(
        build_model("s", len(CLASS_NAMES)).eval(), folder / "model.onnx", imgsz=IMGSZ, class_names=CLASS_NAMES
    )


def test_an_empty_result_from_a_model_still_learning_says_so(storage, silent_model, tmp_path):
    """The issue's case: a model that finds nothing on any validation photo, and nothing on the user's photo."""
    add_project(storage, "Starters", CLASS_NAMES)
    evaluation = evaluate_model(silent_model, tmp_path / "val", "quarter")
    assert evaluation["metrics"]["recall"] == 0.0
    evaluated_run(storage.runs_dir, "fresh", silent_model, evaluation)
    app = start()
    slider = app.slider(key="pokedex_conf")
    slider.set_value(slider.min).run()
    app.file_uploader(key="pokedex_upload").set_value(("photo.png", png_bytes(), "image/png")).run()
    assert not app.exception, [exception.value for exception in app.exception]

    (hint,) = [info.value for info in app.info if info.value.startswith("Nothing found")]
    assert hint == (
        f"Nothing found above 0.05: this model is still learning (validation mAP50 "
        f"{evaluation['metrics']['mAP50']:.3f}, finding {percent(0.0)} of the objects of its validation photos). "
        "Continue its training, or label more photos."
    )  # no "lower the threshold": it is at its lowest
    # The link under the notice and under the empty result: both continue this run.
    assert set(continue_links(app)) == {("Continue training fresh", "train", "continue=fresh")}
    assert any("per-class NMS at IoU 0.7 (as in the evaluation)" in caption.value for caption in app.caption)


def test_an_empty_result_from_a_model_never_evaluated_suggests_another_photo(storage, silent_model):
    add_project(storage, "Starters", CLASS_NAMES)
    evaluated_run(storage.runs_dir, "run", silent_model, None)
    app = start()
    slider = app.slider(key="pokedex_conf")
    slider.set_value(slider.min).run()
    app.file_uploader(key="pokedex_upload").set_value(("photo.png", png_bytes(), "image/png")).run()
    (hint,) = [info.value for info in app.info if info.value.startswith("Nothing found")]
    assert "lowest threshold (0.05)" in hint and "still learning" not in hint and "lower" not in hint
    assert not continue_links(app)


# ----------------------------------------------------------------------------------------------------------------
# Latency: each model is warmed up once when it loads
# ----------------------------------------------------------------------------------------------------------------


def test_each_loaded_model_is_warmed_up_once_before_any_timing(run_with_models, monkeypatch):
    """The page's timings are the steady state's: the cached predictor ran once on a blank image when it loaded,
    and never again however often the page reruns (the predictor itself is real; the calls are only counted)."""
    warmed: list[int] = []  # the predictors warmed, by identity
    original = Predictor.warm_up

    def counted(self: Predictor) -> float:
        warmed.append(id(self))
        return original(self)

    monkeypatch.setattr(Predictor, "warm_up", counted)
    app = start()
    assert len(warmed) == 1  # the default INT8 model, loaded with the page, warmed before any photo
    app.file_uploader(key="pokedex_upload").set_value(("photo.png", png_bytes(), "image/png")).run()
    app.slider(key="pokedex_conf").set_value(0.5).run()  # reruns that time the model again: no new warm-up
    assert len(warmed) == 1
    app.toggle(key="pokedex_compare").set_value(True).run()  # loads the FP32 model: its own warm-up, once
    app.slider(key="pokedex_conf").set_value(0.6).run()
    assert not app.exception, [exception.value for exception in app.exception]
    assert len(warmed) == len(set(warmed)) == 2  # two predictors, each warmed once
    assert {metric.label for metric in app.metric} == COMPARE_METRICS
    assert any("each model warmed up once when it loaded" in caption.value for caption in app.caption)
