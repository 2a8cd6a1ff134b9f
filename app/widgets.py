"""Widgets and cached resources every page shares. Pages stay thin: they call these and `backend`, nothing else.

Importable from any page (the `app` package is installed with yolodex), under `streamlit run app/main.py`, under
`streamlit run pages/<page>.py` and under AppTest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import streamlit as st
from sqlalchemy import select
from sqlalchemy.engine import Engine

from backend.settings import Settings, get_settings
from backend.store.db import describe_error, session_scope, shared_engine
from backend.store.models import Project

logger = logging.getLogger(__name__)

PROJECT_PARAM = "project"  # ?project=<name> keeps the chosen project across reloads and pages


def page_settings() -> Settings:
    """The settings, or a clear error on the page (and nothing else) when an environment variable is wrong."""
    try:
        return get_settings()
    except ValueError as error:
        st.error(f"yolodex settings: {error}")
        st.stop()
        raise  # st.stop() raises; this line keeps type checkers honest


def store_engine(database_url: str) -> Engine:
    """The process's one migrated engine for the database (`db.shared_engine`, the same the backend's calls use)."""
    return shared_engine(database_url)


def project_names(engine: Engine) -> list[str]:
    with session_scope(engine) as session:
        return list(session.scalars(select(Project.name).order_by(Project.id)))


def project_picker(engine: Engine, *, key: str, label: str = "Project") -> str | None:
    """A project select box remembered in `?project=`; None (with guidance shown) when there is no project."""
    names = project_names(engine)
    if not names:
        st.info("No project yet: add images on the Datasets page, or run `yolodex dataset starter` for a demo project.")
        return None
    wanted = st.query_params.get(PROJECT_PARAM)
    index = names.index(wanted) if wanted in names else 0
    chosen = st.selectbox(label, names, index=index, key=key)
    if st.query_params.get(PROJECT_PARAM) != chosen:
        st.query_params[PROJECT_PARAM] = chosen
    return chosen


def run_and_report(title: str, action: Callable[[], Any], *, state_key: str) -> Any:
    """Runs a short step with a spinner; its outcome (or error, never a crash) is kept in `st.session_state[state_key]`
    as ("success" | "error", text) for the page to show after its rerun. Returns the result, or None on error."""
    try:
        with st.spinner(f"{title}…"):
            result = action()
    except Exception as error:  # shown to the user: the page itself must keep working
        logger.exception("%s failed", title)
        st.session_state[state_key] = ("error", f"{title} failed: {describe_error(error)}")
        return None
    summary = result.get("summary") if isinstance(result, dict) else None
    st.session_state[state_key] = ("success", f"{title}: {summary or 'done'}")
    return result


def show_outcome(state_key: str) -> None:
    """Shows (once) what `run_and_report` kept."""
    outcome = st.session_state.pop(state_key, None)
    if outcome:
        kind, text = outcome
        (st.success if kind == "success" else st.error)(text)
