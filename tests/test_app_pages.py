"""What every page keeps to: layout and calls. No page queries the database (no SQLAlchemy, no session, no store
models) or imports torch itself; the view helpers live in backend/ (e.g. backend/views), which never imports
Streamlit. Read from the source, so a page that starts querying again fails here before any browser test."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PAGES = sorted((REPO_ROOT / "pages").glob("*.py"))
FORBIDDEN_IN_PAGES = (
    "sqlalchemy",
    "torch",
    "backend.store.models",
    "backend.training.engine",
    "backend.training.world",
)
FORBIDDEN_NAMES = ("session_scope", "Session")


def imported(path: Path) -> tuple[set[str], set[str]]:
    """The modules a file imports and the names it imports from them."""
    modules, names = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            names |= {alias.name for alias in node.names}
    return modules, names


@pytest.mark.parametrize("page", PAGES, ids=[page.stem for page in PAGES])
def test_a_page_neither_queries_the_database_nor_imports_torch(page: Path):
    modules, names = imported(page)
    bad = [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_IN_PAGES)]
    assert not bad, f"{page.name} imports {bad}: ask a backend view (backend/views) instead"
    assert not names & set(FORBIDDEN_NAMES), f"{page.name} opens a database session itself"


def test_the_train_pages_constants_do_not_import_the_training_engine():
    """The Train page reads the loss terms and presets; torch's training engine loads only when a job trains."""
    code = "import sys, backend.training.presets; print('backend.training.engine' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
