"""Pokédex page: drop a photo (or take one), pick a model, see the boxes and a dex entry card for each detection;
optionally the run's FP32 and INT8 models side by side with their latencies. The models and entries come from
`backend.views.pokedex` (the project's best model by default), decoding, inference and drawing from
`backend.pokedex`; the sections, with the cached predictor and results, are drawn by `app.pokedex_sections`."""

from __future__ import annotations

import streamlit as st

from app import pokedex_sections as sections
from app.widgets import page_settings, project_picker, store_engine
from backend import pokedex as dex
from backend.processing import ImageLoadError
from backend.views import pokedex as view

LOWEST_CONF = 0.05

st.title("Pokédex")
st.write("Drop a photo and your detector names what it sees, with the dex entry of each find.")
settings = page_settings()
project = project_picker(store_engine(settings.database_url), key="pokedex_project")
choices = view.model_choices(settings, project)
if choices.others:
    st.info(
        f"{project} has no trained model yet: train one on the [Train](/train) page. Meanwhile, the models of "
        "other projects (they name their own classes)."
    )
if not choices.models:
    st.info(
        "No model yet. Train one on the **Train** page ([Train](/train)), then shrink it to INT8 on the "
        "**Quantize** page ([Quantize](/quantize)): the Pokédex uses the project's best model.",
        icon=":material/info:",
    )
    st.stop()
chosen_path = sections.model_picker(choices, project)
model, score = choices.models[chosen_path], choices.score(chosen_path)
if notice := dex.still_learning_note(score):
    st.warning(notice, icon=":material/school:")
    sections.continue_link(model.run)
controls = st.columns(3)
conf = controls[0].slider("Confidence threshold", LOWEST_CONF, 0.95, 0.25, 0.05, key="pokedex_conf")
compare = controls[1].toggle("Compare FP32 and INT8", key="pokedex_compare")
use_camera = controls[2].toggle("Use the camera", key="pokedex_use_camera")
predictor = sections.load_model(model)

photo = sections.photo_input(use_camera)
if photo is None:
    st.info("Drop a photo (JPEG, PNG, WebP or BMP, any size) or take one with the camera.")
    st.stop()
entries, readable = view.entries_for(settings, predictor.class_names, project)
if not readable:
    st.warning("Could not read the projects' dex entries: showing class names only.")
try:
    result, display = sections.detect_with(model, photo, conf, entries)
    pair = view.comparison_pair(model) if compare else {}
    if compare and not pair:
        st.info(f"Run {model.run} has no FP32 and INT8 pair to compare: quantize it on the **Quantize** page.")
    # The pair shares the run's classes, so the chosen model's entries label both.
    compared = {kind: sections.detect_with(file, photo, conf, entries) for kind, file in pair.items()}
except ImageLoadError as error:
    st.error(str(error))
    st.stop()

if compared:
    sections.render_comparison(compared, conf)
else:
    sections.render_single(result, display, photo, conf, model)
st.caption(f"Boxes: {dex.nms_text(conf)}.")

st.subheader("Dex entries")
if len(result):
    sections.show_cards(result, entries)
else:
    st.info(dex.empty_result_hint(conf, LOWEST_CONF, score))
    if dex.still_learning(score):
        sections.continue_link(model.run)
