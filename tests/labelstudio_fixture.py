"""The `labelstudio` session fixture: one real Label Studio server for the whole test session.

Registered in tests/conftest.py with `pytest_plugins = ["tests.labelstudio_fixture"]`. The server gets a fresh
temporary storage and a free port on 127.0.0.1, starts once (about two minutes: a fresh data dir runs every
migration) and is stopped at the end of the session, failures included. A missing `.venv-labelstudio` fails
the tests (CI has it after `make setup`): a skipped server test would hide a broken integration.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from backend.labeling.server import (
    Credentials,
    LabelStudioError,
    load_or_create_credentials,
    ls_venv,
    start,
    stop,
)
from backend.settings import Settings


@dataclass(frozen=True)
class LabelStudioServer:
    """A running server: `url` is its base URL, `credentials` its admin login, `start_seconds` how long it took."""

    settings: Settings
    url: str
    credentials: Credentials
    start_seconds: float

    @property
    def auth_header(self) -> dict[str, str]:
        return self.credentials.auth_header


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def labelstudio_settings(storage: str, port: int) -> Settings:
    """Settings for a test server; an explicit environ, so the tests never read or change `os.environ`."""
    return Settings.from_env({"YOLODEX_STORAGE": storage, "YOLODEX_LS_PORT": str(port), "YOLODEX_HOST": "127.0.0.1"})


@pytest.fixture(scope="session")
def labelstudio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A Label Studio server on a fresh temporary storage and a free 127.0.0.1 port, stopped after the session."""
    if not (ls_venv() / "bin" / "label-studio").is_file():
        pytest.fail(f"Label Studio is not installed in {ls_venv()}: run `make setup`.", pytrace=False)
    settings = labelstudio_settings(str(tmp_path_factory.mktemp("labelstudio-storage")), free_port())
    began = time.monotonic()
    try:
        running = start(settings, wait=True)
    except LabelStudioError as error:
        stop(settings)
        pytest.fail(f"Label Studio did not start for the tests: {error}", pytrace=False)
    except BaseException:  # Ctrl-C during the two-minute start still stops the server
        stop(settings)
        raise
    try:
        yield LabelStudioServer(
            settings=settings,
            url=running.url,
            credentials=load_or_create_credentials(settings),
            start_seconds=time.monotonic() - began,
        )
    finally:
        stop(settings)
