"""The Train page's readiness (issue 18) under AppTest, jobs inline: the time an epoch takes here and the budget it
suggests (from an earlier run's metrics.jsonl, or from the speed probe), the start-weights pre-flight (COCO absent
and not downloadable: said before anything is queued), and Continue training of a finished run."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from backend.jobs import api as jobs
from backend.models.download import OFFICIAL_COCO_WEIGHTS, WeightsSource
from backend.settings import Settings
from backend.training import estimate, presets
from backend.training.engine import autocast_dtype
from tests.test_app_train import PROJECT, RUN, open_page, settings, texts, trained_storage  # noqa: F401 (fixtures)

PRECISION = str(autocast_dtype(torch.device("cpu"), None) or "float32")


def write_run(runs_dir: Path, name: str, data: str, *, imgsz: int, batch: int, step_s: float, eval_s: float) -> None:
    """A run folder as the trainer leaves it, whose steps came every `step_s` seconds and whose evaluation of 8
    validation images took `eval_s`: 10 steps of one epoch, evaluated."""
    folder = runs_dir / name
    folder.mkdir(parents=True)
    train = {"data": data, "size": "s", "imgsz": imgsz, "batch_size": batch, "epochs": 1, "device": "cpu"}
    (folder / "config.json").write_text(json.dumps({"train": train}))
    start = {
        "event": "train_start",
        "device": "cpu",
        "precision": PRECISION,
        "batch_size": batch,
        "processes": 1,
        "val_images": 8,
        "steps_per_epoch": 10,
    }
    steps = [
        {"event": "step", "epoch": 0, "step": i, "global_step": i, "elapsed_s": 5.0 + i * step_s} for i in range(1, 11)
    ]
    end_of_epoch = {
        "event": "epoch",
        "epoch": 0,
        "val": {"mAP50-95": 0.1},
        "elapsed_s": steps[-1]["elapsed_s"] + eval_s,
    }
    lines = [start, *steps, end_of_epoch, {"event": "train_end", "stopped": "epochs"}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def choose(app, *, imgsz: int, batch: int) -> None:
    app.radio(key="train_device").set_value("cpu")
    app.selectbox(key="train_imgsz_S").set_value(imgsz)
    app.number_input(key="train_batch_S").set_value(batch).run()
    assert not app.exception, [exception.value for exception in app.exception]


def expected_minutes(folder: str, batch: int, images_per_s: float, eval_images_per_s: float) -> tuple[int, int]:
    """The rule, by hand: epochs to see 7,500 images (or 10 passes), each epoch's steps and evaluation."""
    train_images, val_images = estimate.version_images(folder)
    samples = max(train_images, 512) // batch * batch
    epochs = math.ceil(max(7_500, 10 * train_images) / samples)
    return epochs, math.ceil(epochs * (samples / images_per_s + val_images / eval_images_per_s) / 60)


@pytest.mark.slow
def test_the_estimate_comes_from_an_earlier_runs_steps(settings: Settings) -> None:  # noqa: F811
    folder = json.loads((settings.runs_dir / RUN / "config.json").read_text())["train"]["data"]
    # Steps of 8 images every 2 s: 4 images/s; 8 validation images in 4 s: 2 images/s.
    write_run(settings.runs_dir, "earlier", folder, imgsz=128, batch=8, step_s=2.0, eval_s=4.0)
    app = open_page()
    choose(app, imgsz=128, batch=8)

    (shown,) = [info.value for info in app.info if "an epoch on this machine" in info.value]
    epochs, minutes = expected_minutes(folder, 8, 4.0, 2.0)
    assert "at 4.0 training images/s, measured by the run earlier" in shown
    assert f"Recommended time budget: {minutes} min, about {epochs} epochs" in shown
    # The budget field was set before the estimate existed (other settings): one click applies the recommendation.
    app.button(key="train_use_budget").click().run()
    assert app.number_input(key="train_budget_S").value == minutes
    # Another input size is another speed: no estimate is scaled from this run.
    choose(app, imgsz=192, batch=8)
    assert not [info for info in app.info if "an epoch on this machine" in info.value]
    assert "No time estimate yet" in texts(app) and app.button(key="train_measure")


@pytest.mark.slow
def test_the_estimate_from_the_speed_probe(settings: Settings) -> None:  # noqa: F811
    app = open_page()
    choose(app, imgsz=64, batch=4)  # no run at batch 4
    assert "No time estimate yet" in texts(app)

    app.button(key="train_measure").click().run()

    assert not app.exception, [exception.value for exception in app.exception]
    (shown,) = [info.value for info in app.info if "an epoch on this machine" in info.value]
    assert "measured by the speed probe of" in shown
    cache = json.loads((settings.storage / estimate.PROBE_FILE).read_text())
    (entry,) = cache.values()
    assert f"at {entry['images_per_s']:.1f} training images/s" in shown
    assert json.loads(next(iter(cache)))["imgsz"] == 64
    # The cached probe answers the next session at once (no button).
    again = open_page()
    choose(again, imgsz=64, batch=4)
    assert [info for info in again.info if "measured by the speed probe of" in info.value]
    assert "train_measure" not in [button.key for button in again.button]


class _HeadOnly(BaseHTTPRequestHandler):
    """Answers HEAD (the page's pre-flight) but fails every GET (the job's download)."""

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()

    def do_GET(self) -> None:
        self.send_error(503, "Service Unavailable")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def weights_host(monkeypatch: pytest.MonkeyPatch):
    """The COCO weights' URL on a local server that answers HEAD and fails GET."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HeadOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    source = OFFICIAL_COCO_WEIGHTS["s"]
    url = f"http://127.0.0.1:{server.server_address[1]}/{source.name}"
    monkeypatch.setitem(OFFICIAL_COCO_WEIGHTS, "s", WeightsSource(source.name, url, None, source.licence))
    yield url
    server.shutdown()


def choose_coco(app) -> None:
    picker = app.selectbox(key=f"train_weights_S_{PROJECT}")
    picker.select_index([label.startswith("COCO") for label in picker.options].index(True)).run()
    assert not app.exception, [exception.value for exception in app.exception]


@pytest.mark.slow
def test_coco_absent_and_unreachable_is_refused_before_anything_is_queued(
    settings: Settings,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = OFFICIAL_COCO_WEIGHTS["s"]
    dead = WeightsSource(source.name, f"http://127.0.0.1:1/{source.name}", None, source.licence)  # nothing listens
    monkeypatch.setitem(OFFICIAL_COCO_WEIGHTS, "s", dead)
    app = open_page()
    # What works is the default: the project's trained run (else random initialisation), never COCO.
    assert app.selectbox(key=f"train_weights_S_{PROJECT}").value.value == str(settings.runs_dir / RUN)

    choose_coco(app)

    (error,) = [item.value for item in app.error if "Start weights" in item.value]
    assert "not on this machine and cannot be downloaded from here" in error and "127.0.0.1:1" in error
    assert "random initialisation (from scratch)" in error
    assert str(presets.coco_weights_file("s", settings.weights_dir)) in error
    assert app.button(key="train_start").disabled
    assert jobs.list_jobs(settings, kind="train") == []
    # Back to random initialisation: nothing to refuse.
    app.selectbox(key=f"train_weights_S_{PROJECT}").select_index(0).run()
    assert not [item for item in app.error if "Start weights" in item.value]
    assert not app.button(key="train_start").disabled


@pytest.mark.slow
def test_a_checkpoint_file_is_checked_before_queueing(settings: Settings) -> None:  # noqa: F811
    app = open_page()
    picker = app.selectbox(key=f"train_weights_S_{PROJECT}")
    picker.select_index(len(picker.options) - 1).run()
    assert app.button(key="train_start").disabled  # no path yet
    app.text_input(key="train_weights_file").input(str(settings.storage / "missing.pt")).run()
    app.button(key="train_start").click().run()

    assert not app.exception, [exception.value for exception in app.exception]
    assert "Training job failed: there is no checkpoint file at" in texts(app)
    assert jobs.list_jobs(settings, kind="train") == []
    # A real checkpoint of another size is refused too; of this size it passes.
    checkpoint = settings.runs_dir / RUN / "last.pt"
    with pytest.raises(ValueError, match="holds YOLO-NAS S weights; this run trains M"):
        presets.check_start_weights(str(checkpoint), "m", settings.weights_dir)
    presets.check_start_weights(str(checkpoint), "s", settings.weights_dir)


@pytest.mark.slow
def test_continue_training_a_finished_run_from_the_page(settings: Settings) -> None:  # noqa: F811
    run_dir = settings.runs_dir / RUN
    lines_before = (run_dir / "metrics.jsonl").read_text().splitlines()
    done_before = json.loads(lines_before[-1])["epochs_done"]
    app = open_page(**{"continue": RUN})
    assert app.selectbox(key=f"train_continue_{RUN}").value == RUN
    app.number_input(key="train_more_minutes").set_value(0.0)
    app.number_input(key="train_more_epochs").set_value(1)

    app.button(key="train_continue").click().run()

    assert not app.exception, [exception.value for exception in app.exception]
    job = jobs.get_job(int(app.query_params["job"]), settings)
    assert job.state == "succeeded", job.error
    assert job.params["resume"] == str(run_dir) and job.params["overrides"] == {"more_epochs": 1}
    assert f"Continue training: job {job.id} succeeded: continuing {RUN} for 1 more epoch" in texts(app)
    lines_after = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert lines_after[: len(lines_before)] == lines_before and len(lines_after) > len(lines_before)
    end = json.loads(lines_after[-1])
    assert end["event"] == "train_end" and end["stopped"] == "epochs" and end["epochs_done"] == done_before + 1
    assert json.loads((run_dir / "config.json").read_text())["train"]["epochs"] == done_before + 1
    assert job.result["summary"].startswith(f"{done_before + 1} of {done_before + 1} epochs")
    # A run name the page cannot continue is said, not silently swapped for another.
    other = open_page(**{"continue": "no-such-run"})
    assert "The run no-such-run cannot be continued here" in texts(other)


@pytest.mark.slow
def test_a_failed_download_after_a_good_preflight_is_shown_once(settings: Settings, weights_host: str) -> None:  # noqa: F811
    """The host answers the pre-flight (HEAD) but the download fails: the job fails, and the page says so once, in
    its own words (the pre-flight cannot rule out every failure; a job it let through tells what happened)."""
    app = open_page()
    choose(app, imgsz=64, batch=2)
    choose_coco(app)
    assert not [item for item in app.error if "Start weights" in item.value]
    (note,) = [info.value for info in app.info if "is not on this machine" in info.value]
    assert weights_host in note
    app.button(key="train_start").click().run()
    assert not app.exception, [exception.value for exception in app.exception]

    job = jobs.get_job(int(app.query_params["job"]), settings)
    assert job.state == "failed"
    shown = texts(app) + " " + " ".join(progress.proto.text for progress in app.get("progress"))
    assert shown.count("could not be downloaded") == 1 and "HTTP 503" in shown
    assert "run the command again" not in shown


@pytest.mark.slow
def test_continue_training_refusals_and_a_resumed_continuation_adds_nothing(settings: Settings) -> None:  # noqa: F811
    from tests.test_app_train import insert_job

    run_dir = settings.runs_dir / RUN
    with pytest.raises(ValueError, match="say how much longer"):
        jobs.continue_training(run_dir, 0, 0, settings)
    with pytest.raises(ValueError, match="holds no run to continue"):
        jobs.continue_training(settings.runs_dir, 5, None, settings)
    queued = insert_job(settings, "queued", {"project": PROJECT, "config": {}, "run_dir": str(run_dir)})
    with pytest.raises(ValueError, match=f"job {queued} is still training {RUN}"):
        jobs.continue_training(run_dir, 5, None, settings)
    jobs.cancel(queued, settings)
    # A cancelled continuation resumed goes on to the totals it set (config.json), without adding its "more" again.
    cancelled = insert_job(
        settings,
        "cancelled",
        {"project": PROJECT, "resume": str(run_dir), "overrides": {"more_epochs": 3, "patience": 2}},
    )
    resumed = jobs.get_job(jobs.resume(cancelled, settings), settings)
    assert resumed.params["overrides"] == {"patience": 2} and resumed.resumed_from == cancelled


@pytest.mark.slow
def test_a_run_offered_once_its_job_ends(settings: Settings) -> None:  # noqa: F811
    """While a job trains the run it is not offered; once the job ends the section offers it (the empty choice made
    while nothing could be continued is not kept)."""
    from tests.test_app_train import insert_job

    queued = insert_job(settings, "queued", {"project": PROJECT, "config": {}, "run_dir": str(settings.runs_dir / RUN)})
    app = open_page()
    assert app.selectbox(key="train_continue_None").value is None
    assert app.button(key="train_continue").disabled

    jobs.cancel(queued, settings)
    app.run()

    assert app.selectbox(key="train_continue_None").value == RUN
    assert not app.button(key="train_continue").disabled
