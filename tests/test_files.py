"""Atomic writes: a failed write leaves the old file and no temporary behind."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from backend.files import atomic_write, atomic_write_json, atomic_write_text


def test_writes_and_replaces(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "first")
    assert path.read_text() == "first"
    atomic_write_json(path, {"x": [1, 2]})
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    assert os.listdir(path.parent) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "a.json", '{"old": true}')

    def half_then_fail(file) -> None:
        file.write(b'{"new": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == '{"old": true}'
    with pytest.raises(ValueError, match="Out of range float"):
        atomic_write_json(path, {"loss": math.nan})  # NaN is not JSON: refused before anything is written
    assert path.read_text() == '{"old": true}' and os.listdir(tmp_path) == ["a.json"]
