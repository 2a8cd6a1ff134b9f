"""The Pokédex: one photo in, its detections out, drawn on a display-sized copy, each with its dex entry.

Large photos are the common case (a phone's 4000x3000 JPEG) and the page must answer in well under two seconds, so
the full-size pixels are never needed: a JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself (PIL `draft`,
which scales in the DCT and costs a fraction of a full decode) down to the smallest size that still feeds the model
input and the display copy without upscaling, and boxes are drawn on the display copy only. Other formats are
decoded whole, under the store's pixel cap (50 MP): a small PNG that declares 13000x13000 pixels is refused from
its header instead of costing 2.5 GB.

Box spaces: `PokedexResult.boxes` are xyxy in original-image pixels (the full-size photo after EXIF orientation,
x2/y2 the right/bottom pixel edges, as everywhere in yolodex); `draw_detections` takes the same boxes and a
`scale` that maps them onto the image it draws on (display pixels = original pixels · scale).

The model's class names are matched to a project's classes by name (`dex_entries`): the project whose class names
equal the model's lends its dex numbers, descriptions and colours; otherwise an entry has the name only.

Post-processing is the evaluation's (`backend.training.engine.EVAL_POSTPROCESS`: class-aware NMS at IoU 0.7, every
class above the threshold a candidate, at most 300 detections) with the page's confidence threshold: the boxes the
page shows are the ones the validation mAP was measured on, above that threshold.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend.catalog import ModelScore
from backend.inference import Predictor
from backend.inference import decode_photo as decode_capped
from backend.palette import palette_rgb as palette_colour
from backend.processing import PostprocessConfig
from backend.store.models import Project, project_classes
from backend.training.engine import EVAL_POSTPROCESS

# px: wide enough for the page's main column, small enough to encode fast, and ≤ 1000 so that a phone's
# 4000x3000 (or 4032x3024) JPEG decodes at 1/4 scale.
DEFAULT_DISPLAY_MAX_SIDE = 960
MAX_CARD_CROPS = 24  # the page shows at most this many entry cards; crops are made for those only
CROP_MAX_SIDE = 160
# A validation mAP50 under this: the model is still learning (docs/model_readiness.md). At 0.3 a detector misses or
# misplaces most objects of a new photo; the same model trained a few more minutes is usually past it.
STILL_LEARNING_MAP50 = 0.3
CONTINUE_PARAM = "continue"  # /train?continue=<run folder name>: the Train page continues that run


@dataclass(frozen=True)
class DexEntry:
    """The Pokédex entry of one model class.

    Attributes:
        index: the model's class index.
        number: the dex number shown (the project's `dex_number`, else index + 1).
        name: the class name.
        description: the project's description ("" without a matching project).
        colour: (r, g, b) for the boxes: the project's colour, else the palette colour of the index.
        project: the project the entry comes from, None when no project has the model's classes.
    """

    index: int
    number: int
    name: str
    description: str
    colour: tuple[int, int, int]
    project: str | None = None


@dataclass
class PokedexResult:
    """The detections of one photo and what the page shows of them.

    Attributes:
        boxes: (N, 4) float32 xyxy in original-image pixels (after EXIF orientation), by decreasing score.
        scores: (N,) float32 confidences.
        class_ids: (N,) int64 model class indices.
        original_size: (h, w) of the photo after EXIF orientation.
        display: the photo downscaled to at most `display_max_side` with the boxes drawn, RGB.
        display_scale: display pixels per original pixel.
        crops: up to MAX_CARD_CROPS small RGB crops of the detections (from the display copy, before drawing).
        timings: milliseconds: decode_ms (bytes → pixels), infer_ms (the model run only: the ONNX
            runtime's run or the PyTorch forward), predict_ms (letterbox + model + post-processing), draw_ms
            (display copy + crops + drawing) and total_ms (all of it).
        runtime: what ran the model ("OpenVINO", "onnxruntime", "PyTorch"; docs/runtimes.md).
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray
    original_size: tuple[int, int]
    display: Image.Image
    display_scale: float
    crops: list[Image.Image] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    runtime: str = ""

    def __len__(self) -> int:
        return len(self.scores)


# ----------------------------------------------------------------------------------------------------------------
# Dex entries
# ----------------------------------------------------------------------------------------------------------------


def _hex_colour(value: str | None) -> tuple[int, int, int] | None:
    if not value or len(value) != 7 or not value.startswith("#"):
        return None
    try:
        return int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16)
    except ValueError:
        return None


def dex_entries(session: Session, class_names: Sequence[str], project: str | None = None) -> list[DexEntry]:
    """One entry per model class, in class-index order, from the project whose classes are the model's.

    A project matches when its class names equal the model's: in the same order first, else as a set (classes
    matched by name either way). `project` (the page's current project) is tried first; among other matches the
    oldest project (lowest id) wins. Without a match every entry has the name only, number index + 1 and a palette
    colour.
    """
    names = [str(name) for name in class_names]
    same_set = None
    projects = list(session.scalars(select(Project).order_by(Project.id)))
    projects.sort(key=lambda item: item.name != project)  # stable: the current project first, then by id
    for candidate in projects:
        classes = project_classes(session, candidate)
        project_names = [item.name for item in classes]
        if project_names == names or (same_set is None and sorted(project_names) == sorted(names)):
            by_name = {item.name: item for item in classes}
            entries = [_entry(index, name, by_name[name], candidate.name) for index, name in enumerate(names)]
            if project_names == names or candidate.name == project:
                return entries
            same_set = entries
    return same_set if same_set is not None else plain_entries(names)


def _entry(index: int, name: str, item: Any, project: str) -> DexEntry:
    return DexEntry(
        index=index,
        number=item.dex_number if item.dex_number is not None else index + 1,
        name=name,
        description=item.description or "",
        colour=_hex_colour(item.colour) or palette_colour(index),
        project=project,
    )


def plain_entries(class_names: Sequence[str]) -> list[DexEntry]:
    """Entries without a project: the name, number index + 1, no description, the palette colour."""
    return [DexEntry(index, index + 1, str(name), "", palette_colour(index)) for index, name in enumerate(class_names)]


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


def decode_photo(
    image_bytes: bytes, min_long_side: int, *, name: str | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decodes a photo at the smallest size whose long side is still at least `min_long_side`, EXIF applied, under
    the pixel cap (`backend.inference.decode_photo`: a JPEG over it is decoded at reduced scale, another format
    over it refused).

    Returns:
        (h', w', 3) uint8 RGB pixels in displayed orientation, and the (H, W) of the full-size photo after EXIF
        orientation (original-image pixels = decoded pixels · (W / w', H / h')).

    Raises:
        ImageLoadError: the bytes are not an image Pillow can decode, or too many pixels to decode (the message
            says what to upload instead).
    """
    return decode_capped(image_bytes, min_long_side, name=name)


# ----------------------------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------------------------


def draw_detections(
    image: Image.Image,
    boxes: np.ndarray,
    labels: Sequence[str],
    colours: Sequence[tuple[int, int, int]],
    scale: float = 1.0,
) -> Image.Image:
    """Draws each box with its label (on a filled tag of the box's colour) onto `image`, in place.

    Args:
        image: an RGB image, drawn on in place.
        boxes: (N, 4) xyxy in original-image pixels; `boxes · scale` are `image` pixels.
        labels: N texts (e.g. "pikachu 0.93").
        colours: N (r, g, b).
        scale: image pixels per box pixel.

    Returns:
        `image`.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * scale
    if not len(boxes) == len(labels) == len(colours):
        raise ValueError(f"{len(boxes)} boxes, {len(labels)} labels and {len(colours)} colours: give one of each")
    side = max(image.size)
    line = max(2, round(side / 300))
    font = ImageFont.load_default(size=max(12, round(side / 55)))
    draw = ImageDraw.Draw(image)
    # Lowest scores first, so the best detection's box and tag end up on top.
    for box, label, colour in reversed(list(zip(boxes, labels, colours))):
        x1, y1, x2, y2 = (float(value) for value in box)
        draw.rectangle((x1, y1, x2, y2), outline=tuple(colour), width=line)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        text_w, text_h = right - left + 2 * line, bottom - top + 2 * line
        tag_y = y1 - text_h if y1 - text_h >= 0 else y1  # above the box, inside it at the top edge
        tag_x = min(max(0.0, x1), max(0.0, image.width - text_w))
        draw.rectangle((tag_x, tag_y, tag_x + text_w, tag_y + text_h), fill=tuple(colour))
        draw.text((tag_x + line - left, tag_y + line - top), label, fill=_text_colour(colour), font=font)
    return image


def _text_colour(colour: Sequence[int]) -> tuple[int, int, int]:
    red, green, blue = colour[:3]
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 150 else (255, 255, 255)


def encode_display(image: Image.Image, image_format: str = "JPEG", quality: int = 88) -> bytes:
    """The display image encoded for the browser (JPEG by default: a photo's PNG is ~5x larger and slower)."""
    buffer = io.BytesIO()
    options: dict[str, Any] = {"quality": quality} if image_format.upper() == "JPEG" else {"compress_level": 1}
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------------


def detect(
    predictor: Predictor,
    image_bytes: bytes,
    conf: float,
    *,
    entries: Sequence[DexEntry] | None = None,
    display_max_side: int = DEFAULT_DISPLAY_MAX_SIDE,
    name: str | None = None,
) -> PokedexResult:
    """Runs the model on an uploaded photo and draws its detections on a display-sized copy.

    Args:
        predictor: a loaded model (ONNX or checkpoint); it is not modified (safe to share between sessions).
        image_bytes: the encoded photo (JPEG, PNG, WebP, BMP, ...), any size and EXIF orientation.
        conf: keep detections scoring strictly above this. For an ONNX graph with NMS inside, its own (lower or
            equal) threshold applies first.
        entries: the dex entries per class (names and colours of the labels), default: the model's class names and
            the palette.
        display_max_side: the long side of the display copy (never larger than the photo).
        name: the photo's name, for error messages.

    Returns:
        The detections (boxes in original-image pixels), the drawn display copy, crops and timings.

    Raises:
        ImageLoadError: the upload is not a readable image.
    """
    start = time.perf_counter()
    timings: dict[str, float] = {}
    # Decode only as large as the model input and the display copy need. The letterbox's content long side is at
    # most the input's long side, so a decode whose long side reaches it is never upscaled by the letterbox.
    pixels, original_size = decode_photo(image_bytes, max(*predictor.input_size, display_max_side), name=name)
    timings["decode_ms"] = (time.perf_counter() - start) * 1e3

    # The page's threshold for this call only: the shared (cached) predictor stays as it is. Its boxes come back
    # in original-image pixels, mapped once from the model input, and above `conf` (also from an NMS graph).
    prediction = predictor.predict_timed([pixels], postprocess=page_postprocess(conf), original_sizes=[original_size])
    timings["infer_ms"] = prediction.timings["model_ms"]
    timings["predict_ms"] = sum(prediction.timings.values())
    (found,) = prediction.detections
    boxes, scores, class_ids = found.boxes, found.scores, found.class_ids

    draw_start = time.perf_counter()
    display, display_scale = _display_copy(pixels, original_size, display_max_side)
    crops = _crops(display, boxes[:MAX_CARD_CROPS] * display_scale)
    names = [entry.name for entry in entries] if entries is not None else list(predictor.class_names)
    labels = [f"{_name(names, int(class_id))} {score:.2f}" for class_id, score in zip(class_ids, scores)]
    colours = [
        entries[int(c)].colour if entries is not None and int(c) < len(entries) else palette_colour(int(c))
        for c in class_ids
    ]
    draw_detections(display, boxes, labels, colours, display_scale)
    timings["draw_ms"] = (time.perf_counter() - draw_start) * 1e3
    timings["total_ms"] = (time.perf_counter() - start) * 1e3
    return PokedexResult(
        boxes.astype(np.float32),
        scores,
        class_ids,
        original_size,
        display,
        display_scale,
        crops,
        timings,
        predictor.runtime_label,
    )


def page_postprocess(conf: float) -> PostprocessConfig:
    """The Pokédex's post-processing: the evaluation's NMS (IoU, class-aware, caps) with the page's threshold."""
    return dataclasses.replace(EVAL_POSTPROCESS, conf_threshold=float(conf))


def nms_text(conf: float) -> str:
    """The post-processing in words, for the page: "score above 0.25, per-class NMS at IoU 0.7 (as in evaluation),
    at most 300 boxes"."""
    config = page_postprocess(conf)
    return (
        f"score above {config.conf_threshold:.2f}, per-class NMS at IoU {config.iou_threshold:g} (as in the "
        f"evaluation), at most {config.max_detections} boxes"
    )


def still_learning(score: ModelScore | None) -> bool:
    """Whether a model is still learning: its validation mAP50 is under `STILL_LEARNING_MAP50`. A model never
    evaluated, or whose evaluation gave no mAP50, is not said to be."""
    return score is not None and score.map50 is not None and score.map50 < STILL_LEARNING_MAP50


def still_learning_note(score: ModelScore | None) -> str | None:
    """The Pokédex's notice on a model that is still learning, None for any other: "Still learning: it finds 12% of
    the objects in its validation photos (confidence above 0.25; validation mAP50 0.081, under 0.3). Train it
    longer, or label more photos." The share is the model's own recall, from its evaluation."""
    if not still_learning(score):
        return None
    assert score is not None and score.map50 is not None
    detail = f"validation mAP50 {score.map50:.3f}, under {STILL_LEARNING_MAP50:g}"
    if score.recall is None:
        lead = (
            f"Still learning: its {detail}; how many of its validation objects it finds was not measured "
            "(evaluate or quantize it again to measure it)."
        )
    else:
        at = f"confidence {score.score_threshold:g} or more; " if score.score_threshold is not None else ""
        lead = (
            f"Still learning: it finds {percent(score.recall)} of the objects in its validation photos ({at}{detail})."
        )
    return f"{lead} Expect missed and misplaced boxes: train it longer, or label more photos."


def percent(share: float) -> str:
    """A share as a whole percentage, never rounded up to 100% or down to 0% when it is not exactly that."""
    value = round(100 * share)
    if value == 100 and share < 1:
        return ">99%"  # a model missing one object in 300 does not find them all
    if value == 0 and share > 0:
        return "<1%"
    return f"{value}%"


def empty_result_hint(conf: float, lowest_conf: float, score: ModelScore | None) -> str:
    """What to say when a photo gives no detection, from the threshold (lowering it is advice only above the
    slider's lowest value) and the model's own evaluation: a model still learning (`still_learning`) is said to be,
    with its mAP50 and what it finds, since another photo or threshold will not make it find much."""
    if still_learning(score):
        assert score is not None and score.map50 is not None
        found = (
            "" if score.recall is None else f", finding {percent(score.recall)} of the objects of its validation photos"
        )
        hint = (
            f"Nothing found above {conf:.2f}: this model is still learning (validation mAP50 {score.map50:.3f}"
            f"{found}). Continue its training, or label more photos"
        )
        return hint + (", or lower the threshold to see its weaker guesses." if conf > lowest_conf else ".")
    if conf > lowest_conf:
        return f"Nothing found above the confidence threshold {conf:.2f}: lower it, or try another photo."
    return (
        f"Nothing found, even at the lowest threshold ({lowest_conf:.2f}): try another photo (the classes large and "
        "clear in it), or a model trained on more images like it."
    )


def continue_training_params(run: str) -> dict[str, str]:
    """The query of the Train page's link that continues `run` (a run folder's name): /train?continue=<run>."""
    return {CONTINUE_PARAM: run}


def _name(names: Sequence[str], class_id: int) -> str:
    return names[class_id] if 0 <= class_id < len(names) else f"class {class_id}"


def _display_copy(pixels: np.ndarray, original_size: tuple[int, int], max_side: int) -> tuple[Image.Image, float]:
    """The decoded pixels resized so the long side is at most `max_side`, and display px per original px."""
    original_h, original_w = original_size
    scale = min(1.0, max_side / max(original_h, original_w))
    width, height = max(1, round(original_w * scale)), max(1, round(original_h * scale))
    if (pixels.shape[1], pixels.shape[0]) != (width, height):
        pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)  # cv2 takes (width, height)
    return Image.fromarray(pixels), width / original_w


def _crops(display: Image.Image, boxes: np.ndarray) -> list[Image.Image]:
    """Small crops of `boxes` (xyxy in display pixels) for the entry cards."""
    crops = []
    for x1, y1, x2, y2 in boxes:
        left = min(max(0, math.floor(x1)), display.width - 1)
        top = min(max(0, math.floor(y1)), display.height - 1)
        right = min(display.width, max(left + 1, math.ceil(x2)))
        bottom = min(display.height, max(top + 1, math.ceil(y2)))
        crop = display.crop((left, top, right, bottom))
        crop.thumbnail((CROP_MAX_SIDE, CROP_MAX_SIDE), Image.Resampling.BILINEAR, reducing_gap=None)
        crops.append(crop)
    return crops
