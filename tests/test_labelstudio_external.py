"""A Label Studio that yolodex does not run (`YOLODEX_LS_URL`, e.g. another container) and one whose data lives in
PostgreSQL (`YOLODEX_LS_DATABASE_URL`): what start/stop/status/repair do, and what the server's environment holds.

No server here (the real ones are in tests/test_postgres.py): nothing answers at the URL, which is the case these
tests check, and nothing may be spawned.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.labeling import server
from backend.labeling.server import LabelStudioError
from backend.settings import Settings
from tests.labelstudio_fixture import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def external(tmp_path: Path) -> Settings:
    """Settings whose Label Studio is at a URL where nothing listens."""
    return Settings.from_env(
        {"YOLODEX_STORAGE": str(tmp_path / "storage"), "YOLODEX_LS_URL": f"http://127.0.0.1:{free_port()}/"}
    )


def test_an_external_label_studio_is_called_at_its_url_and_never_started_or_stopped(external: Settings) -> None:
    assert server.api_url(external) == external.ls_url and not external.ls_url.endswith("/")
    down = server.status(external)
    assert (down.state, down.pid) == ("stopped", None)
    assert external.ls_url in down.message and "YOLODEX_LS_URL" in down.action
    assert server.start(external, wait=False).state == "stopped"
    with pytest.raises(LabelStudioError, match=r"did not answer at http://127\.0\.0\.1:\d+ \(YOLODEX_LS_URL\)"):
        server.start(external, timeout=0.0)
    assert server.stop(external) is False
    with pytest.raises(LabelStudioError, match="cannot repair a Label Studio it does not run"):
        server.repair_credentials(external)
    with pytest.raises(LabelStudioError, match="unset YOLODEX_LS_URL where Label Studio itself runs"):
        server.run_foreground(external)
    # Nothing was spawned and no state or log written.
    assert not server.state_path(external).exists() and not server.log_path(external).exists()


def test_the_cli_reports_an_external_label_studio(external: Settings) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("YOLODEX_")}
    env.update(YOLODEX_STORAGE=str(external.storage), YOLODEX_LS_URL=external.ls_url)
    stop = subprocess.run(
        [sys.executable, "-m", "backend.cli", "labelstudio", "stop"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stop.returncode == 0 and "runs outside yolodex" in stop.stdout + stop.stderr, stop
    status = subprocess.run(
        [sys.executable, "-m", "backend.cli", "labelstudio", "status"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 1 and f"does not answer at {external.ls_url}" in status.stdout, status


def test_label_studio_gets_postgresql_settings_only_through_its_environment(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"YOLODEX_STORAGE": str(tmp_path), "YOLODEX_LS_DATABASE_URL": "postgresql://ls:pa%2Fss@db:5433/label"}
    )
    credentials = server.load_or_create_credentials(settings)
    env = server._server_env(settings, credentials)
    assert (env["DJANGO_DB"], env["POSTGRE_NAME"], env["POSTGRE_USER"], env["POSTGRE_PASSWORD"]) == (
        "default",
        "label",
        "ls",
        "pa/ss",
    )
    assert (env["POSTGRE_HOST"], env["POSTGRE_PORT"]) == ("db", "5433")
    assert "pa/ss" not in " ".join(server._start_command(settings, Path("label-studio")))
    line = server._start_line(settings)
    assert "PostgreSQL database 'label' at db:5433" in line and "pa/ss" not in line and "pa%2Fss" not in line
    sqlite = server._server_env(Settings.from_env({"YOLODEX_STORAGE": str(tmp_path)}), credentials)
    assert sqlite["DJANGO_DB"] == "sqlite" and not any(name.startswith("POSTGRE_") for name in sqlite)
