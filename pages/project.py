"""Project page: create a project with its classes, and edit the current project's classes and their Pokédex entries
(name, dex number, description, colour): add, rename, recolour, describe, remove. Every change is one call into
`backend.ingest.service` (the rules live in `backend.store.classes`); its summary is the message shown."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st

from app.widgets import page_settings, project_names, project_picker, set_current_project, show_outcome, store_engine
from backend.ingest import service
from backend.store.db import describe_error
from backend.views import project as view

logger = logging.getLogger(__name__)
OUTCOME = "project_outcome"
state = st.session_state


def apply(failed: str, action: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Runs one change; its summary (or the error, once) is shown after the rerun. None when it failed."""
    try:
        result = action()
    except Exception as error:  # shown on the page, which keeps working
        logger.exception("%s", failed)
        state[OUTCOME] = ("error", f"{failed}: {describe_error(error)}")
        return None
    state[OUTCOME] = (result.get("level", "success"), view.sentence(result["summary"]))
    state["project_revision"] = state.get("project_revision", 0) + 1  # fresh edit widgets
    return result


def create() -> None:
    name, classes = state["project_new_name"], view.class_lines(state["project_new_classes"])
    if result := apply(
        "Could not create the project", lambda: service.create_project(name, classes, settings=settings)
    ):
        set_current_project(result["project"])
        state["project_new_name"] = state["project_new_classes"] = ""


def add() -> None:
    entry = {
        "dex_number": state["project_add_dex"],
        "description": state["project_add_description"],
        "colour": state["project_add_colour"],
    }
    add_class = lambda: service.add_class(project, state["project_add_name"], **entry, settings=settings)  # noqa: E731
    if apply("Could not add the class", add_class):
        state["project_add_name"] = state["project_add_description"] = ""
        state["project_add_dex"] = None


def save(row: dict[str, Any], prefix: str) -> None:
    fields = (state[prefix + field] for field in ("name", "dex", "colour", "description"))
    changes = view.edit_changes(row, *fields)
    result = apply(
        "Could not save the class", lambda: service.edit_class(project, row["name"], **changes, settings=settings)
    )
    if result:
        state["project_selected"] = result["class"]  # the class stays selected under its new name


def remove(name: str) -> None:
    apply(f"Could not remove {name}", lambda: service.remove_class(project, name, settings=settings))


def edit_class(rows: list[dict[str, Any]]) -> None:
    # A fresh select box after every change (its key carries the revision), placed on the class last selected: a
    # select box kept across a change of its options can go on showing a class that was renamed or removed.
    names = [row["name"] for row in rows]
    revision, wanted = state.get("project_revision", 0), state.get("project_selected")
    index = names.index(wanted) if wanted in names else 0
    state["project_selected"] = chosen = st.selectbox("Class", names, index=index, key=f"project_class_{revision}")
    row = rows[names.index(chosen)]
    prefix = f"project_edit_{revision}_{row['index']}_"
    with st.form("project_edit"):
        left, middle, right = st.columns([2, 1, 1])
        left.text_input("Name", value=row["name"], key=prefix + "name")
        middle.number_input("Dex number", min_value=0, value=row["dex_number"], step=1, key=prefix + "dex")
        right.color_picker("Colour", value=view.shown_colour(row), key=prefix + "colour")
        st.text_area("Dex entry (description)", value=row["description"], key=prefix + "description")
        st.form_submit_button("Save", on_click=save, args=(row, prefix))
    st.button(f"Remove {row['name']}", key="project_remove", on_click=remove, args=(row["name"],))


st.title("Project")
settings = page_settings()
settings.ensure_dirs()
engine = store_engine(settings.database_url)
show_outcome(OUTCOME)

# Open until the user has a project of their own (the demo project does not count).
with st.expander("Create a project", expanded=not view.own_projects(project_names(engine))), st.form("project_create"):
    st.text_input("Project name", key="project_new_name", placeholder="e.g. Garden visitors")
    st.text_area(
        "Its classes, one a line (at least one)", key="project_new_classes", placeholder="Raccoon\nFox\nHedgehog"
    )
    st.form_submit_button("Create the project", type="primary", on_click=create)

if not project_names(engine):
    st.stop()  # the form above is open: there is nothing else to show yet
project = project_picker(engine, key="project_project")
if project is None:
    st.stop()
rows = service.list_classes(project, settings=settings)["classes"]
st.header(f"Classes of {project}")
if rows:
    st.dataframe(
        pd.DataFrame(view.table_rows(rows)),
        hide_index=True,
        key="project_classes_table",
        column_config={"dex number": st.column_config.NumberColumn(format="%d")},
    )
    st.caption(
        "New and renamed classes reach Label Studio's labeling config at the next sync (Label page); boxes "
        "already drawn under a class's old name stay with the class. A class that boxes use cannot be "
        "removed: relabel those boxes first, or rename the class."
    )
    st.subheader("Edit a class")
    edit_class(rows)
else:
    st.info("This project has no class yet: add one below (labeling needs at least one).")
st.subheader("Add a class")
with st.form("project_add"):
    left, middle, right = st.columns([2, 1, 1])
    left.text_input("Name", key="project_add_name")
    middle.number_input("Dex number", min_value=0, value=None, step=1, key="project_add_dex")
    right.color_picker("Colour", value=view.new_class_colour(len(rows)), key="project_add_colour")
    st.text_area("Dex entry (description)", key="project_add_description")
    st.form_submit_button("Add the class", on_click=add)
st.markdown("Next: add photos on the [Datasets](/datasets) page, then label them on the [Label](/label) page.")
