"""Tests for backend.models.download against a real HTTP server on 127.0.0.1 (no internet needed)."""

from __future__ import annotations

import hashlib
import logging
import random
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from backend.models.download import (
    COCO_WEIGHTS_LICENCE_NOTE,
    OFFICIAL_COCO_WEIGHTS,
    WeightsDownloadError,
    WeightsSource,
    download_file,
    fetch_weights,
    sha256_file,
)

PAYLOAD = random.Random(0).randbytes(300_000)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


@dataclass
class Behaviour:
    """What the test server does; tests change it before calling the downloader.

    Attributes:
        payload: The file served.
        status: Answer every request with this error status instead of the file.
        drop_after: On the first request, close the connection after this many body bytes.
        stall_after: On every request, stop sending after this many body bytes for ``delay`` seconds.
        delay: Seconds to wait before the headers (or, with ``stall_after``, mid-body).
        ignore_range: Answer Range requests with 200 and the whole file, like many static servers.
        body: Send these bytes instead of ``payload`` (a corrupted or replaced file).
        range_headers: The Range header of each request received (None when absent), in order.
    """

    payload: bytes = PAYLOAD
    status: int | None = None
    drop_after: int | None = None
    stall_after: int | None = None
    delay: float = 0.0
    ignore_range: bool = False
    body: bytes | None = None
    range_headers: list[str | None] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _dropped: bool = False


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        behaviour = self.server.behaviour
        behaviour.range_headers.append(self.headers.get("Range"))
        if behaviour.status is not None:
            self.send_error(behaviour.status)
            return
        if behaviour.delay and behaviour.stall_after is None:
            behaviour.stop.wait(behaviour.delay)

        body = behaviour.body if behaviour.body is not None else behaviour.payload
        start = 0
        requested = self.headers.get("Range")
        if requested and not behaviour.ignore_range:
            match = re.fullmatch(r"bytes=(\d+)-", requested)
            assert match, f"downloader sent an unexpected Range header {requested!r}"
            start = int(match[1])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()

        data = body[start:]
        if behaviour.drop_after is not None and not behaviour._dropped:
            behaviour._dropped = True
            self.wfile.write(data[: behaviour.drop_after])
            self.wfile.flush()
            self.close_connection = True  # the server then closes the socket mid-body
            return
        if behaviour.stall_after is not None:
            self.wfile.write(data[: behaviour.stall_after])
            self.wfile.flush()
            behaviour.stop.wait(behaviour.delay)
            return
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output readable


class _Server(ThreadingHTTPServer):
    # Do not join handler threads on close: a stalled handler must not hold up the test run.
    block_on_close = False
    daemon_threads = True

    def __init__(self, behaviour: Behaviour) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.behaviour = behaviour

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client hanging up on a stalled or dropped response is expected here


@dataclass
class LocalServer:
    behaviour: Behaviour
    base_url: str

    def url(self, name: str = "yolo_nas_s_coco.pth") -> str:
        return f"{self.base_url}/models/{name}"


@pytest.fixture
def server() -> Iterator[LocalServer]:
    behaviour = Behaviour()
    http_server = _Server(behaviour)
    thread = threading.Thread(target=http_server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = http_server.server_address[:2]
    yield LocalServer(behaviour, f"http://{host}:{port}")
    behaviour.stop.set()  # release stalled handlers
    http_server.shutdown()
    http_server.server_close()
    thread.join(timeout=5)


def _part(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".part")


def test_download_writes_payload_and_leaves_no_part(server: LocalServer, tmp_path: Path) -> None:
    destination = tmp_path / "nested" / "weights" / "yolo_nas_s_coco.pth"

    result = download_file(server.url(), destination, PAYLOAD_SHA256, progress=False)

    assert result == destination
    assert destination.read_bytes() == PAYLOAD
    assert not _part(destination).exists()
    assert server.behaviour.range_headers == [None]


def test_download_with_progress_bar_and_uppercase_digest(server: LocalServer, tmp_path: Path) -> None:
    destination = tmp_path / "w.pth"

    download_file(server.url(), destination, PAYLOAD_SHA256.upper(), progress=True, chunk_size=4096)

    assert destination.read_bytes() == PAYLOAD


@pytest.mark.parametrize("sha256", [PAYLOAD_SHA256, None], ids=["right-checksum", "no-checksum"])
def test_existing_file_is_used_without_a_request(server: LocalServer, tmp_path: Path, sha256: str | None) -> None:
    destination = tmp_path / "w.pth"
    destination.write_bytes(PAYLOAD)

    assert download_file(server.url(), destination, sha256, progress=False) == destination
    assert server.behaviour.range_headers == []


def test_existing_file_with_wrong_checksum_is_reported_and_kept(server: LocalServer, tmp_path: Path) -> None:
    destination = tmp_path / "w.pth"
    destination.write_bytes(b"someone else's checkpoint")
    found = sha256_file(destination)

    with pytest.raises(WeightsDownloadError, match="wrong checksum") as raised:
        download_file(server.url(), destination, PAYLOAD_SHA256, progress=False)

    assert PAYLOAD_SHA256 in str(raised.value)
    assert found in str(raised.value)
    assert destination.read_bytes() == b"someone else's checkpoint"
    assert server.behaviour.range_headers == []


def test_resume_after_dropped_connection(server: LocalServer, tmp_path: Path) -> None:
    server.behaviour.drop_after = 100_000
    destination = tmp_path / "w.pth"

    with pytest.raises(WeightsDownloadError, match=r"Could not download w\.pth") as raised:
        download_file(server.url("w.pth"), destination, PAYLOAD_SHA256, progress=False)

    assert str(destination) in str(raised.value)
    assert not destination.exists()
    # Every byte that arrived is kept, even with a chunk size larger than the whole payload.
    assert _part(destination).read_bytes() == PAYLOAD[:100_000]

    download_file(server.url("w.pth"), destination, PAYLOAD_SHA256, progress=False)

    assert server.behaviour.range_headers == [None, "bytes=100000-"]
    assert destination.read_bytes() == PAYLOAD
    assert not _part(destination).exists()


def test_server_ignoring_range_restarts_from_zero(server: LocalServer, tmp_path: Path) -> None:
    server.behaviour.drop_after = 100_000
    server.behaviour.ignore_range = True
    destination = tmp_path / "w.pth"
    with pytest.raises(WeightsDownloadError):
        download_file(server.url(), destination, PAYLOAD_SHA256, progress=False)

    download_file(server.url(), destination, PAYLOAD_SHA256, progress=False)

    # Appending the 200 body to the 100 kB part would give 400 kB and a checksum error.
    assert server.behaviour.range_headers == [None, "bytes=100000-"]
    assert destination.read_bytes() == PAYLOAD


def test_complete_part_answered_with_416_is_verified_and_renamed(server: LocalServer, tmp_path: Path) -> None:
    destination = tmp_path / "w.pth"
    _part(destination).write_bytes(PAYLOAD)  # a run that was stopped between download and rename

    download_file(server.url(), destination, PAYLOAD_SHA256, progress=False)

    assert server.behaviour.range_headers == [f"bytes={len(PAYLOAD)}-"]
    assert destination.read_bytes() == PAYLOAD
    assert not _part(destination).exists()


def test_part_longer_than_remote_file_is_discarded(server: LocalServer, tmp_path: Path) -> None:
    destination = tmp_path / "w.pth"
    _part(destination).write_bytes(PAYLOAD + b"junk")

    with pytest.raises(WeightsDownloadError, match="longer than the 300000 bytes"):
        download_file(server.url(), destination, progress=False)
    assert not _part(destination).exists()

    download_file(server.url(), destination, progress=False)
    assert destination.read_bytes() == PAYLOAD


def test_wrong_body_fails_checksum_and_leaves_nothing(server: LocalServer, tmp_path: Path) -> None:
    wrong_body = PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 0xFF])
    server.behaviour.body = wrong_body
    destination = tmp_path / "w.pth"

    with pytest.raises(WeightsDownloadError, match="checksum is wrong") as raised:
        download_file(server.url(), destination, PAYLOAD_SHA256, progress=False)

    message = str(raised.value)
    assert PAYLOAD_SHA256 in message
    assert hashlib.sha256(wrong_body).hexdigest() in message
    assert str(destination) in message
    assert not destination.exists()
    assert not _part(destination).exists()


@pytest.mark.parametrize(("status", "reason"), [(404, "Not Found"), (403, "Forbidden")])
def test_http_error_names_status_and_where_to_put_the_file(
    server: LocalServer, tmp_path: Path, status: int, reason: str
) -> None:
    server.behaviour.status = status
    destination = tmp_path / "weights" / "yolo_nas_s_coco.pth"

    with pytest.raises(WeightsDownloadError) as raised:
        download_file(server.url(), destination, PAYLOAD_SHA256, progress=False)

    message = str(raised.value)
    assert f"HTTP {status} {reason}" in message
    assert server.url() in message
    assert f"put it at {destination} (sha256 {PAYLOAD_SHA256})" in message
    assert not destination.exists()
    assert not _part(destination).exists()


def test_connection_refused_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago has nothing listening on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    destination = tmp_path / "w.pth"

    with pytest.raises(WeightsDownloadError, match="refused") as raised:
        download_file(f"http://127.0.0.1:{port}/w.pth", destination, progress=False, timeout=2)

    assert "connection failed" in str(raised.value)
    assert f"put it at {destination}" in str(raised.value)
    assert not _part(destination).exists()


def test_slow_server_times_out(server: LocalServer, tmp_path: Path) -> None:
    server.behaviour.delay = 5.0
    destination = tmp_path / "w.pth"

    with pytest.raises(WeightsDownloadError, match=r"no response within the 0\.5 s timeout") as raised:
        download_file(server.url(), destination, progress=False, timeout=0.5)

    assert f"put it at {destination}" in str(raised.value)
    assert not destination.exists()


def test_stall_mid_body_times_out_and_keeps_part_for_resume(server: LocalServer, tmp_path: Path) -> None:
    server.behaviour.stall_after = 50_000
    server.behaviour.delay = 5.0
    destination = tmp_path / "w.pth"

    with pytest.raises(WeightsDownloadError, match=r"0\.5 s timeout") as raised:
        download_file(server.url(), destination, PAYLOAD_SHA256, progress=False, timeout=0.5)

    assert "running again resumes" in str(raised.value)
    assert _part(destination).read_bytes() == PAYLOAD[:50_000]

    server.behaviour.stall_after = None
    server.behaviour.delay = 0.0
    download_file(server.url(), destination, PAYLOAD_SHA256, progress=False)
    assert server.behaviour.range_headers[-1] == "bytes=50000-"
    assert destination.read_bytes() == PAYLOAD


@pytest.mark.parametrize("url", ["ftp://example.com/w.pth", "file:///tmp/w.pth", "storage/weights/w.pth"])
def test_non_http_url_is_rejected(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError, match="http"):
        download_file(url, tmp_path / "w.pth", progress=False)


def test_malformed_sha256_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="64 hex digits"):
        download_file("http://127.0.0.1/w.pth", tmp_path / "w.pth", "abc123", progress=False)


def test_official_coco_weights_cover_each_size_with_non_commercial_licence() -> None:
    assert set(OFFICIAL_COCO_WEIGHTS) == {"s", "m", "l"}
    for size, source in OFFICIAL_COCO_WEIGHTS.items():
        assert source.name == f"yolo_nas_{size}_coco.pth"
        assert source.url == f"https://sg-hub-nv.s3.amazonaws.com/models/yolo_nas_{size}_coco.pth"
        assert source.sha256 is None
        assert source.licence == COCO_WEIGHTS_LICENCE_NOTE
    note = COCO_WEIGHTS_LICENCE_NOTE.lower()
    assert "commercial use" in note
    assert "forbids" in note
    assert "non-commercial" in note
    assert "random init" in note


def test_fetch_weights_downloads_into_dir_and_logs_licence(
    server: LocalServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = WeightsSource(name="tiny.pth", url=server.url("tiny.pth"), sha256=PAYLOAD_SHA256, licence="TEST TERMS")

    with caplog.at_level(logging.INFO, logger="yolodex.weights"):
        path = fetch_weights(source, tmp_path / "weights", progress=False)

    assert path == tmp_path / "weights" / "tiny.pth"
    assert path.read_bytes() == PAYLOAD
    assert any(r.name == "yolodex.weights" and "TEST TERMS" in r.getMessage() for r in caplog.records)


def test_sha256_file_streams_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    path.write_bytes(PAYLOAD)

    assert sha256_file(path, chunk_size=7) == PAYLOAD_SHA256
