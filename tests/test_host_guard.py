"""The app answers only its own names (issue 19, DNS rebinding): the real app started as `make run` and Docker start
it (`streamlit run app/main.py`, `docker/start.sh app`), asked over raw HTTP and websocket upgrades with a foreign
Host/Origin and with its own; plus the name checks and the settings without a server.

Label Studio's side is in tests/test_labelstudio_server.py, the Label page's in tests/test_app_label.py.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.host_guard import HostGuard, host_name
from backend.settings import Settings
from tests.browser_fixture import streamlit_app

FOREIGN = "attacker.example"


def first_line(port: int, request: str) -> str:
    """The status line the app answers to a raw request (so the Host header is exactly what the test says)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(request.encode("latin-1"))
        answer = b""
        while b"\r\n" not in answer:
            chunk = connection.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.split(b"\r\n", 1)[0].decode("latin-1")


def http_get(port: int, path: str, host: str, origin: str | None = None) -> int:
    origin_line = f"Origin: {origin}\r\n" if origin else ""
    line = first_line(port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{origin_line}Connection: close\r\n\r\n")
    return int(line.split()[1])


def websocket_upgrade(port: int, host: str, origin: str) -> int:
    """The HTTP status of a browser-like websocket handshake on the app's stream: 101 means the socket opened."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\nOrigin: {origin}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: streamlit\r\n\r\n"
    )
    return int(first_line(port, request).split()[1])


@pytest.fixture(scope="module", params=["streamlit run", "docker/start.sh app"])
def running_app(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """The app as `make run` starts it (`streamlit run app/main.py` from the repository root) and as its container
    does (`docker/start.sh app`, with YOLODEX_ALLOWED_HOSTS=yolodex.test): (port, log)."""
    storage = tmp_path_factory.mktemp("host-guard-storage")
    env = {"YOLODEX_ALLOWED_HOSTS": "yolodex.test", "YOLODEX_APP_STARTER": "0"}
    command = None  # streamlit run app/main.py
    if request.param == "docker/start.sh app":
        command = ["bash", "docker/start.sh", "app"]
        env["YOLODEX_VENV"] = str(Path(sys.executable).parents[1])
    with streamlit_app(storage, env=env, command=command) as app:
        yield app.port, app.log


# ---------------------------------------------------------------------------------------------- the real app


@pytest.mark.slow
def test_a_foreign_host_or_origin_is_refused_over_http_and_websocket(running_app: tuple[int, Path]) -> None:
    port, log = running_app
    foreign_host, foreign_origin = f"{FOREIGN}:{port}", f"http://{FOREIGN}:{port}"
    # DNS rebinding: the page's own name in both headers, as the browser sends them after the name moved.
    assert websocket_upgrade(port, foreign_host, foreign_origin) == 403
    for path in ("/", "/_stcore/health", "/_stcore/host-config", "/label"):
        assert http_get(port, path, foreign_host, foreign_origin) == 403, path
        assert http_get(port, path, foreign_host) == 403, path
    # A page elsewhere calling the app by its real name: the Origin gives it away.
    assert http_get(port, "/_stcore/health", f"127.0.0.1:{port}", foreign_origin) == 403
    assert websocket_upgrade(port, f"127.0.0.1:{port}", foreign_origin) == 403
    # Malformed or missing names are refused too.
    assert http_get(port, "/_stcore/health", f"127.0.0.1:{port}", "null") == 403
    assert first_line(port, "GET /_stcore/health HTTP/1.0\r\n\r\n").split()[1] == "403"
    # The refusal is logged once, naming the Host and the setting to change.
    assert f"refused requests for the Host '{foreign_host}'" in log.read_text() and "YOLODEX_ALLOWED_HOSTS" in (
        log.read_text()
    )


@pytest.mark.slow
def test_its_own_names_are_answered(running_app: tuple[int, Path]) -> None:
    port, _ = running_app
    for name in ("127.0.0.1", "localhost", "yolodex.test"):  # the last one from YOLODEX_ALLOWED_HOSTS
        host, origin = f"{name}:{port}", f"http://{name}:{port}"
        assert websocket_upgrade(port, host, origin) == 101, name
        assert http_get(port, "/_stcore/health", host) == 200, name
        assert http_get(port, "/", host, origin) == 200, name


# ---------------------------------------------------------------------------------------------- no server


def test_host_names_are_parsed_strictly() -> None:
    assert host_name("127.0.0.1:8501") == "127.0.0.1"
    assert host_name("LocalHost.") == "localhost"
    assert host_name("[::1]:8501") == "::1"
    assert host_name("http://[::1]:8501", origin=True) == "::1"
    assert host_name("https://yolodex.example.org", origin=True) == "yolodex.example.org"
    for bad in (None, "", "127.0.0.1:abc", "127.0.0.1:99999", "user@127.0.0.1", "127.0.0.1/x", "127.0.0.1?x"):
        assert host_name(bad) is None, bad
    for bad in ("null", "file://", "127.0.0.1:8501", "ftp://127.0.0.1", "http://127.0.0.1/path"):
        assert host_name(bad, origin=True) is None, bad


def test_guard_refuses_what_is_not_trusted() -> None:
    guard = HostGuard(app=None, trusted_hosts=("127.0.0.1", "localhost", "::1"))  # type: ignore[arg-type]
    assert guard.refusal("127.0.0.1:8501", None) is None
    assert guard.refusal("localhost:8501", "http://localhost:8501") is None
    assert guard.refusal("[::1]:8501", "http://[::1]:8501") is None
    assert guard.refusal(f"{FOREIGN}:8501", None) == f"the Host '{FOREIGN}:8501'"
    assert guard.refusal("127.0.0.1:8501", f"http://{FOREIGN}") == f"the Origin 'http://{FOREIGN}'"
    assert guard.refusal(None, None) == "the Host None"
    # A name that only ends like a trusted one is another name.
    assert guard.refusal("evil-localhost:8501", None) is not None
    assert guard.refusal("127.0.0.1.attacker.example", None) is not None


def test_trusted_hosts_come_from_the_settings(tmp_path: Path) -> None:
    base = {"YOLODEX_STORAGE": str(tmp_path)}
    assert Settings.from_env(base).trusted_hosts == ("127.0.0.1", "localhost", "::1")
    settings = Settings.from_env(
        base | {"YOLODEX_HOST": "192.168.1.20", "YOLODEX_ALLOWED_HOSTS": " Yolodex.Example.org, ,[fd00::5],box.lan."}
    )
    assert settings.trusted_hosts == (
        "127.0.0.1",
        "localhost",
        "::1",
        "192.168.1.20",
        "yolodex.example.org",
        "fd00::5",
        "box.lan",
    )
    assert settings.listens_beyond_loopback
    # Binding every interface adds no name: 0.0.0.0 is never a Host a browser sends.
    wildcard = Settings.from_env(base | {"YOLODEX_HOST": "0.0.0.0"})
    assert wildcard.trusted_hosts == ("127.0.0.1", "localhost", "::1") and wildcard.listens_beyond_loopback
    for loopback in ("127.0.0.1", "localhost", "::1", "127.0.1.1"):
        assert not dataclasses.replace(settings, host=loopback).listens_beyond_loopback, loopback


@pytest.mark.parametrize("value", ["http://yolodex.example.org", "box.lan:8501", "a b", "*", "box.lan/x"])
def test_a_bad_allowed_host_names_the_setting(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValueError, match=r"YOLODEX_ALLOWED_HOSTS.*without http:// or a port"):
        Settings.from_env({"YOLODEX_STORAGE": str(tmp_path), "YOLODEX_ALLOWED_HOSTS": value})
