"""The in-memory form of a detection dataset that every reader returns and every consumer takes.

Boxes here are xyxy in original-image pixels (after EXIF orientation), x2/y2 being the right/bottom pixel edges,
the same convention as `backend.processing`. Labels are contiguous class indices 0..C-1; `category_ids` maps them
back to the dataset's own ids (COCO category ids, from 1) at COCO boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """A dataset that cannot be used at all (missing file, malformed JSON, unknown class...): the message says
    what is wrong and what to do. Problems with single records are counted in a `LoadReport` instead."""


@dataclass
class ImageRecord:
    """One image and its boxes.

    Attributes:
        path: the image file.
        image_id: the dataset's id for this image (COCO image id; YOLO readers number images from 1).
        width: width in pixels after EXIF orientation.
        height: height in pixels after EXIF orientation.
        boxes: (N, 4) float32 xyxy in original-image pixels, clipped to the image, none degenerate.
        labels: (N,) int64 contiguous class indices 0..C-1.
    """

    path: Path
    image_id: int
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.boxes) != len(self.labels):
            raise ValueError(f"{self.path}: {len(self.boxes)} boxes but {len(self.labels)} labels")


@dataclass
class LoadReport:
    """What a reader kept, fixed and dropped; nothing is dropped without being counted here.

    Attributes:
        images: images kept.
        boxes: boxes kept.
        background_images: kept images without any box.
        boxes_clipped: boxes that reached outside the image and were clipped to it.
        boxes_dropped: boxes dropped, by reason ("degenerate", "crowd", ...).
        images_skipped: (file name, reason) of images left out (missing, corrupt...).
        warnings: anything else the user should know (e.g. a size in the JSON that disagrees with the file).
    """

    images: int = 0
    boxes: int = 0
    background_images: int = 0
    boxes_clipped: int = 0
    boxes_dropped: dict[str, int] = field(default_factory=dict)
    images_skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def drop_box(self, reason: str) -> None:
        self.boxes_dropped[reason] = self.boxes_dropped.get(reason, 0) + 1

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "boxes": self.boxes,
            "background_images": self.background_images,
            "boxes_clipped": self.boxes_clipped,
            "boxes_dropped": dict(self.boxes_dropped),
            "images_skipped": [list(item) for item in self.images_skipped],
            "warnings": list(self.warnings),
        }


@dataclass
class DetectionSet:
    """One split of a dataset.

    Attributes:
        records: the images kept, in file order.
        class_names: one name per contiguous class index.
        category_ids: the dataset's category id for each class index (COCO ids; 1..C for YOLO layouts).
        report: what loading kept and dropped.
        source: the annotation file or folder it was read from.
    """

    records: list[ImageRecord]
    class_names: list[str]
    category_ids: list[int]
    report: LoadReport
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
