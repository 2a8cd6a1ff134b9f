"""The Datasets page under AppTest, on a private copy of the Starter Pokédex storage: what the grid, the filters, the
import report, the statistics, the augmentation preview, the versions and the export show."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import delete, func, select, update
from streamlit.testing.v1 import AppTest

from backend.ingest import service
from backend.ingest.starter import STARTER_NAME
from backend.settings import Settings
from backend.store.db import session_scope
from backend.store.models import Annotation, DatasetVersion, Image, Project
from tests.conftest import encode_image, textured_image
from tests.labelstudio_fixture import free_port

# Absolute: AppTest resolves a relative path against this test file, not the repository root.
PAGE = Path(__file__).resolve().parents[1] / "pages" / "datasets.py"


@pytest.fixture(scope="module")
def starter_storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    storage = tmp_path_factory.mktemp("starter") / "storage"
    service.starter(Settings.from_env({"YOLODEX_STORAGE": str(storage)}))
    return storage


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, starter_storage: Path) -> Settings:
    copy = tmp_path / "storage"
    shutil.copytree(starter_storage, copy)
    for name in ("YOLODEX_DATABASE_URL", "YOLODEX_QUEUE_URL", "YOLODEX_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("YOLODEX_STORAGE", str(copy))
    monkeypatch.setenv("YOLODEX_LS_PORT", str(free_port()))
    return Settings.from_env({"YOLODEX_STORAGE": str(copy)})


def run_page(project: str | None = None) -> AppTest:
    app = AppTest.from_file(str(PAGE), default_timeout=60)
    if project is not None:
        app.query_params["project"] = project  # what a link from another page, or a reload, carries
    app.run()
    assert_clean(app)
    return app


def assert_clean(app: AppTest) -> None:
    assert not app.exception, [exception.value for exception in app.exception]
    assert not app.error, [error.value for error in app.error]


def grid_captions(app: AppTest) -> list[str]:
    """Captions of the grid's thumbnails (one st.image per card; the preview's samples are captioned "sample n")."""
    captions = [image.captions[0] for image in app.image if len(image.captions) == 1]
    return [caption for caption in captions if not caption.startswith("sample ")]


def page_line(app: AppTest) -> str:
    lines = [markdown.value for markdown in app.markdown if markdown.value.startswith("Page ")]
    assert len(lines) == 1, lines
    return lines[0]


def table_with(app: AppTest, column: str):
    """The one table of the page that has `column`."""
    tables = [frame.value for frame in app.dataframe if column in frame.value.columns]
    assert len(tables) == 1, [list(frame.value.columns) for frame in app.dataframe]
    return tables[0]


def metrics(app: AppTest) -> dict[str, str]:
    return {metric.label: metric.value for metric in app.metric}


def expected_captions(settings: Settings, project: str, ids: list[int] | None = None) -> list[str]:
    """Captions built from the database, independently of the page: name · W×H · boxes (no boxes, unlabeled)."""
    engine, _ = service.open_store(settings)
    with session_scope(engine) as session:
        query = select(Image).join(Project).where(Project.name == project).order_by(Image.id)
        images = [image for image in session.scalars(query) if ids is None or image.id in ids]
        captions = []
        for image in images:
            boxes = session.scalar(select(func.count()).where(Annotation.image_id == image.id))
            background = "no boxes" if image.labeled else "unlabeled"  # a labeled image without boxes is background
            label = f"{boxes} boxes" if boxes > 1 else ("1 box" if boxes else background)
            captions.append(f"{image.original_name} · {image.width}×{image.height} · {label}")
        return captions


def test_grid_pages_through_the_starter_images(settings):
    app = run_page()
    everything = expected_captions(settings, STARTER_NAME)
    assert len(everything) == 64
    assert page_line(app) == "Page 1 of 3 · 64 images"
    assert grid_captions(app) == everything[:24]
    assert app.selectbox(key="datasets_project").value == STARTER_NAME

    app.button(key="datasets_next").click().run()
    assert page_line(app) == "Page 2 of 3 · 64 images"
    assert grid_captions(app) == everything[24:48]
    app.number_input(key="datasets_page").set_value(3).run()
    assert page_line(app) == "Page 3 of 3 · 64 images"
    assert grid_captions(app) == everything[48:]
    assert app.button(key="datasets_next").disabled and not app.button(key="datasets_previous").disabled


def test_unlabeled_and_class_filters(settings):
    engine, _ = service.open_store(settings)
    with session_scope(engine) as session:
        ids = list(session.scalars(select(Image.id).order_by(Image.id)))[10:13]
        session.execute(delete(Annotation).where(Annotation.image_id.in_(ids)))
        session.execute(update(Image).where(Image.id.in_(ids)).values(labeled=False))
    app = run_page()
    app.number_input(key="datasets_page").set_value(2).run()
    app.radio(key="datasets_filter").set_value("unlabeled").run()
    assert page_line(app) == "Page 1 of 1 · 3 images"  # a filter change goes back to page 1
    assert grid_captions(app) == expected_captions(settings, STARTER_NAME, ids)
    assert all(caption.endswith("· unlabeled") for caption in grid_captions(app))

    stats = service.stats(STARTER_NAME, settings=settings)
    squares = next(entry for entry in stats["classes"] if entry["name"] == "square")
    app.radio(key="datasets_filter").set_value("class").run()
    app.selectbox(key="datasets_class").set_value("square").run()
    assert page_line(app) == f"Page 1 of 2 · {squares['images']} images"


def upload(app: AppTest, files: list[tuple[str, bytes, str]]) -> AppTest:
    """Uploads and imports; the banner may be an error (nothing imported), so only exceptions are checked here."""
    app.file_uploader(key="datasets_upload_0").set_value(files).run()
    app.button(key="datasets_import").click().run()
    assert not app.exception, [exception.value for exception in app.exception]
    return app


def banners(app: AppTest) -> dict[str, list[str]]:
    kinds = {"success": app.success, "info": app.info, "warning": app.warning, "error": app.error}
    return {kind: [element.value for element in elements] for kind, elements in kinds.items() if len(elements)}


def test_uploading_a_png_and_a_zip_shows_the_report_and_the_images(settings):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("holiday/beach.png", encode_image(textured_image(21)))
        zipped.writestr("holiday/again.png", encode_image(textured_image(20)))  # the same bytes as the PNG
        zipped.writestr("holiday/near.jpg", encode_image(textured_image(22), "JPEG", quality=95))
    files = [
        ("pikachu.png", encode_image(textured_image(20)), "image/png"),
        ("holiday.zip", archive.getvalue(), "application/zip"),
        ("near.png", encode_image(textured_image(22)), "image/png"),
    ]
    service.create_project("Holiday", ["Beach ball"], settings=settings)
    app = run_page("Holiday")
    upload(app, files)

    # The banner's figures are the report's: 3 new + 1 near duplicate stored, the PNG's copy in the zip skipped.
    assert banners(app)["success"] == [
        "Added 4 images to Holiday; 1 of the added are near duplicates, 1 already there (skipped)."
    ]
    shown = metrics(app)
    assert (shown["accepted"], shown["duplicates"], shown["near duplicates"], shown["rejected"]) == ("3", "1", "1", "0")
    accepted = next(frame.value for frame in app.dataframe if "image_id" in frame.value and len(frame.value) == 3)
    assert list(accepted["name"]) == ["pikachu.png", "holiday.zip/holiday/beach.png", "holiday.zip/holiday/near.jpg"]

    # The page stays on the project, and its grid shows the stored images (near duplicates included).
    assert app.selectbox(key="datasets_project").value == "Holiday"
    assert page_line(app) == "Page 1 of 1 · 4 images"
    assert grid_captions(app) == [
        "pikachu.png · 96×64 · unlabeled",
        "holiday.zip/holiday/beach.png · 96×64 · unlabeled",
        "holiday.zip/holiday/near.jpg · 96×64 · unlabeled",
        f"near.png · 96×64 · unlabeled · near #{near_of(settings)}",
    ]
    app.radio(key="datasets_filter").set_value("duplicates").run()
    assert grid_captions(app) == [caption for caption in grid_captions(app) if "near" in caption]
    assert len(grid_captions(app)) == 2
    assert not list((settings.storage / "uploads").glob("[0-9a-f]*"))  # the upload folder went after the import


def near_of(settings: Settings) -> int:
    engine, _ = service.open_store(settings)
    with session_scope(engine) as session:
        return session.scalar(select(Image.duplicate_of_id).where(Image.original_name == "near.png"))


def test_a_text_file_named_jpg_is_rejected_with_its_reason(settings):
    app = run_page()
    upload(app, [("cat.jpg", b"just some text, no picture", "image/jpeg")])
    assert banners(app)["error"] == [f"Nothing imported into {STARTER_NAME}: 1 rejected (the report below says why)."]
    assert "success" not in banners(app)
    assert metrics(app)["rejected"] == "1" and metrics(app)["accepted"] == "0"
    rejected = table_with(app, "reason")
    assert list(rejected["name"]) == ["cat.jpg"]
    assert rejected["reason"][0].startswith("not an image")
    assert page_line(app) == "Page 1 of 3 · 64 images"  # nothing stored

    # The grid's "rejected" filter shows the last import's list (rejected files are not stored), also after a reload.
    app = run_page()
    app.radio(key="datasets_filter").set_value("rejected").run()
    kept = table_with(app, "reason")
    assert list(kept["name"]) == ["cat.jpg"] and kept["reason"][0].startswith("not an image")
    assert any("Rejected files are not stored" in caption.value for caption in app.caption)


def test_class_statistics_figures(settings):
    app = run_page()
    stats = service.stats(STARTER_NAME, settings=settings)
    charts = {chart.proto.id: json.loads(chart.proto.spec) for chart in app.get("plotly_chart")}
    per_class = next(spec for spec in charts.values() if "per class" in spec["layout"]["title"]["text"])
    bars = {trace["name"]: dict(zip(trace["x"], trace["y"])) for trace in per_class["data"]}
    assert bars["images"] == {entry["name"]: entry["images"] for entry in stats["classes"]}
    assert bars["boxes"] == {entry["name"]: entry["boxes"] for entry in stats["classes"]}
    sizes = next(spec for spec in charts.values() if "Box size" in spec["layout"]["title"]["text"])
    assert {trace["name"]: list(trace["y"]) for trace in sizes["data"]} == stats["box_size_histogram"]
    assert metrics(app)["images"] == "64" and metrics(app)["boxes"] == str(stats["boxes"])


def test_augmentation_preview_shows_samples(settings):
    app = run_page()
    app.number_input(key="datasets_aug_count").set_value(4).run()
    app.button(key="datasets_aug_show").click().run()
    assert_clean(app)
    samples = [image for image in app.image if image.captions and image.captions[0] == "sample 1"]
    assert len(samples) == 1 and samples[0].captions == ["sample 1", "sample 2", "sample 3", "sample 4"]


def test_freeze_lists_the_version_and_export_offers_a_zip(settings):
    app = run_page()
    assert any("No version yet" in info.value for info in app.info)
    assert app.text_input(key="datasets_version_name").value == "v1"
    app.number_input(key="datasets_val").set_value(0.25)
    app.button(key="FormSubmitter:datasets_freeze-Freeze the labeled images").click().run()
    assert_clean(app)

    engine, _ = service.open_store(settings)
    with session_scope(engine) as session:
        version = session.scalar(select(DatasetVersion).where(DatasetVersion.name == "v1"))
        splits = version.counts["splits"]
    assert version.val_fraction == 0.25
    assert app.success[0].value.startswith("Freeze: version v1: train ")
    table = table_with(app, "train images")
    row = table.iloc[0]
    assert row["version"] == "v1" and row["images"] == 64 and row["fractions"] == "0.75/0.25"
    assert (row["train images"], row["val images"]) == (splits["train"]["images"], splits["val"]["images"])
    assert (row["train boxes"], row["val boxes"]) == (splits["train"]["boxes"], splits["val"]["boxes"])

    app.radio(key="datasets_export_format").set_value("coco").run()
    app.button(key="datasets_export_button").click().run()
    assert_clean(app)
    archive = Path(app.session_state["datasets_export"])
    with zipfile.ZipFile(archive) as zipped:
        names = sorted(name for name in zipped.namelist() if name.endswith(".json"))
        splits = {name: json.loads(zipped.read(name)) for name in names}
    assert names == [f"{archive.stem}/train.json", f"{archive.stem}/val.json"]  # per split, no merged file
    assert sum(len(content["images"]) for content in splits.values()) == 64
    assert app.get("download_button")[0].proto.label == f"Download {archive.name}"

    # The form suggests the next free name after each freeze (after v2, v3).
    assert app.text_input(key="datasets_version_name").value == "v2"
    app.button(key="FormSubmitter:datasets_freeze-Freeze the labeled images").click().run()
    assert app.success[0].value.startswith("Freeze: version v2: train ")
    assert app.text_input(key="datasets_version_name").value == "v3"


def test_upload_banners_follow_the_report(settings):
    png = encode_image(textured_image(50))
    app = upload(run_page(), [("new.png", png, "image/png"), ("bad.jpg", b"text", "image/jpeg")])
    assert banners(app)["warning"] == [f"Added 1 image to {STARTER_NAME}; 1 rejected (the report below says why)."]
    app = upload(run_page(), [("again.png", png, "image/png")])
    assert banners(app)["warning"] == [f"Nothing new imported into {STARTER_NAME}: 1 already there (skipped)."]
    assert "success" not in banners(app)


def test_a_labeled_set_of_images_already_there_is_reported_as_the_boxes_it_added():
    from backend.ingest.service import import_outcome

    counts = {"accepted": 0, "near_duplicates": 0, "duplicates": 9, "rejected": 0, "annotations": 9}
    assert import_outcome({"project": "Garden", "counts": counts}) == (
        "success",
        "Added 9 boxes to 9 images Garden already had (no new image).",
    )
    rejected = {**counts, "rejected": 1, "annotations": 1}
    assert import_outcome({"project": "Garden", "counts": rejected}) == (
        "warning",
        "Added 1 box to 9 images Garden already had (no new image); 1 rejected (the report below says why).",
    )
    assert import_outcome({"project": "Garden", "counts": {**counts, "annotations": 0}}) == (
        "warning",
        "Nothing new imported into Garden: 9 already there (skipped).",
    )


@pytest.fixture
def immediate_jobs(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Jobs run inline when submitted (no worker)."""
    import backend.jobs.tasks

    monkeypatch.setenv("YOLODEX_QUEUE_IMMEDIATE", "1")
    monkeypatch.setattr(backend.jobs.tasks.huey, "immediate", True)
    yield
    # The module's huey was made at its first import, for that test's storage, which pytest deletes once the test has
    # passed (tmp_path_retention_policy); leaving immediate mode reopens that SQLite file, so its folder must exist.
    filename = backend.jobs.tasks.huey.storage_kwargs.get("filename")
    if filename:
        Path(filename).parent.mkdir(parents=True, exist_ok=True)


def test_a_crawl_is_a_job_whose_outcome_the_page_shows(settings, immediate_jobs):
    from backend.jobs import api as jobs_api

    app = run_page()
    app.radio(key="datasets_crawl_mode").set_value("Image URLs")
    app.text_area(key="datasets_crawl_text").set_value("http://127.0.0.1:9/pikachu.png\n\n")
    app.button(key="FormSubmitter:datasets_crawl-Crawl").click().run()
    assert_clean(app)

    job = jobs_api.get_job(app.session_state["datasets_job"], settings)
    assert job.kind == "crawl" and job.state == "succeeded", job.error
    assert job.params["urls"] == ["http://127.0.0.1:9/pikachu.png"] and job.params["project"] == STARTER_NAME
    assert any(f"Crawl job #{job.id}: succeeded" in markdown.value for markdown in app.markdown)
    assert any("[Jobs](/jobs)" in markdown.value for markdown in app.markdown)
    # A loopback address is refused by the crawler's SSRF rules: the page says so instead of storing anything.
    refusals = table_with(app, "url")
    assert list(refusals["url"]) == ["http://127.0.0.1:9/pikachu.png"]
    assert "upload box above" in refusals["detail"].iloc[0] and "--allow-private" not in refusals["detail"].iloc[0]
    assert metrics(app)["kept"] == "0"
    assert app.button(key="datasets_job_cancel").disabled


def test_a_large_upload_is_imported_by_a_job(settings, immediate_jobs, monkeypatch: pytest.MonkeyPatch):
    from backend import browse
    from backend.jobs import api as jobs_api

    monkeypatch.setattr(browse, "SYNC_IMPORT_BYTES", 10)  # every upload counts as large
    app = run_page()
    upload(app, [("big.png", encode_image(textured_image(30)), "image/png"), ("bad.jpg", b"text", "image/jpeg")])
    job = jobs_api.get_job(app.session_state["datasets_job"], settings)
    assert job.kind == "import" and job.state == "succeeded", job.error
    assert any(f"Import job #{job.id}: succeeded" in markdown.value for markdown in app.markdown)
    assert (metrics(app)["accepted"], metrics(app)["rejected"]) == ("1", "1")
    assert page_line(app) == "Page 1 of 3 · 65 images"
    # The job's report becomes the project's last report, and the uploaded files are removed once imported.
    app.radio(key="datasets_filter").set_value("rejected").run()
    rejected = [frame.value for frame in app.dataframe if "reason" in frame.value.columns]
    assert len(rejected) == 2 and all(list(table["name"]) == ["bad.jpg"] for table in rejected)  # job report + grid
    assert not list((settings.storage / "uploads").glob("[0-9a-f]*"))


def test_an_empty_storage_sends_the_user_to_the_project_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("YOLODEX_DATABASE_URL", raising=False)
    monkeypatch.setenv("YOLODEX_STORAGE", str(tmp_path / "empty"))
    settings = Settings.from_env({"YOLODEX_STORAGE": str(tmp_path / "empty")})
    app = run_page()
    [info] = [info.value for info in app.info]  # the shared picker's guidance, sending the user to the Project page
    assert info.startswith("No project yet") and "(/project)" in info
    assert not app.file_uploader and not app.image and not app.get("plotly_chart")  # no upload into no project
    assert not service.project_exists(service.DEFAULT_PROJECT, settings=settings)

    service.create_project("Garden", ["Hedgehog"], settings=settings)
    app = upload(run_page(), [("first.png", encode_image(textured_image(40)), "image/png")])
    assert banners(app)["success"] == ["Added 1 image to Garden."]
    assert app.selectbox(key="datasets_project").value == "Garden"
    assert page_line(app) == "Page 1 of 1 · 1 image"
    assert grid_captions(app) == ["first.png · 96×64 · unlabeled"]


def test_a_project_without_classes_points_to_the_project_page(settings):
    (settings.storage / "loose.png").write_bytes(encode_image(textured_image(41)))
    service.import_into([settings.storage / "loose.png"], "Loose", settings=settings)  # the CLI's way: no classes
    app = run_page("Loose")
    assert any(info.value.startswith("No classes yet: add them on the [Project](/project) page") for info in app.info)
