"""The Evaluate page under AppTest (jobs inline: an immediate queue) over a storage holding the Starter Pokédex, its
frozen version v1 and a tiny trained run: the numbers shown are the backend's, computed here directly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

import backend.jobs.tasks
from backend.data.folders import load_dataset
from backend.evaluation import report
from backend.jobs import api as jobs
from backend.models import load_model
from backend.settings import Settings
from backend.store.db import init_db, session_scope
from backend.store.models import Image, LabelingTask
from backend.training.engine import EvalImages, evaluate, resolve_device
from tests.test_app_train import PROJECT, RUN, private_copy, tiny_run
from tests.test_pokedex import CANCELLED_AT_EPOCH_0

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "evaluate.py")
LS_PROJECT_ID = 7


@pytest.fixture(scope="module")
def trained_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    storage = tmp_path_factory.mktemp("evaluate_page") / "storage"
    tiny_run(storage)
    return storage


@pytest.fixture
def settings(trained_storage: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    storage = private_copy(trained_storage, tmp_path / "storage")
    monkeypatch.setenv("YOLODEX_STORAGE", str(storage))
    monkeypatch.setenv("YOLODEX_LS_PORT", "1")  # nothing listens there
    monkeypatch.delenv("YOLODEX_DATABASE_URL", raising=False)
    monkeypatch.delenv("YOLODEX_QUEUE_URL", raising=False)
    monkeypatch.delenv("YOLODEX_HOST", raising=False)
    monkeypatch.setenv("YOLODEX_QUEUE_IMMEDIATE", "1")
    monkeypatch.setattr(backend.jobs.tasks.huey, "immediate", True)
    return Settings.from_env({"YOLODEX_STORAGE": str(storage), "YOLODEX_LS_PORT": "1"})


def open_page(**query: str) -> AppTest:
    app = AppTest.from_file(PAGE, default_timeout=180)
    for key, value in query.items():
        app.query_params[key] = value
    app.run()
    assert not app.exception, [exception.value for exception in app.exception]
    return app


def direct_evaluation(settings: Settings, split: str) -> dict:
    """The run's best.pt on v1's split, evaluated here without the page or the jobs (as `yolodex eval` does)."""
    model, loaded = load_model(settings.runs_dir / RUN / "best.pt")
    dataset = load_dataset(settings.datasets_dir / "Starter_Pokédex" / "v1")[split]
    device = resolve_device("cpu")
    result = evaluate(model.to(device), EvalImages(dataset, loaded.imgsz), device=device)
    return json.loads(json.dumps(result.to_dict()))


def table_with(app: AppTest, column: str):
    tables = [element.value for element in app.dataframe if column in element.value.columns]
    assert len(tables) == 1, [list(element.value.columns) for element in app.dataframe]
    return tables[0]


def chart(app: AppTest, key: str) -> dict:
    charts = [element for element in app.get("plotly_chart") if key in element.proto.id]
    assert len(charts) == 1, [element.proto.id for element in app.get("plotly_chart")]
    return json.loads(charts[0].proto.spec)


def caption_text(app: AppTest) -> str:
    parts = [*app.caption, *app.info, *app.success, *app.warning, *app.markdown]
    return " ".join(str(element.value) for element in parts)


@pytest.mark.slow
def test_metrics_equal_the_backends_and_the_confusion_matrix_is_square(settings: Settings) -> None:
    app = open_page()
    # The run's own evaluation (best.pt on v1's val split) is read from its eval.json: nothing to launch.
    assert app.radio(key="evaluate_split").value == "val"
    assert app.button(key="evaluate_start").label == "Evaluate again"

    # Another split goes through an evaluate job, which writes its own file.
    app.radio(key="evaluate_split").set_value("train").run()
    assert "Not evaluated on this dataset and split yet" in caption_text(app)
    app.button(key="evaluate_start").click().run()
    assert not app.exception, [exception.value for exception in app.exception]
    job = jobs.get_job(int(app.query_params["eval_job"]), settings)
    assert job.state == "succeeded", job.error
    assert job.project == PROJECT  # the job carries the page's project
    # The banner says what was queued and the job's real state (inline here: already ended), never a bare "done".
    assert f"Evaluation job: job {job.id} succeeded: evaluating {RUN}'s best.pt on v1 [train]" in caption_text(app)
    assert Path(job.params["out"]) == settings.runs_dir / RUN / "evals" / "best_pt-Starter_Pokédex_v1-train.json"

    expected = direct_evaluation(settings, "train")
    shown = table_with(app, "metric").set_index("metric")["value"]
    assert list(shown.index) == [key for key, _ in report.METRICS]
    for key, value in expected["metrics"].items():
        assert shown[key] == pytest.approx(value, abs=1e-4), key
    per_class = table_with(app, "AP50-95").set_index("class")
    for item in expected["per_class"]:
        row = per_class.loc[item["class_name"]]
        assert (row["boxes"], row["predictions"]) == (item["gt_count"], item["prediction_count"])
        assert row["AP50-95"] == pytest.approx(item["AP50-95"], abs=1e-4)
    counts = expected["counts"]
    assert counts["predictions"] > 0  # the numbers compared are not all empty
    assert (
        f"{counts['images']} images, {counts['ground_truth']} ground-truth boxes, {counts['predictions']} predictions"
        in caption_text(app)
    )

    heatmap = chart(app, "evaluate_confusion")["data"][0]
    classes = len(expected["class_names"])
    assert np.array(heatmap["z"]).shape == (classes + 1, classes + 1)
    assert heatmap["x"] == [*expected["class_names"], "background"]
    assert heatmap["z"] == expected["confusion_matrix"]
    # Each class with ground truth has a PR curve (IoU 0.5), and there are the per-class AP bars.
    pr_names = [trace["name"] for trace in chart(app, "evaluate_pr_curves")["data"]]
    assert all(any(name.startswith(item["class_name"]) for name in pr_names) for item in expected["per_class"])
    assert chart(app, "evaluate_ap_bars")["data"][0]["x"] == expected["class_names"]


@pytest.mark.slow
def test_the_error_browser_links_synced_images_to_label_studio(settings: Settings) -> None:
    evaluation = json.loads((settings.runs_dir / RUN / "eval.json").read_text())
    items = report.error_items(evaluation)
    assert items, "the tiny run makes mistakes"
    app = open_page()
    assert len(app.image) == min(len(items), 8)
    assert app.image[0].captions == [report.describe_error(items[0], evaluation["class_names"])]
    assert "Not in Label Studio" in caption_text(app) and "Fix in Label Studio" not in caption_text(app)

    # Every image of the project synced, as a Label Studio sync leaves them: task id = 1000 + image id.
    with session_scope(init_db(settings.database_url)) as session:
        for image_id in session.scalars(select(Image.id)):
            session.add(LabelingTask(image_id=image_id, ls_project_id=LS_PROJECT_ID, ls_task_id=1000 + image_id))
    app = open_page()

    links = [element.value for element in app.markdown if "Fix in Label Studio" in element.value]
    expected = [
        f"[Fix in Label Studio](http://127.0.0.1:1/projects/{LS_PROJECT_ID}/data?task={1000 + item.store_image_id})"
        for item in items[:8]
    ]
    assert sorted(links) == sorted(expected)  # two columns: the element tree lists one column, then the other
    assert "Not in Label Studio" not in caption_text(app)
    # The second page shows the next errors.
    if len(items) > 8:
        app.number_input(key="evaluate_page").set_value(2).run()
        links = [element.value for element in app.markdown if "Fix in Label Studio" in element.value]
        assert any(link.endswith(f"task={1000 + items[8].store_image_id})") for link in links)
        assert len(links) == min(len(items) - 8, 8)


def test_a_run_cancelled_in_its_first_epoch_is_not_offered(settings: Settings) -> None:
    """A run of the project that has a last.pt but never finished an epoch nor was evaluated: nothing to evaluate."""
    cancelled = settings.runs_dir / "cancelled"
    cancelled.mkdir()
    (cancelled / "config.json").write_text((settings.runs_dir / RUN / "config.json").read_text())
    (cancelled / "last.pt").write_bytes((settings.runs_dir / RUN / "last.pt").read_bytes())
    (cancelled / "metrics.jsonl").write_text("".join(json.dumps(event) + "\n" for event in CANCELLED_AT_EPOCH_0))

    app = open_page(project=PROJECT)

    labels = app.selectbox(key=f"evaluate_run_{PROJECT}").options
    assert [label.split(" (")[0] for label in labels] == [RUN]
    assert "epochs" in labels[0]  # the run's epochs in the same words as everywhere


def test_an_exported_onnx_model_is_evaluated_like_its_checkpoint(settings: Settings) -> None:
    """The run's ONNX export is offered beside its checkpoints; its evaluation job runs it in the runtime "auto"
    picks and scores what the checkpoint scores (same weights, same post-processing)."""
    from backend.export.onnx_export import export_onnx

    run_dir = settings.runs_dir / RUN
    model, loaded = load_model(run_dir / "best.pt")
    export_onnx(model, run_dir / "model_fp32.onnx", imgsz=loaded.imgsz, class_names=loaded.class_names)
    app = open_page()
    options = [Path(option).name for option in app.radio(key="evaluate_model").options]
    assert options == ["best.pt", "last.pt", "model_fp32.onnx"] or options == ["best.pt", "model_fp32.onnx"]
    app.radio(key="evaluate_model").set_value(run_dir / "model_fp32.onnx").run()
    app.radio(key="evaluate_split").set_value("train").run()
    app.button(key="evaluate_start").click().run()
    assert not app.exception, [exception.value for exception in app.exception]
    job = jobs.get_job(int(app.query_params["eval_job"]), settings)
    assert job.state == "succeeded", job.error
    saved = json.loads(Path(job.params["out"]).read_text())
    expected = direct_evaluation(settings, "train")["metrics"]
    assert saved["metrics"]["mAP50"] == pytest.approx(expected["mAP50"], abs=0.01), (saved["metrics"], expected)
    assert saved["counts"]["predictions"] > 0
