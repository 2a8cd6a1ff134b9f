"""The Label page in a real Chromium against a real Label Studio (the session's `labelstudio` server): the page's
Sync button creates the labeling project, the embedded labeling view shows it, a box is drawn by mouse in Label
Studio's own labeling UI inside that view and submitted, and the page's Pull button brings it back into our store.

Only the Streamlit app is started here (on the server's storage, pointed at its port); the worker is not needed.
The project has its own name, so it has its own Label Studio project beside the other tests' ones. Screenshots go
to `$YOLODEX_E2E_SCREENSHOTS`, default build/screenshots/e2e/ (label_page_*.png).
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from sqlalchemy import select

from backend.ingest.service import open_store
from backend.labeling.client import connect
from backend.store.db import session_scope
from backend.store.images import add_image_bytes
from backend.store.models import (
    Annotation,
    LabelingTask,
    Project,
    ProjectClass,
    ensure_class,
    get_or_create_project,
)
from backend.store.models import Image as StoredImage
from tests.browser_fixture import REPO_ROOT, chromium, require_browser, streamlit_app, wait_for_app

pytestmark = pytest.mark.slow

PROJECT = "Label page in a browser"
CLASSES = ("raccoon", "fox")
DRAWN_CLASS = "fox"  # not the first label: the box must carry the label the user chose
PHOTO_SIZE = (640, 480)
# One object per photo (xyxy pixels), at a different place in each, so no photo is a near-duplicate of another.
OBJECTS = {
    "garden_0.jpg": (60, 50, 300, 260),
    "garden_1.jpg": (330, 200, 600, 440),
    "garden_2.jpg": (200, 120, 440, 360),
}
LABELED = "garden_2.jpg"


def photo(seed: int, box: tuple[int, int, int, int]) -> bytes:
    """A noisy light background with one dark ellipse inside `box`, as JPEG."""
    rng = np.random.default_rng(seed)
    width, height = PHOTO_SIZE
    pixels = np.clip(rng.integers(150, 220, 3) + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).ellipse(box, fill=(70, 60, 55))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def make_project(settings) -> None:
    engine, storage = open_store(settings)
    with session_scope(engine) as session:
        project = get_or_create_project(session, PROJECT)
        for name in CLASSES:
            ensure_class(session, project, name)
        for seed, (name, box) in enumerate(OBJECTS.items()):
            added = add_image_bytes(session, storage, project, photo(seed, box), source="upload", original_name=name)
            assert added.status == "accepted", added.reason


def task_ids(settings) -> dict[str, tuple[int, int]]:
    """Our file name → (Label Studio project id, task id), from the image→task map the sync wrote."""
    engine, _ = open_store(settings)
    with session_scope(engine) as session:
        rows = session.execute(
            select(StoredImage.original_name, LabelingTask.ls_project_id, LabelingTask.ls_task_id)
            .join(LabelingTask, LabelingTask.image_id == StoredImage.id)
            .join(Project, Project.id == StoredImage.project_id)
            .where(Project.name == PROJECT)
        )
        return {name: (project_id, task_id) for name, project_id, task_id in rows}


def stored_boxes(settings) -> dict[str, list[tuple[str, tuple[float, float, float, float]]]]:
    """File name → the boxes our store holds for it (class name, xyxy pixels), for this project's images."""
    engine, _ = open_store(settings)
    with session_scope(engine) as session:
        rows = session.execute(
            select(
                StoredImage.original_name, ProjectClass.name, Annotation.x1, Annotation.y1, Annotation.x2, Annotation.y2
            )
            .join(Annotation, Annotation.class_id == ProjectClass.id)
            .join(StoredImage, StoredImage.id == Annotation.image_id)
            .join(Project, Project.id == StoredImage.project_id)
            .where(Project.name == PROJECT)
        )
        boxes: dict[str, list] = {}
        for image_name, class_name, x1, y1, x2, y2 in rows:
            boxes.setdefault(image_name, []).append((class_name, (x1, y1, x2, y2)))
        return boxes


@pytest.fixture
def screenshots() -> Path:
    folder = Path(os.environ.get("YOLODEX_E2E_SCREENSHOTS") or REPO_ROOT / "build" / "screenshots" / "e2e")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("label_page_*.png"):
        old.unlink()
    return folder


@pytest.mark.timeout(600)
def test_sync_label_a_task_in_the_embedded_label_studio_and_pull_the_box_back(labelstudio, screenshots: Path):
    require_browser()
    from playwright.sync_api import expect

    settings = labelstudio.settings
    make_project(settings)
    credentials = json.loads((settings.storage / "labelstudio" / "credentials.json").read_text())
    environment = {"YOLODEX_LS_PORT": str(settings.ls_port)}
    with streamlit_app(settings.storage, env=environment) as app, chromium() as browser:
        context = browser.new_context(viewport={"width": 1400, "height": 1200})
        page = context.new_page()

        def shot(name: str) -> None:
            page.screenshot(path=str(screenshots / f"label_page_{name}.png"), full_page=True)

        try:
            # The labeling view needs a Label Studio session in this browser: log in as the page says, once.
            page.goto(f"{labelstudio.url}/user/login/")
            page.fill('input[name="email"]', credentials["email"])
            page.fill('input[name="password"]', credentials["password"])
            page.click('button[type="submit"]')
            expect(page).not_to_have_url(re.compile(r"/user/login"))

            page.goto(f"{app.url}/label?project={PROJECT}")
            wait_for_app(page)
            expect(page.get_by_text(f"Label Studio is running at {labelstudio.url}.")).to_be_visible()
            expect(page.get_by_text(f"{PROJECT!r} is not in Label Studio yet")).to_be_visible()
            expect(page.locator("iframe")).to_have_count(0)  # nothing to embed before the sync

            # Sync: the banner's counts are the sync's report; Label Studio holds what it says.
            page.get_by_role("button", name="Sync to Label Studio", disabled=False).click()
            banner = page.get_by_text(re.compile(r"^Sync: Label Studio project \d+: "))
            expect(banner).to_contain_text("3 tasks for 3 images (3 new, 0 with their existing boxes)")
            wait_for_app(page)
            tasks = task_ids(settings)
            assert sorted(tasks) == sorted(OBJECTS), tasks
            ls_project_id = tasks[LABELED][0]
            expect(banner).to_contain_text(f"Label Studio project {ls_project_id}: ")
            with connect(settings) as client:
                in_label_studio = sorted(task["id"] for task in client.iter_tasks(ls_project_id))
            assert in_label_studio == sorted(task_id for _, task_id in tasks.values())

            # The embedded labeling view: Label Studio's data manager of that project, one row per task.
            frame = page.locator("iframe").first
            expect(frame).to_have_attribute("src", re.compile(rf"^{labelstudio.url}/projects/{ls_project_id}/data"))
            view = page.frame_locator("iframe").first
            rows = view.get_by_test_id("table-row")
            expect(rows).to_have_count(len(OBJECTS), timeout=60_000)
            frame.scroll_into_view_if_needed()
            shot("synced")

            # Label one task in Label Studio's own UI, inside the embedded view: open it from its row, choose the
            # label, drag a box over the object, submit.
            task_id = tasks[LABELED][1]
            row = rows.filter(has=view.get_by_label(f"Select Task {task_id}", exact=True))
            row.get_by_text(str(task_id), exact=True).first.click()
            expect(view.locator(".konvajs-content").first).to_be_visible(timeout=60_000)
            view.get_by_text(DRAWN_CLASS, exact=True).first.click()
            shown = view.locator('img[src^="blob:"]').first  # the photo as displayed (the canvas may be wider)
            expect(shown).to_be_visible()
            bounds = shown.bounding_box()
            scale = bounds["width"] / PHOTO_SIZE[0]
            x0, y0, x1, y1 = OBJECTS[LABELED]
            page.mouse.move(bounds["x"] + x0 * scale, bounds["y"] + y0 * scale)
            page.mouse.down()
            page.mouse.move(bounds["x"] + x1 * scale, bounds["y"] + y1 * scale, steps=12)
            page.mouse.up()
            expect(view.get_by_text("Labeled regions will appear here")).to_have_count(0)
            shot("drawn")
            with page.expect_response(
                lambda response: "/annotations" in response.url and response.request.method == "POST"
            ) as posted:
                view.get_by_test_id("bottombar-submit-button").click()
            assert posted.value.status == 201, posted.value.text()
            saved = posted.value.json()["result"]
            assert [result["value"]["rectanglelabels"] for result in saved] == [[DRAWN_CLASS]], saved

            # Pull: the banner's counts are the pull's report; the store now holds the box as drawn.
            page.get_by_role("button", name="Pull labels").click()
            expect(page.get_by_text(re.compile(r"^Pull: "))).to_have_text(
                "Pull: 1 of 3 tasks labeled; 1 images updated, 1 boxes"
            )
            wait_for_app(page)
            expect(page.get_by_test_id("stException")).to_have_count(0)
            progress = page.get_by_text("1 of 3 images labeled")
            expect(progress).to_be_visible()
            progress.scroll_into_view_if_needed()
            shot("pulled")
        except Exception:
            shot("failed")
            raise
        finally:
            context.close()

    boxes = stored_boxes(settings)
    assert list(boxes) == [LABELED], boxes  # only the labeled photo has a box
    [(class_name, box)] = boxes[LABELED]
    assert class_name == DRAWN_CLASS
    # As Label Studio saved it (percent of the original size), and as drawn within the mouse's rounding.
    value = saved[0]["value"]
    from_label_studio = (
        value["x"] * PHOTO_SIZE[0] / 100,
        value["y"] * PHOTO_SIZE[1] / 100,
        (value["x"] + value["width"]) * PHOTO_SIZE[0] / 100,
        (value["y"] + value["height"]) * PHOTO_SIZE[1] / 100,
    )
    assert np.abs(np.subtract(box, from_label_studio)).max() < 0.01, (box, from_label_studio)
    assert np.abs(np.subtract(box, OBJECTS[LABELED])).max() < 4, (box, OBJECTS[LABELED])
