"""Jobs page: every background job (import, crawl, labeling, train, evaluate, quantize), paged and filtered by kind,
state and project, each with its project, who started it ("you", or the app itself: "retrain loop"), state,
progress, duration, ETA and times; the selected job's parameters, log tail, result, error and traceback, with Cancel
(queued or running) and Resume (an interrupted, cancelled or failed training).

Thin on purpose: everything comes from `backend.jobs.api`. The selected job stays in `?job=` so a reload keeps it.
The table and the selected job refresh themselves (a timed fragment) only while a job on the page is active.
"""

from datetime import datetime

import pandas as pd
import streamlit as st

from app.widgets import page_settings, project_names, run_and_report, show_outcome, store_engine
from backend.jobs import api as jobs

JOB_PARAM = "job"
PER_PAGE = 20
REFRESH_S = 2.0
LOG_LINES = 60
ALL = "all"
SELECTED_KEY = "jobs_selected"
SHOWN_LABEL_KEY = "jobs_selected_label"  # the selected job's label as last sent to the browser
NO_JOB_YET = "No job yet: imports, training, evaluation and quantization started from the other pages run here."


def when(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def job_duration(job: "jobs.JobView") -> str:
    """Queued: how long it has waited; running: how long so far; ended: finished − started."""
    seconds = job.duration_s()
    if seconds is None:
        return "never started"
    return {"queued": f"{duration(seconds)} waiting", "running": f"{duration(seconds)} so far"}.get(
        job.state, duration(seconds)
    )


COLUMNS = ["id", "kind", "project", "started by", "state", "progress", "message", "duration", "ETA", "created",
           "started", "finished"]  # fmt: skip


def table_rows(views: list["jobs.JobView"]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "id": job.id, "kind": job.kind, "project": job.project or "", "started by": job.started_by,
                "state": job.state, "progress": job.progress, "message": job.message, "duration": job_duration(job),
                "ETA": duration(job.eta_s) if job.active else "", "created": when(job.created_at),
                "started": when(job.started_at), "finished": when(job.finished_at),
            }
            for job in views
        ],
        columns=COLUMNS,
    )  # fmt: skip


def job_label(job: "jobs.JobView") -> str:
    project = f" · {job.project}" if job.project else ""
    by = "" if job.started_by == jobs.STARTED_BY_USER else f" · by the {job.started_by}"
    return f"{job.id} · {job.kind}{project} · {job.state}{by}"


def page_of_jobs(kind: str | None, state: str | None, project: str | None, page: int) -> tuple[list, int]:
    """The jobs on `page` (1-based) and how many match the filters, newest first."""
    states = None if state is None else (state,)
    total = jobs.count_jobs(settings, kind=kind, project=project, states=states)
    views = jobs.list_jobs(settings, kind=kind, project=project, states=states, limit=PER_PAGE,
                           offset=(page - 1) * PER_PAGE)  # fmt: skip
    return views, total


st.title("Jobs")
settings = page_settings()
engine = store_engine(settings.database_url)
show_outcome("jobs_outcome")

left, middle, right, last = st.columns([2, 2, 2, 1])
kind_choice = left.selectbox("Kind", [ALL, *jobs.JOB_KINDS], key="jobs_kind")
state_choice = middle.selectbox("State", [ALL, *jobs.JOB_STATES], key="jobs_state")
project_choice = right.selectbox("Project", [ALL, *project_names(engine)], key="jobs_project")
kind = None if kind_choice == ALL else kind_choice
state = None if state_choice == ALL else state_choice
project = None if project_choice == ALL else project_choice
total = (
    jobs.count_jobs(settings, kind=kind, project=project) if state is None else page_of_jobs(kind, state, project, 1)[1]
)
pages = max(1, -(-total // PER_PAGE))
page = int(last.number_input(f"Page (of {pages})", 1, pages, 1, key="jobs_page"))
shown, total = page_of_jobs(kind, state, project, page)
active_ids = {job.id for job in shown if job.active}

# The selected job: ?job= (it may be on another page), else the newest shown.
selected = None
wanted = st.query_params.get(JOB_PARAM)
if wanted and wanted.isdigit():
    try:
        selected = jobs.get_job(int(wanted), settings)
    except ValueError:
        st.warning(f"There is no job {wanted}.")
if selected is None and shown:
    selected = shown[0]
watching = bool(active_ids) or (selected is not None and selected.active)


@st.fragment(run_every=REFRESH_S if watching else None)
def job_table() -> None:
    current, _ = page_of_jobs(kind, state, project, page)
    if not current:
        filtered = total or kind or state or project
        st.info("No job matches these filters." if filtered else NO_JOB_YET)
        return
    st.caption(f"{total} jobs; page {page} of {pages}.")
    st.dataframe(
        table_rows(current), hide_index=True, key="jobs_table",
        column_config={"progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0)},
    )  # fmt: skip
    if watching and {job.id for job in current if job.active} != active_ids:
        st.rerun()  # a job started or ended: the whole page (selector, buttons, result) follows


job_table()
if selected is None:
    st.stop()

choices = [job.id for job in shown]
if selected.id not in choices:
    choices.insert(0, selected.id)
labels = {job.id: job_label(job) for job in shown} | {selected.id: job_label(selected)}
# The browser keeps the label it was last sent for the selected job, and Streamlit sends it again only when the
# value changes: after a Cancel (or when a job ends) the box would still read "running". Setting the value again
# whenever the selected job's label changed sends the new one. It also selects the ?job= job on a first visit.
held = st.session_state.get(SELECTED_KEY)
if held not in labels or st.session_state.get(SHOWN_LABEL_KEY) != labels[held]:
    st.session_state[SELECTED_KEY] = held if held in labels else selected.id
chosen = st.selectbox("Job", choices, format_func=labels.get, key=SELECTED_KEY)
st.session_state[SHOWN_LABEL_KEY] = labels[chosen]
if chosen != selected.id:
    selected = jobs.get_job(chosen, settings)
if st.query_params.get(JOB_PARAM) != str(selected.id):
    st.query_params[JOB_PARAM] = str(selected.id)


def cancel_outcome(job: "jobs.JobView") -> dict:
    """The banner after Cancel, from the job's state once cancel returned."""
    if job.state == "cancelled":
        return {"summary": f"job {job.id} is cancelled.", "level": "success"}
    if job.active:
        return {"summary": f"job {job.id} is {job.state}, cancel requested: it stops at its next step.",
                "level": "info"}  # fmt: skip
    return {"summary": f"job {job.id} had already ended ({job.state}): nothing to cancel.", "level": "warning"}


def cancel() -> None:
    run_and_report(f"Cancel job {selected.id}", lambda: cancel_outcome(jobs.cancel(selected.id, settings)),
                   state_key="jobs_outcome")  # fmt: skip


def resume() -> None:
    def queue_resume() -> dict:
        new = jobs.get_job(jobs.resume(selected.id, settings), settings)
        return {"summary": f"job {new.id} is {new.state}: it continues this training.", "job_id": new.id,
                "level": "info" if new.active else ("success" if new.state == "succeeded" else "warning")}  # fmt: skip

    result = run_and_report(f"Resume job {selected.id}", queue_resume, state_key="jobs_outcome")
    if result is not None:
        st.query_params[JOB_PARAM] = str(result["job_id"])
        st.session_state.pop(SELECTED_KEY, None)  # the new job is selected, not the one the box remembers


left, right, _ = st.columns([1, 1, 4])
left.button("Cancel", disabled=not selected.active, on_click=cancel, key="jobs_cancel")
right.button("Resume", disabled=not selected.can_resume, on_click=resume, key="jobs_resume",
             help="a new training job that continues from the run's last.pt")  # fmt: skip


@st.fragment(run_every=REFRESH_S if selected.active else None)
def job_live() -> None:
    current = jobs.get_job(selected.id, settings)
    eta = f" · ETA {duration(current.eta_s)}" if current.active and current.eta_s is not None else ""
    cancelling = " · cancel requested" if current.cancel_requested and current.active else ""
    st.progress(min(1.0, max(0.0, current.progress or 0.0)),
                text=f"job {current.id} {current.state}: {current.message or ''}{eta}{cancelling}")  # fmt: skip
    worker = ""
    if current.worker_pid is not None:
        worker = f" · worker pid {current.worker_pid} on {current.worker_host or '?'}"
        if current.state == "running" and current.heartbeat_at is not None:
            silent = (datetime.now(current.heartbeat_at.tzinfo) - current.heartbeat_at).total_seconds()
            worker += f", last heartbeat {max(0, round(silent))} s ago"
    st.caption(
        f"started by {current.started_by} · project {current.project or '—'} · created {when(current.created_at)} · "
        f"started {when(current.started_at) or '—'} · finished {when(current.finished_at) or '—'} · "
        f"duration {job_duration(current)}{worker}"
    )
    st.code("\n".join(current.log_tail[-LOG_LINES:]) or "(no log yet)", language="text")
    if selected.active and not current.active:
        st.rerun()  # ended: show its result or error and settle the buttons


st.subheader(f"Job {selected.id}: {selected.kind}")
job_live()
if selected.state == "failed":
    st.error(selected.error or "the job failed")
    if selected.traceback:
        with st.expander("Traceback", expanded=True):
            st.code(selected.traceback, language="text")
left, right = st.columns(2)
with left:
    st.markdown("**Parameters**")
    st.json(selected.params, expanded=True)
with right:
    st.markdown("**Result**")
    if selected.result is None:
        st.caption("None yet." if selected.active else "None.")
    else:
        st.json(selected.result, expanded=1)
