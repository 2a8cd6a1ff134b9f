"""A small procedurally drawn detection dataset, for tests, demos and checking that training can overfit.

Each class is one shape in one saturated colour (circle = red, square = green, triangle = blue, ...), drawn at
12 px to half the image size on a muted background (gradient, blotchy noise or stripes) under random lighting
and sensor noise. Shape and colour both separate the classes, so a detector learns them in a few hundred steps;
scale, position, rotation (±15°), lighting and occlusion keep the task from being trivial.

Occlusion: objects are drawn one over the other, and an object's box is tight around its *visible* pixels
(x2/y2 = one past the last visible pixel column/row, the xyxy edge convention). A new object is only placed
where it leaves every earlier object at least `MIN_VISIBLE_FRACTION` visible; after 20 rejected positions it is
not drawn at all. So every drawn object has a box, and no box stands for a mostly hidden object.

Output is the COCO dataset folder `load_dataset` reads: `images/{split}_{index:04d}.png`, `train.json`,
`val.json` (and `test.json`), category ids 1..C. Everything is drawn from one seeded NumPy generator and
written as PNG, so the same seed gives byte-identical files (with the same OpenCV build).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import cast

import cv2
import numpy as np

from backend.data.coco import write_coco
from backend.data.records import DetectionSet, ImageRecord, LoadReport

# Base RGB colour of each shape; backgrounds are low-saturation so these stay distinct under any lighting.
SHAPE_COLOURS: dict[str, tuple[int, int, int]] = {
    "circle": (225, 35, 35),
    "square": (35, 175, 55),
    "triangle": (40, 75, 230),
    "diamond": (235, 205, 25),
    "cross": (205, 45, 205),
    "ring": (25, 205, 215),
    "hexagon": (245, 125, 15),
    "star": (20, 20, 20),
}
DEFAULT_CLASSES = ("circle", "square", "triangle")
MIN_OBJECT_SIZE = 12  # px, the smallest object's extent
MAX_OBJECTS = 4
BACKGROUND_ONLY_FRACTION = 0.1  # share of images with no object at all
MIN_VISIBLE_FRACTION = 0.4  # an object more than 60% hidden would be a misleading box
_PLACEMENT_TRIES = 20
# Huffman-only PNG: the sensor noise defeats LZ matching anyway, and this is ~30% faster than zlib level 1.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]

ImageSize = tuple[int, int] | tuple[tuple[int, int], tuple[int, int]]


def generate_synthetic_dataset(
    out_dir: str | Path,
    *,
    num_train: int = 48,
    num_val: int = 16,
    num_test: int = 0,
    image_size: ImageSize = (320, 320),
    class_names: Sequence[str] = DEFAULT_CLASSES,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Draws a synthetic shapes dataset and writes it as a COCO dataset folder.

    Args:
        out_dir: the dataset folder to write (created if needed).
        num_train: images in train.json.
        num_val: images in val.json.
        num_test: images in test.json (not written when 0).
        image_size: (width, height) of every image, or ((min_width, min_height), (max_width, max_height)) to draw
            each image's size uniformly in that range.
        class_names: shapes to draw, from `SHAPE_COLOURS`; class index i is `class_names[i]`.
        seed: the same seed gives byte-identical files.
        overwrite: replace the files of an earlier generation in `out_dir` (otherwise FileExistsError).

    Returns:
        `out_dir`, ready for `load_dataset`.

    Raises:
        ValueError: unknown shape names, or an image size too small for the smallest object.
        FileExistsError: `out_dir` already holds generated files and `overwrite` is False.
    """
    class_names = list(class_names)
    unknown = [name for name in class_names if name not in SHAPE_COLOURS]
    if unknown or not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names must be distinct shapes from {sorted(SHAPE_COLOURS)}, got {class_names}")
    min_size, max_size = _size_range(image_size)
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    counts = {"train": num_train, "val": num_val, "test": num_test}
    _clear_previous(out_dir, overwrite)
    images_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        if split == "test" and count == 0:
            continue
        records = []
        for index in range(count):
            width = int(rng.integers(min_size[0], max_size[0] + 1))
            height = int(rng.integers(min_size[1], max_size[1] + 1))
            image, boxes, labels, _ = draw_image(rng, width, height, class_names)
            path = images_dir / f"{split}_{index:04d}.png"
            ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), _PNG_PARAMS)
            if not ok:
                raise RuntimeError(f"OpenCV could not encode {path.name} as PNG")
            path.write_bytes(encoded.tobytes())
            records.append(ImageRecord(path, index + 1, width, height, boxes, labels))
        category_ids = list(range(1, len(class_names) + 1))
        dataset = DetectionSet(records, class_names, category_ids, LoadReport(), source=out_dir / f"{split}.json")
        write_coco(dataset, out_dir / f"{split}.json", images_root=images_dir)
    return out_dir


def _size_range(image_size: ImageSize) -> tuple[tuple[int, int], tuple[int, int]]:
    low: tuple[int, int]
    high: tuple[int, int]
    if len(image_size) == 2 and all(isinstance(value, Integral) for value in image_size):
        width, height = cast(tuple[int, int], image_size)
        low = high = (int(width), int(height))
    else:
        (low_w, low_h), (high_w, high_h) = cast(tuple[tuple[int, int], tuple[int, int]], image_size)
        low, high = (int(low_w), int(low_h)), (int(high_w), int(high_h))
    if min(low) < 2 * MIN_OBJECT_SIZE or high[0] < low[0] or high[1] < low[1]:
        raise ValueError(f"image_size must be (width, height) ≥ {2 * MIN_OBJECT_SIZE} px, or a (min, max) pair of them")
    return low, high


def _clear_previous(out_dir: Path, overwrite: bool) -> None:
    previous: list[Path] = []
    for split in ("train", "val", "test"):  # only what this generator writes; other files are the user's
        previous += [out_dir / f"{split}.json"] if (out_dir / f"{split}.json").exists() else []
        previous += sorted((out_dir / "images").glob(f"{split}_[0-9][0-9][0-9][0-9].png"))
    if previous and not overwrite:
        raise FileExistsError(f"'{out_dir}' already holds a dataset (e.g. {previous[0].name}); pass overwrite=True")
    for path in previous:
        path.unlink()


def draw_image(
    rng: np.random.Generator, width: int, height: int, class_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draws one image.

    Returns:
        image: (H, W, 3) uint8 RGB.
        boxes: (N, 4) float32 xyxy in image pixels, tight around each object's visible pixels.
        labels: (N,) int64 indices into `class_names`.
        owner: (H, W) int16, the index of the object each pixel shows, -1 for background.
    """
    if rng.random() < BACKGROUND_ONLY_FRACTION:
        num_objects = 0
    else:
        num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    owner = np.full((height, width), -1, dtype=np.int16)  # which object each pixel shows; -1 = background
    areas: list[int] = []
    labels: list[int] = []
    for _ in range(num_objects):
        label = int(rng.integers(len(class_names)))
        for _ in range(_PLACEMENT_TRIES):
            mask = _shape_mask(rng, class_names[label], width, height)
            if _leaves_others_visible(owner, mask, areas):
                owner[mask] = len(areas)
                areas.append(int(mask.sum()))
                labels.append(label)
                break

    xs = np.arange(width, dtype=np.float32)[None, :] - width / 2  # (1, W) pixel offsets from the centre
    ys = np.arange(height, dtype=np.float32)[:, None] - height / 2  # (H, 1)
    image = _background(rng, xs, ys)
    boxes = []
    for index, label in enumerate(labels):
        rows, columns = np.nonzero(owner == index)
        colour = np.array(SHAPE_COLOURS[class_names[label]], dtype=np.float32) * rng.uniform(0.85, 1.1)
        colour += rng.uniform(-12, 12, size=3).astype(np.float32)
        # Shading across the object: a ramp over its visible pixels, centred on them.
        shade = _ramp(rng, columns - columns.mean(), rows - rows.mean(), strength=0.15)  # (n,)
        image[rows, columns] = colour[None, :] * shade[:, None]
        boxes.append([columns.min(), rows.min(), columns.max() + 1, rows.max() + 1])

    # Lighting: a global exposure change and a soft light gradient, then sensor noise.
    image *= rng.uniform(0.65, 1.3) * _ramp(rng, xs, ys, strength=0.2)[:, :, None]
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 6.0))
    pixels = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return pixels, np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64), owner


def _leaves_others_visible(owner: np.ndarray, mask: np.ndarray, areas: list[int]) -> bool:
    if not areas:
        return True
    hidden = np.bincount(owner[mask].astype(np.int64) + 1, minlength=len(areas) + 1)[1:]
    visible = np.bincount(owner.ravel().astype(np.int64) + 1, minlength=len(areas) + 1)[1:]
    return all((visible[i] - hidden[i]) >= MIN_VISIBLE_FRACTION * areas[i] for i in range(len(areas)))


def _shape_mask(rng: np.random.Generator, shape: str, width: int, height: int) -> np.ndarray:
    """(H, W) bool mask of one shape at a random log-uniform size, position and small rotation, fully inside."""
    largest = max(MIN_OBJECT_SIZE, min(width, height) // 2)
    size = math.exp(rng.uniform(math.log(MIN_OBJECT_SIZE), math.log(largest)))
    radius = size / 2
    mask = np.zeros((height, width), dtype=np.uint8)
    if shape in ("circle", "ring"):
        centre = (round(rng.uniform(radius, width - radius)), round(rng.uniform(radius, height - radius)))
        cv2.circle(mask, centre, max(1, round(radius)), 1, thickness=-1)
        if shape == "ring":
            cv2.circle(mask, centre, max(1, round(radius * 0.55)), 0, thickness=-1)
        return mask.astype(bool)
    angle = math.radians(rng.uniform(-15, 15))
    rotation = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    polygons = [polygon @ rotation for polygon in _polygons(shape, radius)]
    low, high = np.min([p.min(axis=0) for p in polygons], axis=0), np.max([p.max(axis=0) for p in polygons], axis=0)
    # Keep the whole (rotated) outline inside the image; a shape wider than the image is left to cv2's clipping.
    cx = rng.uniform(-low[0], max(-low[0], width - high[0]))
    cy = rng.uniform(-low[1], max(-low[1], height - high[1]))
    cv2.fillPoly(mask, [np.rint(polygon + np.array([cx, cy])).astype(np.int32) for polygon in polygons], 1)
    return mask.astype(bool)


def _polygons(shape: str, radius: float) -> list[np.ndarray]:
    """Outline(s) of a shape centred on (0, 0), (K, 2) x, y in pixels, about `radius` from the centre."""

    def regular(corners: int, start: float, scale_x: float = 1.0) -> np.ndarray:
        angles = start + np.arange(corners) * 2 * math.pi / corners
        return np.stack([np.cos(angles) * radius * scale_x, np.sin(angles) * radius], axis=1)

    if shape == "square":
        side = radius * 0.8  # a square's area comparable to the circle's of the same size
        return [np.array([[-side, -side], [side, -side], [side, side], [-side, side]])]
    if shape == "triangle":
        return [regular(3, -math.pi / 2)]
    if shape == "diamond":
        return [regular(4, -math.pi / 2, scale_x=0.65)]
    if shape == "hexagon":
        return [regular(6, 0.0)]
    if shape == "cross":
        arm = radius * 0.3
        return [
            np.array([[-radius, -arm], [radius, -arm], [radius, arm], [-radius, arm]]),
            np.array([[-arm, -radius], [arm, -radius], [arm, radius], [-arm, radius]]),
        ]
    if shape == "star":
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
        return [np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)]
    raise ValueError(f"unknown shape {shape!r}")


def _background(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 RGB in muted colours: a two-colour gradient, blotchy noise or stripes.

    Args:
        xs: (1, W) pixel x offsets from the image centre.
        ys: (H, 1) pixel y offsets from the image centre.
    """
    height, width = ys.shape[0], xs.shape[1]

    def muted() -> np.ndarray:
        return (rng.uniform(70, 190) + rng.uniform(-18, 18, size=3)).astype(np.float32)

    def blend(weight: np.ndarray) -> np.ndarray:  # (H, W) in 0..1 → two muted colours mixed
        first, second = muted(), muted()
        return first + (second - first) * weight[:, :, None]

    kind = rng.integers(3)
    if kind == 0:
        return blend(_ramp(rng, xs, ys, strength=1.0) / 2)
    if kind == 1:
        # Mostly brightness blotches with a little colour, so no blotch passes for a saturated object.
        grid = (int(rng.integers(3, 9)), int(rng.integers(3, 9)))
        coarse = rng.uniform(-35, 35, size=(*grid, 1)) + rng.uniform(-10, 10, size=(*grid, 3))
        coarse = coarse.astype(np.float32)
        return muted() + cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    angle, period = rng.uniform(0, math.pi), rng.uniform(8, 48)
    phase = (xs * math.cos(angle) + ys * math.sin(angle)) * (2 * math.pi / period)
    return blend((np.sin(phase) > 0).astype(np.float32))


def _ramp(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, *, strength: float) -> np.ndarray:
    """1 - strength .. 1 + strength along a random direction, at pixels given by their offsets (xs, ys) from a
    centre (broadcast together); the extremes are reached at the farthest pixels."""
    angle = rng.uniform(0, 2 * math.pi)
    cos, sin = math.cos(angle), math.sin(angle)
    extent = max(float(np.abs(xs).max()) * abs(cos) + float(np.abs(ys).max()) * abs(sin), 1.0)
    return (1.0 + strength * (xs * cos + ys * sin) / extent).astype(np.float32)
