"""The run folder (`backend.runs.RunFolder`) and the evaluation the CLI and the evaluate job share
(`backend.run_evaluation.evaluate_run`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend import cli
from backend.data.synthetic import generate_synthetic_dataset
from backend.jobs import api, tasks
from backend.models import save_checkpoint
from backend.run_evaluation import evaluate_run
from backend.runs import RunFolder, RunFolderError
from backend.settings import Settings
from backend.training.config import TrainConfig
from tests.test_export import detector_with_spread_scores

SHAPES = ["circle", "square", "triangle"]


def test_a_config_written_is_read_back_as_the_same_train_config(tmp_path: Path) -> None:
    config = TrainConfig(data=str(tmp_path / "data"), size="m", imgsz=320, epochs=7, time_minutes=2.5, patience=None)
    folder = RunFolder(tmp_path / "run")
    folder.write_config({"train": config.to_dict(), "class_names": SHAPES})
    assert TrainConfig.from_dict(folder.train()) == config
    assert folder.read_config()["class_names"] == SHAPES
    assert folder.dataset() == tmp_path / "data"
    assert folder.has_config() and not folder.resumable() and folder.holds_run()


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "has no config.json"),
        ("{not json", "is not valid JSON"),
        ('{"class_names": ["a"]}', 'its "train" object is missing'),
        ('{"train": "s"}', 'its "train" object is missing'),
        ("[1, 2]", 'its "train" object is missing'),
    ],
)
def test_a_missing_or_broken_config_is_refused_with_what_is_wrong(tmp_path: Path, content: str | None, words: str):
    folder = RunFolder(tmp_path)
    if content is not None:
        folder.config_path.write_text(content)
    with pytest.raises(RunFolderError, match=words) as error:
        folder.train()
    assert str(tmp_path) in str(error.value)
    assert folder.train_or_none() is None and folder.dataset() is None
    if content is not None:
        assert folder.config_path.read_text() == content  # a reader loses nothing


def test_writing_a_config_without_its_train_part_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    with pytest.raises(ValueError, match="train"):
        folder.write_config({"class_names": SHAPES})
    assert not folder.config_path.exists()


def test_the_checkpoint_of_a_folder_is_best_then_last(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    assert folder.checkpoint() == tmp_path / "best.pt"  # neither: the name a missing file is reported under
    folder.last.write_bytes(b"last")
    assert folder.checkpoint() == tmp_path / "last.pt"
    folder.best.write_bytes(b"best")
    assert folder.checkpoint() == tmp_path / "best.pt"


def test_resumable_needs_both_config_and_last(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.last.write_bytes(b"last")
    assert folder.holds_run() and not folder.resumable()
    folder.write_config({"train": TrainConfig(data="d").to_dict()})
    assert folder.resumable()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run folder holding an untrained detector's best.pt and config.json, and a 5-image validation set."""
    root = tmp_path_factory.mktemp("evaluate")
    data = generate_synthetic_dataset(root / "shapes", num_train=1, num_val=5, image_size=(96, 96), class_names=SHAPES)
    run = root / "run"
    save_checkpoint(run / "best.pt", detector_with_spread_scores(len(SHAPES)), class_names=SHAPES, imgsz=96)
    RunFolder(run).write_config({"train": TrainConfig(data=str(data), imgsz=96).to_dict()})
    return run, data


def test_the_cli_prints_what_evaluate_run_returns(evaluated: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    run, data = evaluated
    started: list[str] = []
    evaluation = evaluate_run(run, data, batch=2, device="cpu", out=tmp_path / "a" / "e.json", on_start=started.append)
    assert evaluation.model == run / "best.pt" and evaluation.images == 5 and evaluation.imgsz == 96
    assert started == ["evaluating best.pt on 5 val images at 96px"]
    payload = evaluation.result.to_dict()  # what is saved and printed: metrics rounded to 4 places
    assert json.loads((tmp_path / "a" / "e.json").read_text()) == json.loads(json.dumps(payload))

    assert cli.main(["eval", str(run), "--data", str(data), "--batch", "2", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == evaluation.text() + "\n"
    assert evaluation.text().startswith(f"{run / 'best.pt'} on {data} [val], 5 images, imgsz 96\n  mAP50-95: ")
    assert cli.main(["eval", str(run), "--data", str(data), "--batch", "2", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(payload))


def test_the_evaluate_job_records_what_evaluate_run_returns(evaluated, tmp_path: Path, monkeypatch) -> None:
    run, data = evaluated
    monkeypatch.setattr(tasks.huey, "immediate", True)
    settings = Settings.from_env({"YOLODEX_STORAGE": str(tmp_path / "storage"), "YOLODEX_DEVICE": "cpu"})
    out = tmp_path / "job.json"
    params = {"model": str(run / "best.pt"), "data": str(data), "batch": 2, "out": str(out)}
    job = api.get_job(api.submit("evaluate", params, settings=settings), settings)
    assert job.state == "succeeded", (job.error, job.traceback)
    expected = evaluate_run(run / "best.pt", data, batch=2, device="cpu", out=out).to_dict()
    assert job.result == json.loads(json.dumps(expected))
    assert job.message == expected["summary"]


def test_evaluate_run_refuses_a_split_the_dataset_lacks(evaluated: tuple[Path, Path]) -> None:
    run, data = evaluated
    with pytest.raises(ValueError, match=r"has no 'test' split \(it has: "):
        evaluate_run(run, data, "test", device="cpu")
