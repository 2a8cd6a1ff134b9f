"""Jobs page: every background job, paged and filtered by kind, state and project, with who started it, state,
progress, duration, ETA and times; the selected job's parameters, log tail, result, error and traceback, with Cancel
and Resume. Rows and words come from `backend.views.jobs`. The selected job stays in `?job=` so a reload keeps it;
the table and the selected job refresh themselves only while a job on the page is active."""

import pandas as pd
import streamlit as st

from app.widgets import page_settings, project_names, run_and_report, show_outcome, store_engine
from backend.jobs import api as jobs
from backend.views import jobs as view

JOB_PARAM = "job"
REFRESH_S = 2.0
LOG_LINES = 60
SELECTED_KEY = "jobs_selected"
SHOWN_LABEL_KEY = "jobs_selected_label"  # the selected job's label as last sent to the browser
NO_JOB_YET = "No job yet: imports, training, evaluation and quantization started from the other pages run here."

st.title("Jobs")
settings = page_settings()
engine = store_engine(settings.database_url)
show_outcome("jobs_outcome")

left, middle, right, last = st.columns([2, 2, 2, 1])
kind = view.chosen(left.selectbox("Kind", [view.ALL, *jobs.JOB_KINDS], key="jobs_kind"))
state = view.chosen(middle.selectbox("State", [view.ALL, *jobs.JOB_STATES], key="jobs_state"))
project = view.chosen(right.selectbox("Project", [view.ALL, *project_names(engine)], key="jobs_project"))
pages = max(1, -(-view.count(settings, kind, state, project) // view.PER_PAGE))
page = int(last.number_input(f"Page (of {pages})", 1, pages, 1, key="jobs_page"))
shown, total = view.page_of_jobs(settings, kind, state, project, page)
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
    current, _ = view.page_of_jobs(settings, kind, state, project, page)
    if not current:
        st.info("No job matches these filters." if total or kind or state or project else NO_JOB_YET)
        return
    st.caption(f"{total} jobs; page {page} of {pages}.")
    progress = st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0)
    table = pd.DataFrame(view.table_rows(current), columns=view.COLUMNS)
    st.dataframe(table, hide_index=True, key="jobs_table", column_config={"progress": progress})
    if watching and {job.id for job in current if job.active} != active_ids:
        st.rerun()  # a job started or ended: the whole page (selector, buttons, result) follows


job_table()
if selected is None:
    st.stop()

choices = [job.id for job in shown]
if selected.id not in choices:
    choices.insert(0, selected.id)
labels = {job.id: view.job_label(job) for job in shown} | {selected.id: view.job_label(selected)}
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


def cancel() -> None:
    run_and_report(f"Cancel job {selected.id}", lambda: view.cancel(settings, selected.id), state_key="jobs_outcome")


def resume() -> None:
    result = run_and_report(
        f"Resume job {selected.id}", lambda: view.resume(settings, selected.id), state_key="jobs_outcome"
    )
    if result is not None:
        st.query_params[JOB_PARAM] = str(result["job_id"])
        st.session_state.pop(SELECTED_KEY, None)  # the new job is selected, not the one the box remembers


left, right, _ = st.columns([1, 1, 4])
left.button("Cancel", disabled=not selected.active, on_click=cancel, key="jobs_cancel")
help_text = "a new training job that continues from the run's last.pt"
right.button("Resume", disabled=not selected.can_resume, on_click=resume, key="jobs_resume", help=help_text)


@st.fragment(run_every=REFRESH_S if selected.active else None)
def job_live() -> None:
    current = jobs.get_job(selected.id, settings)
    st.progress(min(1.0, max(0.0, current.progress or 0.0)), text=view.progress_text(current))
    st.caption(view.details(current))
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
