"""The app started the way `make run` starts it, or its Streamlit server alone, and a headless Chromium to drive it
(Playwright): shared by the browser tests and `bench/app_browser.py`.

`make_run` gets a fresh storage and free ports, so it starts its own Label Studio, huey worker and Streamlit app; it
is stopped with Ctrl-C (SIGINT), as a user would, and no process may outlive it. `streamlit_app` starts only the
Streamlit app (`streamlit run app/main.py`, or another command that serves it) on a storage the caller prepared, for
pages that need no worker or that talk to a Label Studio the caller started. Assertions in the tests are Playwright's
retrying `expect`s, never fixed sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.labelstudio_fixture import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]

CHROMIUM = Path(os.environ.get("YOLODEX_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
EXPECT_TIMEOUT_MS = 30_000  # 2 cores shared by the app, the worker, Label Studio and the browser


@dataclass(frozen=True)
class RunningApp:
    """`make run` on free ports: the app's and Label Studio's base URLs, the storage folder and make's log."""

    url: str
    ls_url: str
    storage: Path
    log: Path


def require_browser() -> None:
    """Skips with the install step when Chromium or Playwright is missing."""
    if not CHROMIUM.is_file():
        pytest.skip(
            f"no {CHROMIUM}: install Debian's chromium (`apt-get install chromium`, `make setup` does it as root)"
        )
    pytest.importorskip("playwright.sync_api", reason="playwright is in requirements-dev.txt: run `make setup`")


@dataclass(frozen=True)
class RunningStreamlit:
    """A Streamlit app started by `streamlit_app`: its base URL, port, server process id and log."""

    url: str
    port: int
    pid: int
    log: Path


def wait_for(url: str, timeout: float, process: subprocess.Popen, log: Path, name: str = "`make run`") -> None:
    """Waits until `url` answers 200; fails with the log when it does not in time or the process (`name`) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{name} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@contextmanager
def make_run(storage: Path) -> Iterator[RunningApp]:
    """`make run` with `storage` and free ports until the block ends; then Ctrl-C, and no process left behind."""
    app_port, ls_port = free_port(), free_port()
    env = {
        **os.environ,
        "YOLODEX_STORAGE": str(storage),
        "YOLODEX_APP_PORT": str(app_port),
        "YOLODEX_LS_PORT": str(ls_port),
        "YOLODEX_HOST": "127.0.0.1",
    }
    env.pop("YOLODEX_QUEUE_IMMEDIATE", None)
    log = storage / "make_run.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=REPO_ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(f"http://127.0.0.1:{app_port}/_stcore/health", 240, process, log)
        yield RunningApp(f"http://127.0.0.1:{app_port}", f"http://127.0.0.1:{ls_port}", storage, log)
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: make's trap stops the worker and Label Studio
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        leftovers = subprocess.run(["pgrep", "-f", str(storage)], capture_output=True, text=True).stdout.split()
        for pid in leftovers:  # never leave a server behind, even when make's trap failed
            os.kill(int(pid), signal.SIGKILL)
        assert not leftovers, f"`make run` left processes running after Ctrl-C: {leftovers}\n{log.read_text()[-2000:]}"


def streamlit_command(port: int) -> list[str]:
    """`streamlit run app/main.py` on 127.0.0.1:`port`, headless, without usage stats or a file watcher."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(REPO_ROOT / "app" / "main.py"),
        "--server.address",
        "127.0.0.1",
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
    ]


@contextmanager
def streamlit_app(
    storage: Path,
    *,
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
    port: int | None = None,
    timeout: float = 120,
) -> Iterator[RunningStreamlit]:
    """The Streamlit app on `storage` until the block ends, then stopped (SIGTERM to its process group, SIGKILL if
    it outlives 30 s).

    Args:
        env: variables added to this process's environment (YOLODEX_STORAGE, YOLODEX_APP_PORT and YOLODEX_HOST are
            set here, and may be overridden).
        command: what serves the app on `port` (default `streamlit_command(port)`), run from the repository root.
        port: default a free one.
    """
    port = port or free_port()
    environment = {
        **os.environ,
        "YOLODEX_STORAGE": str(storage),
        "YOLODEX_APP_PORT": str(port),
        "YOLODEX_HOST": "127.0.0.1",
        **(env or {}),
    }
    log = storage / f"streamlit-{port}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            command or streamlit_command(port),
            cwd=REPO_ROOT,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(f"{url}/_stcore/health", timeout, process, log, name="the app")
        yield RunningStreamlit(url, port, process.pid, log)
    finally:
        with suppress(ProcessLookupError):  # the app may have exited already (a failed start)
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@contextmanager
def chromium() -> Iterator:
    """A headless Chromium (Debian's, not Playwright's download) with the tests' `expect` timeout."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def wait_for_app(page, timeout_ms: int = 90_000) -> None:
    """Waits until the Streamlit page is connected and its script has finished running (a page's first run in a
    fresh app process imports torch: tens of seconds on 2 busy cores)."""
    from playwright.sync_api import expect

    app = page.get_by_test_id("stApp")
    expect(app).to_have_attribute("data-test-connection-state", "CONNECTED", timeout=timeout_ms)
    expect(app).to_have_attribute("data-test-script-state", "notRunning", timeout=timeout_ms)


def drop_files(page, paths: list[Path]) -> None:
    """Drops files on the page's first file uploader and waits until the upload's rerun is over (a click during it
    could start a run without the files)."""
    from playwright.sync_api import expect

    page.locator('[data-testid="stFileUploaderDropzoneInput"]').first.set_input_files([str(path) for path in paths])
    expect(page.get_by_text(paths[-1].name).first).to_be_visible()
    wait_for_app(page)


def fill_short_training(page, minutes: int, epochs: int | None = None) -> None:
    """On the Train page: 64 px images, a time budget of `minutes` and, when given, a number of epochs."""
    from playwright.sync_api import expect

    page.get_by_test_id("stSelectbox").filter(has_text="Image size").click()
    page.get_by_role("option", name="64", exact=True).click()
    if epochs is not None:
        field = page.get_by_label("Epochs", exact=True)
        field.fill(str(epochs))
        field.press("Enter")
        expect(field).to_have_value(str(epochs))
    budget = page.get_by_label("Time budget (minutes, 0 = none)")
    budget.fill(str(minutes))
    budget.press("Enter")
    expect(budget).to_have_value(f"{minutes:.2f}")
    wait_for_app(page)
