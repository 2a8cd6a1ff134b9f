"""The Pokédex page under AppTest: the guidance without a model, an uploaded photo's boxes and dex entry cards, the
FP32/INT8 comparison, and a bad upload. The model is a tiny real export (tests/test_export.py's spread-score
detector) placed in a run folder the way training and quantization leave it."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from backend.export.onnx_export import export_onnx
from backend.inference import Predictor
from backend.models.yolo_nas import build_model
from backend.pokedex import MAX_CARD_CROPS, detect
from backend.settings import Settings
from backend.store.db import init_db, session_scope
from backend.store.models import ensure_class, get_or_create_project
from tests.labelstudio_fixture import free_port
from tests.test_export import CLASS_NAMES, detector_with_spread_scores
from tests.test_pokedex import CANCELLED_AT_EPOCH_0, smooth_photo, write_run

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "pages" / "pokedex.py"
IMGSZ = 128
DESCRIPTIONS = {"bulbasaur": "A strange seed.", "charmander": "Its tail burns.", "squirtle": "Shoots water."}


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
    assert any(text.startswith("model run ") and " ms · total " in text for text in shown)


def test_compare_shows_fp32_and_int8_latencies(run_with_models):
    app = start()
    app.file_uploader(key="pokedex_upload").set_value(("photo.png", png_bytes(), "image/png")).run()
    app.toggle(key="pokedex_compare").set_value(True).run()
    assert not app.exception, [exception.value for exception in app.exception]
    metrics = {metric.label: metric.value for metric in app.metric}
    assert set(metrics) == {"FP32 model run", "FP32 total", "INT8 model run", "INT8 total"}
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
    labels = picker.options  # "run · INT8 ONNX (...) · mAP50-95 0.405"
    assert {label.split(" · ")[0] for label in labels} == {"first", "newer"}  # no 0-epoch run, no other project's
    (reason,) = [caption.value for caption in app.caption if caption.value.startswith("Default: ")]
    assert "first · INT8" in reason and "best validation mAP50-95 0.410 of 2 trained runs" in reason
    assert "within the 1.0-point budget of FP32" in reason


@pytest.fixture(scope="module")
def silent_model(tmp_path_factory) -> Path:
    """A fresh (untrained) detector: every score is the class prior, about 0.01, below the slider's lowest value."""
    folder = tmp_path_factory.mktemp("silent")
    return export_onnx(build_model("s", len(CLASS_NAMES)).eval(), folder / "model.onnx", imgsz=IMGSZ,
                       class_names=CLASS_NAMES)  # fmt: skip


@pytest.mark.parametrize("model_map", [0.35, 0.001])
def test_the_empty_result_hint_at_the_lowest_threshold(storage, silent_model, model_map):
    add_project(storage, "Starters", CLASS_NAMES)
    write_run(storage.runs_dir, "run", CLASS_NAMES, best_map=model_map, quant=(model_map, model_map, 0.5),
              onnx=silent_model)  # fmt: skip
    app = start()
    slider = app.slider(key="pokedex_conf")
    slider.set_value(slider.min).run()
    app.file_uploader(key="pokedex_upload").set_value(("photo.png", png_bytes(), "image/png")).run()
    assert not app.exception, [exception.value for exception in app.exception]

    (hint,) = [info.value for info in app.info if info.value.startswith("Nothing found")]
    assert "lower" not in hint  # the threshold is already at its lowest
    if model_map < 0.05:
        assert f"mAP50-95 {model_map:.3f}" in hint and "Train it longer or on more labeled images" in hint
    else:
        assert "lowest threshold (0.05)" in hint and "barely learned" not in hint
    assert any("per-class NMS at IoU 0.7 (as in the evaluation)" in caption.value for caption in app.caption)
