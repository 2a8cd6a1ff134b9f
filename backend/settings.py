"""Every yolodex setting, read from environment variables with working defaults.

| variable               | default                                        |
|------------------------|------------------------------------------------|
| `YOLODEX_STORAGE`      | `./storage`, relative to the repository root   |
| `YOLODEX_DATABASE_URL` | `sqlite:///<storage>/yolodex.db`               |
| `YOLODEX_QUEUE_URL`    | `sqlite:///<storage>/queue.db` (`redis://…` switches the queue to Redis) |
| `YOLODEX_HOST`         | `127.0.0.1`                                    |
| `YOLODEX_APP_PORT`     | `8501`                                         |
| `YOLODEX_LS_PORT`      | `8080`                                         |
| `YOLODEX_DEVICE`       | `auto` (CUDA when torch sees a GPU, else CPU)  |
| `YOLODEX_LS_DATABASE_URL` | unset: SQLite in `<storage>/labelstudio`; `postgresql://user:pw@host:port/db` |
| `YOLODEX_LS_URL`       | unset: yolodex runs Label Studio; `http://labelstudio:8080`: one run elsewhere |
| `YOLODEX_ALLOWED_HOSTS` | unset: only the names below; `yolodex.example.org,box.lan`: more names to answer to |

A variable set to the empty string counts as unset. A relative `YOLODEX_STORAGE` is resolved against the
repository root, never the current directory, so the app, the worker and the CLI agree wherever they start.
`YOLODEX_DATABASE_URL` takes any SQLAlchemy URL: SQLite (default) or PostgreSQL as
`postgresql+psycopg://user:password@host:port/db` (psycopg 3). With `YOLODEX_LS_URL` set, yolodex neither starts nor
stops Label Studio and calls it at that URL; a browser still opens `YOLODEX_HOST:YOLODEX_LS_PORT` (the app's hostname
when the app binds 0.0.0.0), so publish Label Studio on that port. The Label Studio that `yolodex labelstudio start`
runs (e.g. in its own container) shares the storage folder with the app: its credentials file is how they agree.
Passwords in URLs stay out of `repr(settings)`.

The app and the Label Studio yolodex starts answer only requests whose Host (and Origin, when a browser sends one)
names them: 127.0.0.1, localhost, ::1, `YOLODEX_HOST` (unless it is 0.0.0.0 or ::) and the comma-separated names in
`YOLODEX_ALLOWED_HOSTS` (a reverse proxy's public name, the machine's LAN name or address). A web page under any
other name is refused, even when its name resolves to this machine (DNS rebinding): docs/host_names.md.
Importing this module does not import torch: only `Settings.resolved_device()` does, and only for `auto`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

DEFAULT_STORAGE = "storage"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_APP_PORT = 8501
DEFAULT_LS_PORT = 8080
DEFAULT_DEVICE = "auto"

_DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_QUEUE_SCHEMES = ("sqlite://", "redis://", "rediss://")
# Label Studio's database: its Django settings read only libpq-style parts, so any PostgreSQL URL spelling will do.
_POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2")
# The addresses that mean "every interface": a bind address, never a name a browser sends.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
# A DNS name (letters, digits, hyphens, dots; "_" as some LAN names have), an IPv4 or a bracket-less IPv6 address.
_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|[0-9a-f:.]+")
DEFAULT_POSTGRES_PORT = 5432


@cache
def project_root() -> Path:
    """The directory holding pyproject.toml (the checkout), found from this file's location.

    When yolodex is installed as a wheel there is no checkout: the current directory stands in, so set
    `YOLODEX_STORAGE` to an absolute path there. (The Docker image installs the checkout in /app editable and sets
    `YOLODEX_STORAGE=/data`.)
    """
    for folder in Path(__file__).resolve().parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    return Path.cwd()


@dataclass(frozen=True)
class Settings:
    storage: Path
    database_url: str = field(repr=False)  # may hold a password
    queue_url: str
    host: str = DEFAULT_HOST
    app_port: int = DEFAULT_APP_PORT
    ls_port: int = DEFAULT_LS_PORT
    device: str = DEFAULT_DEVICE
    ls_database_url: str | None = field(default=None, repr=False)  # None: Label Studio's own SQLite file
    ls_url: str | None = None  # None: yolodex runs Label Studio itself
    allowed_hosts: tuple[str, ...] = ()  # YOLODEX_ALLOWED_HOSTS: names answered besides `trusted_hosts`' defaults

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Reads the `YOLODEX_*` variables (from `os.environ` unless `environ` is given).

        Raises:
            ValueError: a variable holds a value yolodex cannot use; the message names it and the fix.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        storage = Path(get("YOLODEX_STORAGE") or DEFAULT_STORAGE).expanduser()
        if not storage.is_absolute():
            storage = project_root() / storage
        storage = storage.resolve()

        queue_url = get("YOLODEX_QUEUE_URL") or f"sqlite:///{storage / 'queue.db'}"
        if not queue_url.startswith(_QUEUE_SCHEMES):
            raise ValueError(
                f"YOLODEX_QUEUE_URL={queue_url!r} is not supported: use sqlite:///<path> or redis://host:port/db, "
                "or unset it to use a SQLite queue in the storage folder."
            )
        device = (get("YOLODEX_DEVICE") or DEFAULT_DEVICE).lower()
        if not _DEVICE_PATTERN.fullmatch(device):
            raise ValueError(
                f"YOLODEX_DEVICE={device!r} is not a device: use auto, cpu, cuda, cuda:<index> or mps, "
                "or unset it for auto."
            )
        ls_database_url = get("YOLODEX_LS_DATABASE_URL")
        if ls_database_url is not None:
            parse_postgres_url(ls_database_url, "YOLODEX_LS_DATABASE_URL")  # fail here, not when Label Studio starts
        ls_url = get("YOLODEX_LS_URL")
        if ls_url is not None:
            parts = urlsplit(ls_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"YOLODEX_LS_URL={ls_url!r} is not an http(s) URL: set it to the base URL of a Label Studio "
                    "that yolodex does not run (e.g. http://labelstudio:8080), or unset it."
                )
            ls_url = ls_url.rstrip("/")
        return cls(
            storage=storage,
            database_url=get("YOLODEX_DATABASE_URL") or f"sqlite:///{storage / 'yolodex.db'}",
            queue_url=queue_url,
            host=get("YOLODEX_HOST") or DEFAULT_HOST,
            app_port=_port(env, "YOLODEX_APP_PORT", DEFAULT_APP_PORT),
            ls_port=_port(env, "YOLODEX_LS_PORT", DEFAULT_LS_PORT),
            device=device,
            ls_database_url=ls_database_url,
            ls_url=ls_url,
            allowed_hosts=_host_names(get("YOLODEX_ALLOWED_HOSTS") or ""),
        )

    @property
    def ls_external(self) -> bool:
        """True when Label Studio runs elsewhere (`YOLODEX_LS_URL`): yolodex only calls it."""
        return self.ls_url is not None

    @property
    def trusted_hosts(self) -> tuple[str, ...]:
        """The host names (lower case, IPv6 without brackets, no port) the app and Label Studio answer to: the
        loopback names, `YOLODEX_HOST` unless it binds every interface, and `YOLODEX_ALLOWED_HOSTS`."""
        own = () if self.host in WILDCARD_HOSTS else (self.host.lower().strip("[]").rstrip("."),)
        return tuple(dict.fromkeys((*LOOPBACK_NAMES, *own, *self.allowed_hosts)))

    @property
    def listens_beyond_loopback(self) -> bool:
        """True when `YOLODEX_HOST` is not a loopback address: other machines may reach the app."""
        return self.host.lower().strip("[]") not in LOOPBACK_NAMES and not self.host.startswith("127.")

    @property
    def images_dir(self) -> Path:
        return self.storage / "images"

    @property
    def datasets_dir(self) -> Path:
        return self.storage / "datasets"

    @property
    def runs_dir(self) -> Path:
        return self.storage / "runs"

    @property
    def models_dir(self) -> Path:
        return self.storage / "models"

    @property
    def weights_dir(self) -> Path:
        """Downloaded pretrained weights (e.g. the official COCO checkpoints)."""
        return self.storage / "weights"

    @property
    def logs_dir(self) -> Path:
        return self.storage / "logs"

    def ensure_dirs(self) -> None:
        """Creates the storage folder and its sub-folders; existing ones are left as they are."""
        folders = (self.images_dir, self.datasets_dir, self.runs_dir, self.models_dir, self.weights_dir, self.logs_dir)
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)

    def resolved_device(self) -> str:
        """The torch device to use: `auto` becomes `cuda` when torch sees a GPU, else `cpu`.

        Raises:
            ValueError: `YOLODEX_DEVICE` asks for CUDA but torch sees no CUDA device.
        """
        if self.device == "cpu":
            return "cpu"
        import torch  # deferred: importing settings must stay cheap

        cuda = torch.cuda.is_available()
        if self.device == "auto":
            return "cuda" if cuda else "cpu"
        if self.device.startswith("cuda") and not cuda:
            raise ValueError(
                f"YOLODEX_DEVICE={self.device} but torch sees no CUDA device: set YOLODEX_DEVICE=cpu or auto."
            )
        return self.device


@dataclass(frozen=True)
class PostgresTarget:
    """The parts of a PostgreSQL URL (what libpq or Django's settings take); `repr` hides the password."""

    host: str
    port: int
    name: str
    user: str
    password: str = field(repr=False)


def parse_postgres_url(url: str, variable: str = "the URL") -> PostgresTarget:
    """Splits `postgresql://user:password@host:port/db` (percent-escapes decoded; port 5432 when absent).

    Raises:
        ValueError: not a PostgreSQL URL, or no host or database name; the message names `variable`, never the
            password.
    """
    try:
        parts = urlsplit(url)
        port = parts.port or DEFAULT_POSTGRES_PORT
    except ValueError:
        parts, port = None, 0
    name = unquote(parts.path.lstrip("/")) if parts else ""
    if parts is None or parts.scheme not in _POSTGRES_SCHEMES or not parts.hostname or not name or "/" in name:
        shown = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
        raise ValueError(
            f"{variable}={shown!r} is not a PostgreSQL URL: use postgresql://user:password@host:port/database "
            "(escape special characters in the password with %XX), or unset it."
        )
    return PostgresTarget(
        host=parts.hostname,
        port=port,
        name=name,
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
    )


def get_settings() -> Settings:
    """The settings from the current environment, read on every call (cheap: no I/O beyond path resolution)."""
    return Settings.from_env()


def _host_names(raw: str) -> tuple[str, ...]:
    """The names in `YOLODEX_ALLOWED_HOSTS` (comma-separated), lower case, IPv6 without brackets; empty items
    are skipped.

    Raises:
        ValueError: an item is not a bare host name (a scheme, a port, a path, a space); the message names it.
    """
    names = []
    for item in raw.split(","):
        name = item.strip().lower().rstrip(".")
        if name.startswith("[") and name.endswith("]"):
            name = name[1:-1]
        if not name:
            continue
        if not _HOST_NAME.fullmatch(name):
            raise ValueError(
                f"YOLODEX_ALLOWED_HOSTS holds {item.strip()!r}, which is not a host name: list bare names or "
                "addresses, comma-separated, without http:// or a port (e.g. yolodex.example.org,192.168.1.20)."
            )
        names.append(name)
    return tuple(names)


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a port number: set it to an integer from 1 to 65535.") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{name}={port} is out of range: set it to an integer from 1 to 65535.")
    return port
