"""Training augmentations and the training data path: backend/data/augment.py and backend/data/loader.py.

Images are written into tmp_path as PNG (lossless, so colours are exact) with Pillow in RGB.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from backend.data.augment import (
    MIN_BOX_SIZE,
    AugmentationError,
    FastHueSaturationValue,
    Letterbox,
    RandomScaleTranslate,
    YoloxMosaic,
    augment_sample,
    box_params,
    default_pipeline,
    load_pipeline_file,
    pipeline_from_dict,
    pipeline_to_dict,
    training_pipeline,
)
from backend.data.loader import (
    EpochSampler,
    TrainDataset,
    collate_detections,
    make_train_loader,
    render_augmented_samples,
    set_loader_epoch,
)
from backend.data.records import DatasetError, ImageRecord
from backend.processing import boxes_to_input, letterbox, load_image

GREY = (128, 128, 128)
COLOURS = [(220, 20, 20), (20, 200, 20), (20, 20, 220), (220, 220, 20)]  # one per class index


def recipe(
    imgsz: int = 320,
    *,
    mosaic_prob: float = 1.0,
    hsv: bool = True,
    flip_prob: float = 0.5,
    scale=(0.5, 1.5),
    translate: float = 0.1,
    **box_filter,
) -> A.Compose:
    """The default pipeline's steps with some strengths changed (hsv=False: exact colours for content checks)."""
    steps = [YoloxMosaic(imgsz, p=mosaic_prob), RandomScaleTranslate(imgsz, scale=scale, translate=translate)]
    if hsv:
        steps.append(FastHueSaturationValue(hue_shift_limit=5, sat_shift_limit=30, val_shift_limit=30, p=1.0))
    steps += [A.HorizontalFlip(p=flip_prob), Letterbox(imgsz)]
    params = box_params()
    for key, value in box_filter.items():
        setattr(params, key, value)
    return A.Compose(steps, bbox_params=params)


def write_record(folder: Path, name: str, size: tuple[int, int], rects: list[tuple[int, int, int, int, int]]):
    """A grey (width, height) PNG with solid rectangles (x1, y1, x2, y2, class) → ImageRecord (boxes = rects)."""
    width, height = size
    pixels = np.full((height, width, 3), GREY, dtype=np.uint8)
    for x1, y1, x2, y2, label in rects:
        pixels[y1:y2, x1:x2] = COLOURS[label]
    path = folder / f"{name}.png"
    Image.fromarray(pixels).save(path)
    boxes = np.array([rect[:4] for rect in rects], dtype=np.float32).reshape(-1, 4)
    labels = np.array([rect[4] for rect in rects], dtype=np.int64)
    return ImageRecord(
        path=path, image_id=len(list(folder.iterdir())), width=width, height=height, boxes=boxes, labels=labels
    )


@pytest.fixture
def records(tmp_path: Path) -> list[ImageRecord]:
    """Four images of different sizes and aspect ratios, each with one rectangle of its own class."""
    specs = [
        ((200, 160), [(40, 30, 120, 110, 0)]),
        ((160, 240), [(50, 100, 140, 200, 1)]),
        ((400, 300), [(220, 60, 360, 220, 2)]),
        ((120, 120), [(10, 10, 70, 90, 3)]),
    ]
    return [write_record(tmp_path, f"image{k}", size, rects) for k, (size, rects) in enumerate(specs)]


def colour_fraction(image: np.ndarray, box: np.ndarray, colour: tuple[int, int, int], margin: float = 2.0) -> float:
    """Fraction of the pixels inside `box` (xyxy, shrunk by `margin` against interpolated edges) near `colour`."""
    x1, y1 = int(np.ceil(box[0] + margin)), int(np.ceil(box[1] + margin))
    x2, y2 = int(np.floor(box[2] - margin)), int(np.floor(box[3] - margin))
    if x2 <= x1 or y2 <= y1:
        return 1.0  # too small to judge: only a sliver of interpolated edge
    patch = image[y1:y2, x1:x2].astype(np.int16)
    return float((np.abs(patch - np.array(colour)).max(axis=2) <= 12).mean())


def assert_valid_sample(image, boxes, labels, imgsz) -> None:
    assert image.shape == (imgsz, imgsz, 3) and image.dtype == np.uint8
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert labels.dtype == np.int64 and labels.shape == (len(boxes),)
    assert (boxes >= 0).all() and (boxes <= imgsz).all()
    assert (boxes[:, 2] - boxes[:, 0] >= MIN_BOX_SIZE - 1e-4).all()
    assert (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_SIZE - 1e-4).all()


# ----------------------------------------------------------------------------------------------------------------
# Shapes and geometry
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mosaic_prob", [1.0, 0.0, None])
def test_samples_have_the_documented_shapes_and_types(records, mosaic_prob) -> None:
    augment = None if mosaic_prob is None else default_pipeline(320, mosaic_prob)
    dataset = TrainDataset(records, 320, augment, seed=3)
    for index in range(12):
        image, boxes, labels = dataset[index]
        assert_valid_sample(image, boxes, labels, 320)


def test_single_image_affine_and_flip_keep_boxes_on_their_content(records) -> None:
    config = recipe(mosaic_prob=0.0, hsv=False, flip_prob=0.0)
    flipped_config = recipe(mosaic_prob=0.0, hsv=False, flip_prob=1.0)
    dataset, flipped_dataset = TrainDataset(records, 320, config), TrainDataset(records, 320, flipped_config)
    kept = 0
    for index in range(24):
        image, boxes, labels = dataset[index]
        flipped_image, flipped_boxes, flipped_labels = flipped_dataset[index]
        # The flip is drawn last, so both see the same zoom and shift: the flipped sample is the mirror image.
        np.testing.assert_array_equal(flipped_image, image[:, ::-1])
        np.testing.assert_allclose(flipped_boxes[:, [0, 2]], 320 - boxes[:, [2, 0]], atol=1e-4)
        np.testing.assert_array_equal(flipped_labels, labels)
        for sample_image, sample_boxes in ((image, boxes), (flipped_image, flipped_boxes)):
            for box, label in zip(sample_boxes, labels):
                assert colour_fraction(sample_image, box, COLOURS[label]) > 0.95, (index, box, label)
        kept += len(boxes)
    assert kept >= 12  # most rectangles stay in view: the checks above were not vacuous


def test_mosaic_boxes_stay_on_their_content(records) -> None:
    dataset = TrainDataset(records, 320, recipe(hsv=False), seed=1)
    classes_per_sample, kept = [], 0
    for index in range(40):
        image, boxes, labels = dataset[index]
        assert_valid_sample(image, boxes, labels, 320)
        for box, label in zip(boxes, labels):
            assert colour_fraction(image, box, COLOURS[label]) > 0.95, (index, box, label)
        classes_per_sample.append(len(set(labels.tolist())))
        kept += len(boxes)
    assert max(classes_per_sample) >= 3  # several images really were combined
    assert kept >= 40


def test_the_mosaic_canvas_is_the_four_images_on_the_fill_and_nothing_else() -> None:
    # The canvas is not filled first: each quadrant's uncovered strips are. Any pixel left out would hold whatever
    # np.empty returned; compare with pasting onto a filled canvas, over random sizes and centres (edges included).
    import random

    rng = np.random.default_rng(0)
    for trial in range(200):
        imgsz = int(rng.choice([32, 96, 320]))
        low = float(rng.choice([0.0, rng.uniform(0.0, 1.0)]))
        high = float(rng.choice([2.0, rng.uniform(low, 2.0)]))
        images = [rng.integers(0, 256, (*rng.integers(1, imgsz + 1, 2), 3), dtype=np.uint8) for _ in range(4)]
        mosaic = YoloxMosaic(imgsz, centre_range=(low, high))
        mosaic.set_random_state(np.random.default_rng(trial), random.Random(trial))
        data = {"image": images[0], "mosaic_metadata": [{"image": image} for image in images[1:]]}
        canvas = mosaic.get_params_dependent_on_data({}, data)["canvas"]
        generator = random.Random(trial)  # the same two draws the transform made for its centre
        centre_x, centre_y = (int(generator.uniform(low, high) * imgsz) for _ in range(2))
        size = 2 * imgsz
        expected = np.full((size, size, 3), 114, np.uint8)
        for position, image in enumerate(images):
            height, width = image.shape[:2]
            left = centre_x - width if position in (0, 2) else centre_x
            top = centre_y - height if position in (0, 1) else centre_y
            x1, y1, x2, y2 = max(left, 0), max(top, 0), min(left + width, size), min(top + height, size)
            expected[y1:y2, x1:x2] = image[y1 - top : y2 - top, x1 - left : x2 - left]
        np.testing.assert_array_equal(canvas, expected, err_msg=f"trial {trial}")


def test_boxes_cut_off_by_the_crop_are_clipped_or_dropped(tmp_path) -> None:
    # A box touching the left edge, zoomed 1.5x and shifted left: its visible part is clipped at x = 0.
    record = write_record(tmp_path, "edge", (320, 320), [(0, 100, 60, 200, 0), (140, 140, 180, 180, 1)])
    image, boxes, labels = load_image(record.path), record.boxes, record.labels
    config = recipe(scale=(1.5, 1.5), translate=0.0, hsv=False, flip_prob=0.0, min_visibility=0.5)
    out_image, out_boxes, out_labels = augment_sample(config, [(image, boxes, labels)], np.random.default_rng(0))
    # Output = 1.5 · (input - 160) + 160 (placed at whole pixels: up to half a pixel off): the first box spans
    # x -80..10 (1/9 visible → dropped at 0.5), the second 130..190 (kept whole).
    np.testing.assert_array_equal(out_labels, [1])
    np.testing.assert_allclose(out_boxes, [[130, 130, 190, 190]], atol=0.5)
    lenient = recipe(scale=(1.5, 1.5), translate=0.0, hsv=False, flip_prob=0.0, min_visibility=0.1)
    _, out_boxes, out_labels = augment_sample(lenient, [(image, boxes, labels)], np.random.default_rng(0))
    np.testing.assert_array_equal(out_labels, [0, 1])
    np.testing.assert_allclose(out_boxes[0], [0, 70, 10, 220], atol=0.5)
    assert colour_fraction(out_image, out_boxes[0], COLOURS[0], margin=1.0) > 0.95


def test_scale_translate_keeps_pixels_and_box_edges_aligned() -> None:
    image = np.zeros((16, 16, 3), dtype=np.uint8)
    image[4:8, 4:8] = 255  # box [4, 4, 8, 8]
    step = RandomScaleTranslate(32)
    warped = step.apply(image, zoom=2.0, crop=(0, 0, 16, 16), place=(0, 0))
    boxes = step.apply_to_bboxes(np.float32([[4, 4, 8, 8]]) / 16, zoom=2.0, offset=(0.0, 0.0), shape=(16, 16, 3)) * 32
    np.testing.assert_allclose(boxes, [[8, 8, 16, 16]])
    row = warped[12, :, 0].astype(int)
    # The white block is centred on the box: interpolated edges are mirror images (a half-pixel error is not).
    assert row[7] == row[16] and row[8] == row[15] and row[11] == 255 and row[3] == 0 and row[20] == 0


def test_hsv_shift_is_additive_on_opencv_scales_and_matches_the_stock_transform() -> None:
    hsv = FastHueSaturationValue(hue_shift_limit=5, sat_shift_limit=30, val_shift_limit=30)
    grey = np.full((8, 8, 3), 100, dtype=np.uint8)
    np.testing.assert_array_equal(hsv.apply(grey, 0, 0, -30), np.full((8, 8, 3), 70))  # value 100 → 70
    np.testing.assert_array_equal(hsv.apply(grey, 0, 30, 0), grey)  # grey stays grey, as in the stock transform
    red = np.zeros((8, 8, 3), dtype=np.uint8)
    red[..., 0] = 200
    towards_magenta = hsv.apply(red, -5, 0, 0)[0, 0]  # hue 0 wraps to 175 of 180
    towards_orange = hsv.apply(red, 5, 0, 0)[0, 0]
    assert towards_magenta[2] > 0 and towards_magenta[1] == 0
    assert towards_orange[1] > 0 and towards_orange[2] == 0
    assert towards_magenta[0] == towards_orange[0] == 200
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    stock = A.HueSaturationValue(hue_shift_limit=5, sat_shift_limit=30, val_shift_limit=30)
    for shifts in [(3, -20, 25), (-5, 30, -30), (0, 7, 0), (4, 0, -1)]:
        np.testing.assert_array_equal(hsv.apply(image, *shifts), stock.apply(image, *shifts))


def test_hsv_jitter_keeps_colours_recognisable(records) -> None:
    dataset = TrainDataset(records, 320, default_pipeline(320, mosaic_prob=0.0), seed=5)
    changed = 0
    for index in range(8):
        image, boxes, labels = dataset[index]
        for box, label in zip(boxes, labels):
            centre = image[int((box[1] + box[3]) / 2), int((box[0] + box[2]) / 2)].astype(int)
            assert int(np.argmax(centre)) == int(np.argmax(COLOURS[label])) or label == 3  # yellow: red ≈ green
            changed += int(np.abs(centre - COLOURS[label]).max() > 0)
    assert changed > 0


def test_without_augmentation_samples_are_the_validation_preprocessing(records, tmp_path) -> None:
    records = [*records, write_record(tmp_path, "large", (700, 500), [(100, 50, 600, 480, 2)])]
    for augment in (None, A.Compose([Letterbox(320)], bbox_params=box_params())):
        dataset = TrainDataset(records, 320, augment)
        for index, record in enumerate(records):
            expected_image, info = letterbox(load_image(record.path), (320, 320))
            image, boxes, labels = dataset[index]
            np.testing.assert_array_equal(image, expected_image)
            if augment is None:  # the same float32 arithmetic
                np.testing.assert_array_equal(boxes, boxes_to_input(record.boxes, info))
            else:  # through albumentations' normalised coordinates
                np.testing.assert_allclose(boxes, boxes_to_input(record.boxes, info), atol=1e-3)
            np.testing.assert_array_equal(labels, record.labels)


# ----------------------------------------------------------------------------------------------------------------
# Reproducibility, cache
# ----------------------------------------------------------------------------------------------------------------


def samples_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def test_samples_depend_on_seed_epoch_and_index_only(records) -> None:
    first, second = (
        TrainDataset(records, 320, default_pipeline(320), seed=7),
        TrainDataset(records, 320, default_pipeline(320), seed=7),
    )
    second.preload()  # the cache must not change what a sample is
    for index in (0, 3, 5):
        assert samples_equal(first[index], second[index])
        assert samples_equal(first[index], first[index])
    assert not samples_equal(first[0], first[len(records)])  # another copy of image 0: another augmentation
    other_seed = TrainDataset(records, 320, default_pipeline(320), seed=8)
    assert not samples_equal(first[1], other_seed[1])
    before = first[2]
    first.set_epoch(1)
    assert first.epoch == 1
    assert not samples_equal(before, first[2])
    second.set_epoch(1)
    assert samples_equal(first[2], second[2])


def test_preloaded_cache_equals_decoding_on_demand(records) -> None:
    uncached = TrainDataset(records, 320, default_pipeline(320), cache_bytes=0)
    assert uncached.preload() == {"cached": 0, "on_demand": 4, "unreadable": 0, "bytes": 0}
    # Room for the first two images only (fitted to 320: 320x256 and 214x320): the rest is decoded on demand.
    partial = TrainDataset(records, 320, default_pipeline(320), cache_bytes=320 * 256 * 3 + 214 * 320 * 3)
    report = partial.preload()
    assert report["cached"] == 2 and report["on_demand"] == 2 and report["bytes"] == partial.cached_bytes
    full = TrainDataset(records, 320, default_pipeline(320))
    assert full.preload()["cached"] == 4
    for index in range(4):
        image, boxes, _ = full.fitted(index)
        assert image.dtype == np.uint8 and max(image.shape[:2]) == 320
        np.testing.assert_allclose(
            boxes, records[index].boxes * 320 / max(records[index].width, records[index].height), rtol=1e-6
        )
    for index in range(10):
        assert samples_equal(uncached[index], partial[index]) and samples_equal(uncached[index], full[index])


def test_unreadable_images_become_empty_samples_not_crashes(records, tmp_path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    records = [*records, ImageRecord(broken, 99, 100, 80, np.float32([[1, 1, 50, 50]]), np.int64([0]))]
    dataset = TrainDataset(records, 320, None)
    assert dataset.preload()["unreadable"] == 1
    image, boxes, labels = dataset[4]
    assert image.shape == (320, 320, 3) and len(boxes) == 0 and len(labels) == 0


def test_bad_dataset_arguments_raise_clear_errors(records) -> None:
    with pytest.raises(DatasetError, match="no images"):
        TrainDataset([], 320, default_pipeline(320))
    with pytest.raises(DatasetError, match="multiples of 32"):
        TrainDataset(records, 300, default_pipeline(320))
    with pytest.raises(DatasetError, match="Letterbox"):  # a pipeline that does not end at the training size
        TrainDataset(records, 320, default_pipeline(256, mosaic_prob=0.0))[0]
    with pytest.raises(ValueError, match="centre_range"):
        YoloxMosaic(320, centre_range=(1.5, 0.5))
    with pytest.raises(ValueError, match="scale"):
        RandomScaleTranslate(320, scale=(1.5, 0.5))


# ----------------------------------------------------------------------------------------------------------------
# Sampler, collate, loader
# ----------------------------------------------------------------------------------------------------------------


def test_sampler_resamples_small_datasets_to_min_samples() -> None:
    sampler = EpochSampler(10, min_samples=512, seed=0)
    indices = list(sampler)
    assert len(sampler) == len(indices) == 512
    assert len(set(indices)) == 512 and min(indices) >= 0 and max(indices) < 520  # distinct virtual indices
    counts = Counter(index % 10 for index in indices)
    assert sorted(counts) == list(range(10)) and set(counts.values()) <= {51, 52}
    assert list(EpochSampler(10, min_samples=512, seed=0)) == indices  # a function of (seed, epoch)
    sampler.set_epoch(1)
    assert list(sampler) != indices
    assert list(EpochSampler(10, min_samples=512, seed=1)) != indices


def test_sampler_on_large_datasets_is_a_permutation() -> None:
    sampler = EpochSampler(1000, min_samples=512, seed=0)
    indices = list(sampler)
    assert len(sampler) == 1000 and sorted(indices) == list(range(1000)) and indices != list(range(1000))
    assert list(EpochSampler(1000, min_samples=512, shuffle=False)) == list(range(1000))


def test_collate_pads_boxes_and_masks() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(3)]
    empty = [(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)) for image in images]
    batch = collate_detections(empty)
    assert batch["images"].shape == (3, 3, 64, 96) and batch["images"].dtype == torch.uint8
    np.testing.assert_array_equal(batch["images"].numpy(), np.stack(images).transpose(0, 3, 1, 2))
    assert batch["gt_boxes"].shape == (3, 0, 4) and batch["gt_labels"].shape == (3, 0)
    assert batch["gt_mask"].shape == (3, 0) and batch["gt_mask"].dtype == torch.bool

    boxes = [
        np.zeros((0, 4), np.float32),
        np.float32([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]),
        np.float32([[20, 21, 22, 23]]),
    ]
    labels = [np.zeros(0, np.int64), np.int64([2, 0, 1]), np.int64([4])]
    batch = collate_detections(list(zip(images, boxes, labels)))
    assert batch["gt_boxes"].shape == (3, 3, 4) and batch["gt_boxes"].dtype == torch.float32
    assert batch["gt_labels"].dtype == torch.int64
    assert batch["gt_mask"].tolist() == [[False] * 3, [True] * 3, [True, False, False]]
    np.testing.assert_array_equal(batch["gt_boxes"][1].numpy(), boxes[1])
    np.testing.assert_array_equal(batch["gt_boxes"][2, 0].numpy(), boxes[2][0])
    assert batch["gt_boxes"][2, 1:].abs().sum() == 0 and batch["gt_boxes"][0].abs().sum() == 0
    assert batch["gt_labels"].tolist() == [[0, 0, 0], [2, 0, 1], [4, 0, 0]]
    with pytest.raises(ValueError, match="one size"):
        collate_detections([empty[0], (np.zeros((32, 32, 3), np.uint8), boxes[0], labels[0])])


def loader_batches(records, num_workers: int, epochs: int = 2) -> list[dict[str, torch.Tensor]]:
    dataset = TrainDataset(records, 64, default_pipeline(64), seed=11)
    dataset.preload()
    loader = make_train_loader(dataset, batch_size=4, min_samples=10, num_workers=num_workers, seed=11)
    batches = []
    for epoch in range(epochs):
        set_loader_epoch(loader, epoch)
        batches.extend(loader)
    return batches


def test_loader_batches_do_not_depend_on_num_workers(records) -> None:
    in_process, in_worker = loader_batches(records, 0), loader_batches(records, 1)
    assert len(in_process) == len(in_worker) == 2 * 2  # 10 samples → 2 full batches of 4 per epoch (drop_last)
    for a, b in zip(in_process, in_worker):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert not torch.equal(in_process[0]["images"], in_process[2]["images"])  # epochs differ
    assert in_process[0]["images"].shape == (4, 3, 64, 64)


def test_loader_keeps_a_short_last_batch_when_it_is_the_only_one(records) -> None:
    dataset = TrainDataset(records, 64, None)
    loader = make_train_loader(dataset, batch_size=16, min_samples=0, num_workers=0)
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["images"].shape[0] == 4


# ----------------------------------------------------------------------------------------------------------------
# Preview
# ----------------------------------------------------------------------------------------------------------------


def test_preview_draws_count_samples(records) -> None:
    names = ["red", "green", "blue", "yellow"]
    previews = render_augmented_samples(records, names, imgsz=160, count=6, seed=2)
    assert len(previews) == 6
    assert all(image.shape == (160, 160, 3) and image.dtype == np.uint8 for image in previews)
    plain = render_augmented_samples(records, names, imgsz=160, count=6, augment=None, seed=2)
    dataset = TrainDataset(records, 160, None)
    undecorated = {dataset[index][0].tobytes() for index in range(len(records))}
    assert all(image.tobytes() not in undecorated for image in plain)  # boxes and names were drawn
    assert len(render_augmented_samples(records[:1], names, imgsz=160, count=3)) == 3


# ----------------------------------------------------------------------------------------------------------------
# The pipeline as data, the final letterbox
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(200, 160), (160, 240), (700, 500), (320, 320), (64, 48)])
def test_the_final_letterbox_is_pixel_identical_to_the_inference_letterbox(size) -> None:
    width, height = size
    image = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    boxes = np.float32([[3, 5, width * 0.5, height * 0.75], [width * 0.25, 1, width, height]])
    out = A.Compose([Letterbox(320)], bbox_params=box_params())(image=image, bboxes=boxes, labels=np.int64([0, 1]))
    expected, info = letterbox(image, (320, 320))
    np.testing.assert_array_equal(out["image"], expected)
    np.testing.assert_allclose(np.asarray(out["bboxes"]), boxes_to_input(boxes, info), atol=1e-3)


def test_pipelines_round_trip_through_to_dict_json_and_yaml(tmp_path) -> None:
    tiles = [
        (
            np.random.default_rng(k).integers(0, 256, (320, 240, 3), dtype=np.uint8),
            np.float32([[10, 10, 100, 120], [150, 200, 230, 300]]),
            np.int64([k, 3]),
        )
        for k in range(4)
    ]
    pipeline = default_pipeline(320, mosaic_prob=0.7)
    spec = pipeline_to_dict(pipeline)
    names = [step["__class_fullname__"] for step in spec["transform"]["transforms"]]
    assert names == [
        "backend.data.augment.YoloxMosaic",
        "backend.data.augment.RandomScaleTranslate",
        "backend.data.augment.FastHueSaturationValue",
        "HorizontalFlip",
        "backend.data.augment.Letterbox",
    ]
    assert spec["transform"]["transforms"][0]["p"] == 0.7
    json_file, yaml_file = tmp_path / "pipeline.json", tmp_path / "pipeline.yaml"
    json_file.write_text(json.dumps(spec))
    yaml_file.write_text(yaml.safe_dump(spec))
    for loaded in (load_pipeline_file(json_file, 320), load_pipeline_file(yaml_file, 320)):
        assert loaded == spec
        rebuilt = pipeline_from_dict(loaded, 320)
        for seed in range(6):  # the same draws, the same samples
            a = augment_sample(pipeline, tiles, np.random.default_rng(seed))
            b = augment_sample(rebuilt, tiles, np.random.default_rng(seed))
            assert samples_equal(a, b), seed
    # A changed strength survives the round trip (the dict is not ignored in favour of the defaults).
    spec["transform"]["transforms"][1]["scale"] = [0.25, 0.25]
    small = pipeline_from_dict(spec, 320)
    image, _, _ = augment_sample(small, tiles[:1], np.random.default_rng(0))
    assert (image == image[0, 0]).all(axis=2).mean() > 0.8  # a quarter-size image in a sea of (HSV-shifted) padding


def test_bad_pipeline_files_are_refused_with_the_reason(tmp_path) -> None:
    cases = {
        "missing.json": None,
        "broken.json": "{not json: [",
        "list.json": "[1, 2]",
        "unknown.json": json.dumps({"transform": {"__class_fullname__": "NoSuchTransform", "p": 1.0}}),
        "no_boxes.json": json.dumps(A.to_dict(A.Compose([Letterbox(320)]))),
        "wrong_size.yaml": yaml.safe_dump(pipeline_to_dict(default_pipeline(256))),
    }
    reasons = {
        "missing.json": "cannot read",
        "broken.json": "neither JSON nor YAML",
        "list.json": "'transform' key",
        "unknown.json": "NoSuchTransform",
        "no_boxes.json": "bbox_params",
        "wrong_size.yaml": "320x320",
    }
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(AugmentationError, match=reasons[name]):
            load_pipeline_file(tmp_path / name, 320)


def test_runs_that_recorded_no_pipeline_train_with_the_default() -> None:
    assert pipeline_to_dict(training_pipeline(None, 320, mosaic_prob=0.5)) == pipeline_to_dict(
        default_pipeline(320, mosaic_prob=0.5)
    )
    custom = pipeline_to_dict(recipe(hsv=False))
    assert pipeline_to_dict(training_pipeline(custom, 320)) == custom


def test_a_first_sample_without_boxes_does_not_break_the_labels_of_later_ones() -> None:
    """albumentations fixes a label field's type at its first sample; an empty one used to make it fit a label
    encoder on nothing, and the mosaic's other images' class indices then failed to decode (KeyError: 2)."""
    pipeline = default_pipeline(128)
    image = np.full((128, 128, 3), 100, np.uint8)
    empty = (image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    shapes = (image, np.float32([[4, 4, 60, 60], [64, 64, 120, 120], [10, 70, 50, 120]]), np.int64([0, 2, 2]))
    rng = np.random.default_rng(0)
    found: set[int] = set()
    for tiles in ([empty, empty, shapes, empty], [shapes, empty, shapes, shapes]):
        for _ in range(5):
            _, boxes, labels = augment_sample(pipeline, tiles, rng)
            assert len(boxes) == len(labels)
            found |= {int(label) for label in labels}
    assert found == {0, 2}
