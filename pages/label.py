"""Label page: label a project's images in Label Studio, least confident first, and set the retrain loop.

Thin on purpose: every figure and action comes from `backend.labeling` (server state, sync, pull, pre-label, queue,
loop) and `backend.store.versions.class_stats`. Reading the page never needs Label Studio: the queue, the progress
and the loop come from our database, so a stopped server only disables the buttons that talk to it.

The labeling view is embedded only when the browser reaches the app and Label Studio on the same hostname: Label
Studio's session cookie is SameSite=Lax, so a cross-site iframe shows its login page (docs/label_studio.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from app.widgets import project_picker, store_engine
from backend import catalog
from backend.jobs import api as jobs
from backend.labeling import service
from backend.labeling.server import ServerStatus, credentials_path, labelstudio_url, load_or_create_credentials, status
from backend.settings import Settings, get_settings
from backend.store.db import describe_error, session_scope
from backend.store.models import Image, LabelingProject, Project
from backend.store.versions import class_stats

logger = logging.getLogger(__name__)

MESSAGE_KEY = "label_last_action"  # (project, level, text, title, job id or None) of the last button pressed
BANNERS = {"success": st.success, "info": st.info, "warning": st.warning, "error": st.error}
CURRENT_IMAGE_STATUSES = ("ok", "near_duplicate")  # the images class_stats counts
BIND_ALL_HOSTS = ("0.0.0.0", "::", "")


# ---------------------------------------------------------------------------------------------- helpers


def project_progress(engine: Engine, name: str) -> tuple[int, int, dict[str, Any], int | None]:
    """(images labeled, current images, class_stats of the project, the Label Studio view id or None)."""
    with session_scope(engine) as session:
        project = session.scalar(select(Project).where(Project.name == name))
        counts = select(func.count()).select_from(Image)
        counts = counts.where(Image.project_id == project.id, Image.status.in_(CURRENT_IMAGE_STATUSES))
        total = int(session.scalar(counts) or 0)
        labeled = int(session.scalar(counts.where(Image.labeled.is_(True))) or 0)
        link = session.get(LabelingProject, project.id)
        return labeled, total, class_stats(session, project), link.ls_view_id if link else None


def server_status(settings: Settings) -> ServerStatus:
    """`server.status`, never raising: a broken credentials file or an odd environment reads as misconfigured."""
    try:
        return status(settings)
    except Exception as error:
        logger.exception("Label Studio status check failed")
        return ServerStatus("misconfigured", labelstudio_url(settings), None, str(error), "fix the problem above")


def browser_location() -> tuple[str | None, str | None]:
    """(scheme, hostname) of the app as the browser sees it; (None, None) when unknown (e.g. under AppTest).

    `st.context.url` is the browser's own address bar; the Host header is the fallback (a reverse proxy may
    rewrite it, so it comes second).
    """
    url = st.context.url
    if url:
        parts = urlsplit(url)
        return parts.scheme or None, parts.hostname
    host = st.context.headers.get("host")
    return (None, urlsplit(f"//{host}").hostname) if host else (None, None)


def browser_ls_url(settings: Settings, browser_host: str | None) -> str:
    """The Label Studio URL a browser opens; a server bound to every interface is reached at the app's hostname."""
    url = labelstudio_url(settings)
    if settings.host in BIND_ALL_HOSTS:
        host = browser_host or "127.0.0.1"
        url = f"http://{f'[{host}]' if ':' in host else host}:{settings.ls_port}"
    return url


def can_embed(ls_url: str, browser_scheme: str | None, browser_host: str | None) -> bool:
    """Same hostname (the login cookie is SameSite=Lax), and no http frame inside an https page (mixed content)."""
    target = urlsplit(ls_url)
    if browser_host is None or target.hostname is None:
        return False
    if browser_scheme == "https" and target.scheme == "http":
        return False
    return browser_host.lower() == target.hostname.lower()


def model_choices(settings, engine: Engine, project: str) -> dict[str, Path]:
    """Label (with the model's own validation mAP50) → model for pre-labeling: the models of the project's trained
    runs (`catalog.trained_runs`: a run cancelled before it learned anything is no model), INT8 before FP32 before
    checkpoints, newest first."""
    with session_scope(engine) as session:
        runs = catalog.project_runs(session, settings, project, catalog.trained_runs(settings))
    run_of = {info.path: info for info in runs}
    return {
        run_of[model.path.parent].model_label(model): model.path for model in catalog.list_models(settings, runs=runs)
    }


def run_action(project: str, title: str, action: Callable[[], dict[str, Any]]) -> None:
    """Runs one Label Studio step with a spinner, keeps its summary (or error) for the next run, and reruns so
    every table below shows the new state. The banner's colour is the step's own "level", as `run_and_report`'s:
    "success" (the default), "info" (a job was queued: nothing has succeeded yet) or "warning"."""
    try:
        with st.spinner(f"{title}…"):
            result = action()
    except Exception as error:  # shown to the user: the page itself must keep working
        logger.exception("%s failed", title)
        st.session_state[MESSAGE_KEY] = (project, "error", f"{title} failed: {describe_error(error)}", title, None)
    else:
        level = result.get("level") if result.get("level") in BANNERS else "success"
        text = f"{title}: {result.get('summary') or 'finished'}"
        st.session_state[MESSAGE_KEY] = (project, level, text, title, result.get("job_id"))
    st.rerun()


def job_banner(title: str, job_id: int) -> tuple[str, str]:
    """(level, text) of a queued step's banner from its job's state now: it stays true while the job runs and ends."""
    follow = f"[Jobs](/jobs?job={job_id}) page"
    try:
        job = jobs.get_job(job_id, settings)
    except jobs.JobNotFound:  # another storage since: nothing to follow
        return "warning", f"{title}: job {job_id} is no longer in the jobs list"
    if job.state == "succeeded":
        result = job.result or {}
        level = result.get("level") if result.get("level") in BANNERS else "success"
        return level, f"{title}: {result.get('summary') or 'finished'} (job {job_id})"
    if job.active:
        return "info", f"{title}: job {job_id} is {job.state}: follow it on the {follow}"
    if job.state == "failed":
        return "error", f"{title} failed: {job.error or 'see the ' + follow}"
    return "warning", f"{title}: job {job_id} is {job.state}: see the {follow}"


# ---------------------------------------------------------------------------------------------- page

st.title("Label")
try:
    settings = get_settings()
except ValueError as error:
    st.error(f"yolodex settings: {error}")
    st.stop()
engine = store_engine(settings.database_url)
scheme, browser_host = browser_location()
ls_url = browser_ls_url(settings, browser_host)
server = server_status(settings)

# Label Studio state
if server.state == "running":
    st.success(f"Label Studio is running at {ls_url}.", icon=":material/check_circle:")
elif server.state == "starting":
    st.info(
        f"{server.message} Starting: the first start takes about two minutes, later ones about 15 seconds. "
        "This page updates itself when it is up."
    )

    @st.fragment(run_every=5.0)
    def wait_for_label_studio() -> None:
        if server_status(settings).state != "starting":
            st.rerun()  # the whole page: its buttons follow the new state

    wait_for_label_studio()
    st.button("Refresh", key="label_refresh", icon=":material/refresh:")
else:
    show = st.warning if server.state == "stopped" else st.error
    show(f"{server.message} To do: {server.action}." if server.action else server.message)
    if server.details:
        with st.expander("Label Studio log"):
            st.code(server.details, language=None)

# Login guidance
with st.expander("Log in to Label Studio", expanded=server.state == "running"):
    if credentials_path(settings).is_file():
        try:
            credentials = load_or_create_credentials(settings)
        except Exception as error:
            st.error(str(error))
        else:
            st.markdown(
                f"Log in once in this browser at [{ls_url}/user/login/]({ls_url}/user/login/); the labeling view "
                f"below needs that session. Email: `{credentials.email}`"
            )
            if settings.listens_beyond_loopback:
                # Other machines may reach this page (issue 19): the password stays in its file.
                st.info(
                    f"The password is not shown here because the app listens beyond this machine "
                    f"(YOLODEX_HOST={settings.host}). Read it in {credentials_path(settings)} on the machine that "
                    "runs yolodex: the file is readable only by the account that runs it (mode 0600).",
                    icon=":material/lock:",
                )
            else:
                if st.toggle("Show password", key="label_show_password"):
                    st.code(credentials.password, language=None)
                st.caption(f"Your own local login, kept readable only by you in {credentials_path(settings)}.")
    else:
        st.write("The login is created when Label Studio starts for the first time (`yolodex labelstudio start`).")

project = project_picker(engine, key="label_project")  # None: it says where to create one
if project is None:
    st.stop()
loop = service.loop(project, settings=settings)
synced = loop["synced"]

# Actions
offline = None if server.ok else "Label Studio is not running"
sync_col, pull_col, model_col, prelabel_col = st.columns([1, 1, 2, 1], vertical_alignment="bottom")
if sync_col.button("Sync to Label Studio", key="label_sync", disabled=not server.ok, help=offline):
    run_action(project, "Sync", lambda: service.sync(project, settings))
pull_off = offline or (None if synced else "sync the project first")
if pull_col.button("Pull labels", key="label_pull", disabled=pull_off is not None, help=pull_off):
    run_action(project, "Pull", lambda: service.pull(project, settings))
models = model_choices(settings, engine, project)
model = model_col.selectbox("Model", list(models), key="label_model", placeholder="no trained model yet")
prelabel_off = pull_off or (None if model else "train a model first")


def queue_prelabel(model_path: Path) -> dict[str, Any]:
    """Pre-labeling runs the model on every unlabeled task (minutes on a CPU): a job, so the page never waits."""
    job_id = jobs.submit("labeling_prelabel", {"project": project, "model": str(model_path)}, settings=settings)
    job = jobs.get_job(job_id, settings)
    if job.state == "failed":  # refused at once, or run inline by an immediate queue
        raise RuntimeError(job.error or "the pre-label job failed")
    return {"job_id": job_id}  # the banner follows the job (`job_banner`)


if prelabel_col.button("Pre-label", key="label_prelabel", disabled=prelabel_off is not None, help=prelabel_off):
    run_action(project, "Pre-label", lambda: queue_prelabel(models[model]))
last = st.session_state.get(MESSAGE_KEY)
if last and last[0] == project:
    level, text = job_banner(last[3], last[4]) if last[4] is not None else last[1:3]
    BANNERS[level](text)

labeled, total, stats, view_id = project_progress(engine, project)
if not synced:
    st.info(f"{project!r} is not in Label Studio yet: press **Sync to Label Studio** to create its labeling project.")
else:
    # The labeling view
    st.header("Labeling view")
    view_url = f"{ls_url}/projects/{loop['ls_project_id']}/data" + (f"?tab={view_id}" if view_id else "")
    if server.ok and can_embed(ls_url, scheme, browser_host):
        st.iframe(view_url, height=850)
    elif server.ok:
        st.caption(
            "The labeling view opens in its own tab: it can be embedded here only when the browser reaches the app "
            f"and Label Studio on the same hostname (the app: {browser_host or 'unknown'}; Label Studio: "
            f"{urlsplit(ls_url).hostname})."
        )
    st.link_button("Open Label Studio in a new tab", view_url, icon=":material/open_in_new:", disabled=not server.ok)

    # Least-confident-first queue
    st.header("Next to label")
    limit = st.number_input("Show", min_value=1, max_value=500, value=20, step=10, key="label_queue_limit")
    queue = service.queue(project, int(limit), settings=settings)
    if queue["items"]:
        table = pd.DataFrame(queue["items"])[["url", "uncertainty", "model_version", "image_id"]]
        table["url"] = table["url"].str.replace(labelstudio_url(settings), ls_url, regex=False)
        st.dataframe(
            table,
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

    # The retrain loop: off until the user turns it on; the plan says what it will do, with the real values.
    st.header("Retrain loop")
    options = loop["settings"]
    starts = service.loop_start_choices(options, settings)
    with st.form(key=f"label_loop_form_{project}"):
        every_col, minutes_col, epochs_col, imgsz_col = st.columns(4)
        every = every_col.number_input(
            "Retrain every N new labels (0 = off)",
            min_value=0,
            step=5,
            value=int(loop["retrain_every"]),
            key=f"label_retrain_every_{project}",
        )
        minutes = minutes_col.number_input(
            "Minutes per retrain (0 = no limit)",
            min_value=0.0,
            max_value=24 * 60.0,
            step=5.0,
            value=float(options["time_minutes"] or 0.0),
            key=f"label_minutes_{project}",
        )
        epochs = epochs_col.number_input(
            "Epochs per retrain (at most)",
            min_value=1,
            max_value=300,
            value=int(options["epochs"]),
            key=f"label_epochs_{project}",
        )
        imgsz = imgsz_col.number_input(
            "Input size (px)",
            min_value=64,
            max_value=1280,
            step=32,
            value=int(options["imgsz"]),
            key=f"label_imgsz_{project}",
        )
        start = st.selectbox(
            "Start each retrain from",
            list(starts),
            index=list(starts).index(service.start_choice_of(options["start_weights"])),
            format_func=starts.get,
            key=f"label_start_{project}",
        )
        if st.form_submit_button("Save loop settings", key="label_loop_save"):
            try:
                loop = service.loop(
                    project,
                    retrain_every=int(every),
                    epochs=int(epochs),
                    imgsz=int(imgsz),
                    time_minutes=float(minutes) or None,
                    start_weights=service.start_weights_of(start),
                    settings=settings,
                )
            except ValueError as error:
                st.error(str(error))
            else:
                st.success(f"Saved: the loop is {'on' if loop['retrain_every'] > 0 else 'off'}.")
    (st.info if loop["retrain_every"] > 0 else st.caption)(loop["plan"])
    due = loop["annotations_at_retrain"] + loop["retrain_every"] if loop["retrain_every"] > 0 else None
    state_col, labeled_col, due_col = st.columns(3)
    state_col.metric("Loop state", "off" if due is None and loop["state"] == "idle" else loop["state"])
    labeled_col.metric("Labeled in Label Studio (last pull)", loop["labeled"])
    due_col.metric("Next retrain at", "off" if due is None else f"{due} labeled")
    st.caption(f"Last event: {loop['last_event'] or 'none yet'} · last model: {loop['last_model'] or 'none yet'}")

# Per-class progress (our database: labels pulled from Label Studio, or imported)
st.header("Progress")
st.progress(labeled / total if total else 0.0, text=f"{labeled} of {total} images labeled")
classes = pd.DataFrame(stats["classes"], columns=["name", "images", "boxes"])
st.dataframe(
    classes,
    key="label_classes",
    hide_index=True,
    column_config={"name": "class", "images": "labeled images", "boxes": "boxes"},
)
if not classes.empty:
    chart = go.Figure(go.Bar(x=classes["name"], y=classes["boxes"]))
    chart.update_layout(height=300, margin={"t": 30, "b": 0}, title="Boxes per class", yaxis_title="boxes")
    st.plotly_chart(chart, key="label_classes_chart")
