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
from backend.pokedex import MAX_CARD_CROPS, detect
from backend.settings import Settings
from backend.store.db import init_db, session_scope
from backend.store.models import ensure_class, get_or_create_project
from tests.labelstudio_fixture import free_port
from tests.test_export import CLASS_NAMES, detector_with_spread_scores
from tests.test_pokedex import smooth_photo

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
    (message,) = app.info
    assert "No model yet" in message.value
    assert "**Train** page" in message.value and "**Quantize** page" in message.value
    assert not app.file_uploader  # nothing to upload to yet


def test_upload_shows_boxes_and_one_card_per_detection(run_with_models):
    app = start()
    assert app.selectbox(key="pokedex_model").value == str(run_with_models / "model_int8.onnx")  # newest INT8
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
