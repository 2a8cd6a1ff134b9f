"""Pokédex page: drop a photo (or take one), pick a model, see the boxes and a dex entry card for each detection;
optionally the run's FP32 and INT8 models side by side with their latencies. Decoding, inference and drawing come
from `backend.pokedex`, the models and entries from `backend.views.pokedex` (the project's best model by default).
The predictor is cached per (path, mtime) and warmed up once when it loads, so the latencies shown are the steady
state's; a photo's result is cached per (photo, model, threshold), so moving a widget does not run the model again."""

from __future__ import annotations

import streamlit as st

from app.navigation import app_pages
from app.widgets import page_settings, project_picker, store_engine
from backend import catalog
from backend import pokedex as dex
from backend.inference import ModelFileError, Predictor
from backend.pokedex import DexEntry, PokedexResult
from backend.processing import ImageLoadError
from backend.views import pokedex as view
from backend.views.pokedex import KIND_TITLE

UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp"]
CARDS_PER_ROW = 3
LOWEST_CONF = 0.05


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def load_predictor(path: str, mtime: float) -> Predictor:
    """One predictor per model file version (`mtime` is only part of the key) for every session of the process, run
    once on a blank image so the latencies shown (FP32 against INT8 above all) are the steady state's."""
    predictor = Predictor.from_path(path)
    predictor.warm_up()
    return predictor


@st.cache_data(show_spinner="Looking…", max_entries=16)
def run_pokedex(
    image_bytes: bytes, name: str, path: str, mtime: float, conf: float, colours: tuple, _entries: list[DexEntry]
) -> tuple[PokedexResult, bytes]:
    """The detections of one photo with one model and threshold, and the drawn display copy as JPEG bytes."""
    result = dex.detect(load_predictor(path, mtime), image_bytes, conf, entries=_entries, name=name)
    return result, dex.encode_display(result.display)


def detect_with(model: catalog.ModelFile, photo, conf: float, entries: list[DexEntry]) -> tuple[PokedexResult, bytes]:
    """`run_pokedex` keyed by what changes the picture: the photo, the model version, the threshold, the labels."""
    colours = tuple((entry.name, entry.colour) for entry in entries)
    mtime = model.path.stat().st_mtime
    return run_pokedex(photo.getvalue(), photo.name, str(model.path), mtime, conf, colours, entries)


def continue_link(run: str) -> None:
    """The Train page, in this tab, set to continue `run`."""
    st.page_link(
        app_pages()["train"],
        label=f"Continue training {run}",
        icon=":material/model_training:",
        query_params=dex.continue_training_params(run),
    )


def show_cards(result: PokedexResult, entries: list[DexEntry]) -> None:
    shown = min(len(result), dex.MAX_CARD_CROPS)
    if len(result) > shown:
        st.caption(f"The {shown} most confident of {len(result)} detections.")
    for row_start in range(0, shown, CARDS_PER_ROW):
        for column, index in zip(st.columns(CARDS_PER_ROW), range(row_start, min(row_start + CARDS_PER_ROW, shown))):
            entry = entries[int(result.class_ids[index])]  # the model only predicts its own classes
            with column.container(border=True):
                st.image(result.crops[index], width=96)
                st.markdown(f"**No. {entry.number:03d} · {entry.name}**")
                st.markdown(f"Confidence: **{float(result.scores[index]):.1%}**")
                st.caption(
                    entry.description or f"No dex entry yet: describe {entry.name} on the [Project](/project) page."
                )


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
paths = list(choices.models)
chosen_path = st.selectbox(
    "Model",
    paths,
    index=paths.index(choices.default),
    format_func=choices.label,
    key=f"pokedex_model_{project}",  # per project: its own default
    help="The project's best model is the default: the highest validation mAP50-95, its INT8 "
    "model when that is within the quantization budget of FP32.",
)
if default_text := choices.default_text():
    st.caption(default_text)
model, score = choices.models[chosen_path], choices.score(chosen_path)
if notice := dex.still_learning_note(score):
    st.warning(notice, icon=":material/school:")
    continue_link(model.run)
controls = st.columns(3)
conf = controls[0].slider("Confidence threshold", LOWEST_CONF, 0.95, 0.25, 0.05, key="pokedex_conf")
compare = controls[1].toggle("Compare FP32 and INT8", key="pokedex_compare")
use_camera = controls[2].toggle("Use the camera", key="pokedex_use_camera")
try:  # loaded now, not on the first photo, so that the answer to an upload is inference only
    predictor = load_predictor(str(model.path), model.path.stat().st_mtime)
except ModelFileError as error:  # damaged, truncated or not exported by yolodex: another file is the way out
    st.error(
        f"Could not load {model.path.name}: {error}. Pick another model above, or export the run again on the "
        "**Quantize** page."
    )
    st.stop()
except Exception as error:  # anything else about the file: say so, keep the page
    st.error(f"Could not load {model.path.name}: {error}")
    st.stop()

photo = st.camera_input("Take a photo", key="pokedex_camera") if use_camera else None
photo = photo or st.file_uploader("Drop a photo", type=UPLOAD_TYPES, key="pokedex_upload")
if photo is None:
    st.info("Drop a photo (JPEG, PNG, WebP or BMP, any size) or take one with the camera.")
    st.stop()
entries, readable = view.entries_for(settings, predictor.class_names, project)
if not readable:
    st.warning("Could not read the projects' dex entries: showing class names only.")
try:
    result, display = detect_with(model, photo, conf, entries)
    pair = view.comparison_pair(model) if compare else {}
    if compare and not pair:
        st.info(f"Run {model.run} has no FP32 and INT8 pair to compare: quantize it on the **Quantize** page.")
    # The pair shares the run's classes, so the chosen model's entries label both.
    compared = {kind: detect_with(file, photo, conf, entries) for kind, file in pair.items()}
except ImageLoadError as error:
    st.error(str(error))
    st.stop()

height, width = result.original_size
if compared:
    for column, (kind, (found, image)) in zip(st.columns(2), compared.items()):
        with column:
            st.subheader(KIND_TITLE[kind])
            st.image(image, caption=f"{KIND_TITLE[kind]}: {len(found)} detections above {conf:.2f}", width="stretch")
            left, right = st.columns(2)
            left.metric(f"{KIND_TITLE[kind]} model run ({found.runtime})", f"{found.timings['infer_ms']:.0f} ms")
            right.metric(f"{KIND_TITLE[kind]} total", f"{found.timings['total_ms']:.0f} ms")
    st.caption(view.speedup_text({kind: found for kind, (found, _) in compared.items()}))
else:
    caption = f"{photo.name} · {width}×{height} px · {len(result)} detections above {conf:.2f} · {model.label}"
    st.image(display, caption=caption)
    st.caption(view.latency_text(result))
st.caption(f"Boxes: {dex.nms_text(conf)}.")

st.subheader("Dex entries")
if len(result):
    show_cards(result, entries)
else:
    st.info(dex.empty_result_hint(conf, LOWEST_CONF, score))
    if dex.still_learning(score):
        continue_link(model.run)
