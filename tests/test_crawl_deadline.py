"""A server that trickles (issue 19, finding 1): every download ends at its deadline, and a crawl never holds the
database while it waits on the network.

The server is a raw TCP server on 127.0.0.1 (so it can send a status line one byte at a time): it answers
/good.png at once and sends the slow paths at one byte a second. Before the fix a download read the body in
64 KiB chunks that urllib3 waited to fill, and the status line and headers without any overall limit, so these
crawls ran until the server gave up; and the crawl held its write transaction across the downloads, so another
writer (a cancel, a new project) failed with "database is locked" and a killed crawl lost what it had stored.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from PIL import Image as PILImage
from sqlalchemy import select

from backend.ingest.crawl import CrawledImage, CrawlSettings, crawl_page, crawl_urls
from backend.ingest.service import create_project
from backend.jobs import api, tasks
from backend.settings import Settings
from backend.store.db import session_scope, shared_engine
from backend.store.models import Image, Project
from tests.conftest import REPO_ROOT

TOTAL_S = 1.5  # total_timeout_s of the bounded crawls
MARGIN_S = 20.0  # generous: a crawl that ends at all ends long before; one that hangs runs for minutes
# The per-read time-out stays far above TOTAL_S: only the whole-request deadline can end a trickle.
SETTINGS = CrawlSettings(min_interval_s=0.0, allow_private_addresses=True, read_timeout_s=60.0, total_timeout_s=TOTAL_S)


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (48, 32), colour).save(buffer, "PNG")
    return buffer.getvalue()


GOOD = png((200, 40, 40))
SLOW = png((40, 40, 200))
PAGE = b"<!doctype html><html><body><img src='/good.png'></body></html>"


def response(body: bytes, content_type: str, length: bool = True) -> tuple[bytes, bytes]:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nConnection: close\r\n"
    head += f"Content-Length: {len(body)}\r\n" if length else ""
    return (head + "\r\n").encode(), body


class TrickleServer:
    """path -> (sent at once, sent one byte a second); `requested` lists the paths asked for, in order."""

    def __init__(self, slow_robots: bool = False) -> None:
        self.routes: dict[str, tuple[bytes, bytes]] = {
            "/good.png": (b"".join(response(GOOD, "image/png")), b""),
            "/slow-body.png": response(SLOW, "image/png"),
            "/slow-body-no-length.png": response(SLOW, "image/png", length=False),
            "/slow-headers.png": (b"", b"".join(response(SLOW, "image/png"))),
            "/slow-page.html": response(PAGE, "text/html"),
            "/robots.txt": (b"", b"".join(response(b"", "text/plain")))
            if slow_robots
            else (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", b""),
        }
        self.requested: list[str] = []
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.origin = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.threads = [threading.Thread(target=self.accept, daemon=True)]
        self.threads[0].start()

    def accept(self) -> None:
        while not self.stop.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self.answer, args=(connection,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def answer(self, connection: socket.socket) -> None:
        with connection:
            request = b""
            while b"\r\n\r\n" not in request and not self.stop.is_set():
                request += connection.recv(4096) or b"\r\n\r\n"
            path = request.split(b" ")[1].decode() if request.count(b" ") >= 2 else "/"
            self.requested.append(path)
            at_once, trickled = self.routes.get(path, (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", b""))
            try:
                connection.sendall(at_once)
                for index in range(len(trickled)):
                    if self.stop.wait(1.0):
                        return
                    connection.sendall(trickled[index : index + 1])
            except OSError:  # the crawler hung up: what the deadline is for
                return

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=5)
        self.listener.close()


@pytest.fixture
def trickle() -> Iterator[TrickleServer]:
    server = TrickleServer()
    yield server
    server.close()  # also ends a crawl that the deadline failed to end, so a failing test does not hang the suite


def bounded(call: Callable[[], Any], limit_s: float) -> Any:
    """Runs `call` in a thread and returns its result; fails when it is still running after `limit_s` seconds.

    The seconds it took go to the log (`-s` shows them): measured, never asserted beyond the bound."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout=limit_s)
    assert not thread.is_alive(), f"still running after {limit_s} s although total_timeout_s={TOTAL_S}"
    if "error" in outcome:
        raise outcome["error"]
    print(f"ended after {time.monotonic() - started:.2f} s (total_timeout_s={TOTAL_S})")
    return outcome["value"]


@pytest.mark.parametrize("path", ["/slow-body.png", "/slow-body-no-length.png", "/slow-headers.png"])
def test_a_trickling_image_ends_at_the_deadline_and_the_good_one_before_it_is_kept(trickle, path):
    good, slow = f"{trickle.origin}/good.png", f"{trickle.origin}{path}"
    kept: list[CrawledImage] = []
    report = bounded(lambda: crawl_urls([good, slow], SETTINGS, kept.append), TOTAL_S + MARGIN_S)
    assert [image.source_url for image in kept] == [good] and kept[0].data == GOOD
    assert report.kept_urls == [good] and report.fetched == 2
    assert [(entry["url"], entry["reason"]) for entry in report.rejected] == [(slow, "timeout")]
    assert "total_timeout_s" in report.rejected[0]["detail"]
    assert trickle.requested == ["/robots.txt", "/good.png", path]


def test_a_trickling_page_or_robots_txt_ends_at_the_deadline(trickle):
    page = f"{trickle.origin}/slow-page.html"
    report = bounded(lambda: crawl_page(page, 0, SETTINGS, lambda image: None), TOTAL_S + MARGIN_S)
    assert report.rejected == [{"url": page, "reason": "timeout", "detail": report.rejected[0]["detail"]}]
    assert report.pages_visited == [] and "total_timeout_s" in report.rejected[0]["detail"]

    slow_robots = TrickleServer(slow_robots=True)
    try:
        good = f"{slow_robots.origin}/good.png"
        report = bounded(lambda: crawl_urls([good], SETTINGS, lambda image: None), TOTAL_S + MARGIN_S)
    finally:
        slow_robots.close()
    # An unreadable robots.txt disallows the whole origin (RFC 9309): the image is never asked for.
    assert [entry["reason"] for entry in report.skipped] == ["robots"] and report.fetched == 0
    assert "timeout" in report.skipped[0]["detail"] and slow_robots.requested == ["/robots.txt"]


def images_of(settings: Settings, project: str) -> list[tuple[str, str]]:
    """(source_url, path) of the project's committed images, read through a connection of its own."""
    with session_scope(shared_engine(settings.database_url)) as session:
        rows = session.execute(
            select(Image.source_url, Image.path).join(Project).where(Project.name == project).order_by(Image.id)
        )
        return [(url, path) for url, path in rows]


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_crawl_job_stuck_downloading_holds_no_lock_and_cancels_keeping_what_it_stored(trickle, tmp_path, monkeypatch):
    """While a job's download trickles: its first image is committed, another connection writes at once, and a
    cancel is recorded and ends the job within seconds (not at the 120 s deadline)."""
    monkeypatch.setattr(tasks.huey, "immediate", True)
    settings = Settings.from_env({"YOLODEX_STORAGE": str(tmp_path / "storage")})
    create_project("Before", ["pikachu"], settings=settings)  # stored before the case: must survive it
    good, slow = f"{trickle.origin}/good.png", f"{trickle.origin}/slow-body.png"
    crawl_settings = {**vars(replace(SETTINGS, total_timeout_s=120.0)), "allowed_networks": []}
    params = {"project": "Trickled", "urls": [good, slow], "crawl_settings": crawl_settings}
    submitted: dict[str, int] = {}
    job = threading.Thread(target=lambda: submitted.update(id=api.submit("crawl", params, settings=settings)))
    job.start()
    try:
        wait_for(lambda: "/slow-body.png" in trickle.requested, 60, "the slow download to start")
        assert [url for url, _ in images_of(settings, "Trickled")] == [good]  # committed: a kill keeps it
        created = create_project("Meanwhile", ["eevee"], settings=settings)  # another writer, not "locked"
        assert created["project"] == "Meanwhile"
        assert job.is_alive()  # all of this happened while the download was trickling (total_timeout_s=120)
        (job_id,) = [view.id for view in api.list_jobs(settings, kind="crawl")]
        view = api.cancel(job_id, settings)
        assert view.cancel_requested
    finally:
        job.join(timeout=MARGIN_S)
    assert not job.is_alive(), "the cancelled crawl did not stop during its download"
    ended = api.get_job(submitted["id"], settings)
    assert ended.state == "cancelled", (ended.error, ended.traceback)
    assert ended.result["kept_urls"] == [good] and ended.result["stored"] == {"accepted": 1}
    assert [(entry["url"], entry["reason"]) for entry in ended.result["skipped"]] == [(slow, "cancelled")]
    assert ended.result["cancelled"] is True
    ((url, path),) = images_of(settings, "Trickled")
    assert url == good and (settings.storage / path).read_bytes() == GOOD
    with session_scope(shared_engine(settings.database_url)) as session:
        assert set(session.scalars(select(Project.name))) == {"Before", "Trickled", "Meanwhile"}


def test_a_killed_crawl_keeps_the_images_it_had_stored(trickle, tmp_path):
    """`yolodex crawl` killed (SIGKILL) during a trickling download: the image fetched before it stays stored."""
    storage = tmp_path / "storage"
    settings = Settings.from_env({"YOLODEX_STORAGE": str(storage)})
    create_project("Before", ["pikachu"], settings=settings)
    urls = tmp_path / "urls.txt"
    urls.write_text(f"{trickle.origin}/good.png\n{trickle.origin}/slow-body.png\n")
    env = {**os.environ, "YOLODEX_STORAGE": str(storage)}
    env.pop("YOLODEX_DATABASE_URL", None)
    command = [sys.executable, "-m", "backend.cli", "crawl", "--urls", str(urls), "--project", "Killed"]
    process = subprocess.Popen([*command, "--allow-private"], cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: "/slow-body.png" in trickle.requested or process.poll() is not None, 120, "the download")
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    ((url, path),) = images_of(settings, "Killed")
    assert url == f"{trickle.origin}/good.png" and (storage / path).read_bytes() == GOOD
    with session_scope(shared_engine(settings.database_url)) as session:
        assert set(session.scalars(select(Project.name))) == {"Before", "Killed"}


def test_the_ssrf_refusal_names_the_cli_flag_or_the_callers_own_words():
    report = crawl_urls(["http://127.0.0.1:9/cat.png"], CrawlSettings(), lambda image: None)
    (entry,) = report.skipped
    assert entry["reason"] == "ssrf" and "--allow-private" in entry["detail"]
    assert "allow_private_addresses" not in entry["detail"]
    hint = "this page crawls public addresses only"
    report = crawl_urls(["http://127.0.0.1:9/cat.png"], CrawlSettings(private_hint=hint), lambda image: None)
    assert hint in report.skipped[0]["detail"] and "--allow-private" not in report.skipped[0]["detail"]
