"""The Project page under AppTest, on a fresh storage folder: create a project with its classes, then rename,
describe, recolour, add and remove classes, each message saying what changed (or why not, once)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from streamlit.testing.v1 import AppTest

from backend.ingest import service
from backend.settings import Settings
from backend.store.db import session_scope
from backend.store.images import add_image_bytes
from backend.store.models import Annotation, Project
from tests.conftest import encode_image, textured_image
from tests.labelstudio_fixture import free_port

PAGE = Path(__file__).resolve().parents[1] / "pages" / "project.py"


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in ("YOLODEX_DATABASE_URL", "YOLODEX_QUEUE_URL", "YOLODEX_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("YOLODEX_STORAGE", str(tmp_path / "storage"))
    monkeypatch.setenv("YOLODEX_LS_PORT", str(free_port()))
    return Settings.from_env({"YOLODEX_STORAGE": str(tmp_path / "storage")})


def run_page() -> AppTest:
    return AppTest.from_file(str(PAGE), default_timeout=60).run()


def messages(app: AppTest) -> dict[str, list[str]]:
    kinds = {"success": app.success, "info": app.info, "warning": app.warning, "error": app.error}
    return {kind: [element.value for element in elements] for kind, elements in kinds.items() if len(elements)}


def classes_of(settings: Settings, project: str) -> list[tuple]:
    rows = service.list_classes(project, settings=settings)["classes"]
    return [(row["index"], row["name"], row["dex_number"], row["description"], row["colour"]) for row in rows]


def create(app: AppTest, name: str, classes: str) -> AppTest:
    app.text_input(key="project_new_name").set_value(name)
    app.text_area(key="project_new_classes").set_value(classes)
    return app.button(key="FormSubmitter:project_create-Create the project").click().run()


def test_a_new_project_with_two_classes_becomes_the_current_one(settings):
    app = run_page()
    assert not app.exception
    assert app.expander[0].proto.expanded  # no project yet: the form is open
    create(app, "Garden visitors", "Raccoon\n\n  Fox  \n")
    assert not app.exception
    assert messages(app) == {"success": ["Created project 'Garden visitors' with 2 classes: Raccoon, Fox."]}
    assert classes_of(settings, "Garden visitors") == [(0, "Raccoon", None, "", None), (1, "Fox", None, "", None)]
    assert app.selectbox(key="project_project").value == "Garden visitors"
    assert app.query_params["project"] == "Garden visitors"
    assert app.text_input(key="project_new_name").value == ""  # the form is ready for another project
    table = app.dataframe[0].value
    assert list(table["name"]) == ["Raccoon", "Fox"] and list(table["boxes"]) == [0, 0]

    # A second project becomes the current one as well; a name that exists is refused and creates nothing.
    assert not app.expander[0].proto.expanded  # the user has a project of their own: the form folds away
    create(app, "Ponds", "Frog")
    assert app.selectbox(key="project_project").value == "Ponds"
    create(app, "Ponds", "Newt")
    assert messages(app) == {
        "error": [
            "Could not create the project: a project called 'Ponds' already exists: "
            "choose another name, or pick it to edit it"
        ]
    }
    assert classes_of(settings, "Ponds") == [(0, "Frog", None, "", None)]
    app.run()
    assert "error" not in messages(app)  # shown once


def test_the_create_form_stays_open_while_only_the_demo_project_exists(settings):
    service.starter(settings)
    app = run_page()
    assert not app.exception
    assert app.expander[0].proto.expanded


def test_a_project_needs_a_class(settings):
    app = create(run_page(), "Empty", " \n")
    assert messages(app)["error"] == [
        "Could not create the project: project 'Empty' needs at least one class: name the things it should detect"
    ]
    assert not service.project_exists("Empty", settings=settings)


def edit_keys(app: AppTest) -> dict[str, str]:
    """field → the widget key of the edit form (the keys carry a revision and the class index)."""
    widgets = [*app.text_input, *app.text_area, *app.number_input, *app.color_picker]
    keys = [widget.key for widget in widgets if (widget.key or "").startswith("project_edit_")]
    return {key.rsplit("_", 1)[1]: key for key in keys}


def class_box(app: AppTest):
    """The edit form's class selector (its key carries the page's revision)."""
    [box] = [box for box in app.selectbox if box.label == "Class"]
    return box


def test_rename_describe_recolour_add_and_refuse_a_removal(settings):
    service.create_project("Garden", ["Racoon", "Fox"], settings=settings)
    app = run_page()
    keys = edit_keys(app)
    assert app.text_input(key=keys["name"]).value == "Racoon"
    app.text_input(key=keys["name"]).set_value("Raccoon")
    app.number_input(key=keys["dex"]).set_value(12)
    app.text_area(key=keys["description"]).set_value("A masked visitor of bins.")
    app.color_picker(key=keys["colour"]).set_value("#AA3300")
    app.button(key="FormSubmitter:project_edit-Save").click().run()
    assert not app.exception
    assert messages(app) == {
        "success": ["Class 'Racoon': renamed 'Racoon' to 'Raccoon' and changed its dex number, description and colour."]
    }
    assert classes_of(settings, "Garden")[0] == (0, "Raccoon", 12, "A masked visitor of bins.", "#aa3300")
    table = app.dataframe[0].value
    assert table.iloc[0]["name"] == "Raccoon" and table.iloc[0]["description"] == "A masked visitor of bins."
    assert app.text_input(key=edit_keys(app)["name"]).value == "Raccoon"  # the form shows the saved values

    # Renaming onto another class's name is refused, and nothing of that save is kept.
    assert class_box(app).value == "Raccoon"  # still selected, under its new name
    class_box(app).set_value("Fox").run()
    keys = edit_keys(app)
    app.text_input(key=keys["name"]).set_value("raccoon")
    app.text_area(key=keys["description"]).set_value("Sly.")
    app.button(key="FormSubmitter:project_edit-Save").click().run()
    assert messages(app) == {
        "error": [
            "Could not save the class: project 'Garden' already has a class called 'Raccoon': choose another name"
        ]
    }
    assert classes_of(settings, "Garden")[1] == (1, "Fox", None, "", None)

    # Saving the values a class has says so, in blue.
    app = run_page()
    app.button(key="FormSubmitter:project_edit-Save").click().run()
    assert messages(app) == {"info": ["Class 'Raccoon': nothing to save (the values are the ones it has)."]}

    app.text_input(key="project_add_name").set_value("Hedgehog")
    app.number_input(key="project_add_dex").set_value(3)
    app.button(key="FormSubmitter:project_add-Add the class").click().run()
    assert messages(app) == {"success": ["Added class 'Hedgehog' to Garden (index 2)."]}
    assert classes_of(settings, "Garden")[2][:3] == (2, "Hedgehog", 3)
    assert app.text_input(key="project_add_name").value == ""

    # A box uses Raccoon: its removal is refused with the count; Fox (no box) goes and Hedgehog moves to index 1.
    engine, storage = service.open_store(settings)
    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == "Garden"))
        image_id = add_image_bytes(session, storage, project, encode_image(textured_image(5)), source="upload").image_id
        session.add(
            Annotation(image_id=image_id, class_id=project.classes[0].id, x1=0, y1=0, x2=9, y2=9, source="labelstudio")
        )
    app = run_page()
    assert class_box(app).value == "Raccoon"
    assert list(app.dataframe[0].value["boxes"]) == [1, 0, 0]
    app.button(key="project_remove").click().run()
    refusal = "class 'Raccoon' is used by 1 box on 1 image: relabel or delete those boxes first (or rename the class"
    assert messages(app) == {"error": [f"Could not remove Raccoon: {refusal} instead)"]}
    assert [row[1] for row in classes_of(settings, "Garden")] == ["Raccoon", "Fox", "Hedgehog"]

    class_box(app).set_value("Fox").run()
    assert app.button(key="project_remove").proto.label == "Remove Fox"
    app.button(key="project_remove").click().run()
    assert messages(app) == {"success": ["Removed class 'Fox' from Garden; classes now: Raccoon, Hedgehog."]}
    assert [row[:2] for row in classes_of(settings, "Garden")] == [(0, "Raccoon"), (1, "Hedgehog")]
    assert list(app.dataframe[0].value["name"]) == ["Raccoon", "Hedgehog"]
    assert class_box(app).options == ["Raccoon", "Hedgehog"] and class_box(app).value == "Raccoon"
    assert app.text_input(key=edit_keys(app)["name"]).value == "Raccoon"
    assert not app.exception
