"""Import, crawl and evaluate jobs report a moving fraction (done/total) that the app reads while they run, through
one real huey worker on a SQLite file. The import holds that file's write lock for its whole transaction, so its
progress reaches the app through the job's pending file (`api.pending_progress_path`)."""

from __future__ import annotations

import http.server
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.data.synthetic import generate_synthetic_dataset
from backend.jobs import api
from backend.models import build_model, save_checkpoint
from backend.settings import Settings
from tests.conftest import encode_image, textured_image
from tests.test_jobs import start_worker, stop_worker, worker_env  # noqa: F401  (worker_env: a fixture)

pytestmark = pytest.mark.slow
SLOW_IMAGE_S = 0.25  # each crawled image is served this late, so the crawl lasts a few seconds
# The import's first progress write reaches the app about 0.7 s in (a 0.5 s flush interval, then the 0.2 s wait for
# the lock the import holds); 500 small photos take a few seconds to import, 100 took 0.6 s on a fast machine.
IMPORTED_PHOTOS = 500
EVALUATED_IMAGES = 120  # at 64 px: a few seconds, several 0.5 s progress writes


@pytest.fixture
def slow_image_server(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """Serves /<n>.png (8 distinct images) after SLOW_IMAGE_S each; robots.txt is a 404 (no rules)."""
    images = {f"/{seed}.png": encode_image(textured_image(100 + seed, (64, 48))) for seed in range(8)}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            body = images.get(self.path)
            if body is None:
                self.send_error(404)
                return
            time.sleep(SLOW_IMAGE_S)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", len(images)
    server.shutdown()
    server.server_close()


def watch(job_id: int, settings: Settings, worker, log: Path, timeout: float = 300) -> list[api.JobView]:
    """Every view of the job the app could have read, polled every 50 ms until it ends."""
    views: list[api.JobView] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise AssertionError(f"the worker exited ({worker.returncode}):\n{log.read_text()[-3000:]}")
        views.append(api.get_job(job_id, settings))
        if views[-1].state not in ("queued", "running"):
            return views
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end in {timeout} s:\n{log.read_text()[-3000:]}")


def moving(views: list[api.JobView]) -> list[tuple[float, str]]:
    return [(view.progress, view.message) for view in views if view.state == "running" and 0 < (view.progress or 0) < 1]


def test_import_crawl_and_evaluate_jobs_report_fractions_between_0_and_1(tmp_path, worker_env, slow_image_server):  # noqa: F811
    settings = Settings.from_env(worker_env)
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(IMPORTED_PHOTOS):
        (photos / f"{seed:03d}.png").write_bytes(encode_image(textured_image(seed, (64, 48))))
    base_url, served = slow_image_server
    data = generate_synthetic_dataset(
        tmp_path / "shapes", num_train=1, num_val=EVALUATED_IMAGES, image_size=(64, 64), seed=2
    )
    model = save_checkpoint(
        tmp_path / "best.pt", build_model("s", 3), class_names=["circle", "square", "triangle"], imgsz=64
    )
    log = tmp_path / "worker.log"
    worker = start_worker(worker_env, log)
    try:
        imported = watch(
            api.submit("import", {"project": "dex", "paths": [str(photos)]}, settings=settings), settings, worker, log
        )
        crawl_params = {
            "project": "dex",
            "urls": [f"{base_url}/{seed}.png" for seed in range(served)],
            "crawl_settings": {"allow_private_addresses": True, "min_interval_s": 0.0},
        }
        crawled = watch(api.submit("crawl", crawl_params, settings=settings), settings, worker, log)
        evaluate_params = {"model": str(model), "data": str(data), "split": "val", "imgsz": 64, "batch": 1}
        evaluated = watch(api.submit("evaluate", evaluate_params, settings=settings), settings, worker, log)
    finally:
        stop_worker(worker, signal.SIGTERM)

    for views, counted in ((imported, "imported files"), (crawled, "crawled"), (evaluated, "evaluated images")):
        last = views[-1]
        assert last.state == "succeeded" and last.progress == 1.0, (last.kind, last.error, log.read_text()[-2000:])
        seen = moving(views)
        assert seen, f"{last.kind}: no fraction strictly between 0 and 1 in {[(v.state, v.progress) for v in views]}"
        assert all(message.startswith(counted) for _, message in seen), seen
        fractions = [fraction for fraction, _ in seen]
        assert fractions == sorted(fractions)  # never lowered
    assert imported[-1].result["counts"]["accepted"] == IMPORTED_PHOTOS
    assert crawled[-1].result["kept"] == served
    assert not api.pending_progress_path(settings, imported[-1].id).exists()  # gone once the row was written
