import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from backend.settings import PostgresTarget, Settings, get_settings, parse_postgres_url

REPO_ROOT = Path(__file__).resolve().parents[1]
VARIABLES = (
    "YOLODEX_STORAGE",
    "YOLODEX_DATABASE_URL",
    "YOLODEX_QUEUE_URL",
    "YOLODEX_HOST",
    "YOLODEX_APP_PORT",
    "YOLODEX_LS_PORT",
    "YOLODEX_DEVICE",
    "YOLODEX_LS_DATABASE_URL",
    "YOLODEX_LS_URL",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_defaults():
    settings = get_settings()
    storage = REPO_ROOT / "storage"
    assert settings.storage == storage
    assert settings.database_url == f"sqlite:///{storage}/yolodex.db"
    assert settings.queue_url == f"sqlite:///{storage}/queue.db"
    assert settings.database_url.startswith("sqlite:////")  # four slashes: an absolute SQLite path
    assert (settings.host, settings.app_port, settings.ls_port, settings.device) == ("127.0.0.1", 8501, 8080, "auto")
    assert settings.weights_dir == storage / "weights"
    assert settings.runs_dir == storage / "runs"
    assert settings.datasets_dir == storage / "datasets"
    assert settings.images_dir == storage / "images"
    assert settings.models_dir == storage / "models"
    assert settings.logs_dir == storage / "logs"
    assert (settings.ls_database_url, settings.ls_url, settings.ls_external) == (None, None, False)


def test_overrides(monkeypatch, tmp_path):
    monkeypatch.setenv("YOLODEX_STORAGE", str(tmp_path / "store"))
    monkeypatch.setenv("YOLODEX_HOST", "0.0.0.0")
    monkeypatch.setenv("YOLODEX_APP_PORT", "9000")
    monkeypatch.setenv("YOLODEX_LS_PORT", " 9080 ")
    monkeypatch.setenv("YOLODEX_DEVICE", "CUDA:1")
    monkeypatch.setenv("YOLODEX_QUEUE_URL", "redis://127.0.0.1:6379/0")
    settings = get_settings()
    assert settings.storage == tmp_path / "store"
    assert settings.database_url == f"sqlite:///{tmp_path}/store/yolodex.db"  # follows the storage
    assert settings.queue_url == "redis://127.0.0.1:6379/0"
    assert (settings.host, settings.app_port, settings.ls_port, settings.device) == ("0.0.0.0", 9000, 9080, "cuda:1")
    assert settings.runs_dir == tmp_path / "store" / "runs"

    monkeypatch.setenv("YOLODEX_DATABASE_URL", "postgresql://yolodex@db/yolodex")
    assert get_settings().database_url == "postgresql://yolodex@db/yolodex"  # read again on every call


def test_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("YOLODEX_APP_PORT", "")
    monkeypatch.setenv("YOLODEX_STORAGE", "")
    assert get_settings() == Settings.from_env({})
    assert get_settings().app_port == 8501


@pytest.mark.parametrize("value", ["abc", "80.5", "0", "65536", "-1"])
@pytest.mark.parametrize("name", ["YOLODEX_APP_PORT", "YOLODEX_LS_PORT"])
def test_invalid_port_names_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"{name}=.*integer from 1 to 65535"):
        get_settings()


@pytest.mark.parametrize(("name", "value"), [("YOLODEX_DEVICE", "gpu"), ("YOLODEX_QUEUE_URL", "amqp://broker")])
def test_invalid_values_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        get_settings()


def test_storage_does_not_depend_on_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert get_settings().storage == REPO_ROOT / "storage"
    monkeypatch.setenv("YOLODEX_STORAGE", "elsewhere/store")  # relative: against the repository root too
    assert get_settings().storage == REPO_ROOT / "elsewhere" / "store"


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_settings().app_port = 1  # type: ignore[misc]


def test_ensure_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("YOLODEX_STORAGE", str(tmp_path / "new"))
    settings = get_settings()
    settings.ensure_dirs()
    settings.ensure_dirs()  # idempotent
    folders = [settings.weights_dir, settings.runs_dir, settings.datasets_dir, settings.images_dir]
    folders += [settings.models_dir, settings.logs_dir]
    assert all(folder.is_dir() for folder in folders)


def test_resolved_device(monkeypatch):
    import torch

    assert Settings.from_env({"YOLODEX_DEVICE": "cpu"}).resolved_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_settings().resolved_device() == "cpu"
    with pytest.raises(ValueError, match="YOLODEX_DEVICE=cuda"):
        Settings.from_env({"YOLODEX_DEVICE": "cuda"}).resolved_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_settings().resolved_device() == "cuda"
    assert Settings.from_env({"YOLODEX_DEVICE": "cuda:1"}).resolved_device() == "cuda:1"


def test_importing_settings_does_not_import_torch():
    code = "import sys, backend.settings as s; s.get_settings(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert result.stdout.strip() == "False"


def test_label_studio_database_url_is_parsed_and_its_password_never_shown(monkeypatch):
    url = "postgresql://ls:p%40ss%3Aw0rd@db.internal/labelstudio"
    monkeypatch.setenv("YOLODEX_LS_DATABASE_URL", url)
    monkeypatch.setenv("YOLODEX_DATABASE_URL", "postgresql+psycopg://yolodex:s3cret-db@db.internal:5433/yolodex")
    settings = get_settings()
    assert settings.ls_database_url == url
    target = parse_postgres_url(settings.ls_database_url)
    assert target == PostgresTarget(host="db.internal", port=5432, name="labelstudio", user="ls", password="p@ss:w0rd")
    assert "p@ss" not in repr(target) and "p%40ss" not in repr(settings) and "s3cret-db" not in repr(settings)
    parsed = parse_postgres_url("postgresql+psycopg://u:pw@127.0.0.1:6543/x")
    assert (parsed.host, parsed.port, parsed.name) == ("127.0.0.1", 6543, "x")


@pytest.mark.parametrize(
    "value",
    [
        "sqlite:///ls.db",
        "postgresql://user:hunter2@host",
        "postgresql://user:hunter2@/db",
        "mysql://u:hunter2@h/db",
        "postgresql://user:hunter2@host:99999/db",
    ],
)
def test_invalid_label_studio_database_url_names_the_variable_and_hides_the_password(monkeypatch, value):
    monkeypatch.setenv("YOLODEX_LS_DATABASE_URL", value)
    with pytest.raises(ValueError, match=r"YOLODEX_LS_DATABASE_URL=.*postgresql://user:password@host") as error:
        get_settings()
    assert "hunter2" not in str(error.value)


def test_label_studio_url_makes_it_external(monkeypatch):
    monkeypatch.setenv("YOLODEX_LS_URL", "http://labelstudio:8080/")
    settings = get_settings()
    assert (settings.ls_url, settings.ls_external) == ("http://labelstudio:8080", True)
    for value in ("labelstudio:8080", "ftp://labelstudio", "http://"):
        monkeypatch.setenv("YOLODEX_LS_URL", value)
        with pytest.raises(ValueError, match=r"YOLODEX_LS_URL=.*http://labelstudio:8080"):
            get_settings()
