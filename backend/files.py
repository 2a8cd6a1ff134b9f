"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Bytes go to a temporary file in the destination's folder, are flushed to disk, then renamed over the destination
(`os.replace` is atomic within one file system). Used for checkpoints, datasets, evaluations and run configs.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Calls `write(file)` on a temporary binary file beside `path`, then renames it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
