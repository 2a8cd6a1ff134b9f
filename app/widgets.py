"""Widgets and cached resources every page shares. Pages stay thin: they call these and `backend`, nothing else.

Importable from any page (the `app` package is installed with yolodex), under `streamlit run app/main.py`, under
`streamlit run pages/<page>.py` and under AppTest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st
from sqlalchemy.engine import Engine

from app.navigation import app_pages
from backend import overview
from backend.jobs import api as jobs_api
from backend.settings import Settings, get_settings
from backend.store.db import describe_error, shared_engine

logger = logging.getLogger(__name__)

PROJECT_PARAM = "project"  # ?project=<name> keeps the chosen project across reloads and in links
CURRENT_PROJECT = "yolodex_current_project"  # the tab's current project, shared by every page's picker


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
    return overview.project_names(engine)


def current_project(engine: Engine, names: list[str] | None = None) -> str | None:
    """The project every page works on: `?project=` when it names one (a link, a reload), else the one chosen on
    another page of this browser tab, else the one the user last worked on (`backend.overview.last_active_project`).
    None when there is no project."""
    names = project_names(engine) if names is None else names
    for wanted in (st.query_params.get(PROJECT_PARAM), st.session_state.get(CURRENT_PROJECT)):
        if wanted in names:
            return wanted
    return overview.last_worked_on(engine)


def set_current_project(name: str) -> None:
    """Makes `name` the current project of this tab and of its URL (every page's picker then shows it)."""
    st.session_state[CURRENT_PROJECT] = name
    if st.query_params.get(PROJECT_PARAM) != name:
        st.query_params[PROJECT_PARAM] = name


def page_link(page: str, label: str, project: str | None = None, *, icon: str | None = None) -> None:
    """A link to one of the app's pages (by url path, `app.navigation.LAYOUT`) that opens it in the same tab and
    session (a Markdown link would open a new tab), with the project in its URL so the page opens on it."""
    st.page_link(app_pages()[page], label=label, icon=icon, query_params={PROJECT_PARAM: project} if project else None)


def project_picker(engine: Engine, *, key: str, label: str = "Project") -> str | None:
    """A project select box that shows, and sets, the current project (`current_project`); None (with guidance
    shown) when there is no project."""
    names = project_names(engine)
    chosen = current_project(engine, names)
    if chosen is None:
        st.info("No project yet: create one with its classes on the [Project](/project) page.")
        return None
    # The widget's own state is set before it is drawn, so it always shows the current project, also when another
    # page (or an import, or a new project) changed it since this page last ran.
    st.session_state[key] = chosen
    st.selectbox(label, names, key=key, on_change=lambda: set_current_project(st.session_state[key]))
    set_current_project(chosen)
    return chosen


def run_and_report(title: str, action: Callable[[], Any], *, state_key: str) -> Any:
    """Runs a short step with a spinner; its outcome (or error, never a crash) is kept in `st.session_state[state_key]`
    as (level, text) for the page to show after its rerun. Returns the result, or None on error.

    An action that returns a dict may say what happened in its "summary" and how to show it in its "level":
    "success" (the default, only for a step that fully succeeded), "info" (e.g. a job was queued: nothing has
    succeeded yet) or "warning" (done, with something the user should look at)."""
    try:
        with st.spinner(f"{title}…"):
            result = action()
    except Exception as error:  # shown to the user: the page itself must keep working
        logger.exception("%s failed", title)
        st.session_state[state_key] = ("error", f"{title} failed: {describe_error(error)}")
        return None
    summary = result.get("summary") if isinstance(result, dict) else None
    level = result.get("level", "success") if isinstance(result, dict) else "success"
    st.session_state[state_key] = (level, f"{title}: {summary or 'done'}")
    return result


def show_outcome(state_key: str) -> None:
    """Shows (once) what `run_and_report` kept."""
    outcome = st.session_state.pop(state_key, None)
    if outcome:
        level, text = outcome
        {"success": st.success, "info": st.info, "warning": st.warning}.get(level, st.error)(text)


def metrics_row(figures: dict[str, Any]) -> None:
    """One `st.metric` per (label, value), side by side."""
    for column, (label, value) in zip(st.columns(len(figures)), figures.items()):
        column.metric(label, value)


def outcome_of(title: str, action: Callable[[], dict[str, Any]], *, state_key: str) -> dict[str, Any] | None:
    """Runs an action that returns {"outcome": (level, text), ...}; keeps that outcome (or the error, in the words of
    `run_and_report`) for the page to show after its rerun. Returns the result, or None on error."""
    try:
        result = action()
    except Exception as error:  # shown on the page; the page keeps working
        logger.exception("%s failed", title)
        st.session_state[state_key] = ("error", f"{title} failed: {describe_error(error)}")
        return None
    st.session_state[state_key] = result["outcome"]
    return result


def live_job(job_id: int, settings: Settings, *, render: Callable[[Any], None], cancel_key: str) -> Any:
    """A job's banner, progress and result (`render(job)`), refreshed every 2 s while it runs, with a Cancel button
    outside the timed fragment (a click inside one can be lost). Returns the job as it is now; None when it is gone."""
    try:
        active = jobs_api.get_job(job_id, settings).active
    except ValueError:
        return None

    @st.fragment(run_every=2.0 if active else None)
    def live() -> None:
        job = jobs_api.get_job(job_id, settings)
        st.markdown(f"**{job.kind.capitalize()} job #{job.id}: {job.state}**. {job.message} (all jobs: [Jobs](/jobs))")
        st.progress(min(max(job.progress or 0.0, 0.0), 1.0))
        if job.error:
            st.error(job.error)
        render(job)
        if active and not job.active:
            st.rerun()

    live()
    st.button("Cancel job", key=cancel_key, disabled=not active, on_click=lambda: jobs_api.cancel(job_id, settings))
    return jobs_api.get_job(job_id, settings)


def pager(page: int, pages: int, total: int, *, key: str, noun: str = "image") -> None:
    """Previous / page number / Next and "Page 2 of 5 · 97 images"; the page number lives in `st.session_state[key]`
    (the caller clamps it to 1..pages before drawing)."""

    def step(delta: int) -> None:
        st.session_state[key] = st.session_state.get(key, 1) + delta

    previous, number, following, summary = st.columns([1, 1, 1, 4])
    prefix = key.removesuffix("_page")
    previous.button("Previous", key=f"{prefix}_previous", on_click=step, args=(-1,), disabled=page <= 1)
    number.number_input("Page", 1, pages, key=key, label_visibility="collapsed")
    following.button("Next", key=f"{prefix}_next", on_click=step, args=(1,), disabled=page >= pages)
    summary.markdown(f"Page {page} of {pages} · {total} {noun}{'' if total == 1 else 's'}")


def image_grid(pictures: list[tuple[Any, str]], columns: int) -> None:
    """Images (anything `st.image` takes) with their captions, `columns` a row."""
    for start in range(0, len(pictures), columns):
        for column, (picture, caption) in zip(st.columns(columns), pictures[start : start + columns]):
            column.image(picture, caption=caption)


def import_report(
    report: dict[str, Any], counts: dict[str, int], tables: dict[str, list[dict[str, Any]]], *, key: str
) -> None:
    """An import's report: its counts, the classes it added, a table per list (accepted, rejected...) and warnings."""
    metrics_row(counts)
    if report.get("classes_added"):
        st.caption("Classes added: " + ", ".join(report["classes_added"]))
    for table, rows in tables.items():
        st.markdown(f"**{table.replace('_', ' ').capitalize()}** ({len(rows)})")
        st.dataframe(pd.DataFrame(rows), hide_index=True, key=f"{key}_{table}")
    for warning in report.get("warnings", []):
        st.warning(warning)


def download_zip(archive: Path, *, key: str) -> None:
    """A "Download <name>" button for a zip on disk (read when clicked); the click does not rerun the page."""
    st.download_button(
        f"Download {archive.name}",
        data=archive.read_bytes,
        file_name=archive.name,
        mime="application/zip",
        key=key,
        on_click="ignore",
    )
