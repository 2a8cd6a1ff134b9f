"""The Train page under AppTest (jobs inline: an immediate queue) over a storage holding the Starter Pokédex, its
frozen version v1 and a tiny trained run; and `backend.training.presets`, what the page builds on."""

from __future__ import annotations

import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import backend.jobs.tasks
from backend import catalog
from backend.ingest.service import freeze, starter
from backend.jobs import api as jobs
from backend.models.download import COCO_WEIGHTS_LICENCE_NOTE
from backend.settings import Settings
from backend.training import presets
from backend.training.config import LOSS_TERMS, TrainConfig
from backend.training.trainer import fit

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "train.py")
PROJECT = "Starter Pokédex"
RUN = "tiny"


def tiny_run(storage: Path) -> None:
    """The Starter Pokédex, version v1, and a 1-epoch run at 64 px in storage/runs/tiny."""
    settings = Settings.from_env({"YOLODEX_STORAGE": str(storage)})
    starter(settings)
    version = freeze(PROJECT, "v1", settings=settings)
    # A 3 s budget: the epoch stops after a step or two, then the run is evaluated as at any end.
    config = TrainConfig(
        data=version["folder"], imgsz=64, epochs=1, batch_size=2, min_samples=4, num_workers=0, time_minutes=0.05
    )
    fit(config, settings.runs_dir / RUN)


def private_copy(source: Path, target: Path) -> Path:
    """A copy a test may change: images and checkpoints hard-linked (never written in place: checkpoints are
    replaced atomically), the database and the text files copied (SQLite and metrics.jsonl write in place)."""

    def link_or_copy(from_path: str, to_path: str) -> None:
        if Path(from_path).suffix in (".pt", ".png", ".jpg"):
            os.link(from_path, to_path)
        else:
            shutil.copy2(from_path, to_path)

    shutil.copytree(source, target, copy_function=link_or_copy)
    return target


@pytest.fixture(scope="module")
def trained_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    storage = tmp_path_factory.mktemp("train_page") / "storage"
    tiny_run(storage)
    return storage


@pytest.fixture
def settings(trained_storage: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    storage = private_copy(trained_storage, tmp_path / "storage")
    monkeypatch.setenv("YOLODEX_STORAGE", str(storage))
    monkeypatch.setenv("YOLODEX_LS_PORT", "1")  # nothing listens there
    monkeypatch.delenv("YOLODEX_DATABASE_URL", raising=False)
    monkeypatch.delenv("YOLODEX_QUEUE_URL", raising=False)
    monkeypatch.setenv("YOLODEX_QUEUE_IMMEDIATE", "1")
    monkeypatch.setattr(backend.jobs.tasks.huey, "immediate", True)
    return Settings.from_env({"YOLODEX_STORAGE": str(storage)})


def open_page(**query: str) -> AppTest:
    app = AppTest.from_file(PAGE, default_timeout=180)
    for key, value in query.items():
        app.query_params[key] = value
    app.run()
    assert not app.exception, [exception.value for exception in app.exception]
    return app


def texts(app: AppTest) -> str:
    parts = [*app.markdown, *app.caption, *app.info, *app.warning, *app.error, *app.success]
    return " ".join(str(element.value) for element in parts)


def runs_table(app: AppTest):
    tables = [element.value for element in app.dataframe if "best mAP50-95" in element.value.columns]
    assert len(tables) == 1
    return tables[0].set_index("run")


def insert_job(settings: Settings, state: str, params: dict) -> int:
    """A job row as a worker would have left it (no worker runs in these tests)."""
    from backend.store.db import session_scope
    from backend.store.models import Job

    with session_scope(jobs.job_engine(settings)) as session:
        job = Job(kind="train", params=params, project=PROJECT, state=state, message=state, log_tail=[])
        session.add(job)
        session.flush()
        return job.id


# ----------------------------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_runs_list_shows_the_trained_run(settings: Settings) -> None:
    app = open_page()

    expected = catalog.run_info(settings.runs_dir / RUN)
    row = runs_table(app).loc[RUN]
    assert expected.best_map is not None
    assert row["best mAP50-95"] == pytest.approx(expected.best_map)
    assert (row["status"], row["size"], row["imgsz"]) == ("finished (time budget)", "S", 64)
    # The epochs it ran, of the one asked for, and the budget that ended it (not the config's "1").
    assert row["epochs"] == expected.epochs_text
    assert row["epochs"].startswith(f"{expected.epochs_done} of 1 epochs: the 3-second time budget ended the run")
    assert row["dataset"] == "Starter_Pokédex/v1"
    assert "No training job yet" in texts(app)
    assert app.button(key="train_cancel").disabled and app.button(key="train_resume").disabled


@pytest.mark.slow
def test_launching_a_training_runs_it_and_shows_its_curves(settings: Settings) -> None:
    app = open_page()
    assert app.selectbox(key=f"train_version_{PROJECT}").value.name == "v1"
    app.selectbox(key="train_imgsz_S").set_value(64)
    app.number_input(key="train_epochs_S").set_value(1)
    app.number_input(key="train_batch_S").set_value(2)
    app.number_input(key="train_budget_S").set_value(0.05)  # 3 s: the time budget ends the epoch early
    app.radio(key="train_device").set_value("cpu")

    app.button(key="train_start").click().run()

    assert not app.exception, [exception.value for exception in app.exception]
    job = jobs.get_job(int(app.query_params["job"]), settings)
    assert job.state == "succeeded", job.error
    run_dir = Path(job.params["run_dir"])
    assert run_dir.parent == settings.runs_dir and run_dir.name.startswith("Starter_Pokédex-v1-")
    assert {"config.json", "metrics.jsonl", "last.pt", "best.pt"} <= {path.name for path in run_dir.iterdir()}
    config = json.loads((run_dir / "config.json").read_text())["train"]
    assert (config["imgsz"], config["epochs"], config["batch_size"], config["device"]) == (64, 1, 2, "cpu")
    assert config["time_minutes"] == pytest.approx(0.05)
    # Finished: the curves, the end of the run, the bar full, nothing left to cancel or resume.
    assert len(app.get("plotly_chart")) == 1
    assert f"Run ended: {catalog.run_info(run_dir).epochs_text}" in texts(app)
    assert app.get("progress")[0].proto.text.startswith(f"job {job.id} succeeded")
    # The banner tells the job's real state (here, with jobs run inline, already ended), never a bare "done".
    assert f"Training job: job {job.id} succeeded: training S at 64 px on v1" in [item.value for item in app.success]
    assert "Training job: done" not in texts(app)
    assert app.button(key="train_cancel").disabled and app.button(key="train_resume").disabled
    table = runs_table(app)
    assert table.loc[run_dir.name, "status"] == "finished (time budget)"
    assert set(table.index) == {RUN, run_dir.name}


@pytest.mark.slow
def test_cancel_a_queued_job_then_resume_it(settings: Settings) -> None:
    run_dir = settings.runs_dir / RUN
    job_id = insert_job(settings, "queued", {"project": PROJECT, "config": {}, "run_dir": str(run_dir)})
    app = open_page(job=str(job_id))
    assert app.selectbox(key=f"train_job_{job_id}").value == job_id
    assert not app.button(key="train_cancel").disabled and app.button(key="train_resume").disabled
    assert "queued" in app.get("progress")[0].proto.text
    assert "queued" in runs_table(app).loc[RUN, "status"]  # the job says more than the folder

    app.button(key="train_cancel").click().run()

    assert jobs.get_job(job_id, settings).state == "cancelled"
    assert f"Cancel: job {job_id} cancelled" in texts(app)
    assert app.button(key="train_cancel").disabled and not app.button(key="train_resume").disabled
    # Resume continues the run from last.pt as a new job; this run's time budget is spent, so the job says it is
    # finished (issue 19: it does not report a training it did not do) and the run stays as it was.
    before = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()}
    app.button(key="train_resume").click().run()
    assert not app.exception, [exception.value for exception in app.exception]
    new_id = int(app.query_params["job"])
    resumed = jobs.get_job(new_id, settings)
    assert new_id != job_id and resumed.resumed_from == job_id and resumed.state == "failed"
    assert "is finished (its 0.05-minute time budget is spent" in resumed.error and "yolodex" not in resumed.error
    assert resumed.params["resume"] == str(run_dir)
    assert f"Resume: job {new_id} failed: continuing job {job_id}'s run" in texts(app)
    assert {path.name: path.read_bytes() for path in run_dir.iterdir() if path.is_file()} == before
    assert app.selectbox(key=f"train_job_{new_id}").value == new_id


@pytest.mark.slow
def test_coco_weights_show_their_licence(settings: Settings) -> None:
    app = open_page()
    assert COCO_WEIGHTS_LICENCE_NOTE not in texts(app)
    picker = app.selectbox(key=f"train_weights_S_{PROJECT}")
    labels = picker.options  # the formatted labels
    assert len(labels) == 4 and labels[1].startswith("COCO") and labels[2].startswith("run tiny")
    assert labels[0] == "none: random initialisation (from scratch)" and labels[3].startswith("a checkpoint file")
    assert "not on this machine" in labels[1]  # no COCO file in this storage
    # The default is something that exists: the project's evaluated run (else random initialisation), not COCO.
    assert picker.index == 2

    app.selectbox(key=f"train_weights_S_{PROJECT}").select_index(1).run()

    # Whether the file can be downloaded from here or not (tests/test_app_train_readiness.py), the licence is said.
    assert COCO_WEIGHTS_LICENCE_NOTE in texts(app)
    assert "run the command again" not in texts(app)


# ----------------------------------------------------------------------------------------------------------------
# backend.training.presets
# ----------------------------------------------------------------------------------------------------------------


def test_train_config_applies_the_preset_then_the_form() -> None:
    config = presets.train_config("/data/v1", "M", epochs=3, device="cpu")
    assert (config.size, config.imgsz, config.batch_size) == ("m", 480, 16)
    assert (config.epochs, config.device, config.data) == (3, "cpu", "/data/v1")
    with pytest.raises(ValueError, match="multiple of 32"):
        presets.train_config("/data/v1", "S", imgsz=100)
    with pytest.raises(ValueError, match="unknown preset"):
        presets.train_config("/data/v1", "XL")
    with pytest.raises(ValueError, match="no field"):
        presets.train_config("/data/v1", "S", epoch=3)
    with pytest.raises(ValueError, match="device"):
        presets.train_config("/data/v1", "S", device="gpu")


def test_new_run_dir_is_named_after_project_version_and_time(tmp_path: Path) -> None:
    moment = datetime(2026, 11, 28, 9, 5, 7, tzinfo=UTC)
    first = presets.new_run_dir(tmp_path, "My Pokédex!", "v1", moment)
    assert first == tmp_path / "My_Pokédex-v1-20261128-090507"
    first.mkdir()
    assert presets.new_run_dir(tmp_path, "My Pokédex!", "v1", moment).name == "My_Pokédex-v1-20261128-090507-2"


def fake_run(folder: Path, size: str, weights: str | None) -> catalog.RunInfo:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train": {"size": size, "weights": weights}}))
    (folder / "best.pt").write_bytes(b"")
    return catalog.run_info(folder)


def test_weights_options_and_the_licence_they_carry(tmp_path: Path) -> None:
    from_coco = fake_run(tmp_path / "from_coco", "s", "coco")
    from_that = fake_run(tmp_path / "from_that", "s", str(tmp_path / "from_coco" / "best.pt"))
    scratch = fake_run(tmp_path / "scratch", "s", None)
    medium = fake_run(tmp_path / "medium", "m", None)

    cancelled = fake_run(tmp_path / "cancelled", "s", None)
    (cancelled.path / "best.pt").rename(cancelled.path / "last.pt")
    end = {"event": "train_end", "stopped": "cancelled", "epochs_done": 0, "best_map": 0.0, "best_epoch": None}
    (cancelled.path / "metrics.jsonl").write_text(json.dumps(end))
    cancelled = catalog.run_info(cancelled.path)

    options = presets.weights_options([from_that, from_coco, cancelled, scratch, medium], "s")

    # The run cancelled in its first epoch is no start weights (it would read "best mAP50-95 0.000").
    assert not cancelled.trained and cancelled.best_map is None
    assert [option.value for option in options] == [
        None,
        "coco",
        *(str(run.path) for run in (from_that, from_coco, scratch)),
        presets.FILE_WEIGHTS,  # last: a checkpoint file whose path the page asks for
    ]
    # Random initialisation unless a run of the project has been evaluated: then the best of those.
    assert presets.default_weights(options, [scratch]) == 0
    (scratch.path / "eval.json").write_text(json.dumps({"metrics": {"mAP50-95": 0.2}}))
    assert options[presets.default_weights(options, [catalog.run_info(scratch.path)])].value == str(scratch.path)
    assert presets.licence_note("coco") == COCO_WEIGHTS_LICENCE_NOTE
    assert presets.inherits_coco_licence(str(from_that.path))  # through from_coco
    assert not presets.inherits_coco_licence(str(scratch.path))
    assert presets.licence_note(None) is None
    # A cycle (a run that names itself) ends.
    (tmp_path / "scratch" / "config.json").write_text(json.dumps({"train": {"weights": str(tmp_path / "scratch")}}))
    assert not presets.inherits_coco_licence(str(scratch.path))


def test_read_events_reads_whole_new_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert presets.read_events(path) == ([], 0)
    path.write_text('{"event": "train_start"}\n{"event": "step", "global_st')  # the second line is being written
    events, offset = presets.read_events(path)
    assert events == [{"event": "train_start"}]
    with path.open("a") as file:
        file.write('ep": 1}\nnot json\n')
    more, offset = presets.read_events(path, offset)
    assert more == [{"event": "step", "global_step": 1}]
    assert presets.read_events(path, offset) == ([], offset)


def test_training_curves_from_events() -> None:
    step = {term: 1.0 for term in LOSS_TERMS}
    events = [
        {"event": "train_start", "epochs": 2},
        *({"event": "step", "global_step": index, "epoch": 0, "lr": 0.1 * index, **step} for index in (1, 2, 3)),
        {"event": "epoch", "epoch": 0, "train": {"loss": 1.0}, "val": {"mAP50-95": 0.2}, "best_map": 0.2},
        # A resume repeats step 3 (from a mid-epoch checkpoint) and epoch 0: the latest values win.
        {"event": "step", "global_step": 3, "epoch": 0, "lr": 0.5, **step},
        {"event": "epoch", "epoch": 0, "train": {"loss": 0.9}, "val": {"mAP50-95": 0.25}, "best_map": 0.25},
        {"event": "train_end", "stopped": "epochs", "best_map": 0.25},
    ]
    curves = presets.training_curves(events)

    assert [row["global_step"] for row in curves.steps] == [1, 2, 3]
    assert curves.steps[-1]["lr"] == 0.5
    assert curves.loss_terms == list(LOSS_TERMS)
    assert curves.epochs == [{"epoch": 1, "lr": None, "best_map": 0.25, "train_loss": 0.9, "mAP50-95": 0.25}]
    assert curves.start["epochs"] == 2 and curves.end["stopped"] == "epochs"
    assert presets.thin(list(range(10)), 4) == [0, 3, 6, 9]
    # A live page keeps a bounded history: steps thinned, every other event kept, in order.
    long = [{"event": "step", "global_step": index} for index in range(10)] + [{"event": "epoch", "epoch": 0}]
    kept = presets.compact_events(long, max_steps=4)
    assert [event.get("global_step", "epoch") for event in kept] == [0, 3, 6, 9, "epoch"]


def test_run_rows_prefer_what_the_job_says(tmp_path: Path) -> None:
    done = fake_run(tmp_path / "done", "s", None)
    (done.path / "metrics.jsonl").write_text(json.dumps({"event": "train_end", "stopped": "time", "best_map": 0.3}))
    done = catalog.run_info(done.path)
    live = fake_run(tmp_path / "live", "s", None)

    rows = presets.run_rows([done, live], {str(live.path): "running", str(done.path): "succeeded"})

    assert [(row["run"], row["status"], row["best mAP50-95"]) for row in rows] == [
        ("done", "finished (time budget)", 0.3),
        ("live", "running", None),
    ]
    assert presets.run_rows([live])[0]["status"] == "stopped before the end"


@pytest.mark.slow
def test_one_epoch_count_everywhere_under_a_time_budget(settings: Settings) -> None:
    """30 epochs asked for, a 6-second budget: the job's message, its log, the page and the runs table all give the
    epochs actually run and say the budget ended the run; an epoch the budget cut short is not counted as done."""
    app = open_page()
    app.selectbox(key="train_imgsz_S").set_value(64)
    app.number_input(key="train_epochs_S").set_value(30)
    app.number_input(key="train_batch_S").set_value(2)
    app.number_input(key="train_budget_S").set_value(0.1)
    app.radio(key="train_device").set_value("cpu")
    app.button(key="train_start").click().run()
    assert not app.exception, [exception.value for exception in app.exception]

    job = jobs.get_job(int(app.query_params["job"]), settings)
    assert job.state == "succeeded", job.error
    done = job.result["epochs_done"]
    words = f"{done} of 30 epochs: the 6-second time budget ended the run"
    assert job.message == job.result["summary"] and job.message.startswith(words)
    log = "\n".join(job.log_tail)
    assert [int(line.split("epoch ")[1].split("/")[0]) for line in job.log_tail if "/30 done:" in line] == list(
        range(1, done + 1)
    )
    cut = [line for line in job.log_tail if "stopped by the time budget after" in line]
    assert all(f"epoch {done + 1}/30 stopped" in line for line in cut) and len(cut) <= 1
    assert f"training ended: {job.message}" in log
    run_dir = Path(job.params["run_dir"])
    info = catalog.run_info(run_dir)
    assert info.epochs_done == done and info.epochs_text.startswith(words)
    assert runs_table(app).loc[run_dir.name, "epochs"] == info.epochs_text
    assert f"Run ended: {info.epochs_text}" in texts(app)


@pytest.mark.slow
def test_switching_project_keeps_a_dataset_version_and_start(settings: Settings) -> None:
    from backend.ingest.service import import_into

    first = catalog.run_info(settings.runs_dir / RUN).config["data"]
    import_into([first], "Second", settings=settings)
    freeze("Second", "v7", settings=settings)
    app = open_page(project=PROJECT)
    assert app.selectbox(key=f"train_version_{PROJECT}").value.name == "v1"

    app.selectbox(key="train_project").set_value("Second").run()

    assert not app.exception, [exception.value for exception in app.exception]
    assert app.selectbox(key="train_version_Second").value.name == "v7"
    assert not app.button(key="train_start").disabled
    assert "No run yet" in texts(app)  # the runs shown are the project's: "tiny" trained on the Starter Pokédex
    assert "The runs of Second; 1 more belong to other projects." in texts(app)


def test_a_queued_jobs_outcome_says_queued(settings: Settings) -> None:
    from backend.jobs import outcome

    job_id = insert_job(settings, "queued", {"project": PROJECT, "config": {}, "run_dir": "x"})
    said = outcome.submitted(job_id, "training S at 320 px on v1", settings)
    assert said == {
        "summary": f"job {job_id} queued: training S at 320 px on v1",
        "level": "info",
        "job_id": job_id,
        "state": "queued",
    }
