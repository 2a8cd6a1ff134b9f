"""Import of image files, folders, zip archives and labeled datasets (COCO or YOLO layout) into a project.

Every file ends up in exactly one list of the `ImportReport`: accepted, duplicates (same bytes already in the
project), near_duplicates (stored, marked), rejected (with the reason) or skipped (not ours to import: macOS
resource forks, symbolic links in folders, named pipes, sockets and device files). One bad file never stops an
import; a whole archive is refused only when its table of contents already breaks a limit (too many members, too
large once unpacked).

Only regular files are ever opened: a named pipe (FIFO) would block the import forever, waiting for a writer, while
the caller's transaction holds the database (docs/sqlite_locks_and_full_disk.md). Each file is checked with `lstat`
first and opened with O_NONBLOCK, then checked again with `fstat` (a file swapped for a pipe in between is still
refused). File names are reported as people can read them: bytes of a name that are not UTF-8 (an old camera's
latin-1 "café.jpg") are shown escaped (`caf\\xe9.jpg`); such a file is still imported, under that name, with a warning.

Archives are read member by member, never extracted as a whole: each member's name is checked first (no absolute
paths, no `..` (zip slip), no symbolic links, no encrypted members), its declared size against the limits, and its
actual bytes are read with a cap (declared sizes can lie; a zip bomb stops at the cap). A zip inside the zip is
read (one level by default); deeper nesting is refused. An archive that holds a labeled dataset (train.json,
data.yaml, classes.txt, *.json, a labels/ folder) has its safe members written to a temporary folder, which is
then read like a labeled folder.

Labeled datasets go through `backend.data.folders.load_dataset` (which validates and clips boxes); categories map
to the project's classes by name, missing ones are appended. Boxes are stored as xyxy original-image pixels after
EXIF orientation (the readers' convention, and `Annotation`'s).
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.data.coco import IMAGE_SUFFIXES
from backend.data.dedupe import DEFAULT_NEAR_THRESHOLD
from backend.data.folders import load_dataset
from backend.data.records import DatasetError, DetectionSet
from backend.files import printable_name
from backend.store.images import AddResult, ImageLimits, add_image_bytes
from backend.store.models import GROUND_TRUTH_SOURCES, Annotation, Image, Project, ensure_class

ARCHIVE_SUFFIXES = (".zip",)
# Files a labeled dataset is recognised by (inside an archive or a folder).
LABEL_MARKERS = ("train.json", "data.yaml", "data.yml", "classes.txt")
# Operating-system clutter: reported as skipped, never as a rejected image.
_JUNK_NAMES = (".ds_store", "thumbs.db", "desktop.ini")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImportLimits:
    """Limits of one import.

    Attributes:
        image: per-image limits (file size, pixel count).
        max_archive_members: entries in one archive (files and folders); more refuses the whole archive.
        max_archive_bytes: total uncompressed bytes read from all archives of one import, nested ones included.
        max_nested_archive_bytes: the largest zip inside a zip (it is read into memory).
        max_nesting: how many levels of zip-inside-zip are read (1: a zip in the uploaded zip is read, a zip in
            that one is refused).
        near_threshold: pHash bits for a near duplicate (see `backend.data.dedupe`).
    """

    image: ImageLimits = field(default_factory=ImageLimits)
    max_archive_members: int = 20_000
    max_archive_bytes: int = 4 * 1024**3
    max_nested_archive_bytes: int = 512 * 1024**2
    max_nesting: int = 1
    near_threshold: int = DEFAULT_NEAR_THRESHOLD


@dataclass
class ImportReport:
    """The outcome of one import, JSON-serialisable through `to_dict`.

    Attributes:
        accepted: {name, image_id} of images added.
        duplicates: {name, image_id} of images whose bytes the project already had (`image_id` is that image).
        near_duplicates: {name, image_id, similar_to, distance, near_group} of images added and marked.
        rejected: {name, reason} of files or archives not imported.
        skipped: {name, reason} of entries deliberately left out (symbolic links, OS clutter, named pipes, sockets,
            device files).
        annotations: boxes imported from labeled datasets.
        classes_added: classes appended to the project.
        warnings: anything else worth knowing (boxes a reader clipped or dropped, ...).
    """

    accepted: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
    near_duplicates: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    annotations: int = 0
    classes_added: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Called with the number of entries so far after each new one (`import_paths`' progress); not reported.
    on_entry: Callable[[int], None] | None = field(default=None, repr=False, compare=False)

    def record(self, result: AddResult) -> None:
        if result.status == "accepted":
            self.accepted.append({"name": result.name, "image_id": result.image_id})
        elif result.status == "duplicate":
            self.duplicates.append({"name": result.name, "image_id": result.image_id})
        elif result.status == "near_duplicate":
            self.near_duplicates.append(result.to_dict() | {"status": "near_duplicate"})
        else:
            self.reject(result.name, result.reason or "rejected")
            return
        self._entered()

    def reject(self, name: str, reason: str) -> None:
        self.rejected.append({"name": name, "reason": reason})
        self._entered()

    def skip(self, name: str, reason: str) -> None:
        self.skipped.append({"name": name, "reason": reason})
        self._entered()

    def entries(self) -> int:
        """Files (and archives, datasets) handled so far: every one ends in exactly one of the five lists."""
        return sum(map(len, (self.accepted, self.duplicates, self.near_duplicates, self.rejected, self.skipped)))

    def _entered(self) -> None:
        if self.on_entry is not None:
            self.on_entry(self.entries())

    def counts(self) -> dict[str, int]:
        return {
            "accepted": len(self.accepted),
            "duplicates": len(self.duplicates),
            "near_duplicates": len(self.near_duplicates),
            "rejected": len(self.rejected),
            "skipped": len(self.skipped),
            "annotations": self.annotations,
            "classes_added": len(self.classes_added),
        }

    def to_dict(self) -> dict:
        return {
            "counts": self.counts(),
            "accepted": list(self.accepted),
            "duplicates": list(self.duplicates),
            "near_duplicates": list(self.near_duplicates),
            "rejected": list(self.rejected),
            "skipped": list(self.skipped),
            "annotations": self.annotations,
            "classes_added": list(self.classes_added),
            "warnings": list(self.warnings),
        }


@dataclass
class _Import:
    session: Session
    storage: Path
    project: Project
    limits: ImportLimits
    source: str
    report: ImportReport
    archive_bytes_left: int


def import_paths(
    session: Session,
    storage: Path,
    project: Project,
    paths: list[str | Path | bytes],
    limits: ImportLimits | None = None,
    *,
    source: str = "import",
    on_progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Imports image files, folders (recursively), zip archives and labeled datasets into `project`.

    Args:
        session: the open session; the caller commits (each image is added in its own savepoint).
        storage: the storage folder.
        project: the project to add to.
        paths: files, folders, .zip archives, or a labeled dataset (a folder, a COCO .json, a YOLO data.yaml); str,
            Path or the name's bytes (`os.fsencode`).
        limits: the import's limits (defaults: `ImportLimits()`).
        source: recorded on each new image: "import" (CLI, folders) or "upload" (files a user uploaded).
        on_progress: called with (files handled, total) after each file, the total being `estimate_entries`
            (raised when the import finds more); a last call has done == total.

    Returns:
        What happened to every file (see `ImportReport`).
    """
    limits = limits or ImportLimits()
    report = ImportReport()
    if on_progress is not None:
        estimate = estimate_entries(paths)
        report.on_entry = lambda done: on_progress(done, max(estimate, done))
        on_progress(0, estimate)
    context = _Import(session, storage, project, limits, source, report, limits.max_archive_bytes)
    for raw in paths:
        path = Path(os.fsdecode(raw)) if isinstance(raw, bytes) else Path(raw)
        name = printable_name(str(path))
        if path.is_dir():
            _import_folder(context, path, printable_name(path.name) or name)
        elif not path.is_file():
            reason = "not found" if not path.exists() else _special_file_reason(path.stat().st_mode)
            context.report.reject(name, reason)
        elif path.suffix.lower() in ARCHIVE_SUFFIXES:
            _import_zip_file(context, path, printable_name(path.name))
        elif path.suffix.lower() in (".json", ".yaml", ".yml"):
            _import_labeled(context, path, path.parent, printable_name(path.name))
        else:
            _import_file(context, path, printable_name(path.name))
    if on_progress is not None:
        on_progress(report.entries(), report.entries())
    return context.report


def estimate_entries(paths: list[str | Path | bytes]) -> int:
    """How many files an import of `paths` will handle, from listings only (no image is read): a file counts 1, a
    zip its members, a folder its files (a labeled dataset's image files only). For a progress bar's total."""
    total = 0
    for raw in paths:
        path = Path(os.fsdecode(raw)) if isinstance(raw, bytes) else Path(raw)
        try:
            if path.is_dir():
                total += _count_folder(path)
            elif path.suffix.lower() in ARCHIVE_SUFFIXES and path.is_file():
                total += _count_zip(path)
            elif path.suffix.lower() == ".json" and path.is_file():
                total += _count_coco_images(path)
            elif path.suffix.lower() in (".yaml", ".yml") and path.is_file():
                total += _count_folder(path.parent, images_only=True)  # a data.yaml sits at its dataset's root
            else:
                total += 1
        except OSError:
            total += 1
    return max(total, 1)


def _count_folder(folder: Path, images_only: bool = False) -> int:
    images_only = images_only or _labeled_target(folder) is not None
    count = 0
    for directory, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [name for name in dirnames if not os.path.islink(os.path.join(directory, name))]
        for filename in filenames:
            suffix = os.path.splitext(filename)[1].lower()
            if images_only and suffix not in IMAGE_SUFFIXES:
                continue
            count += _count_zip(Path(directory, filename)) if suffix in ARCHIVE_SUFFIXES else 1
    return count


def _count_coco_images(path: Path) -> int:
    try:
        return max(1, len(json.loads(path.read_text(encoding="utf-8")).get("images") or []))
    except (OSError, ValueError, AttributeError, TypeError):
        return 1


def _count_zip(path: Path) -> int:
    try:
        with zipfile.ZipFile(path) as archive:
            return max(1, sum(1 for info in archive.infolist() if not info.is_dir()))
    except (zipfile.BadZipFile, OSError, ValueError):
        return 1


# ----------------------------------------------------------------------------------------------------------------
# Files and folders
# ----------------------------------------------------------------------------------------------------------------


def _import_file(context: _Import, path: Path, name: str) -> AddResult:
    cap = context.limits.image.max_file_bytes
    try:
        data, size, special = _read_regular_file(path, cap)
    except OSError as error:  # only reading is guarded: a failing store (disk full) must stop the import
        result = AddResult("rejected", name, reason=f"cannot read the file ({error.strerror or error})")
        context.report.record(result)
        return result
    if special is not None:
        context.report.skip(name, special)
        return AddResult("skipped", name, reason=special)
    if data is None:
        result = AddResult(
            "rejected", name, reason=f"the file is {_human(size)}, over the {_human(cap)} limit per image"
        )
    else:
        result = _add(context, data, name)
    context.report.record(result)
    return result


def _read_regular_file(path: Path, cap: int) -> tuple[bytes | None, int, str | None]:
    """(bytes or None when over `cap`, size, None) for a regular file; (None, 0, why) for anything else.

    Opened without blocking (O_NONBLOCK: opening a FIFO for reading would wait for a writer) and checked with
    `fstat` on the open file, so whatever the name points to when it is opened is what is checked.
    """
    mode = os.stat(path).st_mode  # follows links: a labeled dataset may link its images
    if not stat.S_ISREG(mode):
        return None, 0, _special_file_reason(mode)
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with os.fdopen(descriptor, "rb") as file:
        opened = os.fstat(file.fileno())
        if not stat.S_ISREG(opened.st_mode):
            return None, 0, _special_file_reason(opened.st_mode)
        if opened.st_size > cap:
            return None, opened.st_size, None
        return file.read(cap + 1), opened.st_size, None


def _special_file_reason(mode: int) -> str:
    """Why a file that is not a regular file is not imported (reading some of them never ends)."""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not a file: never read (it would wait for a writer forever)"
    if stat.S_ISSOCK(mode):
        return "a socket, not a file: never read"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file, not a file: never read"
    if stat.S_ISDIR(mode):
        return "a folder where a file was expected"
    return "not a regular file: never read"


def _human(size: int) -> str:
    """Bytes in words: "3.2 MB", "4.0 GB"."""
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{size} bytes"


def _add(context: _Import, data: bytes, name: str) -> AddResult:
    return add_image_bytes(
        context.session,
        context.storage,
        context.project,
        data,
        source=context.source,
        original_name=name,
        near_threshold=context.limits.near_threshold,
        limits=context.limits.image,
    )


def _is_junk(name: str) -> bool:
    parts = re.split(r"[/\\]", name)
    base = parts[-1].lower()
    return "__MACOSX" in parts or base in _JUNK_NAMES or base.startswith("._")


def _import_folder(context: _Import, folder: Path, label: str) -> None:
    target = _labeled_target(folder)
    if target is not None:
        _import_labeled(context, target, folder, label)
        return

    def unreadable(error: OSError) -> None:  # os.walk skips a folder it cannot list: say so
        where = _join(label, Path(error.filename), folder) if error.filename else label
        context.report.reject(where, f"cannot read the folder ({error.strerror or error})")

    for directory, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=False):
        dirnames.sort()
        here = Path(directory)
        for dirname in list(dirnames):
            try:
                linked = stat.S_ISLNK(os.lstat(here / dirname).st_mode)
            except OSError as error:  # e.g. a path over the system's 4096 bytes: the folder cannot be read
                context.report.reject(
                    _join(label, here / dirname, folder), f"cannot read the folder ({error.strerror})"
                )
                dirnames.remove(dirname)
                continue
            if linked:
                context.report.skip(_join(label, here / dirname, folder), "symbolic link to a folder: not followed")
                dirnames.remove(dirname)
        for filename in sorted(filenames):
            path = here / filename
            name = _join(label, path, folder)
            try:
                mode = os.lstat(path).st_mode
            except OSError as error:  # gone since the listing, or a path over the system's limit
                context.report.reject(name, f"cannot read the file ({error.strerror or error})")
                continue
            if stat.S_ISLNK(mode):
                context.report.skip(name, "symbolic link: not followed (copy the file itself to import it)")
            elif not stat.S_ISREG(mode):
                context.report.skip(name, _special_file_reason(mode))
            elif _is_junk(name):
                context.report.skip(name, "operating-system clutter, not an image")
            elif path.suffix.lower() in ARCHIVE_SUFFIXES:
                _import_zip_file(context, path, name)
            else:
                result = _import_file(context, path, name)
                if result.image_id is not None and _not_utf8(path.relative_to(folder).as_posix()):
                    context.report.warnings.append(
                        f"{name}: the file name is not valid UTF-8; it is kept with those bytes written as \\xNN"
                    )


def _not_utf8(name: str) -> bool:
    return any("\udc80" <= character <= "\udcff" for character in name)  # os.fsdecode's surrogate escapes


def _join(label: str, path: Path, root: Path) -> str:
    """The name a report shows: `label/<path relative to root>`, with bytes that are not UTF-8 escaped; a path of
    over 300 characters keeps its first and last 120 around an ellipsis."""
    name = f"{label}/{printable_name(path.relative_to(root).as_posix())}"
    return name if len(name) <= 300 else f"{name[:120]}…{name[-120:]}"


# ----------------------------------------------------------------------------------------------------------------
# Zip archives
# ----------------------------------------------------------------------------------------------------------------


def _import_zip_file(context: _Import, path: Path, name: str) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        context.report.reject(name, f"not a readable zip archive ({error})")
        return
    with archive:
        _import_zip(context, archive, name, depth=0)


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why an archive member must not be read, or None."""
    name = info.filename
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path inside the archive: refused (it could point outside the import)"
    if ".." in re.split(r"[/\\]", name):
        return "'..' in the member path (zip slip): refused"
    if stat.S_ISLNK(info.external_attr >> 16):
        return "symbolic link inside the archive: refused"
    if info.flag_bits & 0x1:
        return "encrypted member: extract the archive yourself and import the files"
    return None


def _import_zip(context: _Import, archive: zipfile.ZipFile, label: str, depth: int) -> None:
    report, limits = context.report, context.limits
    entries = archive.infolist()
    if len(entries) > limits.max_archive_members:
        report.reject(
            label, f"the archive holds {len(entries)} entries, over the limit of {limits.max_archive_members}"
        )
        return
    files = [info for info in entries if not info.is_dir()]
    if not files:
        report.reject(label, "the archive is empty (no files inside)")
        return
    declared = sum(info.file_size for info in files)
    if declared > context.archive_bytes_left:
        report.reject(
            label,
            f"the archive unpacks to {_human(declared)}, over the {_human(context.archive_bytes_left)} left of the "
            f"{_human(limits.max_archive_bytes)} limit per import; split it into smaller archives",
        )
        return

    safe: list[zipfile.ZipInfo] = []
    for info in files:
        member = f"{label}/{info.filename}"
        problem = _member_problem(info)
        if problem is not None:
            report.reject(member, problem)
        elif _is_junk(info.filename):
            report.skip(member, "operating-system clutter, not an image")
        else:
            safe.append(info)
    if _names_look_labeled([info.filename for info in safe]):
        _import_labeled_zip(context, archive, safe, label)
        return
    for info in safe:
        member = f"{label}/{info.filename}"
        if info.filename.lower().endswith(ARCHIVE_SUFFIXES):
            _import_nested_zip(context, archive, info, member, depth)
            continue
        data = _read_member(context, archive, info, member, limits.image.max_file_bytes)
        if data is not None:
            report.record(_add(context, data, member))


def _import_nested_zip(
    context: _Import, archive: zipfile.ZipFile, info: zipfile.ZipInfo, member: str, depth: int
) -> None:
    if depth + 1 > context.limits.max_nesting:
        context.report.reject(
            member, f"archive nested more than {context.limits.max_nesting} level(s) deep: unpack it and import it"
        )
        return
    data = _read_member(context, archive, info, member, context.limits.max_nested_archive_bytes)
    if data is None:
        return
    try:
        inner = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as error:
        context.report.reject(member, f"not a readable zip archive ({error})")
        return
    with inner:
        _import_zip(context, inner, member, depth + 1)


def _read_member(
    context: _Import, archive: zipfile.ZipFile, info: zipfile.ZipInfo, member: str, cap: int
) -> bytes | None:
    """The member's bytes, read with a cap (declared sizes can lie), or None after reporting why not."""
    if info.file_size > cap:
        context.report.reject(member, f"{_human(info.file_size)} unpacked, over the {_human(cap)} limit")
        return None
    limit = min(cap, context.archive_bytes_left)
    chunks: list[bytes] = []
    read = 0
    try:
        with archive.open(info) as stream:
            while chunk := stream.read(min(_CHUNK, limit + 1 - read)):
                chunks.append(chunk)
                read += len(chunk)
                if read > limit:
                    break
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError, EOFError, OSError) as error:
        context.report.reject(member, f"cannot read it from the archive ({error})")
        return None
    context.archive_bytes_left -= min(read, limit)
    if read > limit:
        if limit < cap:
            reason = f"the import reached its {_human(context.limits.max_archive_bytes)} unpacked limit"
        else:
            reason = f"unpacks to more than its declared size and the {_human(cap)} limit (zip bomb?)"
        context.report.reject(member, reason)
        return None
    return b"".join(chunks)


def _names_look_labeled(names: list[str]) -> bool:
    for name in names:
        parts = [part.lower() for part in re.split(r"[/\\]", name)]
        if parts[-1] in LABEL_MARKERS or parts[-1].endswith(".json") or "labels" in parts[:-1]:
            return True
    return False


def _import_labeled_zip(context: _Import, archive: zipfile.ZipFile, safe: list[zipfile.ZipInfo], label: str) -> None:
    """Writes the (already checked) members to a temporary folder, then imports it as a labeled folder."""
    with tempfile.TemporaryDirectory(prefix="yolodex-import-") as temporary:
        root = Path(temporary).resolve()
        for info in safe:
            member = f"{label}/{info.filename}"
            if info.filename.lower().endswith(ARCHIVE_SUFFIXES):
                context.report.reject(member, "archive inside a labeled dataset archive: not read")
                continue
            parts = [part for part in re.split(r"[/\\]", info.filename) if part not in ("", ".")]
            target = root.joinpath(*parts).resolve()
            if not target.is_relative_to(root):  # already refused by _member_problem; belt and braces
                context.report.reject(member, "member path leaves the archive: refused")
                continue
            data = _read_member(context, archive, info, member, context.limits.image.max_file_bytes)
            if data is None:
                continue
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            except OSError as error:
                if error.errno not in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL):
                    raise  # a full disk stops the import (the caller rolls back)
                context.report.reject(member, f"the member's name cannot be a file name here ({error.strerror})")
        dataset_root = _single_child_folder(root)
        labeled = _labeled_target(dataset_root)
        if labeled is None:
            context.report.warnings.append(f"{label}: no COCO or YOLO layout found; imported its images unlabeled")
            _import_folder_plain(context, dataset_root, label)
        else:
            _import_labeled(context, labeled, dataset_root, label)


def _single_child_folder(root: Path) -> Path:
    """Archives often wrap everything in one folder: the dataset is that folder."""
    children = [child for child in root.iterdir() if not _is_junk(child.name) and child.name != "__MACOSX"]
    if len(children) == 1 and children[0].is_dir() and _labeled_target(root) is None:
        return children[0]
    return root


def _import_folder_plain(context: _Import, folder: Path, label: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():  # a folder this import wrote: regular files only
            _import_file(context, path, _join(label, path, folder))


# ----------------------------------------------------------------------------------------------------------------
# Labeled datasets
# ----------------------------------------------------------------------------------------------------------------


def _labeled_target(folder: Path) -> Path | None:
    """What to hand `load_dataset` when `folder` holds a labeled dataset, else None."""
    if any((folder / marker).is_file() for marker in LABEL_MARKERS):
        return folder
    if (folder / "images").is_dir() and (folder / "labels").is_dir():
        return folder  # load_dataset says so if the class list is missing
    for candidate in sorted(folder.glob("*.json")):
        if not candidate.is_file():  # a named pipe called x.json would block read_text forever
            continue
        try:
            content = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(content, dict) and "annotations" in content and "images" in content:
            return candidate
    return None


def _import_labeled(context: _Import, target: Path, root: Path, label: str) -> None:
    """Imports a dataset `load_dataset(target)` reads; names in the report are `label/<path relative to root>`."""
    report = context.report
    try:
        splits = load_dataset(target)
    except (DatasetError, OSError) as error:
        report.reject(label, f"labeled dataset not imported: {error}")
        return
    classes = _map_classes(context, splits["train"])
    for split, dataset in splits.items():
        for file_name, reason in dataset.report.images_skipped:
            report.reject(f"{label}/{file_name}", reason)
        for reason, count in dataset.report.boxes_dropped.items():
            report.warnings.append(f"{label} ({split}): {count} boxes dropped ({reason})")
        if dataset.report.boxes_clipped:
            report.warnings.append(f"{label} ({split}): {dataset.report.boxes_clipped} boxes clipped to the image")
        report.warnings.extend(f"{label} ({split}): {warning}" for warning in dataset.report.warnings)
        for record in dataset.records:
            try:
                name = f"{label}/{printable_name(record.path.relative_to(root).as_posix())}"
            except ValueError:
                name = f"{label}/{printable_name(record.path.name)}"
            result = _import_file(context, record.path, name)
            if result.image_id is None:
                continue
            image = context.session.get(Image, result.image_id)
            if image is None:
                continue
            if (image.width, image.height) != (record.width, record.height):
                report.warnings.append(f"{name}: size disagrees with the dataset reader; its boxes were not imported")
                continue
            if result.status == "duplicate" and _has_ground_truth(context.session, image.id):
                report.warnings.append(f"{name}: already labeled in the project; its boxes were not imported again")
                continue
            for box, class_index in zip(record.boxes.tolist(), record.labels.tolist()):
                x1, y1, x2, y2 = box
                context.session.add(
                    Annotation(
                        image_id=image.id, class_id=classes[class_index], x1=x1, y1=y1, x2=x2, y2=y2, source="import"
                    )
                )
                report.annotations += 1
            image.labeled = True
    context.session.flush()


def _map_classes(context: _Import, dataset: DetectionSet) -> list[int]:
    """ProjectClass ids for the dataset's class indices, adding classes the project lacks (by name)."""
    ids = []
    for name in dataset.class_names:
        project_class, added = ensure_class(context.session, context.project, str(name))
        if added:
            context.report.classes_added.append(project_class.name)
        ids.append(project_class.id)
    return ids


def _has_ground_truth(session: Session, image_id: int) -> bool:
    count = session.scalar(
        select(func.count())
        .select_from(Annotation)
        .where(Annotation.image_id == image_id, Annotation.source.in_(GROUND_TRUTH_SOURCES))
    )
    return bool(count)
