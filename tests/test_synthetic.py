"""The synthetic shapes dataset: determinism, layout, boxes inside the images and tight around what is visible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backend.data.folders import load_dataset
from backend.data.synthetic import SHAPE_COLOURS, draw_image, generate_synthetic_dataset


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()
    }


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    first = file_bytes(generate_synthetic_dataset(tmp_path / "a", num_train=6, num_val=3, seed=3))
    second = file_bytes(generate_synthetic_dataset(tmp_path / "b", num_train=6, num_val=3, seed=3))
    other = file_bytes(generate_synthetic_dataset(tmp_path / "c", num_train=6, num_val=3, seed=4))
    assert sorted(first) == [
        "images/train_0000.png",
        *[f"images/train_000{i}.png" for i in range(1, 6)],
        "images/val_0000.png",
        "images/val_0001.png",
        "images/val_0002.png",
        "train.json",
        "val.json",
    ]
    assert first == second
    assert sorted(other) == sorted(first)
    assert other["train.json"] != first["train.json"]
    assert all(other[name] != first[name] for name in first if name.endswith(".png"))


def test_generated_folder_loads_with_boxes_inside_and_nothing_dropped(tmp_path: Path) -> None:
    out = generate_synthetic_dataset(
        tmp_path / "shapes", num_train=24, num_val=8, num_test=4, image_size=((160, 128), (256, 224))
    )
    splits = load_dataset(out)
    assert {name: len(split) for name, split in splits.items()} == {"train": 24, "val": 8, "test": 4}
    sizes = set()
    for split in splits.values():
        assert split.class_names == ["circle", "square", "triangle"] and split.category_ids == [1, 2, 3]
        report = split.report
        assert report.boxes_clipped == 0 and report.boxes_dropped == {} and report.images_skipped == []
        assert report.warnings == []  # the JSON sizes match the files
        for record in split.records:
            sizes.add((record.width, record.height))
            assert 160 <= record.width <= 256 and 128 <= record.height <= 224
            assert len(record.boxes) <= 4
            boxes = record.boxes
            assert (
                np.all(boxes[:, :2] >= 0)
                and np.all(boxes[:, 2] <= record.width)
                and np.all(boxes[:, 3] <= record.height)
            )
            assert np.all(boxes[:, 2:] - boxes[:, :2] >= 1)
    assert len(sizes) > 1  # sizes are drawn from the range
    train = splits["train"]
    assert train.report.background_images >= 1  # some background-only images
    assert train.report.boxes > len(train)  # more than one object per image on average (2.25 expected)
    assert set(np.concatenate([r.labels for r in train.records]).tolist()) == {0, 1, 2}
    widths = np.concatenate([r.boxes[:, 2] - r.boxes[:, 0] for r in train.records])
    assert widths.min() < 30 and widths.max() > 60  # varied scale


def test_boxes_are_tight_around_visible_pixels_of_the_right_colour() -> None:
    rng = np.random.default_rng(0)
    names = ["circle", "square", "triangle"]  # red, green, blue: the dominant channel identifies the class
    overlapping = 0
    for _ in range(30):
        image, boxes, labels, owner = draw_image(rng, 200, 160, names)
        assert owner.shape == (160, 200) and image.shape == (160, 200, 3)
        for index, (box, label) in enumerate(zip(boxes, labels, strict=True)):
            rows, columns = np.nonzero(owner == index)
            assert box.tolist() == [columns.min(), rows.min(), columns.max() + 1, rows.max() + 1]
            dominant = np.argmax(image[rows, columns].astype(int), axis=1)
            expected = int(np.argmax(SHAPE_COLOURS[names[label]]))
            assert np.mean(dominant == expected) > 0.95
        for first in range(len(boxes)):
            for second in range(first + 1, len(boxes)):
                overlap = np.minimum(boxes[first, 2:], boxes[second, 2:]) - np.maximum(
                    boxes[first, :2], boxes[second, :2]
                )
                overlapping += bool(np.all(overlap > 0))
    assert overlapping > 0  # objects do overlap (and then the later one hides part of the earlier)


def test_refuses_unknown_shapes_and_overwriting(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="distinct shapes"):
        generate_synthetic_dataset(tmp_path / "x", class_names=("circle", "unicorn"))
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic_dataset(tmp_path / "x", image_size=(16, 16))
    out = generate_synthetic_dataset(tmp_path / "y", num_train=2, num_val=1, num_test=1, class_names=("star", "ring"))
    assert json.loads((out / "test.json").read_text())["categories"][0]["name"] == "star"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        generate_synthetic_dataset(out, num_train=2, num_val=1)
    generate_synthetic_dataset(out, num_train=2, num_val=1, overwrite=True)
    assert not (out / "test.json").exists()  # no stale split from the earlier generation
    assert len(list((out / "images").iterdir())) == 3
