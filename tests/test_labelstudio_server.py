"""Label Studio server control (backend/labeling/server.py): the fast tests need no server, the slow ones share
the session's real server from tests/labelstudio_fixture.py."""

from __future__ import annotations

import dataclasses
import json
import socket
import stat
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import requests

from backend.labeling import server
from backend.labeling.server import Credentials, LabelStudioError
from backend.settings import Settings
from tests.conftest import REPO_ROOT
from tests.labelstudio_fixture import LabelStudioServer, free_port, labelstudio_settings


@pytest.fixture
def idle_settings(tmp_path: Path) -> Settings:
    """Settings for a storage with no server, on a port nothing listens on."""
    return labelstudio_settings(str(tmp_path / "storage"), free_port())


# ---------------------------------------------------------------------------------------------- no server


def test_credentials_are_private_stable_and_tightened(idle_settings: Settings) -> None:
    first = server.load_or_create_credentials(idle_settings)
    path = server.credentials_path(idle_settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first.token) == 40 and int(first.token, 16) >= 0 and first.token == first.token.lower()
    assert first.email == server.LS_EMAIL and len(first.password) >= 16
    assert first.token not in repr(first) and first.password not in repr(first)

    path.chmod(0o644)
    assert server.load_or_create_credentials(idle_settings) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_urls_and_venv_override(idle_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    public = dataclasses.replace(idle_settings, host="0.0.0.0", ls_port=8123)
    assert server.labelstudio_url(public) == "http://0.0.0.0:8123"
    assert server.api_url(public) == "http://127.0.0.1:8123"

    monkeypatch.setenv("YOLODEX_LS_VENV", str(tmp_path / "no-such-venv"))
    assert server.ls_venv() == tmp_path / "no-such-venv"
    with pytest.raises(LabelStudioError, match="make setup"):
        server.start(idle_settings)


def test_stopped_server_says_how_to_start(idle_settings: Settings) -> None:
    current = server.status(idle_settings)
    assert current.state == "stopped" and not current.ok
    assert current.action == server.START_ACTION
    assert server.stop(idle_settings) is False


def test_busy_port_is_refused_with_the_variable_to_change(idle_settings: Settings) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", idle_settings.ls_port))
        squatter.listen()
        with pytest.raises(LabelStudioError, match=r"in use by another program.*YOLODEX_LS_PORT=\d+"):
            server.start(idle_settings, wait=False)
        current = server.status(idle_settings)
        assert current.state == "misconfigured" and "YOLODEX_LS_PORT" in current.action
    assert not server.state_path(idle_settings).exists()  # nothing was spawned


def test_stale_state_file_never_kills_another_program(idle_settings: Settings) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        server.state_path(idle_settings).parent.mkdir(parents=True)
        server.state_path(idle_settings).write_text(json.dumps({"pid": bystander.pid, "port": idle_settings.ls_port}))
        assert server.status(idle_settings).state == "crashed"
        assert server.stop(idle_settings, timeout=1.0) is False
        assert bystander.poll() is None, "stop() killed a process that is not Label Studio"
        assert not server.state_path(idle_settings).exists()
    finally:
        bystander.kill()
        bystander.wait()


# ---------------------------------------------------------------------------------------------- real server


def _listeners(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].rsplit(":", 1)
            if int(port_hex, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.append(address)
    return found


def _server_pid(labelstudio: LabelStudioServer) -> int:
    return json.loads(server.state_path(labelstudio.settings).read_text())["pid"]


@pytest.mark.slow
def test_server_listens_on_loopback_only(labelstudio: LabelStudioServer) -> None:
    assert _listeners(labelstudio.settings.ls_port) == ["0100007F"]  # 127.0.0.1, no 0.0.0.0 or IPv6


@pytest.mark.slow
def test_server_env_is_clean_and_never_phones_home(labelstudio: LabelStudioServer) -> None:
    raw = Path(f"/proc/{_server_pid(labelstudio)}/environ").read_bytes().split(b"\0")
    env = dict(item.decode().split("=", 1) for item in raw if item)
    for name in ("SENTRY_DSN", "FRONTEND_SENTRY_DSN"):
        assert env[name] == ""
    assert env["LATEST_VERSION_CHECK"] == "false" and env["COLLECT_ANALYTICS"] == "false"
    assert env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] == str(labelstudio.settings.images_dir)
    # Label Studio also reads bare USERNAME/PASSWORD/PORT/HOST/DEBUG: only our names and a few basics get through.
    unexpected = {
        name
        for name in env
        if name not in server._INHERITED_ENV
        and not name.startswith(("LC_", "LABEL_STUDIO_"))
        and name not in ("DJANGO_DB", "LATEST_VERSION_CHECK", "COLLECT_ANALYTICS", "SENTRY_DSN", "FRONTEND_SENTRY_DSN")
        and name not in ("PYTHONUNBUFFERED",)
    }
    assert not unexpected


@pytest.mark.slow
def test_a_foreign_host_is_refused_and_its_own_names_answer(labelstudio: LabelStudioServer) -> None:
    """DNS rebinding (issue 19): a page under attacker.example that resolves to 127.0.0.1 gets 400 for every path,
    the login page and the API with a valid token included; the names yolodex uses answer as before."""
    port = labelstudio.settings.ls_port
    auth = labelstudio.auth_header

    def answer(path: str, host: str, origin: str | None = None) -> int:
        headers = {**auth, "Host": host} | ({"Origin": origin} if origin else {})
        return requests.get(f"{labelstudio.url}{path}", headers=headers, timeout=10, allow_redirects=False).status_code

    for path in ("/health", "/user/login/", "/api/current-user/whoami"):
        assert answer(path, f"attacker.example:{port}", f"http://attacker.example:{port}") == 400, path
        assert answer(path, f"127.0.0.1:{port}") == 200, path
        assert answer(path, f"localhost:{port}") == 200, path
    # The server still answers yolodex afterwards: nothing stored was touched.
    assert server.status(labelstudio.settings).ok


@pytest.mark.slow
def test_data_folder_and_secret_files_are_private_and_tightened_at_start(labelstudio: LabelStudioServer) -> None:
    folder = server.data_dir(labelstudio.settings)
    database, key = folder / "label_studio.sqlite3", folder / ".env"

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(folder) == 0o700
    assert {path.name: mode(path) for path in (database, key, server.credentials_path(labelstudio.settings))} == {
        "label_studio.sqlite3": 0o600,
        ".env": 0o600,
        "credentials.json": 0o600,
    }
    # Files an older yolodex left readable by everyone are tightened by the next start (here: a no-op start of
    # the running server), which keeps the server and its data.
    pid = _server_pid(labelstudio)
    folder.chmod(0o755)
    database.chmod(0o644)
    assert server.start(labelstudio.settings).pid == pid
    assert (mode(folder), mode(database)) == (0o700, 0o600)
    whoami = requests.get(f"{labelstudio.url}/api/current-user/whoami", headers=labelstudio.auth_header, timeout=10)
    assert whoami.status_code == 200


def test_secure_data_dir_creates_0700_and_tightens_secret_files(idle_settings: Settings) -> None:
    folder = server.data_dir(idle_settings)
    assert server.secure_data_dir(idle_settings) == folder and stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o755)
    for name in ("label_studio.sqlite3", "label_studio.sqlite3-wal", ".env", "notes.txt"):
        (folder / name).write_text(name)
        (folder / name).chmod(0o644)
    server.secure_data_dir(idle_settings)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert modes == {
        "label_studio.sqlite3": 0o600,
        "label_studio.sqlite3-wal": 0o600,
        ".env": 0o600,
        "notes.txt": 0o644,
    }
    assert (folder / ".env").read_text() == ".env"  # contents untouched


def test_label_studio_is_told_only_the_trusted_names(idle_settings: Settings) -> None:
    settings = dataclasses.replace(idle_settings, host="0.0.0.0", allowed_hosts=("ls.example.org", "fd00::5"))
    credentials = server.load_or_create_credentials(settings)
    env = server._server_env(settings, credentials)
    assert env["LABEL_STUDIO_ALLOWED_HOSTS"] == "127.0.0.1,localhost,[::1],ls.example.org,[fd00::5]"
    origins = env["LABEL_STUDIO_CSRF_TRUSTED_ORIGINS"].split(",")
    assert f"http://ls.example.org:{settings.ls_port}" in origins and "https://ls.example.org" in origins
    assert not any("0.0.0.0" in origin or "*" in origin for origin in origins)


@pytest.mark.slow
def test_running_status_token_and_idempotent_start(labelstudio: LabelStudioServer) -> None:
    current = server.status(labelstudio.settings)
    assert current.state == "running" and current.ok and current.pid == _server_pid(labelstudio)

    # The legacy token works (legacy tokens enabled for the organization) and names our admin.
    whoami = requests.get(f"{labelstudio.url}/api/current-user/whoami", headers=labelstudio.auth_header, timeout=10)
    assert whoami.status_code == 200 and whoami.json()["email"] == server.LS_EMAIL

    began = time.monotonic()
    again = server.start(labelstudio.settings)
    assert again.pid == current.pid and time.monotonic() - began < 10


@pytest.mark.slow
def test_wrong_token_is_misconfigured(labelstudio: LabelStudioServer) -> None:
    other = Credentials(email=server.LS_EMAIL, password="x" * 20, token="0" * 40)
    current = server.status(labelstudio.settings, credentials=other)
    assert current.state == "misconfigured" and current.action == server.REPAIR_ACTION
    # A second yolodex storage on the same port: the server is not "ours" and rejects its token.
    foreign = labelstudio_settings(
        str(labelstudio.settings.storage.parent / "other-storage"), labelstudio.settings.ls_port
    )
    current = server.status(foreign)
    assert current.state == "misconfigured" and "YOLODEX_LS_PORT" in current.action


@pytest.mark.slow
def test_password_login_works(labelstudio: LabelStudioServer) -> None:
    session = requests.Session()
    session.get(f"{labelstudio.url}/user/login/", timeout=10)
    response = session.post(
        f"{labelstudio.url}/user/login/",
        data={
            "email": labelstudio.credentials.email,
            "password": labelstudio.credentials.password,
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
        },
        headers={"Referer": f"{labelstudio.url}/user/login/"},
        allow_redirects=False,
        timeout=10,
    )
    assert response.status_code == 302 and "sessionid" in session.cookies


@pytest.mark.slow
def test_local_files_are_served_from_the_images_dir(labelstudio: LabelStudioServer) -> None:
    image = labelstudio.settings.images_dir / "x" / "a b é.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    auth = labelstudio.auth_header
    project = requests.post(f"{labelstudio.url}/api/projects", json={"title": "serving"}, headers=auth, timeout=30)
    assert project.status_code == 201, project.text
    storage = requests.post(
        f"{labelstudio.url}/api/storages/localfiles",
        json={"project": project.json()["id"], "path": str(image.parent), "use_blob_urls": True},
        headers=auth,
        timeout=30,
    )
    assert storage.status_code == 201, storage.text

    query = urllib.parse.quote("x/a b é.png")
    assert query == "x/a%20b%20%C3%A9.png"
    served = requests.get(f"{labelstudio.url}/data/local-files/?d={query}", headers=auth, timeout=10)
    assert served.status_code == 200 and served.content == image.read_bytes()
    assert requests.get(f"{labelstudio.url}/data/local-files/?d={query}", timeout=10).status_code == 401


@pytest.mark.slow
def test_repair_writes_another_login_into_the_running_server(labelstudio: LabelStudioServer) -> None:
    replacement = Credentials(email=server.LS_EMAIL, password="another-password-123", token="ab" * 20)
    try:
        server.repair_credentials(labelstudio.settings, replacement)
        assert server.status(labelstudio.settings, credentials=replacement).ok
        assert server.status(labelstudio.settings).state == "misconfigured"
    finally:
        server.repair_credentials(labelstudio.settings)
    assert server.status(labelstudio.settings).ok


def test_module_import_stays_cheap() -> None:
    code = "import sys, backend.labeling.server; print(any(m.startswith('label_studio') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert result.stdout.strip() == "False"
