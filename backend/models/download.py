"""Download pretrained weights: resumable, checksum-verified, with by-hand instructions on failure.

The official YOLO-NAS COCO checkpoints live on a host that has moved once (sghub.deci.ai is gone) and
that users report answering 403 as well, so every failure message says where to put a file fetched by
hand: the next run then finds it and never touches the network.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from tqdm import tqdm

logger = logging.getLogger("yolodex.weights")

COCO_WEIGHTS_LICENCE_NOTE = (
    "The YOLO-NAS pretrained COCO weights are released by Deci/NVIDIA under a licence that forbids "
    "commercial use (see LICENSE.YOLONAS.md in super-gradients: "
    "https://github.com/Deci-AI/super-gradients/blob/master/LICENSE.YOLONAS.md). "
    "Models fine-tuned from them inherit that non-commercial restriction. "
    "Training from random initialisation has no such restriction."
)

_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_PATTERN = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


class WeightsDownloadError(RuntimeError):
    """A weights file could not be downloaded or verified; the message says how to fix it by hand, in the CLI's
    words ("then run the command again").

    Attributes:
        destination: where the file was to be stored (where a user may put it by hand), None when not known.
        reason: what went wrong, without the advice (for callers that give advice in their own words: a page).
    """

    def __init__(self, message: str, *, destination: Path | None = None, reason: str | None = None):
        super().__init__(message)
        self.destination = destination
        self.reason = reason or message


@dataclass(frozen=True)
class WeightsSource:
    """Where a weights file comes from and under which terms.

    Attributes:
        name: File name to store it under, e.g. ``yolo_nas_s_coco.pth``.
        url: http(s) URL to download it from.
        sha256: Expected lowercase hex digest, or None when nobody has published one.
        licence: Licence terms to show the user whenever the file is fetched.
    """

    name: str
    url: str
    sha256: str | None
    licence: str


# sha256 is None: Deci never published digests for these files, and pinning one we computed ourselves
# would reject a legitimately re-uploaded checkpoint without making the download any safer.
OFFICIAL_COCO_WEIGHTS: dict[str, WeightsSource] = {
    size: WeightsSource(
        name=f"yolo_nas_{size}_coco.pth",
        url=f"https://sg-hub-nv.s3.amazonaws.com/models/yolo_nas_{size}_coco.pth",
        sha256=None,
        licence=COCO_WEIGHTS_LICENCE_NOTE,
    )
    for size in ("s", "m", "l")
}


def sha256_file(path: Path | str, chunk_size: int = 1 << 20) -> str:
    """Returns the lowercase hex sha256 of a file, read in chunks so large checkpoints fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    url: str,
    destination: Path,
    sha256: str | None = None,
    *,
    progress: bool = True,
    timeout: float = 30.0,
    chunk_size: int = 1 << 20,
    session: requests.Session | None = None,
) -> Path:
    """Downloads ``url`` to ``destination`` unless a file with the right checksum is already there.

    Bytes go to ``<destination>.part`` first and are renamed into place only once complete and
    verified, so ``destination`` never holds a truncated file. A ``.part`` left by an interrupted run
    is resumed with an HTTP Range request.

    Args:
        url: http or https URL of the file.
        destination: Where the file must end up; parent directories are created.
        sha256: Expected hex digest. None skips verification (and accepts any existing file).
        progress: Show a tqdm progress bar (only when stderr is a terminal).
        timeout: Seconds to wait for the connection and for each read from the socket.
        chunk_size: Bytes per read; also how often the progress bar updates.
        session: Session to send requests with (proxies, auth, retries); a fresh one by default.

    Returns:
        ``destination``, as an absolute path.

    Raises:
        ValueError: ``url`` is not http(s), or ``sha256`` is not a hex sha256 digest.
        WeightsDownloadError: The server or network failed, or a checksum did not match. The
            ``.part`` file is kept after network failures so that the next call resumes.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"Only http and https URLs can be downloaded, got {url!r}.")
    expected = None
    if sha256 is not None:
        expected = sha256.strip().lower()
        if not _SHA256_PATTERN.fullmatch(expected):
            raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}.")

    # Absolute, so the by-hand instructions name the same file whatever directory the user is in.
    destination = Path(destination).expanduser().absolute()
    if destination.exists():
        if expected is None:
            return destination
        actual = sha256_file(destination)
        if actual == expected:
            return destination
        # The file may be the user's own hand-downloaded copy: reporting beats silently deleting it.
        raise WeightsDownloadError(
            f"{destination} exists but has the wrong checksum: expected sha256 {expected}, found {actual}. "
            f"Delete it, or replace it with the correct file downloaded from {url}, then run the command again.",
            destination=destination,
            reason=f"the file there has the wrong checksum: expected sha256 {expected}, found {actual}",
        )

    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    http = session if session is not None else requests.Session()
    try:
        _download_to_part(http, url, destination, part, expected, progress, timeout, chunk_size)
    finally:
        if session is None:
            http.close()

    if expected is not None:
        actual = sha256_file(part)
        if actual != expected:
            # Resuming a corrupt .part can never fix it, so start the next attempt from zero.
            part.unlink()
            raise WeightsDownloadError(
                f"Downloaded {destination.name} from {url}, but its checksum is wrong: expected sha256 "
                f"{expected}, got {actual}. The partial file was deleted. "
                + _by_hand_instructions(destination, expected),
                destination=destination,
                reason=f"the downloaded file's checksum is wrong: expected sha256 {expected}, got {actual}",
            )
    # Same directory, so the rename is atomic: other processes see either no file or the whole file.
    os.replace(part, destination)
    return destination


def fetch_weights(source: WeightsSource, weights_dir: Path, *, progress: bool = True, timeout: float = 30.0) -> Path:
    """Downloads ``source`` into ``weights_dir`` (if not already there) and logs its licence terms.

    Args:
        source: The weights file to fetch.
        weights_dir: Directory to store it in, as ``weights_dir / source.name``.
        progress: Show a progress bar.
        timeout: Seconds to wait for the connection and for each read.

    Returns:
        Absolute path of the weights file.

    Raises:
        WeightsDownloadError: See :func:`download_file`.
    """
    # Logged before downloading and on every call: the terms matter even when the file already exists.
    logger.warning("%s: %s", source.name, source.licence)
    return download_file(source.url, Path(weights_dir) / source.name, source.sha256, progress=progress, timeout=timeout)


def _download_to_part(
    http: requests.Session,
    url: str,
    destination: Path,
    part: Path,
    expected: str | None,
    progress: bool,
    timeout: float,
    chunk_size: int,
) -> None:
    """Fills ``part`` with the complete remote file, resuming from its current length if it exists."""

    def fail(reason: str) -> WeightsDownloadError:
        kept = ""
        if part.exists() and part.stat().st_size > 0:
            kept = f"The {part.stat().st_size} bytes received so far are kept in {part}; running again resumes. "
        return WeightsDownloadError(
            f"Could not download {destination.name} from {url} ({reason}). "
            + kept
            + _by_hand_instructions(destination, expected),
            destination=destination,
            reason=f"from {url}: {reason}",
        )

    offset = part.stat().st_size if part.exists() else 0
    # identity: Range offsets count bytes of the stored representation, which must be the raw file.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with http.get(url, headers=headers, stream=True, timeout=timeout) as response:
            if response.status_code == 416 and offset:
                # Nothing left after `offset`: the previous run received everything but was stopped
                # before verifying/renaming. Checksum verification still guards against a bad part.
                total = _parse_content_range(response.headers.get("Content-Range"))[2]
                if total is None or total == offset:
                    return
                # The part is longer than the remote file, so it cannot be a prefix of it.
                part.unlink()
                raise fail(f"the partial file was longer than the {total} bytes on the server and was deleted")
            if response.status_code >= 400:
                raise fail(f"HTTP {response.status_code} {response.reason}")

            if response.status_code == 206:
                start, _, total = _parse_content_range(response.headers.get("Content-Range"))
                if start != offset:
                    # Appending bytes that do not start where the part ends would corrupt it silently.
                    part.unlink()
                    where = "without a valid Content-Range" if start is None else f"at byte {start} instead of {offset}"
                    raise fail(f"the server resumed {where}; the partial file was deleted")
                mode = "ab"
            else:
                # 200: the server ignored Range and sends the whole file, so start the part over.
                offset = 0
                content_length = response.headers.get("Content-Length")
                total = int(content_length) if content_length and content_length.isdigit() else None
                mode = "wb"

            received = offset
            with (
                open(part, mode) as file,
                tqdm(
                    total=total,
                    initial=offset,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=destination.name,
                    # None lets tqdm hide the bar when stderr is not a terminal (logs, CI, workers).
                    disable=None if progress else True,
                ) as bar,
            ):
                for chunk in _iter_raw(response, chunk_size):
                    file.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            # urllib3 2.x already raises IncompleteRead on a short body; 1.x does not enforce Content-Length.
            if total is not None and received != total:
                raise fail(f"connection closed after {received} of {total} bytes")
    except requests.RequestException as error:
        raise fail(_describe_network_error(error, timeout)) from error


def _iter_raw(response: requests.Response, chunk_size: int) -> Iterator[bytes]:
    """Yields the body as it arrives, including the bytes received before a connection drops.

    ``iter_content`` reads full ``chunk_size`` blocks, and urllib3 discards a half-filled block when
    the connection dies, so up to one chunk of received data would have to be downloaded again.
    """
    # read1 arrived in urllib3 2.x; read() on 1.26 still works, it just loses the half-filled block.
    read = getattr(response.raw, "read1", response.raw.read)
    try:
        while True:
            chunk = read(chunk_size, decode_content=False)
            if not chunk:
                return
            yield chunk
    except urllib3.exceptions.ReadTimeoutError as error:
        raise requests.Timeout(error) from error
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.HTTPError, OSError) as error:
        raise requests.ConnectionError(error) from error


def _parse_content_range(header: str | None) -> tuple[int | None, int | None, int | None]:
    """Parses ``bytes 100-199/300`` or ``bytes */300`` into (first, last, total); None where unknown."""
    match = _CONTENT_RANGE_PATTERN.fullmatch((header or "").strip())
    if match is None:
        return None, None, None
    first, last, total = match.groups()
    return (
        int(first) if first is not None else None,
        int(last) if last is not None else None,
        int(total) if total != "*" else None,
    )


def _describe_network_error(error: requests.RequestException, timeout: float) -> str:
    """Turns a requests exception into a short reason a user can act on."""
    cause = error.args[0] if error.args else error
    # iter_content reports a read timeout mid-body as ConnectionError(ReadTimeoutError).
    if isinstance(error, requests.Timeout) or isinstance(cause, urllib3.exceptions.ReadTimeoutError):
        return f"no response within the {timeout:g} s timeout"
    if isinstance(error, requests.ConnectionError):
        # requests wraps the socket error in MaxRetryError, whose text buries it after the URL.
        return f"connection failed: {getattr(cause, 'reason', None) or cause}"
    return f"request failed: {error}"


def _by_hand_instructions(destination: Path, expected: str | None) -> str:
    checksum = f" (sha256 {expected})" if expected else ""
    return f"Download it yourself and put it at {destination}{checksum}, then run the command again."
