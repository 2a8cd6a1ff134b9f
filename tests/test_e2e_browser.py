"""End to end in a real browser: the app started the way `make run` starts it, driven by Playwright and chromium.

`make run` (on free ports, with a temporary storage) starts Label Studio, the huey worker and the Streamlit app; the
tests upload a photo on the Pokédex page, run a short training job from the Train page, and upload a zip on the
Datasets page. Assertions are Playwright's retrying `expect`s, never fixed sleeps.
Screenshots go to `$YOLODEX_E2E_SCREENSHOTS` (default: `build/screenshots/e2e/` in the repository) and are kept.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser_fixture import chromium, drop_files, fill_short_training, make_run, require_browser, wait_for_app
from tests.conftest import REPO_ROOT, encode_image, textured_image

pytestmark = pytest.mark.slow

CLASS_NAMES = ["Bulbasaur", "Charmander", "Squirtle"]
MODEL_PROJECT = "Kanto"  # the newest project, so the pages open on it
# The cancelled training job: far more than it can train before the click.
CANCEL_EPOCHS = 1000
CANCEL_BUDGET_MINUTES = 60


def _write_model_run(storage: Path) -> Path:
    """A run folder the catalog finds, with an FP32 ONNX model whose scores spread over 0.25-0.95 (real detections
    on any photo, no training needed)."""
    from backend.export.onnx_export import export_onnx
    from tests.test_export import detector_with_spread_scores

    run = storage / "runs" / "e2e-run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {"size": "s", "imgsz": 64}, "class_names": CLASS_NAMES}))
    export_onnx(
        detector_with_spread_scores(len(CLASS_NAMES)),
        run / "model_fp32.onnx",
        imgsz=64,
        class_names=CLASS_NAMES,
        run_id="e2e-run",
    )
    # Its real evaluation on three photos whose objects it finds a quarter of: a model still learning.
    from tests.test_app_pokedex import evaluate_model

    evaluation = evaluate_model(run / "model_fp32.onnx", storage / "e2e-val", "quarter")
    (run / "eval.json").write_text(json.dumps(evaluation))
    return run


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app's storage folder (its runs are read back by the training test)."""
    return tmp_path_factory.mktemp("e2e-storage")


@pytest.fixture(scope="module")
def app_url(storage: Path) -> Iterator[str]:
    """`make run` with a fresh storage and free ports; stopped (Ctrl-C, as a user would) after the module."""
    require_browser()
    _write_model_run(storage)
    from backend.ingest.service import create_project, freeze, starter
    from backend.settings import Settings

    prepared = Settings.from_env({"YOLODEX_STORAGE": str(storage)})
    starter(prepared)  # what `make run` does too; the training test needs a frozen version of it
    freeze("Starter Pokédex", "v1", settings=prepared)
    create_project(MODEL_PROJECT, CLASS_NAMES, settings=prepared)  # the model's project (by its class names)
    with make_run(storage) as app:
        yield app.url


@pytest.fixture(scope="module")
def browser(app_url: str):
    with chromium() as launched:
        yield launched


@pytest.fixture
def screenshots() -> Path:
    folder = Path(os.environ.get("YOLODEX_E2E_SCREENSHOTS") or REPO_ROOT / "build" / "screenshots" / "e2e")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser, screenshots: Path, request: pytest.FixtureRequest):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = context.new_page()
    yield opened
    # The page as the test left it (on failure too): the first thing to look at when a browser test fails.
    opened.screenshot(path=str(screenshots / f"{request.node.name}_end.png"), full_page=True)
    context.close()


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _photo(path: Path, size: tuple[int, int] = (640, 480)) -> Path:
    path.write_bytes(encode_image(textured_image(5, size), "JPEG", quality=90))
    return path


def test_pokedex_upload_shows_boxes_and_dex_cards(page, app_url: str, tmp_path: Path, screenshots: Path):
    from playwright.sync_api import expect

    page.goto(f"{app_url}/pokedex")
    wait_for_app(page)
    drop_files(page, [_photo(tmp_path / "photo.jpg")])
    expect(page.get_by_test_id("stImage").first).to_be_visible()
    # One dex card per detection: each shows a class name and a confidence.
    expect(
        page.get_by_text("Bulbasaur").or_(page.get_by_text("Charmander")).or_(page.get_by_text("Squirtle")).first
    ).to_be_visible()
    expect(page.get_by_text("%").first).to_be_visible()
    expect(page.get_by_test_id("stException")).to_have_count(0)
    page.screenshot(path=str(screenshots / "e2e_pokedex.png"), full_page=True)
    # The model is still learning (its evaluation above): the page says what it finds, with a link to train it on.
    notice = page.get_by_test_id("stAlert").filter(has_text="Still learning")
    expect(notice).to_contain_text(re.compile(r"it finds \d+% of the objects in its validation photos"))
    notice.scroll_into_view_if_needed()
    page.screenshot(path=str(screenshots / "e2e_pokedex_still_learning.png"))  # the notice in view
    expect(page.get_by_role("link", name="Continue training e2e-run")).to_have_attribute(
        "href",
        re.compile(r"(^|/)train\?continue=e2e-run$"),  # the app's own link (relative): the same tab
    )


def test_datasets_zip_upload_shows_the_import_report(page, app_url: str, tmp_path: Path, screenshots: Path):
    from playwright.sync_api import expect

    archive = tmp_path / "photos.zip"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for seed in range(3):
            bundle.writestr(f"photos/cat_{seed}.png", encode_image(textured_image(100 + seed, (120, 90))))
        bundle.writestr("photos/notes.jpg", b"this is not an image")
    archive.write_bytes(buffer.getvalue())

    page.goto(f"{app_url}/datasets")
    wait_for_app(page)
    drop_files(page, [archive])
    page.get_by_role("button", name=re.compile(r"^Import into")).click()
    # The report: 3 accepted, the text file named .jpg rejected (its row is in the rejected table).
    expect(page.get_by_test_id("stMetric").filter(has_text="accepted")).to_contain_text("3", timeout=90_000)
    expect(page.get_by_test_id("stMetric").filter(has_text="rejected")).to_contain_text("1")
    expect(page.get_by_text("Rejected (1)")).to_be_visible()
    expect(page.get_by_test_id("stException")).to_have_count(0)
    page.screenshot(path=str(screenshots / "e2e_datasets_zip.png"), full_page=True)


def test_train_page_runs_a_job_with_live_charts_and_cancel(page, app_url: str, storage: Path, screenshots: Path):
    """A job far too long to end by itself (1000 epochs, a 60-minute budget) is cancelled from the page: the job ends
    `cancelled` and its run stopped early (its last.pt and metrics.jsonl say so), so the click really stopped it."""
    from playwright.sync_api import expect

    from backend.models.checkpoints import read_checkpoint

    page.goto(f"{app_url}/train?project=Starter%20Pok%C3%A9dex")  # a link to the page on that project
    wait_for_app(page)
    fill_short_training(page, minutes=CANCEL_BUDGET_MINUTES, epochs=CANCEL_EPOCHS)
    page.get_by_role("button", name="Start training").click()

    # The worker trains; the page follows it live: progress text, then the loss/lr/mAP chart.
    progress = page.get_by_test_id("stProgress").first  # a fragment re-render can show two for a moment
    expect(progress).to_contain_text("running", timeout=120_000)
    expect(page.get_by_test_id("stPlotlyChart").first).to_be_visible(timeout=120_000)
    first = progress.inner_text()
    expect(progress).not_to_have_text(first, timeout=60_000)  # it moves on: the fragment refreshes
    page.screenshot(path=str(screenshots / "e2e_train_live.png"), full_page=True)

    page.get_by_role("button", name="Cancel").click()
    expect(progress).to_contain_text("cancelled", timeout=120_000)
    expect(progress).not_to_contain_text("succeeded")
    expect(page.get_by_test_id("stException")).to_have_count(0)
    page.screenshot(path=str(screenshots / "e2e_train_end.png"), full_page=True)

    # The run the job trained stopped early: it ended on the cancel, far before its epochs or its time budget.
    (run,) = [folder for folder in (storage / "runs").iterdir() if folder.name != "e2e-run"]
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == CANCEL_EPOCHS
    (end,) = [event for event in _events(run / "metrics.jsonl") if event["event"] == "train_end"]
    assert end["stopped"] == "cancelled" and end["epochs_done"] < CANCEL_EPOCHS, end
    assert end["elapsed_s"] < CANCEL_BUDGET_MINUTES * 60
    position = read_checkpoint(run / "last.pt")
    assert (position["epoch"], position["step_in_epoch"]) < (CANCEL_EPOCHS, 0), position
