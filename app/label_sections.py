"""The Label page's sections: Label Studio's state and login, the buttons that talk to it (sync, pull, pre-label) with
the banner of the last one, the labeling view, the queue, the retrain loop form and the per-class progress. Each draws
its widgets (their keys are the page's) and asks `backend.views.label` or `backend.labeling.service`; the page
arranges them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
import streamlit as st

from app.widgets import metrics_row
from backend.labeling import server as ls_server
from backend.labeling import service
from backend.settings import Settings
from backend.store.db import describe_error
from backend.views import label as view

logger = logging.getLogger(__name__)
MESSAGE_KEY = "label_last_action"  # (project, level, text, title, job id or None) of the last button pressed
BANNERS = {"success": st.success, "info": st.info, "warning": st.warning, "error": st.error}


def browser_location() -> tuple[str | None, str | None]:
    """(scheme, hostname) of the app as the browser sees it: `st.context.url` (the address bar), else the Host
    header (a reverse proxy may rewrite it); (None, None) when unknown (e.g. under AppTest)."""
    if st.context.url:
        parts = urlsplit(st.context.url)
        return parts.scheme or None, parts.hostname
    host = st.context.headers.get("host")
    return (None, urlsplit(f"//{host}").hostname) if host else (None, None)


def run_action(project: str, title: str, action: Callable[[], dict[str, Any]]) -> None:
    """Runs one Label Studio step with a spinner, keeps its banner (or error) for the next run, and reruns so every
    table below shows the new state."""
    try:
        with st.spinner(f"{title}…"):
            result = action()
    except Exception as error:  # shown to the user: the page itself must keep working
        logger.exception("%s failed", title)
        st.session_state[MESSAGE_KEY] = (project, "error", f"{title} failed: {describe_error(error)}", title, None)
    else:
        st.session_state[MESSAGE_KEY] = (project, *view.result_banner(title, result), title, result.get("job_id"))
    st.rerun()


def server_state(settings: Settings, server: ls_server.ServerStatus, ls_url: str) -> None:
    """Label Studio's state; while it starts, the page reruns by itself once it is up; a stopped one shows its log."""
    level, text, icon = view.server_banner(server, ls_url)
    BANNERS[level](text, icon=icon)
    if server.state == "starting":

        @st.fragment(run_every=5.0)
        def wait_for_label_studio() -> None:
            if view.server_status(settings).state != "starting":
                st.rerun()  # the whole page: its buttons follow the new state

        wait_for_label_studio()
        st.button("Refresh", key="label_refresh", icon=":material/refresh:")
    elif server.state != "running" and server.details:
        with st.expander("Label Studio log"):
            st.code(server.details, language=None)


def login_help(settings: Settings, server: ls_server.ServerStatus, ls_url: str) -> None:
    """How to log in to Label Studio; the password only to a browser on this machine, behind a toggle."""
    with st.expander("Log in to Label Studio", expanded=server.state == "running"):
        login = view.login_text(settings, ls_url)
        if "error" in login:
            st.error(login["error"])
        elif "missing" in login:
            st.write(login["missing"])
        else:
            st.markdown(login["markdown"])
            if "hidden" in login:
                st.info(login["hidden"], icon=":material/lock:")
            else:
                if st.toggle("Show password", key="label_show_password"):
                    st.code(login["password"], language=None)
                st.caption(login["caption"])


def actions(settings: Settings, project: str, loop: dict[str, Any], server: ls_server.ServerStatus) -> None:
    """Sync, Pull and Pre-label (each disabled with the reason when it cannot run), then the last one's banner."""
    offline = None if server.ok else "Label Studio is not running"
    sync_col, pull_col, model_col, prelabel_col = st.columns([1, 1, 2, 1], vertical_alignment="bottom")
    if sync_col.button("Sync to Label Studio", key="label_sync", disabled=not server.ok, help=offline):
        run_action(project, "Sync", lambda: service.sync(project, settings))
    pull_off = offline or (None if loop["synced"] else "sync the project first")
    if pull_col.button("Pull labels", key="label_pull", disabled=pull_off is not None, help=pull_off):
        run_action(project, "Pull", lambda: service.pull(project, settings))
    models = view.model_choices(settings, project)
    model = model_col.selectbox("Model", list(models), key="label_model", placeholder="no trained model yet")
    prelabel_off = pull_off or (None if model else "train a model first")
    if prelabel_col.button("Pre-label", key="label_prelabel", disabled=prelabel_off is not None, help=prelabel_off):
        run_action(project, "Pre-label", lambda: view.queue_prelabel(settings, project, models[model]))
    last = st.session_state.get(MESSAGE_KEY)
    if last and last[0] == project:
        level, text = view.job_banner(settings, last[3], last[4]) if last[4] is not None else last[1:3]
        BANNERS[level](text)


def labeling_view(
    ls_url: str, view_url: str, server: ls_server.ServerStatus, scheme: str | None, browser_host: str | None
) -> None:
    """The project's data view of Label Studio, embedded when the browser can log in to it here, and a link."""
    if server.ok and view.can_embed(ls_url, scheme, browser_host):
        st.iframe(view_url, height=850)
    elif server.ok:
        st.caption(
            "The labeling view opens in its own tab: it can be embedded here only when the browser reaches the "
            f"app and Label Studio on the same hostname (the app: {browser_host or 'unknown'}; Label Studio: "
            f"{urlsplit(ls_url).hostname})."
        )
    st.link_button("Open Label Studio in a new tab", view_url, icon=":material/open_in_new:", disabled=not server.ok)


def next_to_label(settings: Settings, project: str, ls_url: str) -> None:
    """The queue, least confident first, each task a link into Label Studio."""
    limit = st.number_input("Show", min_value=1, max_value=500, value=20, step=10, key="label_queue_limit")
    queue = service.queue(project, int(limit), settings=settings)
    if queue["items"]:
        st.dataframe(
            pd.DataFrame(view.queue_rows(queue["items"], settings, ls_url)),
            key="label_queue",
            hide_index=True,
            column_config={
                "url": st.column_config.LinkColumn("task", display_text=r".*task=(\d+)$"),
                "uncertainty": st.column_config.NumberColumn("uncertainty", format="%.3f"),
                "model_version": "pre-labeled by",
                "image_id": "image",
            },
        )
        st.caption("Most uncertain first; images no model has pre-labeled yet come last.")
    else:
        st.write("Nothing left to label: every image in Label Studio has an annotation.")


def retrain_loop(settings: Settings, project: str, loop: dict[str, Any]) -> None:
    """The retrain loop's form (off until the user turns it on), then its plan with the real values and its figures."""
    starts = service.loop_start_choices(loop["settings"], settings)
    with st.form(key=f"label_loop_form_{project}"):
        fields = view.loop_fields(loop)
        value = {
            field: column.number_input(label, key=f"label_{field}_{project}", **options)
            for column, (field, label, options) in zip(st.columns(len(fields)), fields)
        }
        start = st.selectbox(
            "Start each retrain from",
            list(starts),
            format_func=starts.get,
            index=list(starts).index(service.start_choice_of(loop["settings"]["start_weights"])),
            key=f"label_start_{project}",
        )
        if st.form_submit_button("Save loop settings", key="label_loop_save"):
            try:
                loop = view.save_loop(settings, project, value, start)
            except ValueError as error:
                st.error(str(error))
            else:
                st.success(f"Saved: the loop is {'on' if loop['retrain_every'] > 0 else 'off'}.")
    (st.info if loop["retrain_every"] > 0 else st.caption)(loop["plan"])
    metrics_row(view.loop_figures(loop))
    st.caption(f"Last event: {loop['last_event'] or 'none yet'} · last model: {loop['last_model'] or 'none yet'}")


def progress(labeled: int, total: int, stats: dict[str, Any]) -> None:
    """Per-class progress from our database (labels pulled from Label Studio, or imported)."""
    st.progress(labeled / total if total else 0.0, text=f"{labeled} of {total} images labeled")
    classes = view.class_rows(stats)
    st.dataframe(
        pd.DataFrame(classes, columns=["name", "images", "boxes"]),
        key="label_classes",
        hide_index=True,
        column_config={"name": "class", "images": "labeled images", "boxes": "boxes"},
    )
    if classes:
        st.plotly_chart(view.boxes_figure(classes), key="label_classes_chart")
