"""Atomic file writes, and file names cut to what a file system accepts.

Atomic writes: a reader (or a crash) sees the old file or the new one, never half of one. Bytes go to a temporary
file in the destination's folder, are flushed to disk, then renamed over the destination (`os.replace` is atomic
within one file system). Used for checkpoints, datasets, evaluations and run configs.

Names: Linux and macOS file systems take at most 255 *bytes* per name (NAME_MAX), and an emoji is 4 bytes in UTF-8,
so a name cut at a number of characters can still be refused (`OSError: [Errno 36] File name too long`;
docs/odd_inputs.md).
Every file name made from user input (an upload's name, an image's original name, a project or version name) goes
through `fit_name` or `cut_to_bytes` before it is written.
"""

from __future__ import annotations

import json
import os
import tempfile
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

# Bytes per file name on ext4, XFS, btrfs, APFS and tmpfs (NAME_MAX); the UTF-8 encoding counts, not characters.
NAME_MAX_BYTES = 255


def cut_to_bytes(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` bytes of UTF-8, never inside a character (or inside a character followed by
    its combining marks). A lone surrogate (`os.fsdecode` of a name that is not UTF-8) counts as its escaped form;
    `printable_name` turns those into readable text first."""
    if max_bytes <= 0:
        return ""
    if len(text.encode("utf-8", "backslashreplace")) <= max_bytes:
        return text
    kept, used = [], 0
    for character in text:
        size = len(character.encode("utf-8", "backslashreplace"))
        if used + size > max_bytes:
            break
        kept.append(character)
        used += size
    while kept and unicodedata.combining(text[len(kept)]):  # a letter whose accent would be cut off goes too
        kept.pop()
    return "".join(kept)


def printable_name(name: str | bytes) -> str:
    """A file name as a person can read it and UTF-8 can store it: a name that is not UTF-8 (os.listdir gives its
    bytes as lone surrogates) shows those bytes escaped (`caf\\xe9.jpg`); control characters become "?"."""
    return "".join("?" if unicodedata.category(ch) == "Cc" else ch for ch in _escape_undecodable(name))


def _escape_undecodable(name: str | bytes) -> str:
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if not any("\ud800" <= ch <= "\udfff" for ch in name):
        return name
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def fit_name(name: str, fallback: str = "file", *, max_bytes: int = NAME_MAX_BYTES) -> str:
    """A single file name safe to create: the last part of `name` (no folders), bytes that are not UTF-8 and control
    characters as "_", cut to `max_bytes` bytes keeping its extension ("x" * 300 + ".jpg" keeps ".jpg");
    `fallback` when nothing is left ("", ".", "..").

    Args:
        name: e.g. an upload's name as the browser sent it.
        fallback: used for an empty or reserved result; itself cut to `max_bytes`.
        max_bytes: the byte budget (255 is NAME_MAX; pass less to leave room for a prefix or suffix).
    """
    base = _escape_undecodable(str(name).replace("\\", "/").rsplit("/", 1)[-1]).replace("\\", "_")
    base = "".join("_" if unicodedata.category(ch) == "Cc" else ch for ch in base).strip()
    if base in ("", ".", ".."):
        base = fallback
    stem, dot, extension = base.rpartition(".")
    if not dot or not stem or len(extension.encode("utf-8")) > 16:  # no real extension: cut the whole name
        stem, extension = base, ""
    else:
        extension = "." + extension
    stem = cut_to_bytes(stem, max_bytes - len(extension.encode("utf-8"))).rstrip()
    fitted = stem + extension if stem else cut_to_bytes(fallback, max_bytes)
    return fitted if fitted not in ("", ".", "..") else cut_to_bytes(fallback, max_bytes) or "_"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Calls `write(file)` on a temporary binary file beside `path`, then renames it to `path` (`write`'s result is
    ignored)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name adds 14 bytes (".", ".", 8 random, ".tmp"): cut the prefix so a long name still fits.
    prefix = f".{cut_to_bytes(path.name, NAME_MAX_BYTES - 16)}."
    handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, payload: Any, *, indent: int | None = 2) -> Path:
    """JSON without NaN/Infinity (they are not JSON; a ValueError names the problem before anything is written)."""
    return atomic_write_text(path, json.dumps(payload, indent=indent, allow_nan=False, ensure_ascii=False) + "\n")
