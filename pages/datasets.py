"""Datasets page: add images (upload, crawl), browse them, class balance, augmentation, versions and exports; every
query and action is one call into `backend.views.datasets`, crawls and large imports run as jobs; the sections are
drawn by `app.datasets_sections`."""

from __future__ import annotations

import streamlit as st

from app import datasets_sections as sections
from app import widgets
from backend.views import datasets as view

st.title("Datasets")
settings = widgets.page_settings()
settings.ensure_dirs()
engine = widgets.store_engine(settings.database_url)
name = widgets.project_picker(engine, key="datasets_project")
if name is None:
    st.stop()
st.caption("A new project, with its classes, is created on the [Project](/project) page.")
widgets.show_outcome(sections.OUTCOME)

st.header("Add images")
sections.add_images(settings, name)

data = view.project_data(settings, name)
if data.project is None:
    known = ", ".join(widgets.project_names(engine)) or "none yet"
    st.info(f"Project {name!r} has no images yet: add some above (projects: {known}).")
    st.stop()
st.header("Images")
cards = sections.image_grid(settings, name, data)
st.header("Class statistics")
sections.class_statistics(data)
st.header("Augmentation preview")
sections.augmentation(settings, data, cards)
st.header("Versions")
sections.versions(settings, name, data)
