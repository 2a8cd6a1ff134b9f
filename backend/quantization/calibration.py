"""Calibration images for onnxruntime static quantization, read lazily with the validation pre-processing."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from backend.data.records import ImageRecord
from backend.processing import check_input_size, letterbox, load_image, to_tensor_batch

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_COUNT = 64


class CalibrationImages(CalibrationDataReader):
    """Feeds `count` training images, one per call, as {"images": (1, 3, H, W) float32 RGB in [0, 1]}.

    The images are drawn with a seeded shuffle and pre-processed exactly like validation images (letterbox,
    /255, NCHW), because the quantization ranges must match what the model sees at inference. Each image is
    loaded when `get_next` asks for it, so calibrating on hundreds of large images never holds them all.

    Args:
        records: the images to draw from (the training split; boxes are not used).
        imgsz: the model input side (square) or (H, W), multiples of 32.
        count: how many images to draw; fewer available → a warning and all of them.
        seed: the shuffle seed (the same seed draws the same images).
        input_name: the model's input name.

    Raises:
        ValueError: no records to calibrate on.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        imgsz: int | tuple[int, int],
        count: int = DEFAULT_CALIBRATION_COUNT,
        seed: int = 0,
        input_name: str = "images",
    ):
        if count < 1:
            raise ValueError(f"calibration needs at least 1 image, got count={count}")
        if len(records) == 0:
            raise ValueError(
                "no calibration images: the training split is empty; add labelled training images "
                "(or pass other records) before quantizing"
            )
        self.input_size = check_input_size((imgsz, imgsz) if isinstance(imgsz, int) else (imgsz[0], imgsz[1]))
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        if len(records) < count:
            logger.warning(
                "asked for %d calibration images but only %d are available; calibrating on %d",
                count,
                len(records),
                len(records),
            )
        self.records = [records[index] for index in order[:count]]
        self.input_name = input_name
        self._position = 0

    def __len__(self) -> int:
        return len(self.records)

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next image as {input_name: (1, 3, H, W) float32}, or None when all were given."""
        if self._position >= len(self.records):
            return None
        record = self.records[self._position]
        self._position += 1
        padded, _ = letterbox(load_image(record.path), self.input_size)
        return {self.input_name: to_tensor_batch([padded])}

    def rewind(self) -> None:
        """Starts again from the first image (the entropy and percentile calibrators may read twice)."""
        self._position = 0
