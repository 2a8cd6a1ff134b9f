"""Project page: create a project with its classes, and edit the current project's classes and their Pokédex entries
(name, dex number, description, colour): add, rename, recolour, describe, remove.

Thin on purpose: every change is one call into `backend.ingest.service` (the rules, e.g. no removal while boxes use
a class, live in `backend.store.classes`); its summary is the message shown.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pandas as pd
import streamlit as st

from app.widgets import page_settings, project_names, project_picker, set_current_project, show_outcome, store_engine
from backend.ingest import service
from backend.ingest.starter import STARTER_NAME
from backend.store.classes import palette_colour
from backend.store.db import describe_error

logger = logging.getLogger(__name__)

OUTCOME = "project_outcome"


def apply(failed: str, action: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """Runs one change; its summary (or the error, once) is shown after the rerun. None when it failed."""
    try:
        result = action()
    except Exception as error:  # shown on the page, which keeps working
        logger.exception("%s", failed)
        st.session_state[OUTCOME] = ("error", f"{failed}: {describe_error(error)}")
        return None
    summary = result["summary"]
    st.session_state[OUTCOME] = (result.get("level", "success"), summary[:1].upper() + summary[1:] + ".")
    st.session_state["project_revision"] = st.session_state.get("project_revision", 0) + 1  # fresh edit widgets
    return result


def create(settings) -> None:
    name = st.session_state["project_new_name"]
    classes = [line.strip() for line in st.session_state["project_new_classes"].splitlines() if line.strip()]
    result = apply("Could not create the project", lambda: service.create_project(name, classes, settings=settings))
    if result:
        set_current_project(result["project"])
        st.session_state["project_new_name"] = st.session_state["project_new_classes"] = ""


def add(settings, project: str) -> None:
    state = st.session_state
    entry = {
        "dex_number": state["project_add_dex"],
        "description": state["project_add_description"],
        "colour": state["project_add_colour"],
    }
    result = apply(
        "Could not add the class",
        lambda: service.add_class(project, state["project_add_name"], **entry, settings=settings),
    )
    if result:
        state["project_add_name"] = state["project_add_description"] = ""
        state["project_add_dex"] = None


def save(settings, project: str, row: dict[str, Any], prefix: str) -> None:
    state = st.session_state
    dex, colour = state[prefix + "dex"], state[prefix + "colour"]
    changes: dict[str, Any] = {"new_name": state[prefix + "name"], "description": state[prefix + "description"]}
    if dex != row["dex_number"]:
        changes["dex_number"] = "" if dex is None else int(dex)
    if colour.lower() != shown_colour(row):  # the palette colour left as it is stays "default"
        changes["colour"] = colour
    result = apply(
        "Could not save the class", lambda: service.edit_class(project, row["name"], **changes, settings=settings)
    )
    if result:
        state["project_selected"] = result["class"]  # the class stays selected under its new name


def remove(settings, project: str, name: str) -> None:
    apply(f"Could not remove {name}", lambda: service.remove_class(project, name, settings=settings))


def shown_colour(row: dict[str, Any]) -> str:
    """The class's colour, or the palette colour Label Studio gives its index when it has none."""
    return (row["colour"] or palette_colour(row["index"])).lower()


def classes_table(rows: list[dict[str, Any]]) -> None:
    table = pd.DataFrame(
        [
            {
                "dex number": row["dex_number"],
                "name": row["name"],
                "description": row["description"],
                "colour": row["colour"] or f"{shown_colour(row)} (default)",
                "boxes": row["boxes"],
                "images": row["images"],
            }
            for row in rows
        ]
    )
    st.dataframe(
        table,
        hide_index=True,
        key="project_classes_table",
        column_config={"dex number": st.column_config.NumberColumn(format="%d")},
    )
    st.caption(
        "New and renamed classes reach Label Studio's labeling config at the next sync (Label page); boxes "
        "already drawn under a class's old name stay with the class. A class that boxes use cannot be "
        "removed: relabel those boxes first, or rename the class."
    )


def edit_class(settings, project: str, rows: list[dict[str, Any]]) -> None:
    # A fresh select box after every change (its key carries the revision), placed on the class last selected: a
    # select box kept across a change of its options can go on showing a class that was renamed or removed.
    names = [row["name"] for row in rows]
    revision = st.session_state.get("project_revision", 0)
    wanted = st.session_state.get("project_selected")
    chosen = st.selectbox(
        "Class", names, index=names.index(wanted) if wanted in names else 0, key=f"project_class_{revision}"
    )
    st.session_state["project_selected"] = chosen
    row = rows[names.index(chosen)]
    prefix = f"project_edit_{revision}_{row['index']}_"
    with st.form("project_edit"):
        left, middle, right = st.columns([2, 1, 1])
        left.text_input("Name", value=row["name"], key=prefix + "name")
        middle.number_input("Dex number", min_value=0, value=row["dex_number"], step=1, key=prefix + "dex")
        right.color_picker("Colour", value=shown_colour(row), key=prefix + "colour")
        st.text_area("Dex entry (description)", value=row["description"], key=prefix + "description")
        st.form_submit_button("Save", on_click=save, args=(settings, project, row, prefix))
    st.button(f"Remove {row['name']}", key="project_remove", on_click=remove, args=(settings, project, row["name"]))


def add_class(settings, project: str, count: int) -> None:
    with st.form("project_add"):
        left, middle, right = st.columns([2, 1, 1])
        left.text_input("Name", key="project_add_name")
        middle.number_input("Dex number", min_value=0, value=None, step=1, key="project_add_dex")
        right.color_picker("Colour", value=palette_colour(count), key="project_add_colour")
        st.text_area("Dex entry (description)", key="project_add_description")
        st.form_submit_button("Add the class", on_click=add, args=(settings, project))


st.title("Project")
settings = page_settings()
settings.ensure_dirs()
engine = store_engine(settings.database_url)
show_outcome(OUTCOME)

# Open until the user has a project of their own (the demo project does not count).
own_projects = [name for name in project_names(engine) if name != STARTER_NAME]
with st.expander("Create a project", expanded=not own_projects), st.form("project_create"):
    st.text_input("Project name", key="project_new_name", placeholder="e.g. Garden visitors")
    st.text_area(
        "Its classes, one a line (at least one)", key="project_new_classes", placeholder="Raccoon\nFox\nHedgehog"
    )
    st.form_submit_button("Create the project", type="primary", on_click=create, args=(settings,))

if not project_names(engine):
    st.stop()  # the form above is open: there is nothing else to show yet
project = project_picker(engine, key="project_project")
if project is None:
    st.stop()
rows = service.list_classes(project, settings=settings)["classes"]
st.header(f"Classes of {project}")
if rows:
    classes_table(rows)
    st.subheader("Edit a class")
    edit_class(settings, project, rows)
else:
    st.info("This project has no class yet: add one below (labeling needs at least one).")
st.subheader("Add a class")
add_class(settings, project, len(rows))
st.markdown("Next: add photos on the [Datasets](/datasets) page, then label them on the [Label](/label) page.")
