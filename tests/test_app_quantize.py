"""The Quantize page (AppTest) on a real quant_report.json of a tiny run, and `report_view`, the page's shaping of
the report.

The run is YOLO-NAS S at 64 px after one epoch on 6 synthetic images (3 for validation), quantized with PTQ: what
is checked is that the page shows the report's values, not that the model is good (its mAP is about 0).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

import backend.jobs.tasks
from backend.data.synthetic import generate_synthetic_dataset
from backend.jobs import api as jobs
from backend.processing import Detections
from backend.quantization import report_view as view
from backend.quantization.pipeline import QuantizeOptions, quantize_run
from backend.settings import Settings
from backend.training.config import TrainConfig
from backend.training.trainer import fit

ROOT = Path(__file__).resolve().parents[1]
PAGE = str(ROOT / "pages" / "quantize.py")
RUN = "tiny"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    """A storage folder with runs/tiny: best.pt, the ONNX files and a real quant_report.json (5 models)."""
    storage = tmp_path_factory.mktemp("quantize_page")
    data = generate_synthetic_dataset(storage / "shapes", num_train=6, num_val=3, image_size=(96, 96), seed=5)
    run_dir = storage / "runs" / RUN
    fit(TrainConfig(data=str(data), imgsz=64, epochs=1, batch_size=2, min_samples=4, num_workers=0), run_dir)
    options = QuantizeOptions(method="ptq", calib_images=4, scan_images=3, scan_layers=(), latency_runs=3)
    quantize_run(run_dir, None, options)
    return storage


@pytest.fixture
def storage(quantized, tmp_path, monkeypatch) -> Settings:
    """A copy of the quantized storage per test (the page and jobs may write into it)."""
    folder = tmp_path / "storage"
    shutil.copytree(quantized, folder, symlinks=True)
    report_file = folder / "runs" / RUN / view.REPORT_FILE
    # The report names absolute paths: point them at this copy, as a moved run folder would be after re-quantizing.
    report_file.write_text(report_file.read_text().replace(str(quantized), str(folder)))
    monkeypatch.setenv("YOLODEX_STORAGE", str(folder))
    monkeypatch.setenv("YOLODEX_LS_PORT", "1")  # nothing listens there: no Label Studio is ever reached
    monkeypatch.setenv("YOLODEX_QUEUE_IMMEDIATE", "1")
    monkeypatch.setattr(backend.jobs.tasks.huey, "immediate", True)
    return Settings.from_env({"YOLODEX_STORAGE": str(folder)})


def report_of(settings: Settings) -> dict:
    return json.loads((settings.runs_dir / RUN / view.REPORT_FILE).read_text())


def page_text(app: AppTest) -> str:
    return " ".join(
        str(element.value) for element in [*app.markdown, *app.caption, *app.info, *app.success, *app.warning]
    )


def open_page(**query: str) -> AppTest:
    app = AppTest.from_file(PAGE, default_timeout=120)
    for key, value in query.items():
        app.query_params[key] = value
    app.run()
    assert not app.exception, [exception.value for exception in app.exception]
    return app


def download_buttons(app: AppTest) -> list:
    return list(app.get("download_button"))


def table_with(app: AppTest, column: str):
    """The page's dataframe that has `column` (AppTest does not expose a read-only dataframe's key)."""
    return next(frame.value for frame in app.dataframe if column in frame.value.columns)


# ------------------------------------------------------------------------------------------------------ report_view
@pytest.mark.slow  # the module fixture trains and quantizes (about a minute)
def test_model_rows_follow_the_report(quantized):
    report = view.read_report(quantized / "runs" / RUN)
    rows = view.model_rows(report)
    assert rows[0]["model"] == "fp32" and {row["model"] for row in rows} == set(report["models"])
    assert [row["model"] for row in rows if row["shipped"]] == [report["chosen"]]
    for row in rows:
        source = report["models"][row["model"]]
        assert row["mAP50-95"] == round(source["metrics"]["mAP50-95"], 4)  # a fraction, as on every page
        assert row["p50 ms"] == source["latency_ms_p50"] and row["p95 ms"] == source["latency_ms_p95"]
        assert row["b8 img/s"] == source["throughput_b8_images_per_s"]
        assert row["size MB"] == round(source["bytes"] / 1e6, 2)
        assert row["float layers"] == len(source.get("float_layers") or [])
        if row["model"] == "fp32":
            assert row[view.DELTA_COLUMN] is None and row["agreement"] is None
        else:
            assert row[view.DELTA_COLUMN] == round(100 * source["deltas"]["metrics"]["mAP50-95"], 2)  # points
            assert row["agreement"] == source["agreement"]["mean_agreement"]
    assert view.budget_floor(report) == round(report["models"]["fp32"]["metrics"]["mAP50-95"] - 0.005, 4)
    # onnxruntime's CPU build has no int8 ConvTranspose: each INT8 model names its two upsampling layers.
    assert [row["kernel"] for row in view.fallback_rows(report)] == ["ConvTranspose"] * 2 * (len(rows) - 1)


def test_each_model_on_each_runtime_and_the_runtime_it_ships_on():
    speed = {"latency_ms_p50": 10.0, "latency_ms_p95": 12.0, "throughput_b8_images_per_s": 90.0}
    report = {
        "runtime": "openvino",
        "runtime_label": "OpenVINO",
        "runtimes": ["onnxruntime", "openvino"],
        "threads": 2,
        "imgsz": 320,
        "validation_images": 8,
        "chosen": "ptq_minmax",
        "models": {
            "ptq_minmax": {
                "runtimes": {
                    "onnxruntime": {**speed, "mAP50-95": 0.401, "mAP50": 0.6},
                    "openvino": {**speed, "latency_ms_p50": 5.0, "mAP50-95": 0.4, "mAP50": 0.6},
                }
            },
            "fp32": {
                "runtimes": {
                    "onnxruntime": {**speed, "mAP50-95": 0.41, "mAP50": 0.61},
                    "openvino": {**speed, "mAP50-95": 0.41, "mAP50": 0.61},
                }
            },
        },
    }
    rows = view.runtime_rows(report)
    assert [(row["model"], row["runtime"]) for row in rows] == [
        ("FP32", "onnxruntime"),
        ("FP32", "OpenVINO"),
        ("PTQ min/max (default policy)", "onnxruntime"),
        ("PTQ min/max (default policy)", "OpenVINO"),
    ]
    assert [row["ships on"] for row in rows] == [False, True, False, True]
    assert rows[3]["p50 ms"] == 5.0 and rows[3]["mAP50-95"] == 0.4 and rows[2]["mAP50-95"] == 0.401
    caption = view.speed_caption(report)
    assert "on onnxruntime and OpenVINO with 2 threads" in caption and "OpenVINO, the runtime the shipped" in caption
    # A report written before runtimes were compared: onnxruntime only, no runtime table.
    old = {"threads": 2, "models": {"fp32": {"latency_ms_p50": 3.0}}}
    assert view.runtime_rows(old) == [] and "on onnxruntime with 2 threads" in view.speed_caption(old)


def test_float_layers_of_each_policy():
    selective = {
        "chosen": "ptq_selective",
        "models": {"fp32": {}, "ptq_selective": {"policy": "selective", "float_layers": ["a.conv"]}},
        "sensitivity": {
            "float_layers": [
                {"module": "a.conv", "node": "/a/Conv", "parameters": 1000, "cost": 0.25, "float_bytes": 3000}
            ]
        },
    }
    assert view.float_layer_rows(selective) == [
        {"layer": "a.conv", "node": "/a/Conv", "parameters": 1000, "cost": 0.25, "float KB": 3.0}
    ]
    default = {"chosen": "ptq_minmax", "models": {"ptq_minmax": {"policy": "default", "float_layers": ["h.cls"]}}}
    assert view.float_layer_rows(default) == [
        {"layer": "h.cls", "node": None, "parameters": None, "cost": None, "float KB": None}
    ]


def test_summary_line_says_what_shipped():
    report = {
        "chosen": "ptq_selective",
        "within_budget": False,
        "budget_points": 0.5,
        "models": {
            "ptq_selective": {
                "deltas": {"metrics": {"mAP50-95": -0.0123}, "latency_ratio_p50": 0.4, "size_ratio": 0.26}
            }
        },
    }
    assert view.summary_line(report) == (
        "Shipped: PTQ selective policy (model_int8.onnx), mAP50-95 -1.23 points vs FP32, latency x0.40, size x0.26, "
        "OUTSIDE the 0.5 point budget."
    )


def test_read_report_of_a_folder_without_one(tmp_path):
    assert view.read_report(tmp_path) is None
    (tmp_path / view.REPORT_FILE).write_text("{not json")
    assert view.read_report(tmp_path) is None


def test_draw_detections_draws_each_box_scaled(tmp_path):
    image = tmp_path / "grey.png"
    Image.new("RGB", (720, 360), (128, 128, 128)).save(image)
    detections = Detections(np.array([[100, 50, 300, 250]]), np.array([0.9]), np.array([1]))
    picture = view.draw_detections(image, detections, ["a", "b"], colour=view.INT8_COLOUR, title="INT8", max_side=360)
    assert picture.boxes == 1 and picture.image.size == (360, 180)  # scaled by 0.5, boxes with it
    pixels = picture.image.load()
    assert pixels[50, 100] == view.INT8_COLOUR and pixels[100, 75] == (128, 128, 128)  # left edge; inside


# ------------------------------------------------------------------------------------------------------------ page
@pytest.mark.slow
def test_page_shows_the_report(storage):
    report = report_of(storage)
    app = open_page()

    assert app.selectbox(key="quantize_run_None").value.name == RUN  # no project in this storage
    assert app.query_params["run"] == RUN
    # The run's models with their own validation mAP50: best.pt's from the training's eval.json, the shipped INT8
    # model's from the report (which records each model's recall too).
    trained = json.loads((storage.runs_dir / RUN / "eval.json").read_text())["metrics"]["mAP50"]
    shipped = report["models"][report["chosen"]]["metrics"]
    assert "recall" in shipped and "recall" in report["models"]["fp32"]["metrics"]
    assert app.selectbox(key="quantize_run_None").options == [
        f"{RUN} · best.pt mAP50 {trained:.3f} · INT8 mAP50 {shipped['mAP50']:.3f}"
    ]
    table = table_with(app, "shipped")
    order = ["fp32", *[name for name in report["models"] if name != "fp32"]]
    assert list(table["label"]) == [view.row_label(name) for name in order]
    for index, name in enumerate(order):
        source = report["models"][name]
        row = table.iloc[index]
        assert bool(row["shipped"]) == (name == report["chosen"])
        assert row["mAP50-95"] == pytest.approx(source["metrics"]["mAP50-95"], abs=5e-5)
        assert row["p50 ms"] == source["latency_ms_p50"] and row["p95 ms"] == source["latency_ms_p95"]
        assert row["b8 img/s"] == source["throughput_b8_images_per_s"]
        assert row["size MB"] == pytest.approx(source["bytes"] / 1e6, abs=0.005)
        if name != "fp32":
            assert row[view.DELTA_COLUMN] == pytest.approx(100 * source["deltas"]["metrics"]["mAP50-95"], abs=0.005)
            assert row["agreement"] == pytest.approx(source["agreement"]["mean_agreement"])
            assert row["float layers"] == len(source["float_layers"])
    assert table["shipped"].sum() == 1

    assert view.summary_line(report) in [element.value for element in app.success]
    chart = json.loads(app.get("plotly_chart")[0].proto.spec)
    points = [trace for trace in chart["data"] if trace.get("type") == "scatter"]
    assert len(points) == len(report["models"])
    assert sorted(point["x"][0] for point in points) == sorted(
        row["latency_ms_p50"] for row in report["models"].values()
    )
    assert any(point["marker"]["symbol"] == "star" for point in points)  # the shipped one
    # Names in the legend and on hover: text labels beside close points overlapped and were clipped.
    assert all("text" not in point["mode"] for point in points)
    unshipped = {view.row_label(name) for name in report["models"] if name != report["chosen"]}
    assert {point["name"] for point in points} >= unshipped
    assert chart["layout"]["yaxis"]["title"]["text"] == "mAP50-95"  # a fraction, as its tick format says
    assert chart["layout"]["shapes"][0]["y0"] == view.budget_floor(report)  # the budget line

    fallbacks = table_with(app, "kernel")
    assert list(fallbacks["kernel"]) == ["ConvTranspose"] * 2 * (len(report["models"]) - 1)
    labels = [button.label for button in download_buttons(app)]
    assert len(labels) == 2 and labels[0].startswith("Download model_fp32.onnx (")
    assert labels[1].startswith("Download model_int8.onnx (")
    assert not any(button.proto.disabled for button in download_buttons(app))
    assert app.button(key="quantize_cancel").disabled  # no job is running


@pytest.mark.slow
def test_gallery_draws_fp32_and_int8_side_by_side(storage):
    # The tiny model detects nothing at 0.25, so its real gallery is empty: give the report two changed images.
    report_file = storage.runs_dir / RUN / view.REPORT_FILE
    report = json.loads(report_file.read_text())
    per_image = report["models"][report["chosen"]]["agreement"]["per_image"]
    report["gallery"] = [{**item, "lost": 1, "agreement": 0.0, "change": 1.0} for item in per_image[:2]]
    report_file.write_text(json.dumps(report))

    app = open_page()
    captions = [caption for image in app.get("image") for caption in image.captions]
    names = [Path(item["image"]).name for item in per_image[:2]]
    assert captions == ["FP32", "INT8", "FP32", "INT8"]
    for name in names:
        assert f"{name}: agreement 0.00 · 0 same, 0 class changed, 1 lost, 0 new" in page_text(app)


def test_gallery_pictures_have_one_size_whatever_the_image(tmp_path):
    """A small and a large image are both drawn with the long side `max_side`: FP32 and INT8 pictures, and every
    image of the gallery, appear at one size."""
    empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))
    sizes = []
    for name, size in (("small.png", (96, 64)), ("large.png", (800, 600))):
        Image.new("RGB", size, (128, 128, 128)).save(tmp_path / name)
        picture = view.draw_detections(tmp_path / name, empty, ["a"], colour=view.FP32_COLOUR, title="FP32")
        sizes.append(picture.image.size)
    assert sizes == [(360, 240), (360, 270)]


def test_page_without_a_run_says_where_to_start(tmp_path, monkeypatch):
    monkeypatch.setenv("YOLODEX_STORAGE", str(tmp_path))
    app = open_page()
    assert "No trained run of any project with a best.pt yet" in page_text(app)


def run_without_worker(tmp_path, monkeypatch) -> tuple[Settings, Path]:
    """A storage with one trained run ("waiting") and a queue no worker reads: a submitted job stays queued."""
    monkeypatch.setenv("YOLODEX_STORAGE", str(tmp_path))
    monkeypatch.delenv("YOLODEX_QUEUE_IMMEDIATE", raising=False)
    monkeypatch.setattr(backend.jobs.tasks.huey, "immediate", False)
    settings = Settings.from_env({"YOLODEX_STORAGE": str(tmp_path)})
    run_dir = settings.runs_dir / "waiting"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"train": {"imgsz": 64}, "class_names": ["a"]}))
    (run_dir / "best.pt").write_bytes(b"not opened by the page")
    return settings, run_dir


def test_a_queued_job_shows_and_cancels(tmp_path, monkeypatch):
    settings, run_dir = run_without_worker(tmp_path, monkeypatch)
    job_id = jobs.submit("quantize", {"run_dir": str(run_dir), "options": {"budget": 0.5}}, settings=settings)

    app = open_page()  # no ?quantize_job=: the run's newest quantize job is found
    assert app.query_params["quantize_job"] == str(job_id)
    assert f"job {job_id} queued" in app.get("progress")[0].proto.text
    assert app.button(key="quantize_start").disabled and not app.button(key="quantize_cancel").disabled
    assert "This run has no INT8 model yet" in page_text(app)

    app.button(key="quantize_cancel").click().run()
    assert jobs.get_job(job_id, settings).state == "cancelled"
    assert f"job {job_id} cancelled" in app.get("progress")[0].proto.text
    assert "Quantization cancelled: no new report was written." in page_text(app)
    assert app.button(key="quantize_cancel").disabled and not app.button(key="quantize_start").disabled


def test_a_launch_says_queued_not_done(tmp_path, monkeypatch):
    """No worker runs: the job stays queued, and the banner says so (blue, not a green "done") beside the disabled
    button, the live panel showing the same state."""
    settings, _ = run_without_worker(tmp_path, monkeypatch)

    app = open_page()
    app.button(key="quantize_start").click().run()
    assert not app.exception, [exception.value for exception in app.exception]

    job_id = int(app.query_params["quantize_job"])
    assert jobs.get_job(job_id, settings).state == "queued"
    banner = f"Quantization job: job {job_id} queued: quantizing waiting (auto, budget 0.5 points)"
    assert [element.value for element in app.info if element.value.startswith("Quantization job")] == [banner]
    assert not any("Quantization job" in element.value for element in app.success)
    assert app.button(key="quantize_start").disabled
    assert f"quantization job {job_id} queued" in app.get("progress")[0].proto.text


@pytest.mark.slow
def test_launch_in_immediate_mode_writes_the_report(storage):
    report_file = storage.runs_dir / RUN / view.REPORT_FILE
    report_file.unlink()
    # A project with the run's classes: the run is the project's, and its quantize job carries the project.
    from backend.store.db import init_db, session_scope
    from backend.store.models import ensure_class, get_or_create_project

    class_names = json.loads((storage.runs_dir / RUN / "config.json").read_text())["class_names"]
    with session_scope(init_db(storage.database_url)) as session:
        project = get_or_create_project(session, "Shapes")
        for name in class_names:
            ensure_class(session, project, name)
    app = open_page()
    assert app.selectbox(key="quantize_run_Shapes").value.name == RUN
    assert "This run has no INT8 model yet" in page_text(app)

    app.number_input(key="quantize_budget").set_value(1.0)
    app.radio(key="quantize_method").set_value("qat")  # no sensitivity scan: QAT of one short epoch
    app.number_input(key="quantize_calib").set_value(4)
    app.checkbox(key="quantize_compare").uncheck()
    app.number_input(key="quantize_qat_epochs").set_value(1)
    assert app.selectbox(key="quantize_calibration").value == "percentile"  # QuantizeOptions' default
    app.button(key="quantize_start").click()
    app.run(timeout=600)
    assert not app.exception, [exception.value for exception in app.exception]

    job = jobs.get_job(int(app.query_params["quantize_job"]), storage)
    assert job.kind == "quantize" and job.state == "succeeded", (job.error, job.traceback)
    assert job.params["run_dir"] == str(storage.runs_dir / RUN)
    assert job.params["project"] == "Shapes" and job.project == "Shapes"
    # The banner says what the job is and its real state (immediate mode: it already ended), never a bare "done".
    banner = f"Quantization job: job {job.id} succeeded: quantizing {RUN} (qat, budget 1 points)"
    assert banner in [element.value for element in app.success] and "Quantization job: done" not in page_text(app)
    assert job.params["options"]["method"] == "qat" and job.params["options"]["budget"] == 1.0
    report = json.loads(report_file.read_text())
    assert report["method"] == "qat" and report["budget_points"] == 1.0 and report["calibration"]["asked"] == 4
    assert set(report["models"]) == {"fp32", "ptq_percentile", "qat"}
    table = table_with(app, "shipped")
    assert list(table["label"]) == ["FP32", "PTQ percentile (default policy)", "QAT"]
    assert f"job {job.id} succeeded" in app.get("progress")[0].proto.text
    assert app.button(key="quantize_cancel").disabled
