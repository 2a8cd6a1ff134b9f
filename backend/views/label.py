"""The Label page's data: Label Studio's state and address as the browser sees it, the project's labeling progress,
the models that can pre-label, the queue and the banners of queued steps. Reading never needs Label Studio: the
queue, the progress and the loop come from our database."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import plotly.graph_objects as go
from sqlalchemy import func, select

from backend import catalog
from backend.jobs import api as jobs
from backend.labeling import server, service
from backend.settings import Settings
from backend.store.db import session_scope, shared_engine
from backend.store.models import Image, LabelingProject, Project
from backend.store.versions import class_stats

logger = logging.getLogger(__name__)

LEVELS = ("success", "info", "warning", "error")
CURRENT_IMAGE_STATUSES = ("ok", "near_duplicate")  # the images class_stats counts
BIND_ALL_HOSTS = ("0.0.0.0", "::", "")


def project_progress(settings: Settings, name: str) -> tuple[int, int, dict[str, Any], int | None]:
    """(images labeled, current images, class_stats of the project, the Label Studio view id or None)."""
    with session_scope(shared_engine(settings.database_url)) as session:
        project = session.scalar(select(Project).where(Project.name == name))
        if project is None:
            raise ValueError(f"There is no project {name!r}.")
        counts = select(func.count()).select_from(Image)
        counts = counts.where(Image.project_id == project.id, Image.status.in_(list(CURRENT_IMAGE_STATUSES)))
        total = int(session.scalar(counts) or 0)
        labeled = int(session.scalar(counts.where(Image.labeled.is_(True))) or 0)
        link = session.get(LabelingProject, project.id)
        return labeled, total, class_stats(session, project), link.ls_view_id if link else None


def server_status(settings: Settings) -> server.ServerStatus:
    """`server.status`, never raising: a broken credentials file or an odd environment reads as misconfigured."""
    try:
        return server.status(settings)
    except Exception as error:
        logger.exception("Label Studio status check failed")
        return server.ServerStatus(
            "misconfigured", server.labelstudio_url(settings), None, str(error), "fix the problem above"
        )


def browser_ls_url(settings: Settings, browser_host: str | None) -> str:
    """The Label Studio URL a browser opens; a server bound to every interface is reached at the app's hostname."""
    url = server.labelstudio_url(settings)
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


def login_text(settings: Settings, ls_url: str) -> dict[str, Any]:
    """How to log in to Label Studio: {"error"} (the credentials cannot be read), {"missing"} (no login yet) or
    {"markdown", "password", "hidden"}: the password is shown only to a browser on this machine (issue 19)."""
    path = server.credentials_path(settings)
    if not path.is_file():
        return {
            "missing": "The login is created when Label Studio starts for the first time (`yolodex labelstudio start`)."
        }
    try:
        credentials = server.load_or_create_credentials(settings)
    except Exception as error:
        return {"error": str(error)}
    markdown = (
        f"Log in once in this browser at [{ls_url}/user/login/]({ls_url}/user/login/); the labeling view "
        f"below needs that session. Email: `{credentials.email}`"
    )
    if settings.listens_beyond_loopback:  # other machines may reach this page: the password stays in its file
        hidden = (
            f"The password is not shown here because the app listens beyond this machine "
            f"(YOLODEX_HOST={settings.host}). Read it in {path} on the machine that "
            "runs yolodex: the file is readable only by the account that runs it (mode 0600)."
        )
        return {"markdown": markdown, "hidden": hidden}
    caption = f"Your own local login, kept readable only by you in {path}."
    return {"markdown": markdown, "password": credentials.password, "caption": caption}


def model_choices(settings: Settings, project: str) -> dict[str, Path]:
    """Label (with the model's own validation mAP50) → model for pre-labeling: the models of the project's trained
    runs (`catalog.trained_runs`: a run cancelled before it learned anything is no model), INT8 before FP32 before
    checkpoints, newest first."""
    with session_scope(shared_engine(settings.database_url)) as session:
        runs = catalog.project_runs(session, settings, project, catalog.trained_runs(settings))
    run_of = {info.path: info for info in runs}
    return {
        run_of[model.path.parent].model_label(model): model.path for model in catalog.list_models(settings, runs=runs)
    }


def queue_prelabel(settings: Settings, project: str, model_path: Path) -> dict[str, Any]:
    """Pre-labeling runs the model on every unlabeled task (minutes on a CPU): a job, so the page never waits."""
    job_id = jobs.submit("labeling_prelabel", {"project": project, "model": str(model_path)}, settings=settings)
    job = jobs.get_job(job_id, settings)
    if job.state == "failed":  # refused at once, or run inline by an immediate queue
        raise RuntimeError(job.error or "the pre-label job failed")
    return {"job_id": job_id}  # the banner follows the job (`job_banner`)


def result_banner(title: str, result: dict[str, Any]) -> tuple[str, str]:
    """(level, text) of a step's banner: its own "level" ("success" by default) and summary."""
    level = result.get("level") if result.get("level") in LEVELS else "success"
    return str(level), f"{title}: {result.get('summary') or 'finished'}"


def job_banner(settings: Settings, title: str, job_id: int) -> tuple[str, str]:
    """(level, text) of a queued step's banner from its job's state now: it stays true while the job runs and ends."""
    follow = f"[Jobs](/jobs?job={job_id}) page"
    try:
        job = jobs.get_job(job_id, settings)
    except jobs.JobNotFound:  # another storage since: nothing to follow
        return "warning", f"{title}: job {job_id} is no longer in the jobs list"
    if job.state == "succeeded":
        level, text = result_banner(title, job.result or {})
        return level, f"{text} (job {job_id})"
    if job.active:
        return "info", f"{title}: job {job_id} is {job.state}: follow it on the {follow}"
    if job.state == "failed":
        return "error", f"{title} failed: {job.error or 'see the ' + follow}"
    return "warning", f"{title}: job {job_id} is {job.state}: see the {follow}"


def queue_rows(items: list[dict[str, Any]], settings: Settings, ls_url: str) -> list[dict[str, Any]]:
    """The least-confident-first queue as table rows, each task's link at the address the browser uses."""
    local = server.labelstudio_url(settings)
    return [
        {
            "url": item["url"].replace(local, ls_url),
            "uncertainty": item["uncertainty"],
            "model_version": item["model_version"],
            "image_id": item["image_id"],
        }
        for item in items
    ]


def labeling_view_url(ls_url: str, loop: dict[str, Any], view_id: int | None) -> str:
    """The project's data view in Label Studio at the address the browser uses, on the queue's own tab when it has
    one."""
    return f"{ls_url}/projects/{loop['ls_project_id']}/data" + (f"?tab={view_id}" if view_id else "")


def save_loop(settings: Settings, project: str, form: dict[str, Any], start: str) -> dict[str, Any]:
    """Saves the retrain loop form (`loop_fields`' values and the start choice); the loop as it is now. A bad value
    raises ValueError with the reason."""
    return service.loop(
        project,
        retrain_every=int(form["retrain_every"]),
        epochs=int(form["epochs"]),
        imgsz=int(form["imgsz"]),
        time_minutes=float(form["minutes"]) or None,
        start_weights=service.start_weights_of(start),
        settings=settings,
    )


def loop_figures(loop: dict[str, Any]) -> dict[str, Any]:
    """The retrain loop's three figures by label."""
    due = loop["annotations_at_retrain"] + loop["retrain_every"] if loop["retrain_every"] > 0 else None
    return {
        "Loop state": "off" if due is None and loop["state"] == "idle" else loop["state"],
        "Labeled in Label Studio (last pull)": loop["labeled"],
        "Next retrain at": "off" if due is None else f"{due} labeled",
    }


def class_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": row["name"], "images": row["images"], "boxes": row["boxes"]} for row in stats["classes"]]


def boxes_figure(rows: list[dict[str, Any]]) -> go.Figure:
    chart = go.Figure(go.Bar(x=[row["name"] for row in rows], y=[row["boxes"] for row in rows]))
    return chart.update_layout(height=300, margin={"t": 30, "b": 0}, title="Boxes per class", yaxis_title="boxes")


def loop_fields(loop: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """The retrain loop form's number fields: (name, label, number_input options with the saved value)."""
    options = loop["settings"]
    return [
        (
            "retrain_every",
            "Retrain every N new labels (0 = off)",
            {"min_value": 0, "step": 5, "value": int(loop["retrain_every"])},
        ),
        (
            "minutes",
            "Minutes per retrain (0 = no limit)",
            {"min_value": 0.0, "max_value": 24 * 60.0, "step": 5.0, "value": float(options["time_minutes"] or 0.0)},
        ),
        ("epochs", "Epochs per retrain (at most)", {"min_value": 1, "max_value": 300, "value": int(options["epochs"])}),
        ("imgsz", "Input size (px)", {"min_value": 64, "max_value": 1280, "step": 32, "value": int(options["imgsz"])}),
    ]


def server_banner(status: server.ServerStatus, ls_url: str) -> tuple[str, str, str | None]:
    """(level, text, icon) of Label Studio's state at the top of the page."""
    if status.state == "running":
        return "success", f"Label Studio is running at {ls_url}.", ":material/check_circle:"
    if status.state == "starting":
        wait = "the first start takes about two minutes, later ones about 15 seconds"
        return "info", f"{status.message} Starting: {wait}. This page updates itself when it is up.", None
    text = f"{status.message} To do: {status.action}." if status.action else status.message
    return ("warning" if status.state == "stopped" else "error"), text, None
