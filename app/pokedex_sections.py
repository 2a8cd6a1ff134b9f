"""The Pokédex page's sections: the model picker and loader, the photo input, the detections (one model, or FP32
and INT8 side by side with their latencies) and the dex entry cards. Plain functions the page calls in order; the
models and entries come from `backend.views.pokedex`, decoding, inference and drawing from `backend.pokedex`.

The predictor is cached per (path, mtime) and warmed up once when it loads, so the latencies shown are the steady
state's; a photo's result is cached per (photo, model, threshold), so moving a widget does not run the model again."""

from __future__ import annotations

from typing import Any

import streamlit as st

from app.navigation import app_pages
from backend import catalog
from backend import pokedex as dex
from backend.inference import ModelFileError, Predictor
from backend.pokedex import DexEntry, PokedexResult
from backend.views import pokedex as view
from backend.views.pokedex import KIND_TITLE

UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp"]
CARDS_PER_ROW = 3


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


def model_picker(choices: view.ModelChoices, project: str | None) -> str:
    """The Model select box (its own default per project) and why the default is the default; the chosen path."""
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
    return chosen_path


def load_model(model: catalog.ModelFile) -> Predictor:
    """The model's predictor, loaded now (not on the first photo) so that the answer to an upload is inference
    only; a file that cannot load is one error with the way out, and the page stops there."""
    try:
        return load_predictor(str(model.path), model.path.stat().st_mtime)
    except ModelFileError as error:  # damaged, truncated or not exported by yolodex: another file is the way out
        st.error(
            f"Could not load {model.path.name}: {error}. Pick another model above, or export the run again on the "
            "**Quantize** page."
        )
    except Exception as error:  # anything else about the file: say so, keep the page
        st.error(f"Could not load {model.path.name}: {error}")
    st.stop()
    raise AssertionError("st.stop() raises")  # keeps type checkers honest


def photo_input(use_camera: bool) -> Any:
    """The camera (when asked for) or the uploader; the photo, or None when there is none yet."""
    photo = st.camera_input("Take a photo", key="pokedex_camera") if use_camera else None
    return photo or st.file_uploader("Drop a photo", type=UPLOAD_TYPES, key="pokedex_upload")


def render_comparison(compared: dict[str, tuple[PokedexResult, bytes]], conf: float) -> None:
    """FP32 and INT8 side by side: each model's picture, its model-run and total latency, and the speed-up."""
    for column, (kind, (found, image)) in zip(st.columns(2), compared.items()):
        with column:
            st.subheader(KIND_TITLE[kind])
            st.image(image, caption=f"{KIND_TITLE[kind]}: {len(found)} detections above {conf:.2f}", width="stretch")
            left, right = st.columns(2)
            left.metric(f"{KIND_TITLE[kind]} model run ({found.runtime})", f"{found.timings['infer_ms']:.0f} ms")
            right.metric(f"{KIND_TITLE[kind]} total", f"{found.timings['total_ms']:.0f} ms")
    st.caption(view.speedup_text({kind: found for kind, (found, _) in compared.items()}))


def render_single(result: PokedexResult, display: bytes, photo: Any, conf: float, model: catalog.ModelFile) -> None:
    """The one model's picture with what was found, and where its time went."""
    height, width = result.original_size
    caption = f"{photo.name} · {width}×{height} px · {len(result)} detections above {conf:.2f} · {model.label}"
    st.image(display, caption=caption)
    st.caption(view.latency_text(result))


def show_cards(result: PokedexResult, entries: list[DexEntry]) -> None:
    """A dex entry card per detection (the most confident first, at most `dex.MAX_CARD_CROPS`), a row of three."""
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
