"""The Pokédex backend on a real (tiny, exported) detector: boxes in the displayed orientation of any photo, fast
large JPEGs decoded at reduced scale, the drawing, and dex entries matched to projects by class name."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from backend.export.onnx_export import export_onnx
from backend.inference import MAX_DECODE_PIXELS, ModelFileError, Predictor
from backend.inference import decode_photo as decode_photo_capped
from backend.pokedex import (
    DEFAULT_DISPLAY_MAX_SIDE,
    MAX_CARD_CROPS,
    decode_photo,
    detect,
    dex_entries,
    draw_detections,
    palette_colour,
    plain_entries,
)
from backend.processing import ImageLoadError, PostprocessConfig, load_image
from backend.store.db import init_db, session_scope
from backend.store.models import ensure_class, get_or_create_project
from tests.conftest import REPO_ROOT
from tests.test_export import CLASS_NAMES, detector_with_spread_scores

IMGSZ = 128
CONF = 0.5
EXIF_ORIENTATION = 0x0112


def smooth_photo(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 of `size` (W, H): coarse colour blobs upscaled, so any two good downscales agree closely."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3)).astype(np.uint8)
    return cv2.resize(coarse, size, interpolation=cv2.INTER_CUBIC)


def encode(pixels: np.ndarray, image_format: str, orientation: int | None = None, **options) -> bytes:
    image = Image.fromarray(pixels)
    if orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def with_conf(predictor: Predictor, conf: float) -> Predictor:
    return dataclasses.replace(predictor, postprocess=PostprocessConfig(conf_threshold=conf))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return export_onnx(
        detector_with_spread_scores(),
        tmp_path_factory.mktemp("pokedex") / "model.onnx",
        imgsz=IMGSZ,
        class_names=CLASS_NAMES,
    )


@pytest.fixture(scope="module")
def predictor(model_path) -> Predictor:
    return Predictor.from_path(model_path)


def test_detect_gives_the_predictors_boxes_in_original_pixels(predictor):
    pixels = smooth_photo((200, 120))
    data = encode(pixels, "PNG")
    result = detect(predictor, data, CONF)

    (expected,) = with_conf(predictor, CONF).predict([pixels])
    assert len(result) == len(expected) > 0
    np.testing.assert_array_equal(result.boxes, expected.boxes)
    np.testing.assert_array_equal(result.scores, expected.scores)
    np.testing.assert_array_equal(result.class_ids, expected.class_ids)
    assert (result.scores > CONF).all()
    assert result.original_size == (120, 200)
    assert result.display.size == (200, 120) and result.display_scale == 1.0  # never upscaled for display
    assert len(result.crops) == min(len(result), MAX_CARD_CROPS)
    assert set(result.timings) == {"decode_ms", "infer_ms", "predict_ms", "draw_ms", "total_ms"}
    assert 0 < result.timings["infer_ms"] <= result.timings["predict_ms"] <= result.timings["total_ms"]
    assert predictor.postprocess.conf_threshold != CONF  # the shared predictor was not changed


def test_threshold_filters(predictor):
    data = encode(smooth_photo((200, 120)), "PNG")
    low, high = detect(predictor, data, 0.3), detect(predictor, data, 0.8)
    assert len(high) < len(low)
    assert (high.scores > 0.8).all()


def test_rotated_exif_jpeg_gives_boxes_in_the_displayed_orientation(predictor):
    shown = smooth_photo((200, 120), seed=3)  # what a viewer shows: landscape 200x120
    # Orientation 6 means "rotate 90° clockwise to display", so the file stores the picture turned the other way.
    stored = np.ascontiguousarray(np.rot90(shown, k=1))  # 120 wide, 200 high
    data = encode(stored, "JPEG", orientation=6, quality=95)
    result = detect(predictor, data, CONF)

    assert result.original_size == (120, 200)
    assert result.display.size == (200, 120)
    decoded = load_image(data)
    assert np.abs(decoded.astype(int) - shown).mean() < 3  # JPEG noise only: the decode is upright
    (expected,) = with_conf(predictor, CONF).predict([decoded])
    assert len(result) == len(expected) > 0
    np.testing.assert_allclose(result.boxes, expected.boxes, atol=1e-4)
    assert (result.boxes[:, [0, 2]] <= 200).all() and (result.boxes[:, [1, 3]] <= 120).all()
    assert (result.boxes[:, 2] > 120).any()  # some box lies where only the landscape picture has pixels


def test_large_jpeg_is_decoded_at_reduced_scale(predictor):
    full = smooth_photo((4000, 3000), seed=5)
    data = encode(full, "JPEG", quality=90)
    pixels, original_size = decode_photo(data, DEFAULT_DISPLAY_MAX_SIDE)
    assert original_size == (3000, 4000)
    assert pixels.shape == (750, 1000, 3)  # libjpeg's 1/4 scale: the smallest that keeps 960 px
    reference = cv2.resize(full, (1000, 750), interpolation=cv2.INTER_AREA)
    assert np.abs(pixels.astype(int) - reference).mean() < 3

    result = detect(predictor, data, CONF)
    assert result.original_size == (3000, 4000)
    assert result.display.size == (960, 720) and result.display_scale == pytest.approx(0.24)
    (on_decoded,) = with_conf(predictor, CONF).predict([pixels])
    np.testing.assert_allclose(result.boxes, on_decoded.boxes * 4, rtol=1e-6)  # decoded px → original px
    assert len(result) > 0 and result.boxes[:, 2].max() > 1000  # in original pixels, not decoded ones


def test_large_rotated_jpeg(predictor):
    stored = np.ascontiguousarray(np.rot90(smooth_photo((4000, 3000), seed=6), k=1))  # stored portrait 3000x4000
    result = detect(predictor, encode(stored, "JPEG", orientation=6, quality=85), CONF)
    assert result.original_size == (3000, 4000)
    assert result.display.size == (960, 720)
    assert (result.boxes[:, [0, 2]] <= 4000).all() and (result.boxes[:, [1, 3]] <= 3000).all()


@pytest.mark.parametrize("image_format", ["WEBP", "BMP"])
def test_other_formats(predictor, image_format):
    result = detect(predictor, encode(smooth_photo((160, 96)), image_format), CONF)
    assert result.original_size == (96, 160)


def test_not_an_image_is_a_clear_error(predictor):
    with pytest.raises(ImageLoadError, match=r"could not read .notes\.txt.*JPEG/PNG"):
        detect(predictor, b"hello, this is text", CONF, name="notes.txt")


def test_draw_detections_scales_boxes_and_colours_them():
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    boxes = np.array([[100, 100, 300, 180]], dtype=np.float32)  # original pixels; the image is half size
    draw_detections(image, boxes, ["pikachu 0.93"], [(255, 0, 0)], scale=0.5)
    pixels = np.asarray(image)
    assert tuple(pixels[70, 50]) == (255, 0, 0)  # the left edge of the box, at x = 100 · 0.5
    assert tuple(pixels[70, 100]) == (255, 255, 255)  # inside the box: untouched
    assert tuple(pixels[95, 195]) == (255, 255, 255)  # outside: untouched
    with pytest.raises(ValueError, match="one of each"):
        draw_detections(image, boxes, [], [], scale=1.0)


def test_detect_uses_the_entries_colours(predictor):
    data = encode(smooth_photo((200, 120)), "PNG")
    red = [dataclasses.replace(entry, colour=(255, 0, 0)) for entry in plain_entries(CLASS_NAMES)]
    with_red = detect(predictor, data, 0.7, entries=red)
    with_palette = detect(predictor, data, 0.7)
    assert len(with_red) > 0

    def red_pixels(image: Image.Image) -> int:
        return int((np.asarray(image) == (255, 0, 0)).all(axis=2).sum())

    assert red_pixels(with_red.display) > red_pixels(with_palette.display) + 100


# --- dex entries ---------------------------------------------------------------------------------------------


@pytest.fixture
def engine(tmp_path: Path):
    return init_db(f"sqlite:///{tmp_path / 'yolodex.db'}")


def add_project(engine, name: str, classes: list[tuple[str, int | None, str, str | None]]) -> None:
    with session_scope(engine) as session:
        project = get_or_create_project(session, name)
        for class_name, number, description, colour in classes:
            ensure_class(session, project, class_name, dex_number=number, description=description, colour=colour)


def test_dex_entries_come_from_the_project_with_the_models_classes(engine):
    add_project(engine, "other", [("cat", 1, "meows", None), ("dog", 2, "barks", None)])
    add_project(
        engine,
        "shuffled",
        [
            ("squirtle", 7, "shuffled squirtle", None),
            ("bulbasaur", 1, "shuffled", None),
            ("charmander", 4, "shuffled", None),
        ],
    )
    add_project(
        engine,
        "starters",
        [
            ("bulbasaur", 1, "A strange seed.", "#00ff00"),
            ("charmander", None, "", None),
            ("squirtle", 7, "Shoots water.", "#0000ff"),
        ],
    )
    with session_scope(engine) as session:
        entries = dex_entries(session, CLASS_NAMES)
    assert [entry.project for entry in entries] == ["starters"] * 3  # same names in the same order wins
    assert [(entry.index, entry.number, entry.name) for entry in entries] == [
        (0, 1, "bulbasaur"),
        (1, 2, "charmander"),
        (2, 7, "squirtle"),  # charmander has no number: index + 1
    ]
    assert entries[0].description == "A strange seed." and entries[1].description == ""
    assert entries[0].colour == (0, 255, 0) and entries[1].colour == palette_colour(1)


def test_dex_entries_match_by_name_in_any_order(engine):
    add_project(
        engine,
        "shuffled",
        [
            ("squirtle", 7, "Shoots water.", None),
            ("bulbasaur", 1, "A seed.", None),
            ("charmander", 4, "Burns.", "#ff8000"),
        ],
    )
    with session_scope(engine) as session:
        entries = dex_entries(session, CLASS_NAMES)
    assert [(entry.name, entry.number, entry.description) for entry in entries] == [
        ("bulbasaur", 1, "A seed."),
        ("charmander", 4, "Burns."),
        ("squirtle", 7, "Shoots water."),
    ]
    assert entries[1].colour == (255, 128, 0)


def test_dex_entries_without_a_matching_project_have_the_name_only(engine):
    add_project(engine, "subset", [("bulbasaur", 1, "A seed.", None), ("charmander", 4, "Burns.", None)])
    with session_scope(engine) as session:
        entries = dex_entries(session, CLASS_NAMES)
    assert entries == plain_entries(CLASS_NAMES)
    assert [(entry.number, entry.name, entry.description, entry.project) for entry in entries] == [
        (1, "bulbasaur", "", None),
        (2, "charmander", "", None),
        (3, "squirtle", "", None),
    ]


# ----------------------------------------------------------------------------------------------------------------
# The default model and the post-processing (the empty-result hint: tests/test_model_scores.py)
# ----------------------------------------------------------------------------------------------------------------


def write_run(
    runs_dir: Path,
    name: str,
    class_names: list[str],
    *,
    best_map: float | None = None,
    quant: tuple[float, float, float] | None = None,
    onnx: Path | None = None,
    events: list[dict] | None = None,
    checkpoint: str | None = "best.pt",
    age_s: float = 0.0,
) -> Path:
    """A run folder as training and quantization leave it: config.json, eval.json (`best_map`), metrics.jsonl
    (`events`), a checkpoint file, both ONNX files (copies of `onnx`) and quant_report.json (`quant`: FP32 mAP, INT8
    mAP, budget in points). Every file is dated `age_s` seconds ago (the newest run is the old default)."""
    import json
    import os
    import shutil
    import time

    folder = runs_dir / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"train": {"size": "s", "imgsz": 128, "epochs": 30}, "class_names": class_names})
    )
    if checkpoint:
        (folder / checkpoint).write_bytes(b"not read by the catalog")
    if best_map is not None:
        (folder / "eval.json").write_text(json.dumps({"metrics": {"mAP50-95": best_map}}))
    if events is not None:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    if onnx is not None:
        shutil.copy(onnx, folder / "model_fp32.onnx")
        shutil.copy(onnx, folder / "model_int8.onnx")
    if quant is not None:
        fp32, int8, budget = quant
        report = {
            "chosen": "ptq_selective",
            "budget_points": budget,
            "within_budget": int8 >= fp32 - budget / 100 - 1e-9,
            "models": {"fp32": {"metrics": {"mAP50-95": fp32}}, "ptq_selective": {"metrics": {"mAP50-95": int8}}},
        }
        (folder / "quant_report.json").write_text(json.dumps(report))
    moment = time.time() - age_s
    for path in folder.iterdir():
        os.utime(path, (moment, moment))
    return folder


CANCELLED_AT_EPOCH_0 = [
    {"event": "train_start", "epochs": 30, "steps_per_epoch": 10, "time_budget_s": None},
    {"event": "train_end", "stopped": "cancelled", "epochs_done": 0, "best_map": 0.0, "best_epoch": None},
]


def test_best_model_is_the_best_validation_map_with_int8_within_budget(tmp_path):
    from backend import catalog

    runs_dir = tmp_path / "runs"
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    write_run(runs_dir, "old", CLASS_NAMES, best_map=0.20, quant=(0.20, 0.199, 0.5), onnx=onnx, age_s=300)
    write_run(runs_dir, "better", CLASS_NAMES, best_map=0.41, quant=(0.41, 0.405, 1.0), onnx=onnx, age_s=200)
    write_run(runs_dir, "unquantized", CLASS_NAMES, best_map=0.30, age_s=100)
    write_run(runs_dir, "cancelled", CLASS_NAMES, events=CANCELLED_AT_EPOCH_0, checkpoint="last.pt", age_s=0)
    runs = [catalog.run_info(folder) for folder in sorted(runs_dir.iterdir())]

    choice = catalog.best_model(runs)

    assert choice.model.path == runs_dir / "better" / "model_int8.onnx"
    assert choice.score == pytest.approx(0.405)
    assert choice.reason == (
        "best validation mAP50-95 0.410 of 3 trained runs; INT8 (0.405), within the 1.0-point "
        "budget of FP32 (0.50 points below it)"
    )
    # An INT8 model that scores above its FP32 (noise on a small validation set) is said to be above it.
    noisy = write_run(tmp_path / "noisy", "noisy", CLASS_NAMES, best_map=0.41, quant=(0.41, 0.42, 1.0), onnx=onnx)
    above = catalog.best_model([catalog.run_info(noisy)])
    assert above.reason.endswith("within the 1.0-point budget of FP32 (1.00 points above it)")
    # The run cancelled in its first epoch has no weights to offer: no model, no best mAP of 0.000.
    cancelled = next(run for run in runs if run.name == "cancelled")
    assert not cancelled.trained and cancelled.best_map is None
    assert all(model.run != "cancelled" for model in catalog.list_models(runs=runs))

    # INT8 outside the budget: the same run's FP32 model, and why.
    write_run(runs_dir, "best-but-lossy", CLASS_NAMES, best_map=0.50, quant=(0.50, 0.40, 0.5), onnx=onnx, age_s=50)
    choice = catalog.best_model([catalog.run_info(folder) for folder in runs_dir.iterdir()])
    assert choice.model.path == runs_dir / "best-but-lossy" / "model_fp32.onnx"
    assert "outside the 0.5-point quantization budget" in choice.reason


def test_runs_belong_to_the_project_with_their_classes(engine, tmp_path):
    from backend import catalog
    from backend.settings import Settings

    settings = Settings.from_env({"YOLODEX_STORAGE": str(tmp_path)})
    write_run(settings.runs_dir, "starters", CLASS_NAMES, best_map=0.1)
    write_run(settings.runs_dir, "raccoons", ["raccoon"], best_map=0.6)
    with session_scope(engine) as session:
        for project_name, names in (("Starters", CLASS_NAMES), ("Raccoons", ["raccoon"])):
            project = get_or_create_project(session, project_name)
            for name in names:
                ensure_class(session, project, name)
    runs = catalog.list_runs(settings)
    with session_scope(engine) as session:
        mine = catalog.project_runs(session, settings, "Starters", runs)
    assert [run.name for run in mine] == ["starters"]  # the better raccoon model is not a Starters model


def test_the_pokedex_post_processing_is_the_evaluations():
    from backend.pokedex import nms_text, page_postprocess
    from backend.training.engine import EVAL_POSTPROCESS

    config = page_postprocess(0.4)
    assert config.conf_threshold == 0.4
    assert dataclasses.replace(config, conf_threshold=EVAL_POSTPROCESS.conf_threshold) == EVAL_POSTPROCESS
    assert f"IoU {EVAL_POSTPROCESS.iou_threshold:g}" in nms_text(0.4)


def test_dex_entries_of_the_current_project_come_first(engine):
    add_project(engine, "Starters", [(name, None, f"old {name}", None) for name in CLASS_NAMES])
    add_project(engine, "Copy", [(name, None, f"mine {name}", None) for name in reversed(CLASS_NAMES)])
    with session_scope(engine) as session:
        assert dex_entries(session, CLASS_NAMES)[0].description == "old bulbasaur"  # the oldest, same order
        entries = dex_entries(session, CLASS_NAMES, "Copy")  # the page's project, its classes as a set
    assert [entry.description for entry in entries] == [f"mine {name}" for name in CLASS_NAMES]
    assert {entry.project for entry in entries} == {"Copy"}


# ----------------------------------------------------------------------------------------------------------------
# Hostile files (issue 19): a small PNG that declares 13000x13000 pixels, a corrupt or foreign .onnx
# ----------------------------------------------------------------------------------------------------------------


def huge_png(path: Path, width: int, height: int) -> Path:
    """A real RGB PNG of width x height written row by row (never the whole image in memory): one colour, so 13000 x
    13000 pixels are ~500 KB of file."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row = zlib.compressobj(9), bytes([0]) + bytes([128, 64, 32]) * width
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend.cli", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory) -> Path:
    return huge_png(tmp_path_factory.mktemp("bomb") / "small file, huge picture.png", 13000, 13000)


def test_a_png_over_the_pixel_cap_is_refused_from_its_header_in_little_memory(bomb_png):
    assert bomb_png.stat().st_size < 1_000_000 and MAX_DECODE_PIXELS < 13000 * 13000
    # Peak memory of the decode, in a fresh process (ru_maxrss is a process's high-water mark). Before the cap, this
    # decode took 2.2 GB more than the process had; refused from the header it takes almost nothing.
    probe = (
        "import json, resource, sys\n"
        "from backend.pokedex import decode_photo\n"
        "from backend.processing import ImageLoadError\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    decode_photo(data, 960, name='huge.png'); message = None\n"
        "except ImageLoadError as error:\n"
        "    message = str(error)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'grown_mb': (after - before) / 1024, 'message': message}))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe, str(bomb_png)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    outcome = json.loads(completed.stdout)
    assert outcome["message"] is not None and "13000x13000 is 169 megapixels, over the 50 MP" in outcome["message"]
    assert "'huge.png'" in outcome["message"] and "downscale it" in outcome["message"]
    assert outcome["grown_mb"] < 300  # a generous bound: the whole decode would be over 2000


def test_yolodex_predict_refuses_a_huge_png_in_one_line(model_path, bomb_png, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(smooth_photo((160, 96)), "PNG"))
    completed = run_cli("predict", model_path, bomb_png, "--json")
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert completed.stderr.strip().splitlines() == [completed.stderr.strip()]
    assert completed.stderr.startswith(f"yolodex: error: could not read '{bomb_png}': 13000x13000 is 169 megapixels")
    assert photo.read_bytes() == encode(smooth_photo((160, 96)), "PNG")  # nothing else touched


def test_a_jpeg_over_the_pixel_cap_is_decoded_at_reduced_scale(predictor):
    full = smooth_photo((2000, 1500), seed=7)
    data = encode(full, "JPEG", quality=90)
    cap = 1000 * 750  # a small cap stands in for 50 MP: the same arithmetic without a 60 MP test photo
    pixels, original_size = decode_photo_capped(data, max_pixels=cap)
    assert original_size == (1500, 2000) and pixels.shape == (750, 1000, 3)  # 1/2 scale: the largest that fits
    with pytest.raises(ImageLoadError, match=r"2000x1500 is 3 megapixels, over the 1 MP"):
        decode_photo_capped(encode(full, "PNG"), max_pixels=cap)  # a PNG cannot be decoded smaller: refused


def test_a_corrupt_or_foreign_onnx_is_one_clear_error(model_path, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(smooth_photo((160, 96)), "PNG"))
    random_bytes = tmp_path / "random.onnx"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 3])
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model")
    for path in (random_bytes, truncated, text):
        with pytest.raises(ModelFileError, match=rf"^{path} is not a valid ONNX model \(.+\)$"):
            Predictor.from_path(path)

    foreign = tmp_path / "foreign.onnx"  # a valid ONNX graph that yolodex did not export, with made-up metadata
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "other",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, {"class_names": json.dumps(["a"]), "imgsz": json.dumps([64, 64])})
    onnx.save(model, foreign)
    with pytest.raises(ModelFileError, match="is not a yolodex detector"):
        Predictor.from_path(foreign)

    completed = run_cli("predict", random_bytes, photo)
    assert completed.returncode == 1 and "Traceback" not in completed.stderr and completed.stdout == ""
    assert completed.stderr.startswith(f"yolodex: error: {random_bytes} is not a valid ONNX model (")
    assert len(completed.stderr.strip().splitlines()) == 1
    assert Predictor.from_path(model_path).class_names == list(CLASS_NAMES)  # the good model still loads


def test_predictor_reports_its_stage_timings_and_takes_a_per_call_threshold(predictor):
    pixels = smooth_photo((200, 120), seed=7)
    prediction = predictor.predict_timed([pixels], postprocess=PostprocessConfig(conf_threshold=CONF))
    assert set(prediction.timings) == {"preprocess_ms", "model_ms", "postprocess_ms"}
    assert all(value > 0 for value in prediction.timings.values())
    (expected,) = with_conf(predictor, CONF).predict([pixels])
    (found,) = prediction.detections
    assert len(found) == len(expected) > 0
    np.testing.assert_array_equal(found.boxes, expected.boxes)
    assert predictor.postprocess.conf_threshold != CONF  # the call's threshold did not change the predictor


def test_predictor_maps_a_reduced_decode_to_the_full_size_photo_per_axis(predictor):
    pixels = smooth_photo((101, 61), seed=8)  # e.g. a 403x243 photo decoded at about 1/4: the ratios differ per axis
    (on_pixels,) = with_conf(predictor, CONF).predict([pixels])
    (on_full,) = predictor.predict_timed(
        [pixels], postprocess=PostprocessConfig(conf_threshold=CONF), original_sizes=[(243, 403)]
    ).detections
    assert len(on_full) == len(on_pixels) > 0
    np.testing.assert_allclose(on_full.boxes, on_pixels.boxes * np.array([403 / 101, 243 / 61] * 2), rtol=1e-6)
    with pytest.raises(ValueError, match="original sizes"):
        predictor.predict_timed([pixels], original_sizes=[(243, 403), (1, 1)])


def test_detect_applies_the_threshold_to_a_graph_with_nms_inside(tmp_path):
    graph_conf = 0.2
    path = export_onnx(
        detector_with_spread_scores(),
        tmp_path / "nms.onnx",
        imgsz=IMGSZ,
        class_names=CLASS_NAMES,
        with_nms=True,
        postprocess=PostprocessConfig(conf_threshold=graph_conf),
    )
    nms_predictor = Predictor.from_path(path)
    assert nms_predictor.onnx_has_nms
    data = encode(smooth_photo((200, 120)), "PNG")
    everything = detect(nms_predictor, data, graph_conf)
    strict = detect(nms_predictor, data, 0.6)
    assert (everything.scores <= 0.6).any()  # the graph's own threshold lets lower scores through
    assert len(strict) > 0 and (strict.scores > 0.6).all()
    np.testing.assert_array_equal(strict.boxes, everything.boxes[everything.scores > 0.6])
