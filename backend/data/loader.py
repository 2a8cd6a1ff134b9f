"""The training data path: a decoded-image cache, the augmented dataset, the epoch sampler, collate and the preview.

    records ──decode once (EXIF, RGB), longer side → imgsz──▶ cache (uint8, in memory, capped by bytes)
    EpochSampler ──virtual indices──▶ TrainDataset[i] ──augmentation pipeline (data/augment.py) or letterbox──▶
    collate_detections ──▶ {"images" uint8 (B, 3, H, W), "gt_boxes" (B, M, 4), "gt_labels", "gt_mask"}

Speed matters: training runs on 2-core CPUs where a model step costs ~1 s per batch of 16 at 320, so the data path
must stay well under 5% of that. Images are decoded once by `TrainDataset.preload()` in the main process, before
DataLoader workers fork and share the cache copy-on-write; each sample is then a few OpenCV calls on small arrays
(bench/loader.py measures the samples/s).

Reproducibility: the random stream of a sample is derived from (dataset seed, epoch, sample index) only, never from
global state or from the worker that runs it, so the same seed gives the same batches with any number of workers.
Small datasets are resampled to `min_samples` per epoch; the sampler then yields *virtual* indices
k·len + j (the k-th copy of image j in this epoch) so that copies get different augmentations.

Boxes: xyxy in pixels (x2/y2 the right/bottom pixel edges). Records hold original-image pixels; everything this
module returns is in letterboxed/augmented input pixels of the imgsz x imgsz training input.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from backend.data.augment import MOSAIC_TILES, augment_sample, default_pipeline, uses_mosaic
from backend.data.records import DatasetError, ImageRecord
from backend.palette import palette_rgb
from backend.processing import PAD_VALUE, ImageLoadError, check_input_size, letterbox, load_image

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 2 * 1024**3
PRELOAD_THREADS = 4  # Pillow decoding and OpenCV resizing release the GIL, so threads overlap file I/O and decoding


class TrainDataset(Dataset):
    """Training samples: augmented (or letterboxed) images with their boxes, from a decoded-image cache.

    `dataset[i]` accepts any non-negative int: i and i + k·len(dataset) are the same image with independent
    augmentations (see `EpochSampler`). Without augmentation it is exactly the validation pre-processing:
    `backend.processing.letterbox` (centred, pad 114) and `boxes_to_input`.

    Args:
        records: the training images and their boxes (xyxy, original-image pixels).
        imgsz: the square training input size, a multiple of 32.
        augment: the augmentation pipeline (`backend.data.augment`, its output imgsz x imgsz); None for plain
            letterboxing.
        seed: seeds every sample's augmentation together with the epoch and the sample index.
        cache_bytes: most bytes of decoded images kept in memory; images beyond it are decoded each time.

    Raises:
        DatasetError: no records, or an imgsz that is not a positive multiple of 32.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        imgsz: int,
        augment: A.Compose | None,
        *,
        seed: int = 0,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        if not records:
            raise DatasetError("the training split has no images: add labelled images or change the split")
        try:
            check_input_size((imgsz, imgsz))
        except ValueError as error:
            raise DatasetError(f"training image size: {error}") from error
        self.records = list(records)
        self.imgsz = int(imgsz)
        self.augment = augment
        self._uses_mosaic = augment is not None and uses_mosaic(augment)
        self.seed = int(seed)
        self.cache_bytes = int(cache_bytes)
        # Shared memory, so persistent DataLoader workers (which hold their own copy of the dataset) see set_epoch.
        self._epoch = multiprocessing.RawValue("q", 0)
        self._mosaic = multiprocessing.RawValue("b", 1)  # 0 once mosaic is closed for the end of a run
        # Which images the cache may hold: the first ones in record order whose resized size fits the byte cap,
        # estimated from the record's size so the choice is known before decoding and the same in every process.
        self._cacheable = np.zeros(len(self.records), dtype=bool)
        total = 0
        for index, record in enumerate(self.records):
            height, width = _fitted_size(record.height, record.width, self.imgsz)
            total += height * width * 3
            if total > self.cache_bytes:
                break
            self._cacheable[index] = True
        # index → (image (h, w, 3) uint8 RGB with max(h, w) == imgsz, boxes (N, 4) float32 xyxy in its pixels)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._unreadable: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch's random streams (call before iterating; `set_loader_epoch` does)."""
        self._epoch.value = int(epoch)

    @property
    def mosaic_enabled(self) -> bool:
        return bool(self._mosaic.value)

    def set_mosaic(self, enabled: bool) -> None:
        """Mosaic on or off from the next iterator on (closing mosaic for the last part of a run, as YOLOX and
        Ultralytics do: the model ends on images that look like the ones it will see). Shared with the workers."""
        self._mosaic.value = int(bool(enabled))

    @property
    def cached_bytes(self) -> int:
        return sum(image.nbytes for image, _ in self._cache.values())

    def preload(self) -> dict[str, int]:
        """Decodes every image the byte cap allows into the cache, in this process.

        Call before the DataLoader starts its workers: forked workers then share the cache copy-on-write instead
        of each decoding (and holding) their own copy.

        Returns:
            {"cached": images in the cache, "on_demand": images decoded per sample (beyond the cap),
            "unreadable": images that could not be decoded (trained on as empty grey images), "bytes": cache size}.
        """
        missing = [index for index in np.flatnonzero(self._cacheable).tolist() if index not in self._cache]
        threads = max(1, min(PRELOAD_THREADS, os.cpu_count() or 1, len(missing)))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for index, decoded in zip(missing, pool.map(self._decode, missing)):
                if decoded is not None:
                    self._cache[index] = decoded
        return {
            "cached": len(self._cache),
            "on_demand": int((~self._cacheable).sum()),
            "unreadable": len(self._unreadable),
            "bytes": self.cached_bytes,
        }

    def fitted(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image `index` resized so its longer side is imgsz (aspect kept), from the cache when it is there.

        Returns:
            image (h, w, 3) uint8 RGB with max(h, w) == imgsz; boxes (N, 4) float32 xyxy in its pixels; labels (N,).
        """
        index = int(index) % len(self.records)
        entry = self._cache.get(index)
        if entry is None:
            entry = self._decode(index)
            if entry is None:  # unreadable: an empty grey image keeps training going; _decode logged why
                height, width = _fitted_size(self.records[index].height, self.records[index].width, self.imgsz)
                empty = np.full((height, width, 3), PAD_VALUE, np.uint8)
                return empty, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
            if self._cacheable[index]:
                self._cache[index] = entry  # in a worker this fills the worker's own copy, still within the cap
        image, boxes = entry
        return image, boxes, self.records[index].labels

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample `index` (any int >= 0; image index % len) of the current epoch.

        Returns:
            image (imgsz, imgsz, 3) uint8 RGB; boxes (N, 4) float32 xyxy in input pixels; labels (N,) int64.
        """
        index = int(index)
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        if self.augment is None:
            image, boxes, labels = self.fitted(index)
            padded, info = letterbox(image, (self.imgsz, self.imgsz))
            # Same float32 arithmetic as boxes_to_input(record.boxes, info) on the original image (scale 1 here).
            pad = np.array([info.pad_x, info.pad_y, info.pad_x, info.pad_y], np.float32)
            return padded, boxes + pad, labels.copy()
        rng = np.random.default_rng([self.seed, self.epoch, index])
        tiles = [self.fitted(index)]
        # The other images are drawn either way: closing mosaic leaves every other random stream as it was.
        # Whether a mosaic is made is the pipeline's YoloxMosaic's own draw (its p).
        others = rng.integers(0, len(self.records), MOSAIC_TILES - 1)
        if self._uses_mosaic and self.mosaic_enabled:
            tiles += [self.fitted(other) for other in others]
        image, boxes, labels = augment_sample(self.augment, tiles, rng)
        if image.shape != (self.imgsz, self.imgsz, 3):
            raise DatasetError(
                f"the augmentation pipeline gave a {image.shape} image, not ({self.imgsz}, "
                f"{self.imgsz}, 3): end it with Letterbox(size={self.imgsz})"
            )
        return image, boxes, labels

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        record = self.records[index]
        try:
            image = load_image(record.path)
        except (FileNotFoundError, ImageLoadError) as error:
            if index not in self._unreadable:
                logger.warning("training on an empty image instead of '%s': %s", record.path, error)
                self._unreadable[index] = str(error)
            return None
        return _fit_longest_side(image, record.boxes, self.imgsz)


def _fitted_size(height: int, width: int, imgsz: int) -> tuple[int, int]:
    """(h, w) of an image resized so it fits imgsz x imgsz, rounded as `backend.processing.letterbox` rounds."""
    scale = min(imgsz / height, imgsz / width)
    return min(imgsz, max(1, round(height * scale))), min(imgsz, max(1, round(width * scale)))


def _fit_longest_side(image: np.ndarray, boxes: np.ndarray, imgsz: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) image and (N, 4) xyxy boxes in its pixels → resized so the longer side is imgsz, boxes scaled.

    The resize is the one `letterbox` does (same scale, rounding and interpolation), so letterboxing the result
    gives the same pixels as letterboxing the original.
    """
    height, width = image.shape[:2]
    scale = min(imgsz / height, imgsz / width)
    new_height, new_width = _fitted_size(height, width, imgsz)
    if (new_height, new_width) != (height, width):
        image = cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(image), (boxes * scale).astype(np.float32)


class EpochSampler(Sampler[int]):
    """Virtual sample indices for one epoch of max(dataset_len, min_samples) samples.

    Small datasets are resampled: whole passes over the images plus a random subset for the remainder, so every
    image appears ⌊total/len⌋ or ⌊total/len⌋ + 1 times. The k-th copy of image j is yielded as k·len + j, which
    `TrainDataset` reads as image j with its own random augmentation. The order is a function of (seed, epoch).

    Distributed training (`world_size` > 1): the epoch's order is the same for every process; it is cut into global
    batches of `global_batch` (an incomplete last one dropped) and process `rank` takes the rank-th slice of
    global_batch / world_size indices of each. Step k then trains on the same images for any number of processes.

    Args:
        dataset_len: number of images.
        min_samples: samples per epoch at least (the fine-tuning recipe's 512).
        seed: seeds the order together with the epoch.
        shuffle: False yields the passes in order and the first images as the remainder.
        rank: this process's rank among `world_size` processes.
        world_size: processes sharing each global batch.
        global_batch: images per optimizer step over all processes (needed when world_size > 1).
    """

    def __init__(
        self,
        dataset_len: int,
        min_samples: int = 512,
        seed: int = 0,
        shuffle: bool = True,
        *,
        rank: int = 0,
        world_size: int = 1,
        global_batch: int | None = None,
    ) -> None:
        if dataset_len < 1:
            raise ValueError(f"EpochSampler needs at least one image, got dataset_len={dataset_len}")
        self.dataset_len = int(dataset_len)
        self.total = max(self.dataset_len, int(min_samples))
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0
        self.rank, self.world_size = int(rank), int(world_size)
        self.global_batch = global_batch
        if self.world_size > 1:
            if global_batch is None or global_batch % self.world_size:
                raise ValueError(
                    f"the global batch ({global_batch}) must be a multiple of the {self.world_size} processes"
                )
            if self.total < global_batch:
                raise ValueError(
                    f"an epoch of {self.total} samples is smaller than the global batch of {global_batch}: raise "
                    "min_samples or lower the batch size"
                )
            if not 0 <= self.rank < self.world_size:
                raise ValueError(f"rank {rank} is not in 0..{self.world_size - 1}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.world_size == 1 or self.global_batch is None:  # __init__ requires global_batch for world_size > 1
            return self.total
        return self.total // self.global_batch * (self.global_batch // self.world_size)

    def indices(self) -> np.ndarray:
        """(total,) int64 virtual indices of the current epoch."""
        passes, remainder = divmod(self.total, self.dataset_len)
        if not self.shuffle:
            return np.arange(self.total, dtype=np.int64)
        rng = np.random.default_rng([self.seed, self.epoch, 0x5A4D])  # a stream apart from the dataset's
        extra = rng.choice(self.dataset_len, size=remainder, replace=False) + passes * self.dataset_len
        order = np.concatenate([np.arange(passes * self.dataset_len), extra]).astype(np.int64)
        return rng.permutation(order)

    def __iter__(self):
        order = self.indices()
        if self.world_size > 1:
            steps, per_rank = self.total // self.global_batch, self.global_batch // self.world_size
            order = order[: steps * self.global_batch].reshape(steps, self.world_size, per_rank)[:, self.rank]
        return iter(order.reshape(-1).tolist())


def collate_detections(batch: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stacks `TrainDataset` samples into the batch the training loop takes.

    Args:
        batch: B samples (image (H, W, 3) uint8 RGB, boxes (N_b, 4) xyxy in input pixels, labels (N_b,)).

    Returns:
        "images" (B, 3, H, W) uint8 RGB (the training loop converts to float on its device); "gt_boxes"
        (B, M, 4) float32 xyxy in input pixels, zero padded; "gt_labels" (B, M) int64, zero padded; "gt_mask"
        (B, M) bool, True for real boxes. M is the largest box count in the batch and may be 0.
    """
    shapes = {sample[0].shape for sample in batch}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
        raise ValueError(f"collate_detections needs (H, W, 3) images all of one size, got shapes {sorted(shapes)}")
    height, width = batch[0][0].shape[:2]
    images = np.empty((len(batch), 3, height, width), dtype=np.uint8)
    for row, sample in enumerate(batch):
        # cv2.split writes each channel straight into the batch: 4x faster than a NumPy or torch HWC → CHW copy.
        cv2.split(np.ascontiguousarray(sample[0], dtype=np.uint8), list(images[row]))
    most = max((len(sample[1]) for sample in batch), default=0)
    gt_boxes = torch.zeros((len(batch), most, 4), dtype=torch.float32)
    gt_labels = torch.zeros((len(batch), most), dtype=torch.int64)
    gt_mask = torch.zeros((len(batch), most), dtype=torch.bool)
    for row, (_, boxes, labels) in enumerate(batch):
        count = len(boxes)
        gt_boxes[row, :count] = torch.from_numpy(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
        gt_labels[row, :count] = torch.from_numpy(np.asarray(labels, dtype=np.int64).reshape(-1))
        gt_mask[row, :count] = True
    return {"images": torch.from_numpy(images), "gt_boxes": gt_boxes, "gt_labels": gt_labels, "gt_mask": gt_mask}


def _init_worker(_worker_id: int) -> None:
    # No OpenCV threads in workers: on 2 cores they would only compete with the training step.
    cv2.setNumThreads(0)  # 0 = sequential; (1) deadlocks in a forked child whose parent used the thread pool


def make_train_loader(
    dataset: TrainDataset,
    batch_size: int,
    *,
    min_samples: int = 512,
    num_workers: int = 1,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader over `dataset` with an `EpochSampler`, `collate_detections` and persistent workers.

    Call `dataset.preload()` first so the workers share the decoded images, and `set_loader_epoch` before each
    epoch. Batches depend only on the seeds and the epoch, not on num_workers (nor, concatenated over the ranks in
    rank order, on world_size).

    Args:
        dataset: the training dataset.
        batch_size: images per optimizer step over all processes (the global batch); each of `world_size`
            processes loads batch_size / world_size of them. The last incomplete batch is dropped unless (in a
            single process) it would be the only one.
        min_samples: samples per epoch at least (small datasets are resampled).
        num_workers: worker processes (0 loads in the training process).
        seed: seeds the sample order.
        rank, world_size: this process among the distributed training processes.
    """
    sampler = EpochSampler(
        len(dataset), min_samples=min_samples, seed=seed, rank=rank, world_size=world_size, global_batch=batch_size
    )
    per_rank = batch_size // world_size
    return DataLoader(
        dataset,
        batch_size=per_rank,
        sampler=sampler,
        collate_fn=collate_detections,
        num_workers=num_workers,
        drop_last=len(sampler) >= per_rank,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_init_worker if num_workers > 0 else None,
        # The loader draws a seed for its workers at every epoch; its own generator leaves the global torch
        # random state (model initialisation, dropout) untouched by data loading.
        generator=torch.Generator().manual_seed(seed),
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Selects the epoch of a `make_train_loader` loader: its sample order and its augmentations."""
    for part in (
        loader.sampler,
        loader.dataset,
    ):  # its EpochSampler and its dataset (bench/loader.py passes an older one)
        set_epoch = getattr(part, "set_epoch", None)
        if set_epoch is None:
            raise TypeError(f"set_loader_epoch takes a loader made by make_train_loader, not one of {type(part)}")
        set_epoch(epoch)


def render_augmented_samples(
    records: list[ImageRecord],
    class_names: Sequence[str],
    imgsz: int = 320,
    count: int = 8,
    augment: A.Compose | str | None = "default",
    seed: int = 0,
) -> list[np.ndarray]:
    """Augmented training samples with their boxes and class names drawn, for the augmentation preview.

    Args:
        records: images to draw from (boxes xyxy in original-image pixels).
        class_names: one name per class index.
        imgsz: the training input size, a multiple of 32.
        count: how many samples.
        augment: the augmentation pipeline to show (its output imgsz x imgsz); "default" the recipe's
            (`backend.data.augment.default_pipeline`); None the plain letterboxed inputs.
        seed: a different seed shows different samples.

    Returns:
        `count` (imgsz, imgsz, 3) uint8 RGB images with the boxes (in input pixels) outlined and labelled.
    """
    if isinstance(augment, str):
        if augment != "default":
            raise ValueError(f"augment is a pipeline, None or 'default', got {augment!r}")
        augment = default_pipeline(imgsz)
    dataset = TrainDataset(records, imgsz, augment, seed=seed, cache_bytes=0)
    order = np.random.default_rng(seed).permutation(max(count, len(records)))[:count]
    rendered = []
    for index in order.tolist():
        image, boxes, labels = dataset[index]
        image = image.copy()
        for box, label in zip(boxes, labels):
            colour = palette_rgb(int(label))
            x1, y1, x2, y2 = (round(float(value)) for value in box)
            cv2.rectangle(image, (x1, y1), (x2 - 1, y2 - 1), colour, 1, cv2.LINE_AA)
            name = class_names[int(label)] if 0 <= int(label) < len(class_names) else str(int(label))
            (text_w, text_h), baseline = cv2.getTextSize(name, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
            top = max(y1 - text_h - baseline, 0)
            cv2.rectangle(image, (x1, top), (x1 + text_w, top + text_h + baseline), colour, cv2.FILLED)
            text_colour = (0, 0, 0) if sum(colour) > 382 else (255, 255, 255)
            cv2.putText(image, name, (x1, top + text_h), cv2.FONT_HERSHEY_SIMPLEX, 0.4, text_colour, 1, cv2.LINE_AA)
        rendered.append(image)
    return rendered
