"""The Train page's augmentation preview in a real browser: 8 samples of a frozen version through the default
pipeline, with their boxes drawn, and Reseed shows 8 others.

Only the Streamlit app is started (`streamlit run app/main.py` on a temporary storage holding the starter project
and a frozen version): the preview needs neither Label Studio nor the worker, so this stays well under a minute.
The screenshot goes where the other browser tests put theirs (`$YOLODEX_E2E_SCREENSHOTS`, default
build/screenshots/e2e/).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.browser_fixture import REPO_ROOT, chromium, require_browser, streamlit_app, wait_for_app

pytestmark = pytest.mark.slow

PREVIEW = ".st-key-train_aug_preview img"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory):
    require_browser()
    from backend.ingest.service import freeze, starter
    from backend.settings import Settings

    storage = tmp_path_factory.mktemp("train-augment-storage")
    settings = Settings.from_env({"YOLODEX_STORAGE": str(storage)})
    starter(settings)
    freeze("Starter Pokédex", "v1", settings=settings)
    with streamlit_app(storage) as app:
        yield app.url


@pytest.fixture
def screenshots() -> Path:
    folder = Path(os.environ.get("YOLODEX_E2E_SCREENSHOTS") or REPO_ROOT / "build" / "screenshots" / "e2e")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_train_page_previews_8_augmented_samples_and_reseeds_them(app_url: str, screenshots: Path) -> None:
    from playwright.sync_api import expect

    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1400, "height": 1600})
        page = context.new_page()
        page.goto(f"{app_url}/train?project=Starter%20Pok%C3%A9dex")
        wait_for_app(page)
        page.get_by_text("Show the augmentation preview").click()
        images = page.locator(PREVIEW)
        expect(images).to_have_count(8, timeout=90_000)
        for index in range(8):  # really drawn: each image has loaded with its width
            expect(images.nth(index)).to_have_js_property("complete", True)
            assert images.nth(index).evaluate("image => image.naturalWidth") > 0
        first = [images.nth(index).get_attribute("src") for index in range(8)]
        page.locator(".st-key-train_aug_preview").scroll_into_view_if_needed()
        page.screenshot(path=str(screenshots / "train_augmentation_preview.png"), full_page=True)

        page.get_by_role("button", name="Reseed").click()
        expect(images.first).not_to_have_attribute("src", first[0], timeout=60_000)
        expect(images).to_have_count(8)
        second = [images.nth(index).get_attribute("src") for index in range(8)]
        assert len(set(second) - set(first)) == 8  # 8 other samples (each image's URL is a hash of its pixels)
        expect(page.get_by_test_id("stException")).to_have_count(0)
        context.close()
