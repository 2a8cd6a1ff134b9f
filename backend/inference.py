"""One predictor for checkpoints (PyTorch) and exported ONNX files, with the shared pre/post-processing.

predictor = Predictor.from_path("runs/x/best.pt")   # or "model_int8.onnx"
detections = predictor.predict(["photo.jpg"])       # boxes xyxy in original-image pixels

Photos are decoded under a pixel cap (`decode_photo`, the store's 50 MP per image): a 500 KB PNG can declare
13000x13000 pixels, which cost 2.5 GB to decode (docs/odd_inputs.md). A JPEG is decoded at 1/2, 1/4 or 1/8 scale by
libjpeg (PIL `draft`) until it fits; any other format above the cap is refused from its header, before a pixel is
decoded.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from backend.models.checkpoints import load_model
from backend.models.yolo_nas import YoloNAS
from backend.processing import (
    Detections,
    ImageLoadError,
    ImageSource,
    LetterboxInfo,
    PostprocessConfig,
    boxes_to_original,
    load_image,
    postprocess_numpy,
    postprocess_torch,
    preprocess,
)
from backend.runtimes import RuntimeUnavailable, open_onnx, runtime_label
from backend.store.images import DEFAULT_MAX_PIXELS

DEFAULT_IMGSZ = 640
# The most pixels one photo is decoded to: the store's per-image limit (a 48 MP phone photo fits). A 50 MP decode
# holds ~200 MB in Pillow (4 bytes a pixel) and ~150 MB as RGB.
MAX_DECODE_PIXELS = DEFAULT_MAX_PIXELS
EXIF_ORIENTATION_TAG = 0x0112
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_JPEG_REDUCTIONS = (2, 4, 8)  # what libjpeg's DCT scaling offers


class ModelFileError(ValueError):
    """A model file that cannot be used: damaged, truncated, not an ONNX model, or not one yolodex exported. The
    message names the file and says why, in one line (the CLI prints it as `yolodex: error: ...`)."""


@dataclass
class Predictor:
    """Runs a model on images. Use `from_path`; `engine` is "torch", "onnxruntime" or "openvino" (docs/runtimes.md)."""

    engine: str
    class_names: list[str]
    input_size: tuple[int, int]  # (h, w) letterbox target, multiples of 32
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    model: YoloNAS | None = None
    session: Any = None  # a backend.runtimes.OnnxSession (onnxruntime's run() shape), or None for torch
    onnx_has_nms: bool = False
    device: str = "cpu"

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        *,
        imgsz: int | None = None,
        postprocess: PostprocessConfig | None = None,
        device: str = "cpu",
        threads: int | None = None,
        runtime: str = "auto",
        compute: str = "f32",
    ) -> Predictor:
        """A checkpoint (.pt/.pth, ours or official) or an ONNX file exported by yolodex.

        Args:
            imgsz: square input side for checkpoints (default: the checkpoint's, else 640); ONNX files have theirs.
            postprocess: thresholds; for ONNX files with NMS inside, the graph's own thresholds apply.
            threads: intra-op threads of the ONNX runtime (default: the runtime's choice).
            runtime: for ONNX files, "auto" (OpenVINO where it runs, else onnxruntime), "onnxruntime" or "openvino".
            compute: for ONNX files in OpenVINO, "f32" or "bf16" (an FP32 model with bfloat16 arithmetic, on CPUs
                with native bf16 only).
        """
        path = Path(path)
        postprocess = postprocess or PostprocessConfig()
        if path.suffix.lower() == ".onnx":
            return cls._from_onnx(path, postprocess, threads, runtime, compute)
        model, report = load_model(path)
        model = model.to(device).eval().fuse(full=True)
        side = imgsz or report.imgsz or DEFAULT_IMGSZ
        return cls("torch", report.class_names, (side, side), postprocess, model=model, device=device)

    @classmethod
    def _from_onnx(
        cls, path: Path, postprocess: PostprocessConfig, threads: int | None, runtime: str, compute: str
    ) -> Predictor:
        # Imported here: onnx only when an ONNX model is opened; a checkpoint's Predictor never loads it.
        from backend.export.onnx_export import read_onnx_metadata

        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        try:
            metadata = read_onnx_metadata(path)
        except Exception as error:  # protobuf's DecodeError, a truncated file, metadata that is not JSON
            raise ModelFileError(f"{path} is not a valid ONNX model ({_first_line(error)})") from error
        if "class_names" not in metadata or "imgsz" not in metadata:
            raise ModelFileError(
                f"{path} has no yolodex metadata (class_names, imgsz): export it with `yolodex export`"
            )
        try:
            names, (height, width) = [str(name) for name in metadata["class_names"]], metadata["imgsz"]
            height, width = int(height), int(width)
        except (TypeError, ValueError) as error:
            raise ModelFileError(f"{path} has unreadable yolodex metadata ({_first_line(error)})") from error
        try:
            session = open_onnx(path, runtime=runtime, compute=compute, threads=threads)
        except (RuntimeUnavailable, ValueError):
            raise
        except Exception as error:  # the runtimes' own types (InvalidProtobuf, InvalidGraph, Fail...) derive Exception
            raise ModelFileError(f"{path} is not a valid ONNX model ({_first_line(error)})") from error
        inputs, outputs = session.input_names, session.output_count
        if inputs != ["images"] or outputs not in (2, 4):
            raise ModelFileError(
                f"{path} is not a yolodex detector (inputs {inputs}, {outputs} outputs; expected the input 'images' "
                "and 2 or 4 outputs): export it with `yolodex export`"
            )
        return cls(
            session.runtime,
            names,
            (height, width),
            postprocess,
            session=session,
            onnx_has_nms=bool(metadata.get("with_nms", outputs == 4)),
        )

    @property
    def runtime_label(self) -> str:
        """The runtime as pages and reports name it: "PyTorch", "onnxruntime", "OpenVINO" or "OpenVINO bf16"."""
        if self.session is None:
            return runtime_label("torch")
        return self.session.label

    def warm_up(self) -> float:
        """Runs the model once on a blank image of its input size, so that a first timed call measures the steady
        state, not onnxruntime's or PyTorch's first-run set-up (allocations, kernel choice: the first run of an INT8
        graph can take several times longer than the next). Returns the seconds it took."""
        height, width = self.input_size
        start = time.perf_counter()
        self.predict([np.full((height, width, 3), 114, dtype=np.uint8)])
        return time.perf_counter() - start

    def predict(
        self, images: Sequence[ImageSource | np.ndarray], *, postprocess: PostprocessConfig | None = None
    ) -> list[Detections]:
        """Detections per image, boxes (N, 4) xyxy in original-image pixels (`predict_timed` without its timings)."""
        return self.predict_timed(images, postprocess=postprocess).detections

    def predict_timed(
        self,
        images: Sequence[ImageSource | np.ndarray],
        *,
        postprocess: PostprocessConfig | None = None,
        original_sizes: Sequence[tuple[int, int] | None] | None = None,
    ) -> Prediction:
        """Detections per image, boxes (N, 4) xyxy in original-image pixels, and the time each stage took.

        Paths and bytes are decoded under the pixel cap (`decode_photo`): a JPEG over it at reduced scale (its boxes
        scaled back to the full-size photo), any other image over it refused with an ImageLoadError.

        Args:
            images: paths, encoded bytes, PIL images or (h, w, 3) uint8 RGB arrays.
            postprocess: thresholds for this call instead of the predictor's own (the predictor is not changed, so
                one cached predictor serves callers with different thresholds). For an ONNX graph with NMS inside,
                its score threshold is applied after the graph's own (which may be lower).
            original_sizes: for arrays decoded at reduced scale (`decode_photo` with `min_long_side`), the (H, W)
                of each full-size photo: their boxes come back in its pixels. None: an array's own pixels.
        """
        start = time.perf_counter()
        decoded: list[tuple[Any, tuple[int, int] | None]] = [
            decode_photo(image) if isinstance(image, str | Path | bytes | bytearray) else (image, None)
            for image in images
        ]
        if original_sizes is not None:
            if len(original_sizes) != len(images):
                raise ValueError(f"got {len(original_sizes)} original sizes for {len(images)} images")
            decoded = [(pixels, size or own) for (pixels, own), size in zip(decoded, original_sizes)]
        batch, infos = preprocess([pixels for pixels, _ in decoded], self.input_size)  # (B, 3, h, w) in [0, 1]
        model_start = time.perf_counter()
        outputs = self._run_model(batch)
        post_start = time.perf_counter()
        detections = self._postprocess(outputs, infos, [size for _, size in decoded], postprocess)
        end = time.perf_counter()
        timings = {
            "preprocess_ms": (model_start - start) * 1e3,
            "model_ms": (post_start - model_start) * 1e3,
            "postprocess_ms": (end - post_start) * 1e3,
        }
        return Prediction(detections, timings)

    def _run_model(self, batch: np.ndarray) -> list[Any]:
        """The raw outputs of the model on a (B, 3, h, w) batch: [boxes, scores], or the NMS graph's four."""
        if self.engine == "torch":
            assert self.model is not None
            with torch.inference_mode():
                boxes, scores = self.model.predict_boxes(torch.from_numpy(batch).to(self.device))
            if boxes.is_cuda:  # the model's time, not the launch's: wait for the kernels
                torch.cuda.synchronize(boxes.device)
            return [boxes, scores]
        return list(self.session.run(None, {"images": batch}))  # type: ignore[union-attr]

    def _postprocess(
        self,
        outputs: list[Any],
        infos: Sequence[LetterboxInfo],
        original_sizes: Sequence[tuple[int, int] | None],
        postprocess: PostprocessConfig | None,
    ) -> list[Detections]:
        """NMS (or the graph's), the score threshold once, and each image's boxes mapped once to its original pixels."""
        config = postprocess or self.postprocess
        if self.engine == "torch":
            found = postprocess_torch(outputs[0], outputs[1], config)
        elif not self.onnx_has_nms:
            found = postprocess_numpy(outputs[0], outputs[1], config)
        else:
            num_detections, det_boxes, det_scores, det_classes = outputs
            found = []
            for index in range(len(infos)):
                count = int(num_detections[index, 0])
                # The graph applied its own score threshold; a caller's threshold, which may be higher, comes on top.
                keep = det_scores[index, :count] > (postprocess.conf_threshold if postprocess else -1.0)
                found.append(
                    Detections(
                        det_boxes[index, :count][keep],
                        det_scores[index, :count][keep],
                        det_classes[index, :count][keep],
                    )
                )
        return [
            Detections(_to_original(item.boxes, info, size), item.scores, item.class_ids)
            for item, info, size in zip(found, infos, original_sizes, strict=True)
        ]


@dataclass
class Prediction:
    """What `Predictor.predict_timed` returns.

    Attributes:
        detections: one Detections per image, boxes (N, 4) xyxy in original-image pixels.
        timings: milliseconds of the batch's stages: "preprocess_ms" (decoding, letterbox, batching), "model_ms"
            (the model or ONNX graph alone) and "postprocess_ms" (NMS and mapping the boxes back).
    """

    detections: list[Detections]
    timings: dict[str, float]


def _to_original(boxes: np.ndarray, info: LetterboxInfo, original_size: tuple[int, int] | None) -> np.ndarray:
    """(N, 4) xyxy in input pixels → xyxy in original-image pixels: the letterbox's inverse, then, for an image
    decoded at reduced scale, its per-axis ratio to the full-size photo (`original_size`, (H, W))."""
    boxes = boxes_to_original(np.asarray(boxes, dtype=np.float32), info)
    if original_size is None or tuple(original_size) == tuple(info.original_size):
        return boxes
    (height, width), (original_h, original_w) = info.original_size, original_size
    return boxes * np.array([original_w / width, original_h / height] * 2, dtype=np.float32)


def _first_line(error: BaseException) -> str:
    """An exception's message on one line, without onnxruntime's "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF :"."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text.split(" : ")[-1] if text.startswith("[ONNXRuntimeError]") else text


def decode_photo(
    source: str | Path | bytes | bytearray,
    min_long_side: int | None = None,
    *,
    max_pixels: int = MAX_DECODE_PIXELS,
    name: str | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decodes a photo under a pixel cap, EXIF orientation applied, as small as `min_long_side` allows for JPEGs.

    A JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (PIL `draft`) when that keeps the long side at least
    `min_long_side` (speed), and at the scale that brings it under `max_pixels` (memory). Any other format is
    decoded at full size, or refused from its header when it has more than `max_pixels` pixels. Everything else
    (EXIF, alpha, 16-bit, errors) is `backend.processing.load_image`.

    Args:
        source: a file path or the encoded file.
        min_long_side: pixels the decoded long side must keep (None: full size when under the cap).
        max_pixels: the most pixels decoded (the store's per-image limit by default).
        name: the photo's name in error messages (default: the path, or "<bytes>").

    Returns:
        (h', w', 3) uint8 RGB pixels in displayed orientation, and the (H, W) of the full-size photo after EXIF
        orientation (original-image pixels = decoded pixels · (W / w', H / h')).

    Raises:
        FileNotFoundError: the path does not exist.
        ImageLoadError: the data is not an image Pillow can decode, or has more pixels than the cap allows.
    """
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():  # load_image's own messages for a missing path or a folder
            return _full_decode(path, name)
        label, data = name or str(path), path.read_bytes()
    else:
        label, data = name or "<bytes>", bytes(source)
    try:
        with warnings.catch_warnings():  # the cap below speaks first, with its own limit and words
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:  # over twice Pillow's own limit (~179 MP): refused by Pillow
        raise ImageLoadError(
            f"could not read '{label}': too many pixels to decode safely ({error}); downscale it and try again"
        ) from error
    except Exception:  # let load_image build the error message it gives for every other bad file
        return _full_decode(data, label)
    width, height = image.size  # stored orientation
    request = _draft_request(image, min_long_side, max_pixels)
    if request is not None:
        image.draft("RGB", request)
    decoded_w, decoded_h = image.size
    if decoded_w * decoded_h > max_pixels:  # before getexif: a PNG's getexif decodes every pixel to find its eXIf
        raise ImageLoadError(
            f"could not read '{label}': {width}x{height} is {width * height / 1e6:.0f} megapixels, over the "
            f"{max_pixels / 1e6:.0f} MP a photo may have here; downscale it (or save it as JPEG, which is decoded "
            "at reduced scale) and try again"
        )
    try:
        transposed = image.getexif().get(EXIF_ORIENTATION_TAG, 1) in TRANSPOSING_ORIENTATIONS
    except Exception:  # a truncated or corrupt file: load_image says so
        return _full_decode(data, label)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pixels = load_image(_reduced(image, min_long_side), name=label)
    return pixels, ((width, height) if transposed else (height, width))


def _reduced(image: Image.Image, min_long_side: int | None) -> Image.Image:
    """A large PNG/WebP/BMP box-averaged by the largest whole factor that keeps the long side at least
    `min_long_side`, right after decoding: the orientation, RGB and resizing copies that follow are then small (a
    49 MP PNG in the Pokédex: 655 MB more without this, 190 MB with it). JPEGs were reduced by `draft` already."""
    factor = max(image.size) // min_long_side if min_long_side else 1
    if factor < 2 or image.format == "JPEG" or image.mode not in ("RGB", "RGBA", "L", "LA"):
        return image
    try:
        image.load()
    except Exception:  # truncated or corrupt: load_image says so, in its words
        return image
    reduced = image.reduce(factor)
    reduced.info.update(image.info)  # the EXIF orientation travels with it
    return reduced


def _draft_request(image: Image.Image, min_long_side: int | None, max_pixels: int) -> tuple[int, int] | None:
    """The size to ask `draft` for (it keeps each side at least the one asked), or None to decode at full size."""
    if image.format != "JPEG":
        return None
    width, height = image.size
    reduction = 1
    if min_long_side is not None:  # the largest reduction that keeps the long side at least min_long_side
        reduction = max([1, *(r for r in _JPEG_REDUCTIONS if math.ceil(max(width, height) / r) >= min_long_side)])
    if width * height > max_pixels:  # the smallest reduction that brings it under the cap
        fitting = [r for r in _JPEG_REDUCTIONS if math.ceil(width / r) * math.ceil(height / r) <= max_pixels]
        reduction = max(reduction, fitting[0] if fitting else _JPEG_REDUCTIONS[-1])
    if reduction == 1:
        return None
    return max(1, width // reduction), max(1, height // reduction)  # width // (width // r) >= r: draft picks r


def _full_decode(source: Path | bytes, name: str | None) -> tuple[np.ndarray, tuple[int, int]]:
    pixels = load_image(source, name=name)
    return pixels, pixels.shape[:2]
