"""The app in a real browser: Pokédex upload-to-result time, and the app server's memory with 3 sessions browsing
500 images (targets: at most 2 s; under 1 GB).

One run, side by side: the Streamlit app (`streamlit run app/main.py`, as `make run` starts it; Label Studio and the
worker are not needed for these two pages and are not started) on a free port, with a fresh storage holding a
project of 500 photos (800x600 JPEG) and the random-weight YOLO-NAS S FP32/INT8 pair at 640 of `bench/app.py`.
Three Chromium sessions (Playwright, Debian's chromium) are open at once and take turns:

1. each pages through the whole Datasets grid (24 thumbnails a page, 21 pages), waiting for each page to render;
2. each uploads a new 4000x3000 JPEG on the Pokédex page (default model: the INT8 one) and waits for the rendered
   result (the caption under the annotated photo). Timed in the test process from `set_input_files` to the caption
   being visible: the HTTP upload of ~3 MB, the script run, the model, the drawing and the browser's rendering.

Memory is the resident set (VmRSS) of the Streamlit server process, sampled after every step; the peak and the
value at the end are printed. Needs /usr/bin/chromium (`make setup` installs it as root).

    .venv/bin/python bench/app_browser.py [--images 500] [--sessions 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import func, select  # noqa: E402

from backend.settings import Settings  # noqa: E402
from backend.store.db import init_db, session_scope  # noqa: E402
from backend.store.images import add_image_bytes  # noqa: E402
from backend.store.models import Image, ensure_class, get_or_create_project  # noqa: E402
from tests.browser_fixture import CHROMIUM, CHROMIUM_ARGS, streamlit_app  # noqa: E402

PROJECT = "Bench"
TIMEOUT_MS = 60_000


def _bench_app_module():
    """bench/app.py (its `build_models` and `photo_jpeg`), loaded by path: the name `app` is our Streamlit package."""
    spec = importlib.util.spec_from_file_location("bench_app", ROOT / "bench" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_project(settings: Settings, count: int, bench_app) -> None:
    """`count` distinct 800x600 JPEG photos in project PROJECT (skipped when it already has them)."""
    from PIL import Image as PILImage

    engine = init_db(settings.database_url)
    with session_scope(engine) as session:
        project = get_or_create_project(session, PROJECT)
        ensure_class(session, project, "bulbasaur")
        have = session.scalar(select(func.count()).select_from(Image).where(Image.project_id == project.id))
        started = time.perf_counter()
        for seed in range(int(have), count):
            photo = PILImage.open(io.BytesIO(bench_app.photo_jpeg(1000 + seed))).resize((800, 600))
            buffer = io.BytesIO()
            photo.save(buffer, "JPEG", quality=85)
            add_image_bytes(
                session,
                settings.storage,
                project,
                buffer.getvalue(),
                source="upload",
                original_name=f"photo_{seed:04d}.jpg",
            )
        print(f"project {PROJECT}: {count} images ready ({time.perf_counter() - started:.0f} s to add)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="storage folder to keep (and reuse)")
    args = parser.parse_args(argv)
    if not CHROMIUM.is_file():
        sys.exit(f"{CHROMIUM} is missing: `make setup` (as root) or `apt-get install chromium`")
    from playwright.sync_api import expect, sync_playwright

    bench_app = _bench_app_module()
    with tempfile.TemporaryDirectory(prefix="yolodex-bench-browser-") as scratch:
        storage = (args.keep or Path(scratch)).resolve()
        settings = Settings.from_env({"YOLODEX_STORAGE": str(storage)})
        settings.ensure_dirs()
        run = storage / "runs" / "bench-s-640"
        run.mkdir(parents=True, exist_ok=True)
        bench_app.build_models(run, 640)
        make_project(settings, args.images, bench_app)
        photos = [storage / f"photo_{index}.jpg" for index in range(args.sessions)]
        for index, path in enumerate(photos):
            path.write_bytes(bench_app.photo_jpeg(50 + index))

        with streamlit_app(storage) as server:
            url = server.url
            samples = {"started": rss_mb(server.pid)}
            peak = samples["started"]
            expect.set_options(timeout=TIMEOUT_MS)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
                pages = [
                    browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                    for _ in range(args.sessions)
                ]
                for page in pages:
                    page.goto(f"{url}/datasets?project={PROJECT}")
                    expect(page.get_by_text("Page 1 of", exact=False).first).to_be_visible()
                total_pages = int(pages[0].get_by_text("Page 1 of", exact=False).first.inner_text().split()[3])
                samples["3 sessions open"] = rss_mb(server.pid)
                grid_times = []
                for number in range(2, total_pages + 1):
                    for page in pages:  # the sessions take turns, all three stay open
                        started = time.perf_counter()
                        page.get_by_role("button", name="Next").click()
                        expect(page.get_by_text(f"Page {number} of {total_pages}").first).to_be_visible()
                        expect(page.locator('[data-testid="stImage"] img').nth(0)).to_be_visible()
                        grid_times.append(time.perf_counter() - started)
                        peak = max(peak, rss_mb(server.pid))
                samples[f"after browsing {total_pages} grid pages x{args.sessions}"] = rss_mb(server.pid)

                upload_times = []
                for page, photo in zip(pages, photos):
                    page.goto(f"{url}/pokedex")
                    expect(page.locator('[data-testid="stFileUploaderDropzoneInput"]').first).to_be_attached()
                    started = time.perf_counter()
                    page.locator('[data-testid="stFileUploaderDropzoneInput"]').first.set_input_files(str(photo))
                    expect(page.get_by_text("detections above", exact=False).first).to_be_visible()
                    upload_times.append(time.perf_counter() - started)
                    peak = max(peak, rss_mb(server.pid))
                samples["after 3 Pokédex uploads"] = rss_mb(server.pid)
                browser.close()

    print(
        f"\nPokédex, 4000x3000 JPEG upload → rendered result in Chromium, YOLO-NAS S INT8 at 640, one upload in "
        f"each of {args.sessions} sessions (the model is loaded when the page opens, before the upload)"
    )
    for index, seconds in enumerate(upload_times, start=1):
        print(f"  session {index}: {seconds:.2f} s")
    print(f"  median {statistics.median(upload_times):.2f} s (target ≤ 2 s)")
    print(
        f"Datasets grid page (24 thumbnails) render: median {statistics.median(grid_times):.2f} s, "
        f"max {max(grid_times):.2f} s over {len(grid_times)} page turns"
    )
    print(f"Streamlit server memory (VmRSS), {args.images} images, {args.sessions} sessions:")
    for name, value in samples.items():
        print(f"  {name:45s} {value:7.0f} MB")
    print(f"  {'peak':45s} {peak:7.0f} MB (target < 1024 MB)")


if __name__ == "__main__":
    main()
