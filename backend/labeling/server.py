"""Starts, stops and checks the Label Studio server that yolodex runs beside the app.

Label Studio 1.23.2 lives in its own venv (`.venv-labelstudio`, see `make setup`) and runs as a detached
subprocess bound to `settings.host:settings.ls_port`, with its data (SQLite, `.env` secret key) in
`<storage>/labelstudio`. Images are never copied into it: Local Files serving exposes `settings.images_dir`
as `/data/local-files/?d=<path relative to images_dir>`.

Authentication: yolodex generates one admin login (email, password, 40-hex legacy API token) into
`<storage>/labelstudio/credentials.json` (mode 0600) and hands it to Label Studio at its first start.
Label Studio applies the token only when it creates the user, so a data dir that outlived its credentials
file rejects the new token; `repair_credentials` writes the file's login into the existing database.

Label Studio's own data goes to PostgreSQL instead of SQLite when `YOLODEX_LS_DATABASE_URL` is set (the
password travels in the child's environment only, never its command line, the log or the state file). With
`YOLODEX_LS_URL` set, Label Studio runs elsewhere (another container): yolodex calls it there, checks its health
there, and `start`/`stop` do not spawn or kill anything (start waits for it to answer; stop says it is external).
`start --foreground` runs the server as this process's child and waits on it, forwarding SIGTERM/SIGINT: the
main process of a Label Studio container.

Only its own names (issue 19, DNS rebinding): Label Studio gets `ALLOWED_HOSTS` = `Settings.trusted_hosts` (127.0.0.1,
localhost, ::1, `YOLODEX_HOST`, `YOLODEX_ALLOWED_HOSTS`), so Django answers a request for any other Host with 400,
and the same names as CSRF trusted origins. Its data folder is 0700 and its files 0600 (the server runs with umask
077; files an older yolodex left looser are tightened at each start): the database holds the admin's API token,
`.env` the key that signs its sessions.

Importing this module is cheap: stdlib only (urllib for HTTP), no Label Studio or SDK import. Its two probes
(`/health`, and `whoami` with the token) run on every rerun of the Label page, so they stay on urllib rather than
pay the SDK's import (docs/label_studio.md, Server status checks); everything that reads or writes Label Studio's
data goes through `backend.labeling.client`, on the SDK.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from backend.files import atomic_write_json
from backend.settings import Settings, get_settings, parse_postgres_url, project_root

logger = logging.getLogger(__name__)

LS_EMAIL = "admin@yolodex.local"
FIRST_START_HINT = "wait: the first start takes about two minutes, later starts about 15 seconds"
START_ACTION = "run `yolodex labelstudio start`"
REPAIR_ACTION = "run `yolodex labelstudio repair` (it writes the login in credentials.json into Label Studio)"
EXTERNAL_REPAIR_ACTION = (
    "run `yolodex labelstudio repair` where Label Studio runs (its container), with the same storage folder"
)
STATES = ("running", "starting", "stopped", "misconfigured", "crashed")
# Bare names Label Studio also reads (get_env tries LABEL_STUDIO_<name>, HEARTEX_<name>, then <name>), so the
# child gets a clean environment built from these plus ours.
_INHERITED_ENV = ("PATH", "HOME", "LANG", "TMPDIR", "TZ")
_LOG_TAIL_LINES = 15
# Files in the data folder that hold secrets: the database (the API token, password hashes; SQLite's side files get
# its mode only when they are created), the session-signing key, our login.
_PRIVATE_FILES = (
    "label_studio.sqlite3",
    "label_studio.sqlite3-wal",
    "label_studio.sqlite3-shm",
    "label_studio.sqlite3-journal",
    ".env",
    "credentials.json",
)
_PRIVATE_UMASK = 0o077  # what Label Studio creates: folders 0700, files 0600
_PORT_MOVED = "is in use"  # Label Studio's "Port N is in use. Trying to start at N+1" warning


class LabelStudioError(RuntimeError):
    """A Label Studio server problem; the message says what happened and what to do."""


# ---------------------------------------------------------------------------------------------- paths


def ls_venv() -> Path:
    """The Label Studio venv: `$YOLODEX_LS_VENV`, else `.venv-labelstudio` in the checkout."""
    override = os.environ.get("YOLODEX_LS_VENV", "").strip()
    if override:
        path = Path(override).expanduser()
        return path if path.is_absolute() else project_root() / path
    return project_root() / ".venv-labelstudio"


def ls_executable() -> Path:
    """`<ls_venv>/bin/label-studio`.

    Raises:
        LabelStudioError: the venv or the executable is missing.
    """
    executable = ls_venv() / "bin" / "label-studio"
    if not executable.is_file():
        raise LabelStudioError(f"Label Studio is not installed ({executable} is missing): run `make setup`.")
    return executable


def data_dir(settings: Settings) -> Path:
    return settings.storage / "labelstudio"


def secure_data_dir(settings: Settings) -> Path:
    """Creates the data folder with mode 0700, or tightens an existing one to 0700 and its secret files
    (`_PRIVATE_FILES`) to 0600; returns the folder."""
    folder = data_dir(settings)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o077:
        folder.chmod(0o700)
    for name in _PRIVATE_FILES:
        path = folder / name
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
    return folder


def log_path(settings: Settings) -> Path:
    return settings.logs_dir / "labelstudio.log"


def state_path(settings: Settings) -> Path:
    return data_dir(settings) / "server.json"


def credentials_path(settings: Settings) -> Path:
    return data_dir(settings) / "credentials.json"


def labelstudio_url(settings: Settings) -> str:
    """The URL a browser opens (the same host as the app, so the session cookie reaches an embedded iframe)."""
    return f"http://{settings.host}:{settings.ls_port}"


def api_url(settings: Settings) -> str:
    """The URL yolodex itself calls: `YOLODEX_LS_URL` when set, else like `labelstudio_url`, with 127.0.0.1 for a
    server bound to 0.0.0.0."""
    if settings.ls_url is not None:
        return settings.ls_url
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    return f"http://{host}:{settings.ls_port}"


# ---------------------------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class Credentials:
    """The admin login yolodex creates in Label Studio; `repr` hides the secrets so logs never show them."""

    email: str
    password: str = field(repr=False)
    token: str = field(repr=False)

    @property
    def auth_header(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}


def load_or_create_credentials(settings: Settings) -> Credentials:
    """Reads `credentials.json`, creating it (mode 0600) on the first call; looser permissions are tightened.

    Creation is race-free: the file is written under a temporary name and hard-linked into place, so two
    processes starting at once agree on one login.

    Raises:
        LabelStudioError: the file exists but is not a valid credentials file.
    """
    path = credentials_path(settings)
    if not path.exists():
        secure_data_dir(settings)
        fresh = {"email": LS_EMAIL, "password": secrets.token_urlsafe(18), "token": secrets.token_hex(20)}
        handle, temporary = tempfile.mkstemp(prefix=".credentials.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(handle, 0o600)
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(fresh, file, indent=2)
                file.flush()
                os.fsync(file.fileno())
            with contextlib.suppress(FileExistsError):  # another process won the race: use its file
                os.link(temporary, path)
        finally:
            Path(temporary).unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        credentials = Credentials(email=payload["email"], password=payload["password"], token=payload["token"])
    except (ValueError, KeyError, TypeError):
        raise LabelStudioError(
            f"{path} is not a valid credentials file: delete it, then {REPAIR_ACTION.removeprefix('run ')}."
        ) from None
    if len(credentials.token) <= 5 or not credentials.password:
        # Label Studio ignores tokens of 5 characters or fewer (server.py _create_user).
        raise LabelStudioError(f"{path} holds an empty password or a token too short: delete it and run repair.")
    return credentials


# ---------------------------------------------------------------------------------------------- status


@dataclass(frozen=True)
class ServerStatus:
    """What `status` found. `message` is one sentence for the user, `action` what to do next ("" when none);
    `details` holds the log tail for a crash or a failed start."""

    state: str
    url: str
    pid: int | None
    message: str
    action: str = ""
    details: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "running"


def status(
    settings: Settings, *, credentials: Credentials | None = None, check_token: bool = True, timeout: float = 2.0
) -> ServerStatus:
    """Checks the server for `settings`: the state file, the process, `GET /health` and (optionally) the token.

    Args:
        credentials: the login to check (default: the credentials file); pass another to test a token.
        check_token: also call `/api/current-user/whoami` with the token once `/health` answers.
        timeout: per HTTP request, in seconds.
    """
    url = labelstudio_url(settings)
    if settings.ls_external:
        return _external_status(settings, credentials, check_token, timeout)
    state = _read_state(settings)
    pid = state.get("pid") if state else None
    alive = isinstance(pid, int) and _is_labelstudio_process(pid)
    ours = state is not None and alive

    if ours and state is not None and state.get("port") != settings.ls_port:
        return ServerStatus(
            "misconfigured",
            url,
            pid,
            f"Label Studio (pid {pid}) runs on port {state.get('port')}, but YOLODEX_LS_PORT is {settings.ls_port}.",
            "run `yolodex labelstudio stop`, then `yolodex labelstudio start`",
        )
    if not _health(settings, timeout):
        return _unhealthy_status(settings, url, state, pid, ours)
    if not ours:
        return _foreign_status(settings, url, credentials, check_token, timeout)
    if not settings.images_dir.is_dir():
        return ServerStatus(
            "misconfigured",
            url,
            pid,
            f"The image folder {settings.images_dir} that Label Studio serves is missing.",
            f"restore it, or {START_ACTION} (it creates the folder)",
        )
    if check_token and not _token_works(settings, credentials or load_or_create_credentials(settings), timeout):
        return ServerStatus(
            "misconfigured",
            url,
            pid,
            "Label Studio rejects yolodex's token (its data was created with another credentials file).",
            REPAIR_ACTION,
        )
    return ServerStatus("running", url, pid, f"Label Studio is running at {url}.")


def _unhealthy_status(settings: Settings, url: str, state: dict | None, pid: int | None, ours: bool) -> ServerStatus:
    """Why nothing answers /health: our process is starting (or moved to another port), our process stopped, another
    program holds the port, or Label Studio is simply not running."""
    if ours and state is not None:
        moved = _log_mentions(settings, state, _PORT_MOVED)
        if moved:
            return ServerStatus(
                "misconfigured",
                url,
                pid,
                f"Label Studio found port {settings.ls_port} taken by another program and moved to another port.",
                f"run `yolodex labelstudio stop`, then set YOLODEX_LS_PORT to a free port "
                f"(e.g. YOLODEX_LS_PORT={_suggest_free_port(settings)}) and start again",
                details=moved,
            )
        return ServerStatus("starting", url, pid, f"Label Studio is starting (pid {pid}).", FIRST_START_HINT)
    if state is not None:
        return ServerStatus(
            "crashed",
            url,
            pid,
            f"Label Studio (pid {pid}) has stopped unexpectedly.",
            f"read {'its console output' if state.get('foreground') else log_path(settings)}, then {START_ACTION}",
            details="" if state.get("foreground") else _log_tail(settings, state.get("log_offset", 0)),
        )
    if not _port_free(settings.host, settings.ls_port):
        return ServerStatus(
            "misconfigured",
            url,
            None,
            f"Port {settings.ls_port} is in use by another program that is not Label Studio.",
            f"{_free_port_action(settings)}, then {START_ACTION}",
        )
    return ServerStatus("stopped", url, None, "Label Studio is not running.", START_ACTION)


def _foreign_status(
    settings: Settings, url: str, credentials: Credentials | None, check_token: bool, timeout: float
) -> ServerStatus:
    """Something answers /health without our state file: another yolodex (other storage) or a hand-started Label
    Studio. Usable only if it accepts our token."""
    if not check_token:
        return ServerStatus("running", url, None, f"A Label Studio not started by this yolodex answers at {url}.")
    if _token_works(settings, credentials or load_or_create_credentials(settings), timeout):
        return ServerStatus("running", url, None, f"Label Studio answers at {url} (started outside this storage).")
    return ServerStatus(
        "misconfigured",
        url,
        None,
        f"Another Label Studio answers at {url} and rejects yolodex's token.",
        f"stop that server, or {_free_port_action(settings)}",
    )


def _external_status(
    settings: Settings, credentials: Credentials | None, check_token: bool, timeout: float
) -> ServerStatus:
    """`status` for a Label Studio at `YOLODEX_LS_URL`: its health and our token, no process or state file."""
    url = labelstudio_url(settings)
    where = f"{settings.ls_url} (YOLODEX_LS_URL)"
    if not _health(settings, timeout):
        return ServerStatus(
            "stopped",
            url,
            None,
            f"Label Studio does not answer at {where}; yolodex does not run it.",
            "start that Label Studio (e.g. its container), or unset YOLODEX_LS_URL to let yolodex run one",
        )
    if check_token and not _token_works(settings, credentials or load_or_create_credentials(settings), timeout):
        return ServerStatus(
            "misconfigured",
            url,
            None,
            f"Label Studio at {where} rejects yolodex's token (it uses another credentials file).",
            EXTERNAL_REPAIR_ACTION,
        )
    return ServerStatus("running", url, None, f"Label Studio answers at {where}; it runs outside yolodex.")


# ---------------------------------------------------------------------------------------------- start / stop

# Popen objects of servers this process started, so they are reaped (no zombies) and never garbage-collected
# while running (which would warn).
_children: dict[int, subprocess.Popen[bytes]] = {}


def start(settings: Settings, *, wait: bool = True, timeout: float = 420.0) -> ServerStatus:
    """Starts Label Studio for `settings`, or returns the status of the one already running (idempotent).

    Args:
        wait: block until `/health` is UP and the token works; False returns "starting" right after spawning.
        timeout: seconds to wait; a server not up by then is stopped.

    With `YOLODEX_LS_URL` set nothing is spawned: the Label Studio there is waited for (`wait`) or its status
    returned.

    Raises:
        LabelStudioError: not installed, the port is taken, the server exited or timed out while starting
            (the message carries the log tail), or a server that cannot be fixed here is in the way.
    """
    if settings.ls_external:
        return _wait_for_external(settings, wait, timeout)
    executable = ls_executable()
    secure_data_dir(settings)
    credentials = load_or_create_credentials(settings)
    current = _prepare_start(settings, credentials)
    if current is not None:
        if current.state == "running":
            return current
        if current.state == "starting":
            return _wait_until_up(settings, credentials, timeout) if wait else current
        repair_credentials(settings, credentials)  # "misconfigured" with the repair action
        return _wait_until_up(settings, credentials, timeout)

    log = log_path(settings)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as log_file:
        log_offset = log_file.tell()
        log_file.write(f"\n=== yolodex {_start_line(settings)}\n".encode())
        log_file.flush()
        process = subprocess.Popen(
            _start_command(settings, executable),
            cwd=data_dir(settings),
            env=_server_env(settings, credentials),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: Ctrl-C in the app's terminal does not hit it, stop() can
            umask=_PRIVATE_UMASK,
        )
    _children[process.pid] = process
    _write_state(settings, process.pid, log_offset)
    logger.info("started Label Studio (pid %d) on %s, log %s", process.pid, labelstudio_url(settings), log)
    if not wait:
        return ServerStatus(
            "starting", labelstudio_url(settings), process.pid, "Label Studio is starting.", FIRST_START_HINT
        )
    return _wait_until_up(settings, credentials, timeout)


def run_foreground(settings: Settings, timeout: float = 420.0) -> int:
    """Runs Label Studio as this process's child until it exits (a container's main process): like `start` (the
    credentials file, the admin user and token, a repair when the data has another login), with its output on
    this process's stdout/stderr. SIGTERM, SIGINT and SIGHUP are passed on to it.

    Returns:
        Its exit status (128 + the signal number when a signal ended it, as a shell reports).

    Raises:
        LabelStudioError: `YOLODEX_LS_URL` is set, a server already runs, or it failed to start.
    """
    if settings.ls_external:
        raise LabelStudioError(
            f"YOLODEX_LS_URL={settings.ls_url} says Label Studio runs elsewhere, so this one would never be called: "
            "unset YOLODEX_LS_URL where Label Studio itself runs."
        )
    executable = ls_executable()
    secure_data_dir(settings)
    credentials = load_or_create_credentials(settings)
    current = _prepare_start(settings, credentials)
    if current is not None:
        raise LabelStudioError(f"{current.message} Run `yolodex labelstudio stop` first.")
    print(f"labelstudio: {_start_line(settings)}", flush=True)
    process = subprocess.Popen(
        _start_command(settings, executable),
        cwd=data_dir(settings),
        env=_server_env(settings, credentials),
        stdin=subprocess.DEVNULL,
        umask=_PRIVATE_UMASK,
    )
    _children[process.pid] = process
    _write_state(settings, process.pid, log_offset=0, foreground=True)
    received: list[int] = []

    def forward(signum: int, _frame) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        try:
            up = _wait_until_up(settings, credentials, timeout)
            logger.info("Label Studio (pid %d) is running at %s", process.pid, up.url)
        except LabelStudioError:
            if not received:  # a signal during the start is a stop, not a failure
                raise
        code = process.wait()  # a forwarded signal's handler runs meanwhile (PEP 475 resumes the wait)
        return 128 - code if code < 0 else code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if process.poll() is None:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            if process.poll() is None:
                process.kill()
                process.wait()
        _children.pop(process.pid, None)
        state_path(settings).unlink(missing_ok=True)


def stop(settings: Settings, timeout: float = 30.0) -> bool:
    """Stops the server named by the state file (SIGTERM to its process group, SIGKILL after `timeout`).

    A pid that is not a Label Studio process (a stale file after a reboot) is left alone. The state file is
    removed in every case. A Label Studio at `YOLODEX_LS_URL` is never stopped from here.

    Returns:
        True if a Label Studio process was stopped.
    """
    if settings.ls_external:
        logger.info("Label Studio runs outside yolodex (YOLODEX_LS_URL=%s): not stopping it", settings.ls_url)
        return False
    state = _read_state(settings)
    if state is None:
        return False
    pid = state.get("pid")
    stopped = False
    if isinstance(pid, int) and _is_labelstudio_process(pid):
        _signal(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            logger.warning("Label Studio (pid %d) ignored SIGTERM for %.0f s: killing it", pid, timeout)
            _signal(pid, signal.SIGKILL)
            _wait_gone(pid, 10.0)
        stopped = True
        logger.info("stopped Label Studio (pid %d)", pid)
    elif pid is not None:
        logger.info("state file names pid %s, which is not a running Label Studio: left alone", pid)
    state_path(settings).unlink(missing_ok=True)
    return stopped


def repair_credentials(settings: Settings, credentials: Credentials | None = None, timeout: float = 300.0) -> None:
    """Writes the login (default: the credentials file) into Label Studio's existing database: creates or
    updates the admin user's password, replaces its API token and enables legacy tokens for its organization.

    Works while the server runs (SQLite takes the concurrent write); takes about 10 s (Django start-up).

    Raises:
        LabelStudioError: no database yet (start the server once), or the repair script failed.
    """
    if settings.ls_external:
        raise LabelStudioError(f"yolodex cannot repair a Label Studio it does not run: {EXTERNAL_REPAIR_ACTION}.")
    credentials = credentials or load_or_create_credentials(settings)
    secure_data_dir(settings)
    if settings.ls_database_url is None and not (data_dir(settings) / "label_studio.sqlite3").is_file():
        raise LabelStudioError(f"Label Studio has no database in {data_dir(settings)} yet: {START_ACTION} first.")
    python = ls_venv() / "bin" / "python"
    if not python.is_file():
        raise LabelStudioError(f"Label Studio is not installed ({python} is missing): run `make setup`.")
    try:
        result = subprocess.run(
            [str(python), "-c", _REPAIR_SCRIPT],
            cwd=data_dir(settings),
            env=_server_env(settings, credentials),
            stdin=subprocess.DEVNULL,
            umask=_PRIVATE_UMASK,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise LabelStudioError(f"Repairing the Label Studio login took over {timeout:.0f} s.") from None
    if result.returncode != 0 or "yolodex-repair-ok" not in result.stdout:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-_LOG_TAIL_LINES:])
        raise LabelStudioError(f"Repairing the Label Studio login failed:\n{tail}")
    logger.info("wrote the yolodex login into Label Studio's database (%s)", credentials.email)


# Runs inside the Label Studio venv with the server's environment; secrets arrive through the environment,
# never the command line (visible in ps).
_REPAIR_SCRIPT = """
import os, pathlib, sys
import label_studio
sys.path.insert(0, str(pathlib.Path(label_studio.__file__).parent))
os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'label_studio.core.settings.label_studio')
import django
django.setup()
from django.db import transaction
from jwt_auth.models import JWTSettings
from organizations.models import Organization
from rest_framework.authtoken.models import Token
from users.models import User
email = os.environ['LABEL_STUDIO_USERNAME']
with transaction.atomic():
    user = User.objects.filter(email=email).first()
    if user is None:
        user = User.objects.create_user(email=email, password=os.environ['LABEL_STUDIO_PASSWORD'])
        user.is_staff = True
        user.is_superuser = True
    else:
        user.set_password(os.environ['LABEL_STUDIO_PASSWORD'])
    user.save()
    org = user.active_organization or Organization.objects.first()
    if org is None:
        org = Organization.create_organization(created_by=user, title='Label Studio', legacy_api_tokens_enabled=True)
    elif not org.has_user(user):
        org.add_user(user)
    user.active_organization = org
    user.save(update_fields=['active_organization'])
    Token.objects.filter(user=user).delete()
    Token.objects.filter(key=os.environ['LABEL_STUDIO_USER_TOKEN']).delete()
    Token.objects.create(user=user, key=os.environ['LABEL_STUDIO_USER_TOKEN'])
    jwt, _ = JWTSettings.objects.get_or_create(organization=org)
    jwt.legacy_api_tokens_enabled = True
    jwt.save()
print('yolodex-repair-ok')
"""


# ---------------------------------------------------------------------------------------------- helpers


def _prepare_start(settings: Settings, credentials: Credentials) -> ServerStatus | None:
    """What `start` does before spawning: None when a server may be spawned (port free, stale state file gone),
    else the status of the server in the way ("running", "starting", or "misconfigured" that a repair fixes).

    Raises:
        LabelStudioError: something in the way that yolodex cannot fix (the message says what to do).
    """
    settings.images_dir.mkdir(parents=True, exist_ok=True)
    current = status(settings, credentials=credentials)
    if current.state in ("running", "starting"):
        return current
    if current.state == "misconfigured":
        if current.action == REPAIR_ACTION:
            return current
        raise LabelStudioError(f"{current.message} To fix: {current.action}.")
    state_path(settings).unlink(missing_ok=True)  # stopped, or a crash already reported by status
    _check_port_free(settings)
    return None


def _start_command(settings: Settings, executable: Path) -> list[str]:
    return [
        str(executable),
        "start",
        "--internal-host",
        settings.host,
        "--port",
        str(settings.ls_port),
        "--no-browser",
        "--enable-legacy-api-token",
    ]


def _start_line(settings: Settings) -> str:
    """One line naming the server about to start and its database (never the database password)."""
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    if settings.ls_database_url is None:
        database = f"SQLite in {data_dir(settings)}"
    else:
        target = parse_postgres_url(settings.ls_database_url, "YOLODEX_LS_DATABASE_URL")
        database = f"PostgreSQL database {target.name!r} at {target.host}:{target.port} as {target.user!r}"
    return f"{stamp}: starting Label Studio on {settings.host}:{settings.ls_port}, data in {database}"


def _write_state(settings: Settings, pid: int, log_offset: int, foreground: bool = False) -> None:
    state = {"pid": pid, "port": settings.ls_port, "host": settings.host, "started_at": time.time()}
    atomic_write_json(state_path(settings), state | {"log_offset": log_offset, "foreground": foreground})


def _wait_for_external(settings: Settings, wait: bool, timeout: float) -> ServerStatus:
    """`start` for a Label Studio at `YOLODEX_LS_URL`: waits (`wait`) until it answers and takes our token."""
    logger.info("Label Studio runs outside yolodex (YOLODEX_LS_URL=%s): not starting one", settings.ls_url)
    deadline = time.monotonic() + timeout
    while True:
        current = status(settings)
        if current.state == "running" or not wait:
            return current
        if current.state == "misconfigured":
            raise LabelStudioError(f"{current.message} To fix: {current.action}.")
        if time.monotonic() > deadline:
            raise LabelStudioError(
                f"Label Studio did not answer at {settings.ls_url} (YOLODEX_LS_URL) within {timeout:.0f} s; yolodex "
                "does not start it: start that Label Studio (e.g. its container), or unset YOLODEX_LS_URL."
            )
        time.sleep(1.0)


def _server_env(settings: Settings, credentials: Credentials) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name in _INHERITED_ENV or name.startswith("LC_")}
    env.update(_database_env(settings))
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir(settings)),
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(settings.images_dir),
            "LABEL_STUDIO_USERNAME": credentials.email,
            "LABEL_STUDIO_PASSWORD": credentials.password,
            "LABEL_STUDIO_USER_TOKEN": credentials.token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            # Only our own names (DNS rebinding): Django answers 400 to any other Host (base.py reads these).
            "LABEL_STUDIO_ALLOWED_HOSTS": ",".join(_django_host(name) for name in settings.trusted_hosts),
            "LABEL_STUDIO_CSRF_TRUSTED_ORIGINS": ",".join(_trusted_origins(settings)),
            # No phone-home: the version check, analytics and the default Sentry DSNs (set unless emptied).
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "PYTHONUNBUFFERED": "1",  # the log shows progress as it happens
        }
    )
    return env


def _django_host(name: str) -> str:
    """A host name as Django's ALLOWED_HOSTS spells it: IPv6 addresses in brackets."""
    return f"[{name}]" if ":" in name else name


def _trusted_origins(settings: Settings) -> list[str]:
    """Django's CSRF_TRUSTED_ORIGINS for the trusted names: http on Label Studio's port, and http/https without a
    port (a reverse proxy in front; same-origin forms need no entry, but a proxy that ends TLS makes the browser's
    https Origin differ from the http request Django sees)."""
    origins = []
    for name in map(_django_host, settings.trusted_hosts):
        origins += [f"http://{name}:{settings.ls_port}", f"http://{name}", f"https://{name}"]
    return origins


def _database_env(settings: Settings) -> dict[str, str]:
    """Label Studio's database settings (its core/settings/base.py): SQLite in the data dir, or PostgreSQL."""
    if settings.ls_database_url is None:
        return {"DJANGO_DB": "sqlite"}
    target = parse_postgres_url(settings.ls_database_url, "YOLODEX_LS_DATABASE_URL")
    return {
        "DJANGO_DB": "default",  # Label Studio's name for its PostgreSQL entry
        "POSTGRE_NAME": target.name,
        "POSTGRE_USER": target.user,
        "POSTGRE_PASSWORD": target.password,
        "POSTGRE_HOST": target.host,
        "POSTGRE_PORT": str(target.port),
    }


def _wait_until_up(settings: Settings, credentials: Credentials, timeout: float) -> ServerStatus:
    deadline = time.monotonic() + timeout
    repaired = False
    while True:
        state = _read_state(settings)
        pid = state.get("pid") if state else None
        if not (isinstance(pid, int) and _is_labelstudio_process(pid)):
            output = _output_end(settings, state)
            state_path(settings).unlink(missing_ok=True)
            raise LabelStudioError(f"Label Studio exited while starting; {output}")
        current = status(settings, credentials=credentials)
        if current.state == "running":
            return current
        if current.state == "misconfigured":
            if current.action == REPAIR_ACTION and not repaired:
                repair_credentials(settings, credentials)
                repaired = True
                continue
            stop(settings)
            details = f"\n{current.details}" if current.details else ""
            raise LabelStudioError(f"{current.message} To fix: {current.action}.{details}")
        if time.monotonic() > deadline:
            output = _output_end(settings, state)
            stop(settings)
            raise LabelStudioError(f"Label Studio did not answer within {timeout:.0f} s, so it was stopped; {output}")
        time.sleep(1.0)


def _output_end(settings: Settings, state: dict | None) -> str:
    """Where to read what the server printed: the end of its log, or (run in the foreground) the console."""
    if state and state.get("foreground"):
        return "its output is above (it ran in the foreground)"
    return f"the end of {log_path(settings)}:\n{_log_tail(settings, state.get('log_offset', 0) if state else 0)}"


def _read_state(settings: Settings) -> dict | None:
    try:
        payload = json.loads(state_path(settings).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def _is_labelstudio_process(pid: int) -> bool:
    """True if `pid` is a live (not zombie) process whose command line names label-studio/label_studio."""
    if pid <= 0:
        return False
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        return False  # our own child exited (poll() reaped it)
    proc = Path("/proc") / str(pid)
    if Path("/proc/self").exists():
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError):
            return False
    else:  # no /proc (macOS): ask ps
        result = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True)
        if result.returncode != 0:
            return False
        cmdline = result.stdout
    return "label-studio" in cmdline or "label_studio" in cmdline


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # start() made the server a session leader: its group is its pid, and holds any helper it spawned.
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child = _children.get(pid)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=0.2)
            if child.returncode is not None:
                _children.pop(pid, None)
                return True
        elif not _is_labelstudio_process(pid):
            return True
        time.sleep(0.2)
    return False


def _get(url: str, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    """(status, body) of a GET, never through a proxy (the server is local); status 0 when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers=headers)
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""
    except (OSError, ValueError):
        return 0, b""


def _health(settings: Settings, timeout: float) -> bool:
    code, body = _get(f"{api_url(settings)}/health", {}, timeout)
    if code != 200:
        return False
    try:
        return json.loads(body).get("status") == "UP"
    except (ValueError, AttributeError):
        return False


def _token_works(settings: Settings, credentials: Credentials, timeout: float) -> bool:
    code, _ = _get(f"{api_url(settings)}/api/current-user/whoami", credentials.auth_header, max(timeout, 10.0))
    return code == 200


def _port_free(host: str, port: int) -> bool:
    """Nothing listens on `host:port`: it binds, and (Label Studio's own test) 127.0.0.1 refuses a connection."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as Django's server does: a port left in TIME_WAIT by a stopped server counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _suggest_free_port(settings: Settings) -> int | str:
    for port in range(settings.ls_port + 1, min(settings.ls_port + 200, 65536)):
        if _port_free(settings.host, port):
            return port
    return "another port"


def _free_port_action(settings: Settings) -> str:
    return f"set YOLODEX_LS_PORT to a free port (e.g. YOLODEX_LS_PORT={_suggest_free_port(settings)})"


def _check_port_free(settings: Settings) -> None:
    # Label Studio would silently move to the next free port; the app would then call the wrong server.
    if not _port_free(settings.host, settings.ls_port):
        raise LabelStudioError(
            f"Port {settings.ls_port} on {settings.host} is in use by another program: set YOLODEX_LS_PORT to a "
            f"free port (e.g. YOLODEX_LS_PORT={_suggest_free_port(settings)}) and start again."
        )


def _log_tail(settings: Settings, offset: int = 0, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with log_path(settings).open("rb") as file:
            file.seek(offset)
            text = file.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:])


def _log_mentions(settings: Settings, state: dict, needle: str) -> str:
    """The log lines of the current run that contain `needle` ("" when none)."""
    text = _log_tail(settings, state.get("log_offset", 0), lines=10_000)
    return "\n".join(line for line in text.splitlines() if needle in line)


# ---------------------------------------------------------------------------------------------- CLI


def _print_status(settings: Settings, current: ServerStatus) -> None:
    print(f"labelstudio: {current.state}: {current.message}")
    if current.action:
        print(f"labelstudio: to do: {current.action}")
    if current.details:
        print(current.details)
    if current.state in ("running", "starting"):
        print(f"labelstudio: open {current.url}; log in with the email and password in {credentials_path(settings)}")


def main(argv: list[str] | None = None) -> int:
    """`python -m backend.labeling.server start|stop|status|repair` (until `yolodex labelstudio` exists)."""
    parser = argparse.ArgumentParser(prog="python -m backend.labeling.server", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("start", "stop", "status", "repair"))
    parser.add_argument("--no-wait", action="store_true", help="start: return once the server is spawned")
    parser.add_argument(
        "--foreground", action="store_true", help="start: run the server in this process until it stops (containers)"
    )
    parser.add_argument("--quiet", action="store_true", help="status: print nothing, exit 0 only when running")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="labelstudio: %(message)s")
    settings = get_settings()
    try:
        if args.command == "start" and args.foreground:
            return run_foreground(settings)
        if args.command == "start":
            if not args.no_wait:
                print(f"labelstudio: starting on {labelstudio_url(settings)} ({FIRST_START_HINT})")
            current = start(settings, wait=not args.no_wait)
        elif args.command == "stop" and settings.ls_external:
            print(f"labelstudio: Label Studio runs outside yolodex (YOLODEX_LS_URL={settings.ls_url}): not stopping it")
            return 0
        elif args.command == "stop":
            if not stop(settings):  # a stop logs its own line
                print("labelstudio: was not running")
            return 0
        elif args.command == "repair":
            repair_credentials(settings)
            current = status(settings)
        else:
            current = status(settings)
            if args.quiet:
                return 0 if current.ok else 1
    except LabelStudioError as error:
        print(f"labelstudio: {error}", file=sys.stderr)
        return 1
    _print_status(settings, current)
    return 0 if current.state in ("running", "starting") or args.command == "repair" else 1


if __name__ == "__main__":
    sys.exit(main())
