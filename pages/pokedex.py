"""Pokédex page: drop a photo (or take one), pick a model, see the boxes and a dex entry card for each detection;
optionally the run's FP32 and INT8 models side by side with their latencies.

Thin on purpose: decoding, inference, drawing and the dex entries come from `backend.pokedex`, the models from
`backend.catalog` (the current project's best model by default: `catalog.best_model`), each listed with its own
validation mAP50; a model still learning (`backend.pokedex.still_learning`) carries a notice with what it finds and a
link to continue its training. The predictor is cached per (path, mtime) for the process, so a re-quantized model
loads again, and warmed up once when it loads, so the latencies shown are the steady state's; a photo's result is
cached per (photo, model, threshold), so moving a widget does not run the model again.
"""

from __future__ import annotations

import logging

import streamlit as st

from app.navigation import app_pages
from app.widgets import page_settings, project_picker, store_engine
from backend import catalog
from backend.inference import ModelFileError, Predictor
from backend.pokedex import (
    MAX_CARD_CROPS,
    DexEntry,
    PokedexResult,
    continue_training_params,
    detect,
    dex_entries,
    empty_result_hint,
    encode_display,
    nms_text,
    plain_entries,
    still_learning,
    still_learning_note,
)
from backend.processing import ImageLoadError
from backend.store.db import session_scope

logger = logging.getLogger(__name__)

UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp"]
CARDS_PER_ROW = 3
KIND_TITLE = {"int8": "INT8", "fp32": "FP32", "checkpoint": "PyTorch"}
LOWEST_CONF = 0.05


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def load_predictor(path: str, mtime: float) -> Predictor:
    """One predictor per model file version (`mtime` is only part of the key) for every session of the process, run
    once on a blank image before any photo: the first run of a session pays its set-up, and the latencies the page
    shows (FP32 against INT8 above all) are to be the steady state's."""
    predictor = Predictor.from_path(path)
    predictor.warm_up()
    return predictor


@st.cache_data(show_spinner="Looking…", max_entries=16)
def run_pokedex(
    image_bytes: bytes, name: str, path: str, mtime: float, conf: float, colours: tuple, _entries: list[DexEntry]
) -> tuple[PokedexResult, bytes]:
    """The detections of one photo with one model and threshold, and the drawn display copy as JPEG bytes."""
    result = detect(load_predictor(path, mtime), image_bytes, conf, entries=_entries, name=name)
    return result, encode_display(result.display)


def entries_for(database_url: str, class_names: list[str], project: str | None) -> list[DexEntry]:
    """The dex entries of the model's classes (the current project's first); names only when the database cannot be
    read (the page still works)."""
    try:
        with session_scope(store_engine(database_url)) as session:
            return dex_entries(session, class_names, project)
    except Exception:
        logger.exception("reading the dex entries failed")
        st.warning("Could not read the projects' dex entries: showing class names only.")
        return plain_entries(class_names)


def detect_with(
    model: catalog.ModelFile, photo: bytes, name: str, conf: float, entries: list[DexEntry]
) -> tuple[PokedexResult, bytes]:
    """`run_pokedex` keyed by what changes the picture: the photo, the model version, the threshold, the labels."""
    colours = tuple((entry.name, entry.colour) for entry in entries)
    return run_pokedex(photo, name, str(model.path), model.path.stat().st_mtime, conf, colours, entries)


def latency_text(result: PokedexResult) -> str:
    timings = result.timings
    return (
        f"model run {timings['infer_ms']:.0f} ms in {result.runtime} · total {timings['total_ms']:.0f} ms "
        f"(decode {timings['decode_ms']:.0f}, pre/post-processing {timings['predict_ms'] - timings['infer_ms']:.0f}, "
        f"drawing {timings['draw_ms']:.0f})"
    )


def continue_link(run: str) -> None:
    """The Train page, in this tab, set to continue `run`."""
    st.page_link(
        app_pages()["train"],
        label=f"Continue training {run}",
        icon=":material/model_training:",
        query_params=continue_training_params(run),
    )


def show_cards(result: PokedexResult, entries: list[DexEntry]) -> None:
    shown = min(len(result), MAX_CARD_CROPS)
    if len(result) > shown:
        st.caption(f"The {shown} most confident of {len(result)} detections.")
    for row_start in range(0, shown, CARDS_PER_ROW):
        columns = st.columns(CARDS_PER_ROW)
        for column, index in zip(columns, range(row_start, min(row_start + CARDS_PER_ROW, shown))):
            class_id, score = int(result.class_ids[index]), float(result.scores[index])
            entry = entries[class_id]  # the model only predicts its own classes
            with column.container(border=True):
                st.image(result.crops[index], width=96)
                st.markdown(f"**No. {entry.number:03d} · {entry.name}**")
                st.markdown(f"Confidence: **{score:.1%}**")
                missing = f"No dex entry yet: describe {entry.name} on the [Project](/project) page."
                st.caption(entry.description or missing)


st.title("Pokédex")
st.write("Drop a photo and your detector names what it sees, with the dex entry of each find.")
settings = page_settings()
engine = store_engine(settings.database_url)
project = project_picker(engine, key="pokedex_project")
runs = catalog.trained_runs(settings)
with session_scope(engine) as session:
    candidates = catalog.project_runs(session, settings, project, runs) if project else runs
if project and not catalog.list_models(runs=candidates) and catalog.list_models(runs=runs):
    st.info(
        f"{project} has no trained model yet: train one on the [Train](/train) page. Meanwhile, the models of "
        "other projects (they name their own classes)."
    )
    candidates = runs
models = catalog.list_models(runs=candidates)
if not models:
    st.info(
        "No model yet. Train one on the **Train** page ([Train](/train)), then shrink it to INT8 on the "
        "**Quantize** page ([Quantize](/quantize)): the Pokédex uses the project's best model.",
        icon=":material/info:",
    )
    st.stop()

run_of = {info.path: info for info in candidates}
by_path = {str(model.path): model for model in models}
choice = catalog.best_model(candidates)
default = str(choice.model.path) if choice else str(models[0].path)


def model_label(path: str) -> str:
    model = by_path[path]
    return run_of[model.path.parent].model_label(model)


chosen_path = st.selectbox(
    "Model",
    list(by_path),
    index=list(by_path).index(default),
    format_func=model_label,
    key=f"pokedex_model_{project}",  # per project: its own default
    help="The project's best model is the default: the highest validation mAP50-95, its INT8 model when that is "
    "within the quantization budget of FP32.",
)
if choice is not None:
    st.caption(f"Default: {choice.run.name} · {KIND_TITLE[choice.model.kind]}: {choice.reason}.")
model = by_path[chosen_path]
score = run_of[model.path.parent].model_score(model.kind)
notice = still_learning_note(score)
if notice:
    st.warning(notice, icon=":material/school:")
    continue_link(model.run)
controls = st.columns(3)
conf = controls[0].slider("Confidence threshold", LOWEST_CONF, 0.95, 0.25, 0.05, key="pokedex_conf")
compare = controls[1].toggle("Compare FP32 and INT8", key="pokedex_compare")
use_camera = controls[2].toggle("Use the camera", key="pokedex_use_camera")

try:
    # Loaded now, not on the first photo, so that the answer to an upload is inference only.
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
upload = st.file_uploader("Drop a photo", type=UPLOAD_TYPES, key="pokedex_upload")
photo = photo or upload
if photo is None:
    st.info("Drop a photo (JPEG, PNG, WebP or BMP, any size) or take one with the camera.")
    st.stop()

photo_bytes, photo_name = photo.getvalue(), photo.name
entries = entries_for(settings.database_url, predictor.class_names, project)
try:
    result, display = detect_with(model, photo_bytes, photo_name, conf, entries)
    pair = {}
    if compare:
        info = catalog.run_info(model.path.parent)
        pair = {kind: info.model(kind) for kind in ("fp32", "int8")} if info else {}
        if not all(pair.values()):
            st.info(f"Run {model.run} has no FP32 and INT8 pair to compare: quantize it on the **Quantize** page.")
            pair = {}
        # The pair shares the run's classes, so the chosen model's entries label both.
        pair = {kind: detect_with(file, photo_bytes, photo_name, conf, entries) for kind, file in pair.items()}
except ImageLoadError as error:
    st.error(str(error))
    st.stop()

height, width = result.original_size
if pair:
    columns = st.columns(2)
    for column, (kind, (found, image)) in zip(columns, pair.items()):
        with column:
            st.subheader(KIND_TITLE[kind])
            st.image(image, caption=f"{KIND_TITLE[kind]}: {len(found)} detections above {conf:.2f}", width="stretch")
            left, right = st.columns(2)
            left.metric(f"{KIND_TITLE[kind]} model run ({found.runtime})", f"{found.timings['infer_ms']:.0f} ms")
            right.metric(f"{KIND_TITLE[kind]} total", f"{found.timings['total_ms']:.0f} ms")
    ratio = pair["fp32"][0].timings["infer_ms"] / max(pair["int8"][0].timings["infer_ms"], 1e-6)
    st.caption(
        f"INT8 runs the model {ratio:.2f}x as fast as FP32 on this machine (this photo, each model warmed up "
        "once when it loaded)."
    )
else:
    st.image(
        display,
        caption=f"{photo_name} · {width}×{height} px · {len(result)} detections above {conf:.2f} · {model.label}",
    )
    st.caption(latency_text(result))
st.caption(f"Boxes: {nms_text(conf)}.")

st.subheader("Dex entries")
if len(result):
    show_cards(result, entries)
else:
    st.info(empty_result_hint(conf, LOWEST_CONF, score))
    if still_learning(score):
        continue_link(model.run)
