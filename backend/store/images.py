"""The content-addressed image store and the one entry point for any new image: `add_image_bytes`.

Files live at `storage/images/<sha256[:2]>/<sha256>.<ext>`, holding the bytes exactly as received (EXIF and all),
so the sha256 of a file is its name and a file is never overwritten: an existing file already holds those bytes.
Writes go to a temporary file in the same folder, then are renamed into place (a crash leaves no half image). A file
is only kept once its row is committed: when the session (`session_scope`) rolls back instead, for a full disk or
any other failure, the files it wrote that no committed row uses are removed again (docs/sqlite_locks_and_full_disk.md).

Every image is decoded fully before it is kept (`decode_checked`): a truncated JPEG, a text file named .jpg or a
decompression bomb is rejected with the reason, never stored. Widths and heights are recorded after EXIF
orientation, the space annotations use (see `backend.store.models`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError
from sqlalchemy import ColumnElement, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from backend.data.dedupe import DEFAULT_NEAR_THRESHOLD, hamming_to_many, hashes_to_array, phash
from backend.files import atomic_write
from backend.store.db import on_rollback
from backend.store.models import IMAGE_SOURCES, Image, Project

logger = logging.getLogger(__name__)

# Pillow format name → the extension we store under. Anything else is rejected.
ACCEPTED_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif"}
ACCEPTED_DESCRIPTION = "jpg, png, webp, bmp or gif"
DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024
# 50 MP holds every common camera and phone photo (a 48 MP phone shot is 8064x6048) and stays under Pillow's own
# bomb threshold (Image.MAX_IMAGE_PIXELS, ~89.5 MP). Decoding one 50 MP image takes ~150 MB of RGB memory.
DEFAULT_MAX_PIXELS = 50_000_000
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, ZeroDivisionError, struct.error)


class ImageRejected(ValueError):
    """Bytes that are not an image we keep; the message is the reason shown to the user."""


@dataclass(frozen=True)
class ImageLimits:
    """What a single image may be.

    Attributes:
        max_file_bytes: the largest encoded file accepted.
        max_pixels: the largest width x height accepted, checked from the header before any pixel is decoded.
    """

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.max_file_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError(f"image limits must be positive, got {self}")
        pil_limit = PILImage.MAX_IMAGE_PIXELS
        if pil_limit is not None and self.max_pixels > pil_limit:
            # Pillow's own check is kept as a second line of defence (its warning is a rejection here), so a
            # larger limit of ours would be silently capped by it: say so instead.
            raise ValueError(
                f"max_pixels={self.max_pixels} is above Pillow's PIL.Image.MAX_IMAGE_PIXELS={pil_limit}; "
                "raise that too (at start-up) to accept larger images"
            )


@dataclass
class DecodedImage:
    """An image that decoded completely.

    Attributes:
        image: the first frame, EXIF orientation applied, pixels loaded.
        width: width in pixels after EXIF orientation.
        height: height in pixels after EXIF orientation.
        format: the Pillow format name ("JPEG", "PNG", ...).
        extension: the extension it is stored under ("jpg", "png", ...).
    """

    image: PILImage.Image
    width: int
    height: int
    format: str
    extension: str


def decode_checked(data: bytes, limits: ImageLimits | None = None) -> DecodedImage:
    """Decodes every pixel of an encoded image, or says why it cannot be kept.

    Checks, in order: size in bytes; a format we accept (jpg, png, webp, bmp; gif gives its first frame);
    width x height against `limits.max_pixels` from the header, before decoding (decompression bombs); the file's
    structure (Pillow `verify`); a full decode (truncated files fail here). Pillow's DecompressionBombWarning is
    turned into a rejection too.

    Raises:
        ImageRejected: the reason, in words for the user.
    """
    limits = limits or ImageLimits()
    if not data:
        raise ImageRejected("the file is empty (0 bytes)")
    if len(data) > limits.max_file_bytes:
        raise ImageRejected(
            f"the file is {len(data) / 1e6:.1f} MB, over the {limits.max_file_bytes / 1e6:.0f} MB limit per image"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", PILImage.DecompressionBombWarning)
        try:
            return _decode(data, limits)
        except ImageRejected:
            raise
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as error:
            raise ImageRejected(f"too many pixels for a safe decode ({error})") from error
        except MemoryError as error:
            raise ImageRejected("not enough memory to decode the image") from error
        except _DECODE_ERRORS as error:
            # Pillow's plugins raise many types for malformed data (OSError "image file is truncated",
            # SyntaxError "broken PNG file", struct.error...); each is one bad file, never a crash.
            raise ImageRejected(f"corrupt or truncated image ({error or type(error).__name__})") from error


def _decode(data: bytes, limits: ImageLimits) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            # Opening reads only the header; our own pixel check below must speak first, with our limit.
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            probe = PILImage.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    except UnidentifiedImageError:
        raise ImageRejected(_unaccepted_reason(data)) from None
    except PILImage.DecompressionBombError as error:  # over twice Pillow's limit: refused by Pillow's header check
        raise ImageRejected(f"too many pixels: {error} (decompression-bomb guard); downscale it first") from error
    with probe:
        image_format = probe.format or ""
        width, height = probe.size
        if width <= 0 or height <= 0:
            raise ImageRejected(f"the image has no pixels ({width}x{height})")
        if width * height > limits.max_pixels:
            raise ImageRejected(
                f"{width}x{height} is {width * height / 1e6:.1f} megapixels, over the "
                f"{limits.max_pixels / 1e6:.0f} MP limit (decompression-bomb guard); downscale it first"
            )
        probe.verify()  # structure and checksums (PNG CRCs); the image cannot be used after verify()
    image = PILImage.open(io.BytesIO(data), formats=[image_format])
    image.seek(0)  # the first frame of an animated gif/webp
    image.load()  # every pixel: a truncated file raises here
    try:
        oriented = ImageOps.exif_transpose(image)
    except Exception as error:  # unreadable EXIF: keep the pixels as stored, as backend.processing.load_image does
        logger.warning("ignoring unreadable EXIF orientation: %s", error)
        oriented = image
    return DecodedImage(oriented, oriented.width, oriented.height, image_format, ACCEPTED_FORMATS[image_format])


def _unaccepted_reason(data: bytes) -> str:
    try:
        with PILImage.open(io.BytesIO(data)) as other:  # header only: which format is it?
            found = other.format
    except Exception:
        found = None
    if found:
        return f"{found} images are not accepted; convert it to {ACCEPTED_DESCRIPTION}"
    return f"not an image (the content is not {ACCEPTED_DESCRIPTION}, whatever the file name says)"


# ----------------------------------------------------------------------------------------------------------------
# The content store
# ----------------------------------------------------------------------------------------------------------------


def content_path(sha256: str, extension: str) -> Path:
    """The store path of an image, relative to the storage folder: images/<sha[:2]>/<sha>.<ext>."""
    return Path("images") / sha256[:2] / f"{sha256}.{extension}"


def store_bytes(storage: Path, sha256: str, extension: str, data: bytes) -> Path:
    """Writes `data` into the content store (atomically) unless it is already there.

    Returns:
        The path relative to `storage`.
    """
    relative = content_path(sha256, extension)
    target = storage / relative
    if target.is_file() and target.stat().st_size == len(data):
        return relative  # same name = same bytes; never overwrite
    atomic_write(target, lambda file: file.write(data))
    return relative


_NEW_FILES = "yolodex_new_image_files"


def _keep_only_if_committed(session: Session, storage: Path, relative: Path) -> None:
    """Registers a file this session just created in the store, to be removed if the session rolls back."""
    new_files = session.info.get(_NEW_FILES)
    if new_files is None:
        new_files = session.info[_NEW_FILES] = {}
        engine = session.get_bind()
        on_rollback(session, lambda: _remove_uncommitted(engine, storage, session.info.pop(_NEW_FILES, {})))
    new_files[relative.as_posix()] = relative


def _remove_uncommitted(engine, storage: Path, new_files: dict[str, Path]) -> None:
    """Deletes the files of `new_files` that no committed row uses (another process may have committed the same
    bytes meanwhile: those stay)."""
    if not new_files:
        return
    paths = list(new_files)
    used: set[str] = set()
    with engine.connect() as connection:
        for start in range(0, len(paths), 500):  # bounded IN lists
            chunk = paths[start : start + 500]
            used.update(connection.scalars(select(Image.path).where(Image.path.in_(chunk))))
    removed = 0
    for path in paths:
        if path not in used:
            (storage / new_files[path]).unlink(missing_ok=True)
            removed += 1
    logger.info("removed %d image files written by a transaction that rolled back", removed)


def image_file(storage: Path, image: Image) -> Path:
    """The absolute path of a stored image."""
    return storage / image.path


# ----------------------------------------------------------------------------------------------------------------
# Adding images
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class AddResult:
    """What happened to one image.

    Attributes:
        status: "accepted", "duplicate" (same bytes already in the project: nothing added, `image_id` is the
            existing image), "near_duplicate" (stored and marked, `similar_to` is the closest earlier image) or
            "rejected" (`reason` says why; nothing stored).
        name: the name the image came under (file name, archive member, URL), for reports.
        image_id: the stored image (None when rejected).
        reason: why it was rejected.
        similar_to: for a near duplicate, the closest earlier image.
        distance: for a near duplicate, its pHash distance in bits.
        near_group: for a near duplicate, its group id (the id of the group's first image).
    """

    status: str
    name: str = ""
    image_id: int | None = None
    reason: str | None = None
    similar_to: int | None = None
    distance: int | None = None
    near_group: int | None = None

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


def add_image_bytes(
    session: Session,
    storage: Path,
    project: Project,
    data: bytes,
    *,
    source: str,
    original_name: str | None = None,
    source_url: str | None = None,
    page_url: str | None = None,
    licence_hint: str | None = None,
    near_threshold: int = DEFAULT_NEAR_THRESHOLD,
    limits: ImageLimits | None = None,
) -> AddResult:
    """Checks, dedupes, stores and records one image. Bad bytes give a "rejected" result, never an exception.

    The new row is flushed inside a savepoint: a failure here undoes only this image, and the caller's session
    (e.g. the rest of an import) carries on. The caller commits.

    Args:
        session: the open session (its transaction holds the new row until the caller commits).
        storage: the storage folder.
        project: the project the image joins.
        data: the encoded file, exactly as received.
        source: "upload", "import", "crawl" or "synthetic".
        original_name: the file name or archive member it came as.
        source_url: where the image bytes were downloaded from (crawl).
        page_url: the page that showed it (crawl).
        licence_hint: any licence the page or provider stated.
        near_threshold: pHash bits within which an earlier image makes this one a near duplicate.
        limits: per-image limits (defaults: `ImageLimits()`).

    Raises:
        ValueError: `source` is not one of the four (a programming error, not bad input).
    """
    if source not in IMAGE_SOURCES:
        raise ValueError(f"source must be one of {IMAGE_SOURCES}, got {source!r}")
    name = original_name or source_url or "<bytes>"
    checked = _decode_and_hash(data, limits, name)
    if isinstance(checked, AddResult):
        return checked
    decoded, image_hash = checked
    sha256 = hashlib.sha256(data).hexdigest()
    existing = _find_by_sha(session, project, sha256)
    if existing is not None:
        return AddResult("duplicate", name, image_id=existing)

    near = _near_matches(session, project, image_hash, near_threshold)
    relative = _store_for_session(session, storage, sha256, decoded.extension, data)
    image = Image(
        project_id=project.id,
        sha256=sha256,
        phash=image_hash,
        width=decoded.width,
        height=decoded.height,
        format=decoded.extension,
        path=relative.as_posix(),
        size_bytes=len(data),
        source=source,
        original_name=original_name,
        source_url=source_url,
        page_url=page_url,
        licence_hint=licence_hint,
        status="near_duplicate" if near.closest is not None else "ok",
        duplicate_of_id=near.closest,
    )
    return _insert_image(session, project, image, near, name)


def _decode_and_hash(data: bytes, limits: ImageLimits | None, name: str) -> tuple[DecodedImage, str] | AddResult:
    """(the decoded image, its pHash), or the "rejected" result that says why the bytes cannot be kept."""
    try:
        decoded = decode_checked(data, limits)
        return decoded, phash(decoded.image)
    except ImageRejected as error:
        return AddResult("rejected", name, reason=str(error))
    except Exception as error:  # anything else a hostile file provokes in a decoder is still one bad file
        logger.warning("rejecting %s: unexpected %s", name, type(error).__name__, exc_info=True)
        return AddResult("rejected", name, reason=f"cannot decode the image ({type(error).__name__}: {error})")


def _store_for_session(session: Session, storage: Path, sha256: str, extension: str, data: bytes) -> Path:
    """Writes the bytes into the content store (`store_bytes`) and returns their path relative to `storage`.

    A file this call creates is removed again if the session rolls back; a file that was already there is left alone.
    """
    created = not (storage / content_path(sha256, extension)).is_file()
    relative = store_bytes(storage, sha256, extension, data)
    if created:
        _keep_only_if_committed(session, storage, relative)
    return relative


def _insert_image(session: Session, project: Project, image: Image, near: _NearMatches, name: str) -> AddResult:
    """Adds and flushes the new row in a savepoint, joining the near-duplicate group of what it matched.

    When the insert fails because another process added the same bytes between our lookup and our insert, only the
    savepoint rolls back and the result is that image as a "duplicate".
    """
    try:
        with session.begin_nested():
            session.add(image)
            session.flush()
            group = None
            if near.closest is not None:
                group = _join_near_group(session, project, image, near.groups, near.ids)
    except IntegrityError:
        existing = _find_by_sha(session, project, image.sha256)
        if existing is None:
            raise
        session.info.get(_NEW_FILES, {}).pop(image.path, None)  # its row uses the file: never remove it
        return AddResult("duplicate", name, image_id=existing)
    if near.closest is not None:
        return AddResult(
            "near_duplicate", name, image.id, similar_to=near.closest, distance=near.distance, near_group=group
        )
    return AddResult("accepted", name, image.id)


def _find_by_sha(session: Session, project: Project, sha256: str) -> int | None:
    return session.scalar(select(Image.id).where(Image.project_id == project.id, Image.sha256 == sha256))


class _NearMatches(NamedTuple):
    """The earlier images of a project whose pHash is within the near-duplicate threshold of a new image's."""

    closest: int | None  # the closest one's id (ties: the oldest), None when nothing matched
    distance: int | None  # its distance in bits
    groups: set[int]  # the near-duplicate groups of all matches
    ids: list[int]  # the ids of all matches


def _near_matches(session: Session, project: Project, image_hash: str, threshold: int) -> _NearMatches:
    """The images of `project` within `threshold` bits of `image_hash`."""
    rows = session.execute(select(Image.id, Image.phash, Image.near_group).where(Image.project_id == project.id)).all()
    if not rows:
        return _NearMatches(None, None, set(), [])
    # One vectorised pass over every hash of the project: ~1 ms per 10k images.
    distances = hamming_to_many(image_hash, hashes_to_array([row.phash for row in rows]))
    close = [index for index in range(len(rows)) if distances[index] <= threshold]
    if not close:
        return _NearMatches(None, None, set(), [])
    closest = min(close, key=lambda index: (distances[index], rows[index].id))
    groups = {rows[index].near_group for index in close if rows[index].near_group is not None}
    return _NearMatches(rows[closest].id, int(distances[closest]), groups, [rows[index].id for index in close])


def _join_near_group(
    session: Session, project: Project, image: Image, matched_groups: set[int], matched_ids: list[int]
) -> int:
    """Puts the new image, every image it matched and those images' groups into one group (union of sets).

    A group's id is the smallest image id in it, so merging two groups keeps the older one's id.
    """
    group = min([*matched_groups, *matched_ids])
    members: ColumnElement[bool] = Image.id.in_([*matched_ids, image.id])
    if matched_groups:
        members = members | Image.near_group.in_(matched_groups)
    session.execute(
        update(Image).where(Image.project_id == project.id, members).values(near_group=group),
        execution_options={"synchronize_session": "fetch"},
    )
    image.near_group = group
    return group
