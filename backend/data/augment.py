"""Training augmentations for detection, as an albumentations pipeline that is data (`A.to_dict` / `A.from_dict`).

The default pipeline is the YOLO-NAS fine-tuning recipe (docs/augmentation.md says where each step comes from):

    YoloxMosaic (p 1.0: 4 images at their own size meeting at a random centre in [0.5, 1.5]·imgsz on a
    2·imgsz canvas, pad 114) → RandomScaleTranslate (zoom 0.5-1.5, shift ±0.1·imgsz, no rotation or shear,
    imgsz x imgsz output, pad 114) → FastHueSaturationValue (additive: hue ±5 on OpenCV's 0-180 scale,
    saturation ±30, value ±30) → A.HorizontalFlip (p 0.5) → Letterbox (imgsz, pad 114)

Boxes go through albumentations (`A.BboxParams`, pascal_voc: xyxy pixels, x2/y2 the right/bottom pixel edges,
labels in the `labels` field). They are clipped, and those narrower or lower than 2 px or with less than a fifth of
their area left (`min_visibility`) dropped, on the mosaic canvas and at the end: a target on a 1-px sliver or on a
fifth of an object teaches the model to fire on fragments. The recipe filters nothing.

The steps that are ours are subclasses of albumentations' base classes, so `A.to_dict` / `A.from_dict` serialise
them (by their import path) like the stock ones once this module is imported:
- `YoloxMosaic`: `A.Mosaic` fits every image into a fixed grid cell and its random centre only moves the crop
  window over that grid; the recipe's YOLOX layout keeps each image at its own size and moves the point where
  the four meet. It reads the three other images from the `mosaic_metadata` key, as `A.Mosaic` does.
- `RandomScaleTranslate`: `A.Affine` keeps the input size, so on the 2·imgsz mosaic canvas it would need an
  `A.CenterCrop` after it and warp four times the pixels it keeps; this one resizes only the input that lands in
  the imgsz x imgsz output.
- `FastHueSaturationValue`: `A.HueSaturationValue` with one lookup table for the three channels (the stock one adds
  each constant through a float image, which cost as much as the rest of the pipeline); the same pixels for
  whole-number shifts.
- `Letterbox`: `backend.processing.letterbox` itself, so training inputs and inference inputs are made alike. It is
  the identity after `RandomScaleTranslate` and makes any other pipeline end at imgsz x imgsz.

Speed: bench/loader.py measures the loader with this pipeline against the hand-written NumPy/OpenCV one it replaced
(bench/loader_results.md); what remains of the difference is albumentations' box bookkeeping around each call.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
import yaml
from albumentations.augmentations.mixing import functional as mixing

from backend.processing import PAD_VALUE, letterbox

# (image (h, w, 3) uint8 RGB, boxes (N, 4) float32 xyxy in that image's pixels, labels (N,) int64)
Sample = tuple[np.ndarray, np.ndarray, np.ndarray]

MOSAIC_TILES = 4
MOSAIC_KEY = "mosaic_metadata"
MIN_BOX_SIZE = 2.0  # output pixels, width and height
MIN_VISIBILITY = 0.2


def _row(*values: float) -> np.ndarray:
    """A float32 row to broadcast over (N, 4) boxes: one array operation instead of two column updates."""
    return np.array(values, dtype=np.float32)


class AugmentationError(ValueError):
    """An augmentation pipeline that cannot be used for training; the message says what is wrong."""


def _boxes_to_albumentations(item: dict[str, Any], processor: Any) -> np.ndarray | None:
    """A mosaic image's boxes in the pipeline's internal form (normalised xyxy + label columns), as Compose's own
    pre-processing makes them; pascal_voc directly (its validity checks cost more than the whole conversion)."""
    if processor is None or item.get("bboxes") is None:
        return None
    params = processor.params
    if params.format != "pascal_voc":
        return mixing.preprocess_selected_mosaic_items([item], processor, None)[0]["bboxes"]
    height, width = item["image"].shape[:2]
    boxes = np.asarray(item["bboxes"], dtype=np.float32).reshape(-1, 4) * _row(
        1 / width, 1 / height, 1 / width, 1 / height
    )
    if params.clip:
        np.minimum(np.maximum(boxes, 0.0, out=boxes), 1.0, out=boxes)  # np.clip costs more on a few boxes
    columns = [boxes]
    for field in params.label_fields or []:
        if len(item[field]) != len(boxes):
            raise ValueError(f"a mosaic image has {len(boxes)} boxes and {len(item[field])} {field}")
        columns.append(np.asarray(processor.label_manager.process_field("bboxes", field, item[field])).reshape(-1, 1))
    return np.hstack(columns).astype(np.float32) if len(columns) > 1 else boxes


def _clip_and_filter(boxes: np.ndarray, size: int, params: A.BboxParams) -> np.ndarray:
    """(N, 4+) xyxy canvas pixels → clipped to the size x size canvas, those failing the BboxParams filter
    (min_visibility against the unclipped area, min_width/min_height/min_area in pixels) dropped: what
    albumentations' own filter does after a step, in a few array operations."""
    clipped = boxes.copy()
    np.clip(clipped[:, :4], 0.0, size, out=clipped[:, :4])
    widths, heights = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    full = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area = widths * heights
    keep = (full > 0) & (area >= params.min_area) & (area >= params.min_visibility * full)
    keep &= (widths >= params.min_width) & (heights >= params.min_height) & (widths > 0) & (heights > 0)
    if params.max_accept_ratio is not None:
        keep &= (
            np.maximum(widths / np.maximum(heights, 1e-7), heights / np.maximum(widths, 1e-7))
            <= params.max_accept_ratio
        )
    return clipped[keep]


class YoloxMosaic(A.DualTransform):
    """Four images at their own size around a random centre on a (2·imgsz, 2·imgsz) canvas (YOLOX layout).

    The primary image goes top-left of the centre; the three in `data[metadata_key]` (dicts with "image",
    "bboxes" in the pipeline's box format and its label fields, each image at most imgsz on each side) go
    top-right, bottom-left and bottom-right. Parts beyond the canvas are cut. Without metadata (mosaic closed
    for the end of a run) the image passes unchanged.

    Args:
        imgsz: the training input size; the canvas is twice that.
        centre_range: the centre's x and y are drawn uniformly from this range, in multiples of imgsz.
        fill: grey level of the canvas where no image lands.
        metadata_key: the data key holding the three other images.
        p: probability of a mosaic (the training dataset passes the three other images to every sample).
    """

    _targets = (A.core.type_definitions.Targets.IMAGE, A.core.type_definitions.Targets.BBOXES)

    def __init__(
        self,
        imgsz: int = 640,
        centre_range: Sequence[float] = (0.5, 1.5),
        fill: int = PAD_VALUE,
        metadata_key: str = MOSAIC_KEY,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if int(imgsz) < 1:
            raise ValueError(f"YoloxMosaic imgsz must be positive, got {imgsz}")
        if len(centre_range) != 2 or not 0.0 <= centre_range[0] <= centre_range[1] <= 2.0:
            raise ValueError(f"YoloxMosaic centre_range must be (low, high) within [0, 2], got {centre_range}")
        self.imgsz = int(imgsz)
        self.centre_range = (float(centre_range[0]), float(centre_range[1]))
        self.fill = int(fill)
        self.metadata_key = metadata_key

    @property
    def targets_as_params(self) -> list[str]:
        return [self.metadata_key]

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        others = data.get(self.metadata_key) or []
        if not others:
            return {"canvas": None, "mosaic_bboxes": None}
        if len(others) != MOSAIC_TILES - 1:
            raise ValueError(f"YoloxMosaic takes {MOSAIC_TILES - 1} other images, got {len(others)}")
        size = 2 * self.imgsz
        centre_x = int(self.py_random.uniform(*self.centre_range) * self.imgsz)
        centre_y = int(self.py_random.uniform(*self.centre_range) * self.imgsz)
        canvas = np.empty((size, size, 3), dtype=np.uint8)  # each quadrant's part no image covers is filled below
        processor = self.get_processor("bboxes")
        items = [{"image": data["image"], "bboxes": data.get("bboxes")}]
        items += [{"image": other["image"], "bboxes": _boxes_to_albumentations(other, processor)} for other in others]
        all_boxes = []
        for position, item in enumerate(items):
            image = item["image"]
            height, width = image.shape[:2]
            if height > self.imgsz or width > self.imgsz:
                raise ValueError(f"mosaic images must fit in {self.imgsz}x{self.imgsz}, got {width}x{height}")
            left = centre_x - width if position in (0, 2) else centre_x  # the image's top-left corner on the canvas
            top = centre_y - height if position in (0, 1) else centre_y
            x1, y1, x2, y2 = max(left, 0), max(top, 0), min(left + width, size), min(top + height, size)
            canvas[y1:y2, x1:x2] = image[y1 - top : y2 - top, x1 - left : x2 - left]
            # The rest of the image's quadrant (the canvas part beside the centre on its side) gets the fill: the
            # strips above, below, left and right of the image; a third of the time of filling the whole canvas.
            qx0, qx1 = (0, centre_x) if position in (0, 2) else (centre_x, size)
            qy0, qy1 = (0, centre_y) if position in (0, 1) else (centre_y, size)
            canvas[qy0:y1, qx0:qx1] = self.fill
            canvas[y2:qy1, qx0:qx1] = self.fill
            canvas[y1:y2, qx0:x1] = self.fill
            canvas[y1:y2, x2:qx1] = self.fill
            boxes = item["bboxes"]
            if boxes is not None and len(boxes):  # normalised to the image → pixels on the canvas, not clipped
                moved = np.array(boxes, dtype=np.float32, copy=True)
                moved[:, :4] = moved[:, :4] * _row(width, height, width, height) + _row(left, top, left, top)
                all_boxes.append(moved)
        columns = data["bboxes"].shape[1] if data.get("bboxes") is not None else 4
        merged = np.concatenate(all_boxes) if all_boxes else np.zeros((0, columns), np.float32)
        if processor is not None and len(merged):
            merged = _clip_and_filter(merged, size, processor.params)
        merged[:, :4] /= size
        return {"canvas": canvas, "mosaic_bboxes": merged}

    def apply(self, img: np.ndarray, canvas: np.ndarray | None = None, **params: Any) -> np.ndarray:
        return img if canvas is None else canvas

    def apply_to_bboxes(self, bboxes: np.ndarray, mosaic_bboxes: np.ndarray | None = None, **params: Any) -> np.ndarray:
        return bboxes if mosaic_bboxes is None else mosaic_bboxes


class RandomScaleTranslate(A.DualTransform):
    """Affine warp without rotation or shear into a size x size output: random zoom and shift around the centre.

    The input's centre lands at the output's centre moved by the shift; output position = scale · input
    position + offset, for pixels and boxes alike.

    Args:
        size: the output is size x size.
        scale: range of the zoom (uniform).
        translate: largest shift, as a fraction of `size`, in x and y independently.
        fill: grey level where no input pixel lands.
        p: probability of the warp; otherwise the image passes unchanged (a later Letterbox fits it).
    """

    _targets = (A.core.type_definitions.Targets.IMAGE, A.core.type_definitions.Targets.BBOXES)

    def __init__(
        self,
        size: int = 640,
        scale: Sequence[float] = (0.5, 1.5),
        translate: float = 0.1,
        fill: int = PAD_VALUE,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1]:
            raise ValueError(f"RandomScaleTranslate scale must be (low, high) with 0 < low <= high, got {scale}")
        if not 0.0 <= translate <= 0.5:
            raise ValueError(
                f"RandomScaleTranslate translate must be in [0, 0.5] (a fraction of size), got {translate}"
            )
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.translate = float(translate)
        self.fill = int(fill)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        zoom = self.py_random.uniform(*self.scale)
        shift_x = self.py_random.uniform(-self.translate, self.translate) * self.size
        shift_y = self.py_random.uniform(-self.translate, self.translate) * self.size
        offset_x = self.size / 2 + shift_x - zoom * width / 2
        offset_y = self.size / 2 + shift_y - zoom * height / 2
        # Only the input pixels that land in the output are resized: whole pixels [x0, x1) x [y0, y1), placed at
        # whole output pixels, so the offset is moved by less than half a pixel to the nearest placement.
        x0, y0 = max(0, math.floor(-offset_x / zoom)), max(0, math.floor(-offset_y / zoom))
        x1 = min(width, math.ceil((self.size - offset_x) / zoom))
        y1 = min(height, math.ceil((self.size - offset_y) / zoom))
        place_x, place_y = round(zoom * x0 + offset_x), round(zoom * y0 + offset_y)
        return {
            "zoom": zoom,
            "crop": (x0, y0, x1, y1),
            "place": (place_x, place_y),
            "offset": (place_x - zoom * x0, place_y - zoom * y0),
        }

    def apply(self, img: np.ndarray, zoom: float, crop: tuple, place: tuple, **params: Any) -> np.ndarray:
        x0, y0, x1, y1 = crop
        if x1 <= x0 or y1 <= y0:
            return np.full((self.size, self.size, *img.shape[2:]), self.fill, dtype=img.dtype)
        # cv2.resize with fx/fy maps crop edge x to zoom·x exactly (pixel centres as in the box convention) and is
        # about twice as fast as cv2.warpAffine with the same mapping.
        resized = cv2.resize(img[y0:y1, x0:x1], (0, 0), fx=zoom, fy=zoom, interpolation=cv2.INTER_LINEAR)
        left, top = place  # where resized's top-left pixel lands in the output (may be outside it)
        part = resized[max(-top, 0) : max(self.size - top, 0), max(-left, 0) : max(self.size - left, 0)]
        out_x0, out_y0 = max(left, 0), max(top, 0)
        if part.shape[0] == 0 or part.shape[1] == 0:
            return np.full((self.size, self.size, *img.shape[2:]), self.fill, dtype=img.dtype)
        # One pass that pads around the part that lands in the output: no full canvas filled and then overwritten.
        return cv2.copyMakeBorder(
            part,
            out_y0,
            self.size - out_y0 - part.shape[0],
            out_x0,
            self.size - out_x0 - part.shape[1],
            cv2.BORDER_CONSTANT,
            value=(self.fill,) * 4,
        )

    def apply_to_bboxes(self, bboxes: np.ndarray, zoom: float, offset: tuple, **params: Any) -> np.ndarray:
        height, width = params["shape"][:2]
        moved = np.array(bboxes, dtype=np.float32, copy=True)
        moved[:, :4] = (
            moved[:, :4] * _row(width, height, width, height) * np.float32(zoom)
            + _row(offset[0], offset[1], offset[0], offset[1])
        ) / np.float32(self.size)
        return moved


class Letterbox(A.DualTransform):
    """`backend.processing.letterbox`: fit into size x size keeping the aspect ratio, centred, padded.

    Args:
        size: the output is size x size, a multiple of 32.
        fill: grey level of the padding.
        p: keep 1.0: a pipeline's last step must always give the training input size.
    """

    _targets = (A.core.type_definitions.Targets.IMAGE, A.core.type_definitions.Targets.BBOXES)

    def __init__(self, size: int = 640, fill: int = PAD_VALUE, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.size = int(size)
        self.fill = int(fill)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        if data["image"].shape[:2] == (self.size, self.size):  # letterbox would copy it unchanged
            return {"padded": data["image"], "scale": 1.0, "pad": (0.0, 0.0)}
        padded, info = letterbox(data["image"], (self.size, self.size), self.fill)
        return {"padded": padded, "scale": info.scale, "pad": (info.pad_x, info.pad_y)}

    def apply(self, img: np.ndarray, padded: np.ndarray | None = None, **params: Any) -> np.ndarray:
        return img if padded is None else padded

    def apply_to_bboxes(
        self, bboxes: np.ndarray, scale: float = 1.0, pad: tuple[float, float] = (0, 0), **params: Any
    ) -> np.ndarray:
        if scale == 1.0 and pad == (0.0, 0.0):  # the image was already size x size: nothing moves
            return bboxes
        height, width = params["shape"][:2]
        moved = np.array(bboxes, dtype=np.float32, copy=True)
        moved[:, :4] = (
            moved[:, :4] * _row(width, height, width, height) * np.float32(scale) + _row(pad[0], pad[1], pad[0], pad[1])
        ) / np.float32(self.size)
        return moved


class FastHueSaturationValue(A.HueSaturationValue):
    """`A.HueSaturationValue` on uint8 RGB with one lookup table for the three channels, 4x faster.

    The same parameters and draws; each shift is rounded to whole levels, then hue wraps around OpenCV's 0-180
    scale and saturation and value are clipped to 0..255; grey pixels (saturation 0) stay grey, as in the stock
    transform. Other images (float, grey) go to the stock transform.
    """

    def apply(self, img: np.ndarray, hue_shift: float, sat_shift: float, val_shift: float, **params: Any):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            return super().apply(img, hue_shift, sat_shift, val_shift, **params)
        hue, saturation, value = round(hue_shift), round(sat_shift), round(val_shift)
        if not (hue or saturation or value):
            return img
        levels = np.arange(256, dtype=np.int16)
        saturation_table = np.clip(levels + saturation, 0, 255)
        saturation_table[0] = 0  # grey stays grey
        table = np.stack([(levels + hue) % 180, saturation_table, np.clip(levels + value, 0, 255)], axis=-1)
        hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)  # uint8 hue is 0..179
        # One table per channel. In place, both steps: half the time of writing new arrays (bench/loader.py).
        cv2.LUT(hsv, table.astype(np.uint8).reshape(1, 256, 3), dst=hsv)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=hsv)


def box_params() -> A.BboxParams:
    """pascal_voc boxes with a `labels` field, clipped and filtered after every step (module docstring)."""
    return A.BboxParams(
        format="pascal_voc",
        label_fields=["labels"],
        clip=True,
        min_visibility=MIN_VISIBILITY,
        min_width=MIN_BOX_SIZE,
        min_height=MIN_BOX_SIZE,
        check_each_transform=False,
    )


def default_pipeline(imgsz: int, mosaic_prob: float = 1.0) -> A.Compose:
    """The YOLO-NAS fine-tuning recipe's training augmentation for imgsz x imgsz inputs (module docstring)."""
    return A.Compose(
        [
            YoloxMosaic(imgsz, p=mosaic_prob),
            RandomScaleTranslate(imgsz, scale=(0.5, 1.5), translate=0.1),
            FastHueSaturationValue(hue_shift_limit=5, sat_shift_limit=30, val_shift_limit=30, p=1.0),
            A.HorizontalFlip(p=0.5),
            Letterbox(imgsz),
        ],
        bbox_params=box_params(),
    )


def pipeline_to_dict(pipeline: A.Compose) -> dict[str, Any]:
    """The JSON-serialisable `A.to_dict` form, as recorded in a run's config.json."""
    return json.loads(json.dumps(A.to_dict(pipeline)))  # tuples → lists, as after a JSON round trip


def pipeline_from_dict(spec: dict[str, Any], imgsz: int) -> A.Compose:
    """Builds a pipeline from its `A.to_dict` form and checks it can augment imgsz x imgsz training samples.

    Raises:
        AugmentationError: not an albumentations pipeline, unknown transforms, boxes not in pascal_voc with a
            `labels` field, or samples that do not come out imgsz x imgsz RGB.
    """
    if not isinstance(spec, dict) or "transform" not in spec:
        raise AugmentationError(
            "an augmentation pipeline is the A.to_dict form of an A.Compose: a mapping with a 'transform' key"
        )
    try:
        pipeline = A.from_dict(spec)
    except Exception as error:  # albumentations raises KeyError, TypeError, ValueError or pydantic errors
        raise AugmentationError(f"not a valid albumentations pipeline: {type(error).__name__}: {error}") from error
    if not isinstance(pipeline, A.Compose):
        raise AugmentationError(f"the pipeline must be an A.Compose, got {type(pipeline).__name__}")
    params = pipeline.processors.get("bboxes")
    if params is None or params.params.format != "pascal_voc" or "labels" not in (params.params.label_fields or []):
        raise AugmentationError(
            "the pipeline must handle boxes: bbox_params with format 'pascal_voc' and label_fields ['labels']"
        )
    _check_output(pipeline, imgsz)
    return pipeline


def _check_output(pipeline: A.Compose, imgsz: int) -> None:
    for step in _flatten(pipeline):
        size = getattr(step, "imgsz", None) if isinstance(step, YoloxMosaic) else getattr(step, "size", None)
        if isinstance(step, (YoloxMosaic, RandomScaleTranslate, Letterbox)) and size != imgsz:
            raise AugmentationError(f"{type(step).__name__} is set for {size} px, the training size is {imgsz}x{imgsz}")
    rng = np.random.default_rng(0)
    tiles = [
        (
            rng.integers(0, 256, (imgsz, imgsz * 3 // 4, 3), dtype=np.uint8),
            np.array([[4, 4, imgsz // 2, imgsz // 2]], np.float32),
            np.array([0], np.int64),
        )
        for _ in range(MOSAIC_TILES)
    ]
    try:
        image, _, _ = augment_sample(pipeline, tiles, rng)
    except Exception as error:
        raise AugmentationError(f"the pipeline fails on a training sample: {type(error).__name__}: {error}") from error
    if image.shape != (imgsz, imgsz, 3) or image.dtype != np.uint8:
        raise AugmentationError(
            f"the pipeline must give {imgsz}x{imgsz} RGB uint8 images (the training size), got {image.shape} "
            f"{image.dtype}: end it with Letterbox(size={imgsz})"
        )


def load_pipeline_file(path: str | Path, imgsz: int) -> dict[str, Any]:
    """Reads a JSON or YAML pipeline file (`A.to_dict` form) and checks it (see `pipeline_from_dict`).

    Returns:
        the pipeline's dict, JSON-serialisable, to record in TrainConfig.augment_pipeline.

    Raises:
        AugmentationError: the file is missing, not JSON/YAML, or not a usable pipeline.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise AugmentationError(f"cannot read the augmentation file {path}: {error.strerror or error}") from error
    return parse_pipeline_text(text, imgsz, source=str(path))


def parse_pipeline_text(text: str, imgsz: int, source: str = "the augmentation file") -> dict[str, Any]:
    """`load_pipeline_file` for text already read (an upload): JSON or YAML → the checked pipeline dict."""
    try:
        spec = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as error:
        raise AugmentationError(f"{source} is neither JSON nor YAML: {error}") from error
    try:
        pipeline = pipeline_from_dict(spec, imgsz)
    except AugmentationError as error:
        raise AugmentationError(f"{source}: {error}") from error
    return pipeline_to_dict(pipeline)


def training_pipeline(spec: dict[str, Any] | None, imgsz: int, mosaic_prob: float = 1.0) -> A.Compose:
    """The pipeline a run trains with: its recorded one, or the default for runs that recorded none."""
    return default_pipeline(imgsz, mosaic_prob) if spec is None else pipeline_from_dict(spec, imgsz)


def uses_mosaic(pipeline: A.Compose) -> bool:
    """Whether a sample may need the three other mosaic images (a `YoloxMosaic` that can fire)."""
    return any(isinstance(step, YoloxMosaic) and step.p > 0 for step in _flatten(pipeline))


def _flatten(pipeline: A.BaseCompose):
    for step in pipeline.transforms:
        if isinstance(step, A.BaseCompose):
            yield from _flatten(step)
        else:
            yield step


def _numeric_label_fields(pipeline: A.Compose) -> None:
    """Marks the box label fields numerical before the pipeline's first call. albumentations decides it from the first
    sample it sees and keeps the decision: an empty label array counts as non-numerical, and the label encoder it
    then fits on nothing fails to decode the mosaic's other images' labels (KeyError on a class index)."""
    processor = pipeline.processors.get("bboxes")
    if processor is None:
        return
    seen = processor.label_manager.metadata.get("bboxes", {})
    for field in processor.params.label_fields or []:
        if field not in seen:
            processor.label_manager.process_field("bboxes", field, np.zeros(1, np.int64))


def augment_sample(
    pipeline: A.Compose, tiles: Sequence[Sample], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training sample through `pipeline`, all randomness from `rng` (same state, same output).

    Args:
        pipeline: built by `default_pipeline` or `pipeline_from_dict`.
        tiles: one sample, or four for a mosaic (the first is the sample, then the three others), each image at
            most imgsz on each side; boxes xyxy in that image's pixels.
        rng: the sample's random generator.

    Returns:
        image (imgsz, imgsz, 3) uint8 RGB; boxes (K, 4) float32 xyxy in input pixels within [0, imgsz]; labels
        (K,) int64.
    """
    if len(tiles) not in (1, MOSAIC_TILES):
        raise ValueError(f"augment_sample takes 1 image or {MOSAIC_TILES} for a mosaic, got {len(tiles)}")
    pipeline.set_random_state(rng, random.Random(int(rng.integers(2**63))))
    _numeric_label_fields(pipeline)
    image, boxes, labels = tiles[0]
    data: dict[str, Any] = {
        "image": image,
        "bboxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "labels": np.asarray(labels, np.int64).reshape(-1),
    }
    data[MOSAIC_KEY] = []  # a YoloxMosaic without other images passes the sample through
    if len(tiles) == MOSAIC_TILES:
        data[MOSAIC_KEY] = [
            {
                "image": other,
                "bboxes": np.asarray(other_boxes, np.float32).reshape(-1, 4),
                "labels": np.asarray(other_labels, np.int64).reshape(-1),
            }
            for other, other_boxes, other_labels in tiles[1:]
        ]
    out = pipeline(**data)
    out_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
    return out["image"], out_boxes, np.asarray(out["labels"], dtype=np.int64).reshape(-1)
