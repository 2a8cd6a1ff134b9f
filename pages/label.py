"""Label page: label a project's images in Label Studio, least confident first, and set the retrain loop. Figures and
actions come from `backend.views.label` and `backend.labeling.service`, the sections from `app.label_sections`; a
stopped server only disables the buttons that talk to it. The labeling view is embedded only when the browser reaches
the app and Label Studio on the same hostname: Label Studio's session cookie is SameSite=Lax, so a cross-site iframe
shows its login page (docs/label_studio.md)."""

from __future__ import annotations

import streamlit as st

from app import label_sections as sections
from app.widgets import page_settings, project_picker, store_engine
from backend.labeling import service
from backend.views import label as view

st.title("Label")
settings = page_settings()
engine = store_engine(settings.database_url)
scheme, browser_host = sections.browser_location()
ls_url = view.browser_ls_url(settings, browser_host)
server = view.server_status(settings)
sections.server_state(settings, server, ls_url)
sections.login_help(settings, server, ls_url)

project = project_picker(engine, key="label_project")  # None: it says where to create one
if project is None:
    st.stop()
loop = service.loop(project, settings=settings)
sections.actions(settings, project, loop, server)

labeled, total, stats, view_id = view.project_progress(settings, project)
if not loop["synced"]:
    st.info(f"{project!r} is not in Label Studio yet: press **Sync to Label Studio** to create its labeling project.")
else:
    st.header("Labeling view")
    view_url = view.labeling_view_url(ls_url, loop, view_id)
    sections.labeling_view(ls_url, view_url, server, scheme, browser_host)
    st.header("Next to label")
    sections.next_to_label(settings, project, ls_url)
    # The retrain loop: off until the user turns it on; the plan says what it will do, with the real values.
    st.header("Retrain loop")
    sections.retrain_loop(settings, project, loop)

# Per-class progress (our database: labels pulled from Label Studio, or imported)
st.header("Progress")
sections.progress(labeled, total, stats)
