"""The one pre- and post-processing spec shared by PyTorch evaluation, ONNX/INT8 inference and the demo.

Pre-processing: image → (H, W, 3) uint8 RGB with EXIF orientation applied → letterbox to the model input size
(centred, pad 114) → float32 (B, 3, h, w) RGB in [0, 1]. Post-processing: model outputs (B, A, 4) xyxy boxes in
input pixels and (B, A, C) sigmoid scores → confidence filter → top-k → class-aware greedy NMS → max detections,
then optionally back to original-image pixels.

Box convention everywhere in this module: xyxy in pixels, with x2/y2 the right/bottom pixel *edges* (a box
covering a whole W×H image is [0, 0, W, H]). Every function states whether its boxes are in letterboxed input
pixels or original-image pixels.

NumPy and torch variants are written separately (not one calling the other) so that the ONNX path needs no torch
tensors and the tests can check the two against each other and against a naive reference.

Why NMS is written here and not taken from a library: `torchvision.ops.batched_nms` would need torchvision, whose
wheel must match the exact torch build (the torchvision wheels we could get are CUDA builds whose compiled ops do
not load beside our CPU torch), and `cv2.dnn.NMSBoxes` takes (x, y, w, h) rectangles with its own IoU arithmetic,
so the NumPy path (ONNX, INT8, the demo) could keep a box that the torch path (training-time evaluation) drops when
an IoU lands on the threshold. Two functions built from the same operations in the same order decide alike, and
the tests check it.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

PAD_VALUE = 114
INPUT_SIZE_MULTIPLE = 32  # the largest stride of YOLO-NAS

ImageSource = str | Path | bytes | Image.Image
BoxArray = TypeVar("BoxArray", np.ndarray, torch.Tensor)

# Exceptions Pillow raises for bytes it cannot decode: UnidentifiedImageError and "image file is truncated" are
# OSErrors, some plugins raise SyntaxError ("broken PNG file"), ValueError or EOFError on malformed headers.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


class ImageLoadError(ValueError):
    """An image source exists but cannot be decoded as an image."""


def load_image(source: ImageSource, *, name: str | None = None) -> np.ndarray:
    """Decodes an image to RGB pixels as the model sees them.

    EXIF orientation is applied first, so boxes refer to the image as a viewer displays it (Label Studio and
    browsers do the same). Animated images give their first frame. Transparent pixels are composited on white,
    as a browser on a white page shows them (dropping alpha would leave whatever colour the encoder stored,
    often black). 16-bit greyscale is scaled to 8 bits rather than clipped.

    Args:
        source: a file path, the encoded file bytes, or a PIL image.
        name: what to call the source in error messages (e.g. an upload's file name); defaults to the path,
            or "<bytes>"/"<PIL image>".

    Returns:
        (H, W, 3) uint8 RGB, H and W after EXIF orientation.

    Raises:
        FileNotFoundError: the path does not exist.
        ImageLoadError: the data is empty, corrupt, truncated or not an image.
    """
    if isinstance(source, Image.Image):
        label = name or "<PIL image>"
        image = source
    else:
        if isinstance(source, str | Path):
            path = Path(source)
            label = name or str(path)
            if not path.exists():
                raise FileNotFoundError(f"image file not found: '{path}'")
            if not path.is_file():
                raise ImageLoadError(f"could not read '{label}' as an image: it is a directory, not a file")
            data = path.read_bytes()
        elif isinstance(source, bytes | bytearray | memoryview):
            label = name or "<bytes>"
            data = bytes(source)
        else:
            raise TypeError(f"load_image takes a path, bytes or a PIL image, got {type(source).__name__}")
        if not data:
            raise ImageLoadError(f"could not read '{label}' as an image: it is empty (0 bytes)")
        try:
            image = Image.open(io.BytesIO(data))
        except _DECODE_ERRORS as error:
            raise _load_error(label, error) from error

    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        # Pillow decodes lazily: load() here so truncated data fails now, as an ImageLoadError.
        image.load()
        image = _apply_exif_orientation(image, label)
        return _to_rgb_array(image)
    except _DECODE_ERRORS as error:
        raise _load_error(label, error) from error


def _load_error(label: str, error: BaseException) -> ImageLoadError:
    # UnidentifiedImageError's message ends in the repr of our BytesIO, which means nothing to a user.
    reason = "cannot identify image file" if isinstance(error, UnidentifiedImageError) else str(error)
    reason = reason or type(error).__name__
    return ImageLoadError(f"could not read '{label}' as an image ({reason}): is it a JPEG/PNG/WebP/BMP file?")


def _apply_exif_orientation(image: Image.Image, label: str) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception as error:  # malformed EXIF must not reject pixels that decoded fine
        logger.warning("ignoring unreadable EXIF orientation of '%s': %s", label, error)
        return image


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any Pillow mode → (H, W, 3) uint8 RGB."""
    if image.mode.startswith("I") or image.mode == "F":
        # 16-bit greyscale (and 32-bit int/float): convert("L") would clip everything above 255 to white.
        # "I;16*" is 16-bit by definition; for "I"/"F" the range is unknown, so values above 255 mean 16-bit.
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0  # 65535 → 255
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def _check_rgb_uint8(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        description = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image)
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {description}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected a non-empty image, got shape {image.shape}")


# ----------------------------------------------------------------------------------------------------------------
# Letterbox and box mapping
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LetterboxInfo:
    """How one image was letterboxed: input = original · scale + pad.

    Attributes:
        scale: input pixels per original pixel, the same for x and y.
        pad_x: left padding in input pixels.
        pad_y: top padding in input pixels.
        original_size: (h, w) of the original image (after EXIF orientation).
        input_size: (h, w) of the model input.
    """

    scale: float
    pad_x: float
    pad_y: float
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def check_input_size(input_size: tuple[int, int]) -> tuple[int, int]:
    """Returns (h, w) as ints, or raises ValueError unless both are positive multiples of 32."""
    if len(input_size) != 2:
        raise ValueError(f"input size must be (height, width), got {input_size!r}")
    height, width = (int(value) for value in input_size)
    if height <= 0 or width <= 0 or height % INPUT_SIZE_MULTIPLE or width % INPUT_SIZE_MULTIPLE:
        raise ValueError(
            f"input size must be positive multiples of {INPUT_SIZE_MULTIPLE} (the model's largest stride), "
            f"got {height}x{width}"
        )
    return height, width


def letterbox(
    image: np.ndarray, input_size: tuple[int, int], pad_value: int = PAD_VALUE
) -> tuple[np.ndarray, LetterboxInfo]:
    """Resizes keeping the aspect ratio so the image fits, and centres it on a padded canvas.

    Images smaller than the input are scaled up, so objects keep the apparent size the model was trained on.

    Args:
        image: (H, W, 3) uint8 RGB.
        input_size: (h, w) model input, multiples of 32.
        pad_value: grey level of the padding.

    Returns:
        (h, w, 3) uint8 RGB, and the mapping for `boxes_to_input`/`boxes_to_original`.
    """
    _check_rgb_uint8(image)
    input_h, input_w = check_input_size(input_size)
    original_h, original_w = image.shape[:2]
    scale = min(input_h / original_h, input_w / original_w)
    # The content size is rounded to whole pixels, so the content edge can sit up to 0.5 px from
    # original_size · scale; the single `scale` keeps x and y mapped alike, which is what the model was trained on.
    new_w = min(input_w, max(1, round(original_w * scale)))
    new_h = min(input_h, max(1, round(original_h * scale)))
    resized = image
    if (new_h, new_w) != (original_h, original_w):
        resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)  # cv2 takes (width, height)
    left = (input_w - new_w) // 2
    top = (input_h - new_h) // 2
    canvas = np.full((input_h, input_w, 3), pad_value, dtype=np.uint8)
    canvas[top : top + new_h, left : left + new_w] = resized
    info = LetterboxInfo(
        scale=float(scale),
        pad_x=float(left),
        pad_y=float(top),
        original_size=(original_h, original_w),
        input_size=(input_h, input_w),
    )
    return canvas, info


def boxes_to_input(boxes: BoxArray, info: LetterboxInfo) -> BoxArray:
    """(..., 4) xyxy in original-image pixels → (..., 4) xyxy in letterboxed input pixels (not clipped).

    Works on NumPy arrays and torch tensors alike (only slicing and arithmetic both support); returns a new
    floating-point array/tensor of the same kind.
    """
    _check_box_shape(boxes)
    mapped = boxes * 1.0  # a float copy for both array kinds
    mapped[..., 0::2] = mapped[..., 0::2] * info.scale + info.pad_x
    mapped[..., 1::2] = mapped[..., 1::2] * info.scale + info.pad_y
    return mapped


def boxes_to_original(boxes: BoxArray, info: LetterboxInfo) -> BoxArray:
    """(..., 4) xyxy in letterboxed input pixels → (..., 4) xyxy in original-image pixels, clipped to the image.

    The exact inverse of `boxes_to_input` for boxes inside the image. Works on NumPy arrays and torch tensors
    alike; returns a new floating-point array/tensor of the same kind. x is clipped to [0, W] and y to [0, H]
    (pixel edges), so a box in the padding collapses to zero width or height on the image border.
    """
    _check_box_shape(boxes)
    original_h, original_w = info.original_size
    mapped = boxes * 1.0
    mapped[..., 0::2] = ((mapped[..., 0::2] - info.pad_x) / info.scale).clip(0, original_w)
    mapped[..., 1::2] = ((mapped[..., 1::2] - info.pad_y) / info.scale).clip(0, original_h)
    return mapped


def _check_box_shape(boxes: np.ndarray | torch.Tensor) -> None:
    if boxes.ndim < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"expected boxes of shape (..., 4) xyxy, got {tuple(boxes.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------------


def to_tensor_batch(images: Sequence[np.ndarray]) -> np.ndarray:
    """List of (h, w, 3) uint8 RGB images, all the same size → (B, 3, h, w) contiguous float32 RGB in [0, 1]."""
    if len(images) == 0:
        raise ValueError("to_tensor_batch needs at least one image")
    for image in images:
        _check_rgb_uint8(image)
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(f"all images in a batch must have the same size, got {sorted(shapes)}")
    batch = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2), dtype=np.float32)
    batch /= 255.0
    return batch


def preprocess(
    images: Sequence[ImageSource | np.ndarray], input_size: tuple[int, int]
) -> tuple[np.ndarray, list[LetterboxInfo]]:
    """Loads, letterboxes and batches images for the model.

    Args:
        images: paths, encoded bytes, PIL images, or (H, W, 3) uint8 RGB arrays (taken as already loaded).
        input_size: (h, w) model input, multiples of 32.

    Returns:
        (B, 3, h, w) float32 RGB in [0, 1], and one LetterboxInfo per image to map boxes back.
    """
    input_size = check_input_size(input_size)
    letterboxed, infos = [], []
    for source in images:
        image = source if isinstance(source, np.ndarray) else load_image(source)
        padded, info = letterbox(image, input_size)
        letterboxed.append(padded)
        infos.append(info)
    return to_tensor_batch(letterboxed), infos


# ----------------------------------------------------------------------------------------------------------------
# IoU and NMS
# ----------------------------------------------------------------------------------------------------------------
# Both IoU functions use the same operations in the same order, so on float32 inputs they agree bit for bit and
# NumPy and torch NMS take the same decisions even for pairs whose IoU lands on the threshold.


def box_iou_numpy(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """(N, 4) and (M, 4) xyxy, same pixel space → (N, M) IoU.

    Boxes that only touch have IoU 0; degenerate (zero-area) boxes have IoU 0 with everything. Computed in
    float32 for float32 inputs, float64 otherwise.
    """
    dtype = np.result_type(boxes_a.dtype, boxes_b.dtype, np.float32)
    a = np.asarray(boxes_a, dtype=dtype).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=dtype).reshape(-1, 4)
    area_a = np.maximum(a[:, 2] - a[:, 0], 0) * np.maximum(a[:, 3] - a[:, 1], 0)
    area_b = np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)
    inter_w = np.maximum(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0)
    inter_h = np.maximum(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0)
    inter = inter_w * inter_h
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_iou_torch(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """(N, 4) and (M, 4) xyxy, same pixel space → (N, M) IoU; same semantics as `box_iou_numpy`."""
    dtype = torch.promote_types(torch.promote_types(boxes_a.dtype, boxes_b.dtype), torch.float32)
    a = boxes_a.to(dtype).reshape(-1, 4)
    b = boxes_b.to(dtype).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    inter_w = (torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])).clamp(min=0)
    inter_h = (torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])).clamp(min=0)
    inter = inter_w * inter_h
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union, torch.zeros_like(inter))


def nms_numpy(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression.

    A box is suppressed when its IoU with an already kept, higher-scoring box is strictly greater than
    `iou_threshold`. Equal scores are ranked by index (lower first).

    Args:
        boxes: (N, 4) xyxy, any pixel space.
        scores: (N,).
        iou_threshold: IoU above which the lower-scoring box is dropped.

    Returns:
        (K,) int64 indices into `boxes` of the kept boxes, by decreasing score.
    """
    return _nms_numpy(boxes, scores, None, iou_threshold)


def batched_nms_numpy(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-aware `nms_numpy`: boxes with different (N,) `class_ids` never suppress each other.

    Returns:
        (K,) int64 indices into `boxes`, by decreasing score across all classes.
    """
    return _nms_numpy(boxes, scores, np.asarray(class_ids).reshape(-1), iou_threshold)


def _nms_numpy(boxes: np.ndarray, scores: np.ndarray, class_ids: np.ndarray | None, iou_threshold: float) -> np.ndarray:
    boxes, scores = np.asarray(boxes), np.asarray(scores).reshape(-1)
    _check_nms_inputs(tuple(boxes.shape), tuple(scores.shape), None if class_ids is None else tuple(class_ids.shape))
    # Masking cross-class pairs instead of offsetting boxes by class keeps IoUs exact (offsets of class · image
    # size cost float32 precision, which moves pairs across the threshold).
    remaining = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    while remaining.size:
        best, rest = remaining[0], remaining[1:]
        kept.append(int(best))
        suppressed = box_iou_numpy(boxes[best : best + 1], boxes[rest])[0] > iou_threshold
        if class_ids is not None:
            suppressed &= class_ids[rest] == class_ids[best]
        remaining = rest[~suppressed]
    return np.asarray(kept, dtype=np.int64)


def nms_torch(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """`nms_numpy` on tensors: (N, 4) xyxy and (N,) scores → (K,) int64 indices on the same device.

    Meant for N up to a few thousand (after top-k): it builds the (N, N) IoU matrix.
    """
    return _nms_torch(boxes, scores, None, iou_threshold)


def batched_nms_torch(
    boxes: torch.Tensor, scores: torch.Tensor, class_ids: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """`batched_nms_numpy` on tensors: boxes with different (N,) `class_ids` never suppress each other."""
    return _nms_torch(boxes, scores, class_ids.reshape(-1), iou_threshold)


def _nms_torch(
    boxes: torch.Tensor, scores: torch.Tensor, class_ids: torch.Tensor | None, iou_threshold: float
) -> torch.Tensor:
    scores = scores.reshape(-1)
    _check_nms_inputs(tuple(boxes.shape), tuple(scores.shape), None if class_ids is None else tuple(class_ids.shape))
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order]
    # overlaps[i, j]: box i (ranked higher) would suppress box j (ranked lower) if i is kept.
    overlaps = box_iou_torch(sorted_boxes, sorted_boxes) > iou_threshold
    if class_ids is not None:
        sorted_classes = class_ids[order]
        overlaps &= sorted_classes[:, None] == sorted_classes[None, :]
    overlaps = overlaps.triu(diagonal=1)
    # The greedy pass is inherently sequential. Run it on a CPU (NumPy view of the) mask: on a GPU each step
    # would be a device synchronisation, and per-element torch indexing costs ~3x NumPy's (measured at N=1000).
    overlaps_cpu = overlaps.cpu().numpy()
    suppressed = np.zeros(order.numel(), dtype=bool)
    for rank in range(order.numel()):
        if not suppressed[rank]:
            suppressed |= overlaps_cpu[rank]
    return order[torch.from_numpy(~suppressed).to(order.device)]


def _check_nms_inputs(
    boxes_shape: tuple[int, ...], scores_shape: tuple[int, ...], class_shape: tuple[int, ...] | None
) -> None:
    if len(boxes_shape) != 2 or boxes_shape[1] != 4:
        raise ValueError(f"expected boxes of shape (N, 4) xyxy, got {boxes_shape}")
    if scores_shape != boxes_shape[:1] or (class_shape is not None and class_shape != boxes_shape[:1]):
        raise ValueError(f"boxes {boxes_shape}, scores {scores_shape} and class ids {class_shape} must have the same N")


# ----------------------------------------------------------------------------------------------------------------
# Post-processing
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Detections:
    """Detections of one image.

    Attributes:
        boxes: (N, 4) float32 xyxy; which pixel space is stated by the function that returns them.
        scores: (N,) float32, by decreasing score.
        class_ids: (N,) int64, 0-based class indices.
    """

    boxes: np.ndarray
    scores: np.ndarray
    class_ids: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        self.class_ids = np.asarray(self.class_ids, dtype=np.int64).reshape(-1)
        if not len(self.boxes) == len(self.scores) == len(self.class_ids):
            raise ValueError(
                f"boxes {self.boxes.shape}, scores {self.scores.shape} and class ids {self.class_ids.shape} "
                "must have the same length"
            )

    def __len__(self) -> int:
        return len(self.scores)

    def to_dict(self, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """JSON-friendly list: {"box": [x1, y1, x2, y2], "score", "class_id", "class_name"} per detection.

        `class_name` is None without `class_names`.
        """
        if class_names is not None and len(self) and int(self.class_ids.max()) >= len(class_names):
            raise ValueError(f"class id {int(self.class_ids.max())} has no name among {len(class_names)} classes")
        return [
            {
                "box": [float(value) for value in box],
                "score": float(score),
                "class_id": int(class_id),
                "class_name": None if class_names is None else class_names[int(class_id)],
            }
            for box, score, class_id in zip(self.boxes, self.scores, self.class_ids)
        ]


@dataclass(frozen=True)
class PostprocessConfig:
    """Post-processing settings.

    Attributes:
        conf_threshold: keep (anchor, class) scores strictly above this.
        iou_threshold: class-aware NMS drops boxes whose IoU with a kept box is strictly above this.
        top_k: candidates kept, by score, before NMS (bounds NMS cost).
        max_detections: detections kept per image after NMS.
        multi_label: every class above the threshold is a candidate for an anchor; otherwise only its best class.
    """

    conf_threshold: float = 0.25
    iou_threshold: float = 0.7
    top_k: int = 1000
    max_detections: int = 300
    multi_label: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf_threshold <= 1.0 or not 0.0 <= self.iou_threshold <= 1.0:
            raise ValueError(f"thresholds must be in [0, 1], got {self.conf_threshold=}, {self.iou_threshold=}")
        if self.top_k < 1 or self.max_detections < 1:
            raise ValueError(f"top_k and max_detections must be at least 1, got {self.top_k}, {self.max_detections}")


def _check_model_outputs(boxes_shape: tuple[int, ...], scores_shape: tuple[int, ...]) -> None:
    if len(boxes_shape) != 3 or boxes_shape[2] != 4 or len(scores_shape) != 3 or boxes_shape[:2] != scores_shape[:2]:
        raise ValueError(f"expected boxes (B, A, 4) and scores (B, A, C), got {boxes_shape} and {scores_shape}")


def postprocess_numpy(
    boxes: np.ndarray, scores: np.ndarray, config: PostprocessConfig = PostprocessConfig()
) -> list[Detections]:
    """Model outputs → detections per image, in letterboxed input pixels.

    Args:
        boxes: (B, A, 4) xyxy in input pixels.
        scores: (B, A, C) sigmoid class scores.
        config: thresholds and caps.

    Returns:
        B Detections, boxes (N, 4) xyxy in input pixels, by decreasing score.
    """
    boxes, scores = np.asarray(boxes), np.asarray(scores)
    _check_model_outputs(boxes.shape, scores.shape)
    results = []
    for image_boxes, image_scores in zip(boxes, scores):  # (A, 4), (A, C)
        if config.multi_label:
            anchor_ids, class_ids = np.nonzero(image_scores > config.conf_threshold)  # row-major, as torch
            candidate_scores = image_scores[anchor_ids, class_ids]
        else:
            best_classes = image_scores.argmax(axis=1)
            best_scores = np.take_along_axis(image_scores, best_classes[:, None], axis=1)[:, 0]
            anchor_ids = np.nonzero(best_scores > config.conf_threshold)[0]
            class_ids, candidate_scores = best_classes[anchor_ids], best_scores[anchor_ids]
        top = np.argsort(-candidate_scores, kind="stable")[: config.top_k]
        anchor_ids, class_ids, candidate_scores = anchor_ids[top], class_ids[top], candidate_scores[top]
        candidate_boxes = image_boxes[anchor_ids]
        keep = batched_nms_numpy(candidate_boxes, candidate_scores, class_ids, config.iou_threshold)
        keep = keep[: config.max_detections]
        results.append(Detections(candidate_boxes[keep], candidate_scores[keep], class_ids[keep]))
    return results


def postprocess_torch(
    boxes: torch.Tensor, scores: torch.Tensor, config: PostprocessConfig = PostprocessConfig()
) -> list[Detections]:
    """`postprocess_numpy` on tensors (any device): (B, A, 4) xyxy input px, (B, A, C) sigmoid → B Detections.

    The same candidates, order and tie-breaking as `postprocess_numpy`; results are NumPy Detections in input
    pixels.
    """
    _check_model_outputs(tuple(boxes.shape), tuple(scores.shape))
    results = []
    for image_boxes, image_scores in zip(boxes, scores):  # (A, 4), (A, C)
        if config.multi_label:
            anchor_ids, class_ids = torch.nonzero(image_scores > config.conf_threshold, as_tuple=True)
            candidate_scores = image_scores[anchor_ids, class_ids]
        else:
            best_classes = image_scores.argmax(dim=1)  # first maximum on ties, like NumPy
            best_scores = image_scores.gather(1, best_classes[:, None])[:, 0]
            anchor_ids = torch.nonzero(best_scores > config.conf_threshold, as_tuple=True)[0]
            class_ids, candidate_scores = best_classes[anchor_ids], best_scores[anchor_ids]
        top = torch.sort(candidate_scores, descending=True, stable=True).indices[: config.top_k]
        anchor_ids, class_ids, candidate_scores = anchor_ids[top], class_ids[top], candidate_scores[top]
        candidate_boxes = image_boxes[anchor_ids]
        keep = batched_nms_torch(candidate_boxes, candidate_scores, class_ids, config.iou_threshold)
        keep = keep[: config.max_detections]
        results.append(
            Detections(
                candidate_boxes[keep].detach().cpu().numpy(),
                candidate_scores[keep].detach().cpu().numpy(),
                class_ids[keep].cpu().numpy(),
            )
        )
    return results


def postprocess_to_original(
    boxes: np.ndarray | torch.Tensor,
    scores: np.ndarray | torch.Tensor,
    infos: Sequence[LetterboxInfo],
    config: PostprocessConfig = PostprocessConfig(),
) -> list[Detections]:
    """Post-processes model outputs and maps each image's boxes back to its original pixels.

    Args:
        boxes: (B, A, 4) xyxy in input pixels, NumPy or torch.
        scores: (B, A, C) sigmoid class scores, the same kind as `boxes`.
        infos: B LetterboxInfo from `preprocess`/`letterbox`.
        config: thresholds and caps.

    Returns:
        B Detections, boxes (N, 4) xyxy in original-image pixels, clipped to the image.
    """
    if len(infos) != boxes.shape[0]:
        raise ValueError(f"got {len(infos)} letterbox infos for a batch of {boxes.shape[0]} images")
    if isinstance(boxes, torch.Tensor):
        detections = postprocess_torch(boxes, torch.as_tensor(scores, device=boxes.device), config)
    else:
        detections = postprocess_numpy(boxes, np.asarray(scores), config)
    return [
        Detections(boxes_to_original(found.boxes, info), found.scores, found.class_ids)
        for found, info in zip(detections, infos, strict=True)
    ]
