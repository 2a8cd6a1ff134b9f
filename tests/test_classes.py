"""A project's classes as the user edits them (`backend.store.classes`, and by project name through
`backend.ingest.service`): create with classes, add, rename, describe, recolour, remove, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from backend.ingest import service
from backend.settings import Settings
from backend.store import classes
from backend.store.classes import ClassError
from backend.store.db import init_db, session_scope
from backend.store.images import add_image_bytes
from backend.store.models import Annotation, Project, ProjectClass, project_classes
from tests.conftest import encode_image, textured_image


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path: Path):
    """The store on SQLite, and on a fresh PostgreSQL database (skipped without one): both check constraints."""
    url = (
        f"sqlite:///{tmp_path / 'yolodex.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    )
    engine = init_db(url)
    yield engine
    engine.dispose()


def project_of(session, name: str = "Raccoons") -> Project:
    return session.scalar(select(Project).where(Project.name == name))


def listing(session, name: str = "Raccoons") -> list[tuple[int, str]]:
    return [(item.index, item.name) for item in project_classes(session, project_of(session, name))]


def add_box(session, storage: Path, project: Project, class_name: str, seed: int) -> None:
    image_id = add_image_bytes(session, storage, project, encode_image(textured_image(seed)), source="upload").image_id
    item = classes.find_class(session, project, class_name)
    session.add(Annotation(image_id=image_id, class_id=item.id, x1=1, y1=1, x2=10, y2=10, source="labelstudio"))
    session.flush()


def test_create_project_with_its_classes_in_order(engine):
    with session_scope(engine) as session:
        classes.create_project(
            session,
            " Raccoons ",
            ["Raccoon", {"name": "Fox", "dex_number": "7", "description": "red", "colour": "#FF0000"}],
        )
    with session_scope(engine) as session:
        assert listing(session) == [(0, "Raccoon"), (1, "Fox")]
        fox = classes.find_class(session, project_of(session), "Fox")
        assert (fox.dex_number, fox.description, fox.colour) == (7, "red", "#ff0000")


@pytest.mark.parametrize(
    ("name", "given", "message"),
    [
        ("Raccoons", [], "needs at least one class"),
        ("Raccoons", ["", "  "], "needs at least one class"),
        ("Raccoons", ["Fox", "fox"], "already has a class called 'Fox'"),
        ("Raccoons", [{"name": "Fox", "colour": "red"}], "is not of the form #rrggbb"),
        ("Raccoons", [{"name": "Fox", "dex_number": -1}], "negative"),
        ("Raccoons", [{"name": "Fox", "dex_number": "twelve"}], "not a whole number"),
        ("  ", ["Fox"], "needs a name"),
    ],
)
def test_create_project_refuses_bad_input_and_creates_nothing(engine, name, given, message):
    with pytest.raises(ClassError, match=message), session_scope(engine) as session:
        classes.create_project(session, name, given)
    with session_scope(engine) as session:
        assert session.scalars(select(Project)).all() == []
        assert session.scalars(select(ProjectClass)).all() == []


def test_a_project_name_that_exists_is_an_error(engine):
    with session_scope(engine) as session:
        classes.create_project(session, "Raccoons", ["Raccoon"])
    with pytest.raises(ClassError, match="a project called 'Raccoons' already exists"), session_scope(engine) as s:
        classes.create_project(s, "Raccoons", ["Fox"])
    with session_scope(engine) as session:
        assert listing(session) == [(0, "Raccoon")]


def test_add_appends_and_refuses_a_name_it_has(engine):
    with session_scope(engine) as session:
        project = classes.create_project(session, "Raccoons", ["Raccoon"])
        added = classes.add_class(session, project, "Fox", dex_number=3, description=" sly ", colour="#00ff00")
        assert (added.index, added.description) == (1, "sly")
        with pytest.raises(ClassError, match="already has a class called 'Fox'"):
            classes.add_class(session, project, "FOX")
        with pytest.raises(ClassError, match="#rrggbb"):
            classes.add_class(session, project, "Badger", colour="#12345")
    with session_scope(engine) as session:
        assert listing(session) == [(0, "Raccoon"), (1, "Fox")]


def test_rename_keeps_index_and_boxes_and_refuses_a_taken_name(engine, tmp_path):
    with session_scope(engine) as session:
        project = classes.create_project(session, "Raccoons", ["Racoon", "Fox"])
        add_box(session, tmp_path, project, "Racoon", 1)
        renamed = classes.rename_class(session, project, "Racoon", "Raccoon")
        assert renamed.index == 0
        with pytest.raises(ClassError, match="already has a class called 'Fox'"):
            classes.rename_class(session, project, "Raccoon", "fox")
        with pytest.raises(ClassError, match="has no class called 'Badger'; its classes: Raccoon, Fox"):
            classes.rename_class(session, project, "Badger", "Bear")
        with pytest.raises(ClassError, match="needs a name"):
            classes.rename_class(session, project, "Fox", "   ")
        classes.rename_class(session, project, "Fox", "FOX")  # its own name in another case is fine
    with session_scope(engine) as session:
        assert listing(session) == [(0, "Raccoon"), (1, "FOX")]
        rows = classes.class_rows(session, project_of(session))
        assert [(row.name, row.boxes, row.images) for row in rows] == [("Raccoon", 1, 1), ("FOX", 0, 0)]


def test_describe_changes_only_the_fields_given(engine):
    with session_scope(engine) as session:
        project = classes.create_project(
            session, "Raccoons", [{"name": "Raccoon", "dex_number": 5, "colour": "#aabbcc"}]
        )
        item, changed = classes.describe_class(session, project, "Raccoon", description="Masked bandit.")
        assert changed == ["description"] and (item.dex_number, item.colour) == (5, "#aabbcc")
        item, changed = classes.describe_class(session, project, "Raccoon", dex_number="", colour="#112233")
        assert changed == ["dex_number", "colour"] and item.dex_number is None and item.colour == "#112233"
        _, changed = classes.describe_class(session, project, "Raccoon", colour="#112233")
        assert changed == []
        with pytest.raises(ClassError, match="#rrggbb"):
            classes.describe_class(session, project, "Raccoon", colour="blue")
    with session_scope(engine) as session:
        item = classes.find_class(session, project_of(session), "Raccoon")
        assert (item.dex_number, item.description, item.colour) == (None, "Masked bandit.", "#112233")


def test_removal_is_refused_while_boxes_use_the_class(engine, tmp_path):
    with session_scope(engine) as session:
        project = classes.create_project(session, "Raccoons", ["Raccoon", "Fox"])
        for seed in (1, 2):
            add_box(session, tmp_path, project, "Fox", seed)
        add_box(session, tmp_path, project, "Fox", 1)  # a second box on the first image (same bytes: same image)
    with pytest.raises(ClassError, match="'Fox' is used by 3 boxes on 2 images"), session_scope(engine) as session:
        classes.remove_class(session, project_of(session), "Fox")
    with session_scope(engine) as session:
        assert listing(session) == [(0, "Raccoon"), (1, "Fox")]


def test_removal_keeps_the_indices_contiguous(engine, tmp_path):
    with session_scope(engine) as session:
        project = classes.create_project(session, "Raccoons", ["A", "B", "C", "D", {"name": "E", "colour": "#123456"}])
        add_box(session, tmp_path, project, "D", 1)
        assert classes.remove_class(session, project, "B") == 1
    with session_scope(engine) as session:
        assert listing(session) == [(0, "A"), (1, "C"), (2, "D"), (3, "E")]
        # Classes that moved keep the colour they showed; the others keep none (or their own).
        colours = [item.colour for item in project_classes(session, project_of(session))]
        assert colours == [None, classes.palette_colour(2), classes.palette_colour(3), "#123456"]
        assert len(set(colours)) == 4
        project = project_of(session)
        classes.remove_class(session, project, "A")
        classes.remove_class(session, project, "E")  # the last one: nothing moves
        added = classes.add_class(session, project, "F")
        assert added.index == 2
    with session_scope(engine) as session:
        assert listing(session) == [(0, "C"), (1, "D"), (2, "F")]
        # The box of D still points at D, now index 1.
        box = session.scalar(select(Annotation))
        assert (box.project_class.name, box.project_class.index) == ("D", 1)


def test_service_by_project_name(tmp_path):
    settings = Settings.from_env({"YOLODEX_STORAGE": str(tmp_path / "storage")})
    created = service.create_project("Raccoons", ["Raccoon", "Fox"], settings=settings)
    assert created["summary"] == "created project 'Raccoons' with 2 classes: Raccoon, Fox"
    assert service.add_class("Raccoons", "Badger", colour="#010203", settings=settings)["index"] == 2
    assert service.rename_class("Raccoons", "Fox", "Red fox", settings=settings)["summary"] == (
        "renamed class 'Fox' to 'Red fox' in Raccoons"
    )
    described = service.describe_class("Raccoons", "Red fox", dex_number=4, description="Sly.", settings=settings)
    assert described["summary"] == "class 'Red fox': changed its dex number and description"
    removed = service.remove_class("Raccoons", "Raccoon", settings=settings)
    assert removed["classes"] == ["Red fox", "Badger"]
    listed = service.list_classes("Raccoons", settings=settings)["classes"]
    assert [(row["index"], row["name"], row["dex_number"], row["description"], row["colour"]) for row in listed] == [
        (0, "Red fox", 4, "Sly.", classes.palette_colour(1)),  # the colour it showed at index 1, now its own
        (1, "Badger", None, "", "#010203"),
    ]
    with pytest.raises(service.StoreError, match="no project called 'Otters'"):
        service.list_classes("Otters", settings=settings)
    assert service.project_exists("Raccoons", settings=settings) and not service.project_exists(
        "Otters", settings=settings
    )
