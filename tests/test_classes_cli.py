"""`yolodex project create` and `yolodex classes list|add|rename|describe|remove`: output, --json, and one clear
line on stderr with exit status 1 when a request is refused (in-process through `cli.main`, and once as a real
process for the exit status)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from backend import cli
from backend.ingest import service
from backend.settings import Settings
from backend.store.db import session_scope
from backend.store.images import add_image_bytes
from backend.store.models import Annotation, Project
from tests.conftest import REPO_ROOT, encode_image, textured_image


@pytest.fixture
def storage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("YOLODEX_STORAGE", str(tmp_path / "storage"))
    monkeypatch.delenv("YOLODEX_DATABASE_URL", raising=False)
    return tmp_path / "storage"


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli.main(list(args))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_create_describe_rename_add_list_remove(storage, capsys):
    assert run(capsys, "project", "create", "Raccoons", "--classes", "Raccoon, Fox") == (
        0,
        "created project 'Raccoons' with 2 classes: Raccoon, Fox\n",
        "",
    )
    status, out, _ = run(
        capsys,
        "classes",
        "describe",
        "Fox",
        "--project",
        "Raccoons",
        "--dex-number",
        "3",
        "--description",
        "Sly.",
        "--colour",
        "#FF8800",
    )
    assert (status, out) == (0, "class 'Fox': changed its dex number, description and colour\n")
    assert run(capsys, "classes", "rename", "Fox", "Red fox", "--project", "Raccoons")[1] == (
        "renamed class 'Fox' to 'Red fox' in Raccoons\n"
    )
    assert run(capsys, "classes", "add", "Badger", "--project", "Raccoons", "--color", "#00ff00")[0] == 0
    status, out, _ = run(capsys, "classes", "list", "--project", "Raccoons")
    assert out.splitlines() == [
        "Raccoons: 3 classes",
        "  0: Raccoon (dex #-, colour default, 0 boxes)",
        "  1: Red fox (dex #3, colour #ff8800, 0 boxes): Sly.",
        "  2: Badger (dex #-, colour #00ff00, 0 boxes)",
    ]
    status, out, _ = run(capsys, "classes", "remove", "Raccoon", "--project", "Raccoons", "--json")
    assert status == 0 and json.loads(out)["classes"] == ["Red fox", "Badger"]
    status, out, _ = run(capsys, "classes", "list", "--project", "Raccoons", "--json")
    rows = json.loads(out)["classes"]
    assert [(row["index"], row["name"], row["dex_number"]) for row in rows] == [(0, "Red fox", 3), (1, "Badger", None)]
    # An empty value clears a field.
    run(capsys, "classes", "describe", "Red fox", "--project", "Raccoons", "--dex-number", "")
    assert service.list_classes("Raccoons")["classes"][0]["dex_number"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("project", "create", "Raccoons", "--classes", "Otter"), "a project called 'Raccoons' already exists"),
        (("project", "create", "Otters", "--classes", " , "), "needs at least one class"),
        (("classes", "add", "fox", "--project", "Raccoons"), "already has a class called 'Fox'"),
        (("classes", "rename", "Fox", "Raccoon", "--project", "Raccoons"), "already has a class called 'Raccoon'"),
        (("classes", "rename", "Wolf", "Dog", "--project", "Raccoons"), "has no class called 'Wolf'"),
        (("classes", "describe", "Fox", "--project", "Raccoons"), "describe needs --dex-number"),
        (("classes", "describe", "Fox", "--project", "Raccoons", "--colour", "red"), "#rrggbb"),
        (("classes", "describe", "Fox", "--project", "Raccoons", "--dex-number", "-2"), "negative"),
        (("classes", "remove", "Raccoon", "--project", "Raccoons"), "'Raccoon' is used by 1 box on 1 image"),
        (("classes", "list", "--project", "Otters"), "no project called 'Otters'"),
    ],
)
def test_refusals_are_one_line_and_change_nothing(storage, capsys, args, message):
    service.create_project("Raccoons", ["Raccoon", "Fox"])
    engine, _ = service.open_store()
    with session_scope(engine) as session:
        project = session.scalar(select(Project))
        image_id = add_image_bytes(session, storage, project, encode_image(textured_image(3)), source="upload").image_id
        raccoon = project.classes[0]
        session.add(Annotation(image_id=image_id, class_id=raccoon.id, x1=0, y1=0, x2=5, y2=5, source="import"))
    before = service.list_classes("Raccoons")
    status, out, err = run(capsys, *args)
    assert status == 1 and out == ""
    assert err.startswith("yolodex: error: ") and message in err and err.count("\n") == 1, err
    assert service.list_classes("Raccoons") == before


def test_a_real_process_exits_1_with_one_line(tmp_path):
    env = {**os.environ, "YOLODEX_STORAGE": str(tmp_path / "storage")}
    env.pop("YOLODEX_DATABASE_URL", None)
    command = [sys.executable, "-m", "backend.cli", "project", "create", "Mine", "--classes", "A,a"]
    completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 1 and completed.stdout == ""
    assert completed.stderr == "yolodex: error: project 'Mine' already has a class called 'A': choose another name\n"
    assert not service.project_exists(
        "Mine", settings=Settings.from_env({"YOLODEX_STORAGE": str(tmp_path / "storage")})
    )
