"""requirements.txt against the imports: `make lint`'s deptry check passes on the tree and fails on a stray or a
missing pin (run on a copy of the tree's Python files and dependency files)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPTRY = Path(sys.executable).with_name("deptry")
SCANNED = ("backend", "app", "pages", "bench", "tests", "tools")
CONFIG = ("pyproject.toml", "requirements.txt", "requirements-dev.txt")


def _deptry(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DEPTRY), ".", "--no-ansi"], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    """The Python files of the scanned folders and the dependency files, nothing else (deptry reads only these)."""
    for folder in SCANNED:
        if (REPO_ROOT / folder).is_dir():
            shutil.copytree(REPO_ROOT / folder, tmp_path / folder, ignore=_not_python)
    for name in CONFIG:
        shutil.copy2(REPO_ROOT / name, tmp_path / name)
    return tmp_path


def _not_python(folder: str, names: list[str]) -> set[str]:
    return {name for name in names if not (Path(folder, name).is_dir() or name.endswith(".py"))} | {"__pycache__"}


def test_the_tree_passes(tree_copy: Path) -> None:
    result = _deptry(tree_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No dependency issues found" in result.stdout + result.stderr


def test_a_stray_pin_fails(tree_copy: Path) -> None:
    requirements = tree_copy / "requirements.txt"
    requirements.write_text(requirements.read_text() + "tabulate==0.9.0\n")
    result = _deptry(tree_copy)
    assert result.returncode != 0
    assert "DEP002 'tabulate' defined as a dependency but not used in the codebase" in result.stdout + result.stderr


def test_a_missing_pin_fails(tree_copy: Path) -> None:
    requirements = tree_copy / "requirements.txt"
    lines = requirements.read_text().splitlines(keepends=True)
    requirements.write_text("".join(line for line in lines if not line.startswith("plotly==")))
    result = _deptry(tree_copy)
    assert result.returncode != 0
    assert "'plotly' imported but" in result.stdout + result.stderr  # DEP001 missing or DEP003 transitive


def test_an_unpinned_import_fails(tree_copy: Path) -> None:
    (tree_copy / "backend" / "uses_tabulate.py").write_text("import tabulate\n")
    result = _deptry(tree_copy)
    assert result.returncode != 0
    assert "DEP001 'tabulate' imported but missing from the dependency definitions" in result.stdout + result.stderr
