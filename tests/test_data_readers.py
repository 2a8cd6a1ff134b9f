"""COCO and YOLO readers and layout detection, on small datasets each test writes into tmp_path.

Boxes in assertions are xyxy original-image pixels (after EXIF orientation) unless they are COCO [x, y, w, h]
written into a JSON file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.data.coco import load_coco, probe_image, write_coco
from backend.data.folders import describe_layout, load_dataset
from backend.data.records import DatasetError
from backend.data.yolo import load_yolo
from backend.processing import load_image
from tests.conftest import REPO_ROOT

RACCOON = REPO_ROOT.parent / "shared" / "data" / "raccoon"


def make_image(path: Path, width: int, height: int, *, orientation: int | None = None) -> Path:
    """A JPEG/PNG (by suffix) of the given *stored* size, optionally with an EXIF orientation tag."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(width * 1000 + height).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if orientation is None:
        image.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(path, exif=exif.tobytes())
    return path


def write_json(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def coco_content(images: list[tuple[int, str, int, int]], annotations: list[dict], categories=None) -> dict:
    categories = categories if categories is not None else [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    return {
        "images": [{"id": i, "file_name": f, "width": w, "height": h} for i, f, w, h in images],
        "annotations": [{"id": n, "iscrowd": 0, **a} for n, a in enumerate(annotations, start=1)],
        "categories": categories,
    }


@pytest.fixture
def coco_dir(tmp_path: Path) -> Path:
    """images/a.jpg 100x80 (two boxes), images/sub/b.png 60x40 (one box), images/c.jpg 50x50 (background)."""
    make_image(tmp_path / "images" / "a.jpg", 100, 80)
    make_image(tmp_path / "images" / "sub" / "b.png", 60, 40)
    make_image(tmp_path / "images" / "c.jpg", 50, 50)
    content = coco_content(
        [(1, "a.jpg", 100, 80), (2, "sub/b.png", 60, 40), (5, "c.jpg", 50, 50)],
        [
            {"image_id": 1, "category_id": 7, "bbox": [10, 20, 30, 40]},
            {"image_id": 1, "category_id": 3, "bbox": [0.5, 1.25, 99.5, 78.75]},
            {"image_id": 2, "category_id": 3, "bbox": [5, 5, 10, 10]},
        ],
    )
    write_json(tmp_path / "train.json", content)
    return tmp_path


# ------------------------------------------------------------------------------------------------------------
# COCO
# ------------------------------------------------------------------------------------------------------------


def test_coco_maps_category_ids_to_sorted_contiguous_labels(coco_dir: Path) -> None:
    dataset = load_coco(coco_dir / "train.json", coco_dir / "images")
    assert dataset.class_names == ["cat", "dog"]
    assert dataset.category_ids == [3, 7]
    first = dataset.records[0]
    assert (first.image_id, first.width, first.height) == (1, 100, 80)
    np.testing.assert_allclose(first.boxes, [[10, 20, 40, 60], [0.5, 1.25, 100, 80]])
    assert first.labels.tolist() == [1, 0]  # dog (id 7) → 1, cat (id 3) → 0
    assert first.boxes.dtype == np.float32 and first.labels.dtype == np.int64
    assert [r.path.name for r in dataset.records] == ["a.jpg", "b.png", "c.jpg"]
    assert dataset.report.to_dict() == {
        "images": 3,
        "boxes": 3,
        "background_images": 1,
        "boxes_clipped": 0,
        "boxes_dropped": {},
        "images_skipped": [],
        "warnings": [],
    }


def test_coco_round_trip_keeps_boxes_ids_and_names(coco_dir: Path, tmp_path: Path) -> None:
    first = load_coco(coco_dir / "train.json", coco_dir / "images")
    written = write_coco(first, tmp_path / "out" / "copy.json", images_root=coco_dir / "images")
    content = json.loads(written.read_text())
    assert [image["file_name"] for image in content["images"]] == ["a.jpg", "sub/b.png", "c.jpg"]
    assert content["categories"] == [
        {"id": 3, "name": "cat", "supercategory": "object"},
        {"id": 7, "name": "dog", "supercategory": "object"},
    ]
    assert content["annotations"][0]["bbox"] == [10, 20, 30, 40]
    assert content["annotations"][0]["category_id"] == 7
    assert list((tmp_path / "out").iterdir()) == [written]  # the temp file was renamed, not left behind

    second = load_coco(written, coco_dir / "images")
    assert second.class_names == first.class_names and second.category_ids == first.category_ids
    for a, b in zip(first.records, second.records, strict=True):
        assert (a.path, a.image_id, a.width, a.height) == (b.path, b.image_id, b.width, b.height)
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3)
        assert a.labels.tolist() == b.labels.tolist()


def test_write_coco_without_images_root_uses_file_names_and_refuses_outside_root(coco_dir: Path) -> None:
    dataset = load_coco(coco_dir / "train.json", coco_dir / "images")
    content = json.loads(write_coco(dataset, coco_dir / "flat.json").read_text())
    assert [image["file_name"] for image in content["images"]] == ["a.jpg", "b.png", "c.jpg"]
    with pytest.raises(ValueError, match="not inside images_root"):
        write_coco(dataset, coco_dir / "bad.json", images_root=coco_dir / "images" / "sub")
    assert not (coco_dir / "bad.json").exists()


def test_coco_clips_boxes_outside_the_image_and_counts_them(tmp_path: Path) -> None:
    make_image(tmp_path / "images" / "a.jpg", 100, 80)
    boxes = [[-10, -5, 50, 50], [90, 70, 30, 30], [10, 10, 20, 20]]
    content = coco_content([(1, "a.jpg", 100, 80)], [{"image_id": 1, "category_id": 3, "bbox": b} for b in boxes])
    dataset = load_coco(write_json(tmp_path / "train.json", content), tmp_path / "images")
    np.testing.assert_allclose(dataset.records[0].boxes, [[0, 0, 40, 45], [90, 70, 100, 80], [10, 10, 30, 30]])
    assert dataset.report.boxes_clipped == 2
    assert dataset.report.boxes == 3


def test_coco_drops_bad_boxes_and_counts_each_reason(tmp_path: Path) -> None:
    make_image(tmp_path / "images" / "a.jpg", 100, 80)
    annotations = [
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, 0, 20]},  # zero width: degenerate
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, 0.5, 20]},  # under 1 px: degenerate
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, -5, 20]},  # negative: degenerate
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, float("nan"), 20]},  # NaN: degenerate
        {"image_id": 1, "category_id": 3, "bbox": [200, 10, 20, 20]},  # entirely outside: degenerate
        {"image_id": 1, "category_id": 3, "bbox": [99.5, 10, 20, 20]},  # 0.5 px left after clipping: degenerate
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, 20]},  # malformed
        {"image_id": 1, "category_id": 3, "bbox": ["10", 10, 20, 20]},  # malformed
        {"image_id": 1, "category_id": 3},  # malformed (no bbox)
        {"image_id": 1, "bbox": [1, 1, 5, 5]},  # malformed (no category)
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1},  # crowd
        {"image_id": 42, "category_id": 3, "bbox": [1, 1, 5, 5]},  # orphan
        {"image_id": 1, "category_id": 7, "bbox": [1, 2, 3, 4]},  # kept
    ]
    content = coco_content([(1, "a.jpg", 100, 80)], annotations)
    dataset = load_coco(write_json(tmp_path / "train.json", content), tmp_path / "images")
    assert dataset.report.boxes_dropped == {"degenerate": 6, "malformed": 4, "crowd": 1, "orphan": 1}
    np.testing.assert_allclose(dataset.records[0].boxes, [[1, 2, 4, 6]])
    assert dataset.records[0].labels.tolist() == [1]


def test_coco_unknown_category_names_the_id_and_the_annotation(tmp_path: Path) -> None:
    make_image(tmp_path / "images" / "a.jpg", 100, 80)
    content = coco_content([(1, "a.jpg", 100, 80)], [{"image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]}])
    content["annotations"].append({"id": 17, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]})
    with pytest.raises(DatasetError, match=r"annotation id 17 uses category_id 99.*\[3, 7\]"):
        load_coco(write_json(tmp_path / "train.json", content), tmp_path / "images")


def test_coco_skips_corrupt_and_missing_images_with_the_reason(coco_dir: Path) -> None:
    jpeg = (coco_dir / "images" / "a.jpg").read_bytes()
    (coco_dir / "images" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (coco_dir / "images" / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(2000))
    (coco_dir / "images" / "empty.jpg").write_bytes(b"")
    content = json.loads((coco_dir / "train.json").read_text())
    for image_id, name in [(10, "truncated.jpg"), (11, "noise.jpg"), (12, "missing.jpg"), (13, "empty.jpg")]:
        content["images"].append({"id": image_id, "file_name": name, "width": 100, "height": 80})
        content["annotations"].append(
            {"id": 100 + image_id, "image_id": image_id, "category_id": 3, "bbox": [1, 1, 9, 9]}
        )
    dataset = load_coco(write_json(coco_dir / "train.json", content), coco_dir / "images")

    assert [record.image_id for record in dataset.records] == [1, 2, 5]
    skipped = dict(dataset.report.images_skipped)
    assert list(skipped) == ["truncated.jpg", "noise.jpg", "missing.jpg", "empty.jpg"]
    assert "truncated" in skipped["truncated.jpg"]
    assert "cannot identify" in skipped["noise.jpg"]
    assert skipped["missing.jpg"] == "file not found"
    assert dataset.report.boxes_dropped == {"image skipped": 4}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON list, not a COCO object"),
        ('{"images": [], "annotations": []}', "no 'categories'"),
        ('{"images": {}, "annotations": [], "categories": []}', "'images' must be a list"),
        ('{"images": [], "annotations": [], "categories": [{"id": 1}]}', "integer 'id' and a string 'name'"),
        ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}', "twice"),
    ],
)
def test_coco_malformed_files_raise_dataset_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "train.json").write_text(text)
    with pytest.raises(DatasetError, match=message):
        load_coco(tmp_path / "train.json", tmp_path)


def test_coco_missing_file_raises_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found"):
        load_coco(tmp_path / "nope.json", tmp_path)


def test_coco_with_no_usable_image_is_empty_and_load_dataset_refuses_it(tmp_path: Path) -> None:
    content = coco_content([(1, "gone.jpg", 10, 10)], [{"image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]}])
    write_json(tmp_path / "train.json", content)
    (tmp_path / "images").mkdir()
    dataset = load_coco(tmp_path / "train.json", tmp_path / "images")
    assert len(dataset) == 0
    assert dataset.report.images_skipped == [("gone.jpg", "file not found")]
    assert "no usable images" in dataset.report.warnings[0]
    with pytest.raises(DatasetError, match=r"train split .* has no usable images .*gone.jpg: file not found"):
        load_dataset(tmp_path)


def test_exif_rotated_jpeg_gets_the_displayed_size(tmp_path: Path) -> None:
    path = make_image(tmp_path / "images" / "rotated.jpg", 60, 40, orientation=6)  # stored 60 wide, 40 tall
    assert probe_image(path) == (40, 60)
    assert load_image(path).shape[:2] == (60, 40)  # the same frame the model sees
    content = coco_content([(1, "rotated.jpg", 60, 40)], [{"image_id": 1, "category_id": 3, "bbox": [5, 30, 30, 25]}])
    dataset = load_coco(write_json(tmp_path / "train.json", content), tmp_path / "images")
    record = dataset.records[0]
    assert (record.width, record.height) == (40, 60)
    np.testing.assert_allclose(record.boxes, [[5, 30, 35, 55]])  # displayed frame, not rotated by us
    assert len(dataset.report.warnings) == 1 and "EXIF orientation" in dataset.report.warnings[0]


def test_probe_image_catches_a_truncated_jpeg_read_at_reduced_scale(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    (tmp_path / "cut.jpg").write_bytes(data[:-100])  # only the last few rows are missing
    with pytest.raises(ValueError, match="truncated"):
        probe_image(tmp_path / "cut.jpg")
    (tmp_path / "whole.jpg").write_bytes(data)
    assert probe_image(tmp_path / "whole.jpg") == (256, 256)


def test_val_split_must_have_the_train_classes(coco_dir: Path) -> None:
    train = load_coco(coco_dir / "train.json", coco_dir / "images")
    content = json.loads((coco_dir / "train.json").read_text())
    content["categories"] = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]  # same names, other ids/order
    for annotation in content["annotations"]:
        annotation["category_id"] = {7: 1, 3: 2}[annotation["category_id"]]
    val = load_coco(write_json(coco_dir / "val.json", content), coco_dir / "images", class_names=train.class_names)
    assert val.class_names == ["cat", "dog"] and val.category_ids == [2, 1]
    assert val.records[0].labels.tolist() == train.records[0].labels.tolist()
    assert "labels follow the train split" in val.report.warnings[0]

    content["categories"] = [{"id": 1, "name": "dog"}, {"id": 2, "name": "bird"}]
    write_json(coco_dir / "val.json", content)
    with pytest.raises(DatasetError, match=r"missing \['cat'\], extra \['bird'\]"):
        load_coco(coco_dir / "val.json", coco_dir / "images", class_names=train.class_names)


# ------------------------------------------------------------------------------------------------------------
# YOLO
# ------------------------------------------------------------------------------------------------------------


def make_yolo(root: Path, split: str | None, files: dict[str, tuple[int, int, str | None]]) -> Path:
    """files: image name → (stored width, stored height, label text or None for no label file)."""
    images = root / "images" / split if split else root / "images"
    labels = root / "labels" / split if split else root / "labels"
    for name, (width, height, text) in files.items():
        make_image(images / name, width, height)
        if text is not None:
            (labels / name).with_suffix(".txt").parent.mkdir(parents=True, exist_ok=True)
            (labels / name).with_suffix(".txt").write_text(text)
    return root


def test_yolo_reads_normalised_boxes_in_pixels_with_data_yaml_dict_names(tmp_path: Path) -> None:
    (tmp_path / "data.yaml").write_text("names:\n  0: cat\n  1: dog\n")
    make_yolo(
        tmp_path,
        "train",
        {
            "b.jpg": (100, 80, "1 0.5 0.5 0.2 0.5\n\n0 0.1 0.1 0.2 0.2\n"),
            "a.png": (50, 50, None),  # no label file: background
            "c.jpg": (40, 40, ""),  # empty label file: background
        },
    )
    dataset = load_yolo(tmp_path, "train")
    assert dataset.class_names == ["cat", "dog"] and dataset.category_ids == [1, 2]
    assert [(r.path.name, r.image_id) for r in dataset.records] == [("a.png", 1), ("b.jpg", 2), ("c.jpg", 3)]
    np.testing.assert_allclose(dataset.records[1].boxes, [[40, 20, 60, 60], [0, 0, 20, 16]], atol=1e-4)
    assert dataset.records[1].labels.tolist() == [1, 0]
    assert dataset.report.background_images == 2
    assert dataset.report.boxes_clipped == 0  # float round-off at the edge is not a clipped box


def test_yolo_and_coco_agree_on_the_same_boxes(coco_dir: Path, tmp_path: Path) -> None:
    coco = load_coco(coco_dir / "train.json", coco_dir / "images")
    root = tmp_path / "yolo"
    (root / "images").mkdir(parents=True)
    (root / "classes.txt").write_text("cat\ndog\n")
    for record in coco.records:
        (root / "images" / record.path.name).write_bytes(record.path.read_bytes())
        lines = [
            f"{label} {(x1 + x2) / 2 / record.width} {(y1 + y2) / 2 / record.height} "
            f"{(x2 - x1) / record.width} {(y2 - y1) / record.height}"
            for (x1, y1, x2, y2), label in zip(record.boxes.tolist(), record.labels.tolist())
        ]
        (root / "labels").mkdir(exist_ok=True)
        (root / "labels" / record.path.with_suffix(".txt").name).write_text("\n".join(lines))
    yolo = load_yolo(root)  # flat layout
    by_name = {record.path.name: record for record in yolo.records}
    for record in coco.records:
        np.testing.assert_allclose(by_name[record.path.name].boxes, record.boxes, atol=1e-3)
        assert by_name[record.path.name].labels.tolist() == record.labels.tolist()


def test_yolo_drops_malformed_lines_clips_and_keeps_polygons(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    lines = [
        "0 0.5 0.5 0.2",  # 4 numbers: malformed
        "0 a 0.5 0.2 0.2",  # not a number: malformed
        "0.5 0.5 0.5 0.2 0.2",  # fractional class: malformed
        "0 0.5 0.5 0.2 0.2 0.3",  # 6 numbers: malformed
        "0 0.5 0.5 -0.2 0.2",  # negative width: degenerate
        "0 nan 0.5 0.2 0.2",  # NaN: degenerate
        "1 0.95 0.5 0.2 0.2",  # reaches past the right edge: clipped
        "1 0.1 0.1 0.3 0.1 0.2 0.4",  # polygon → its bounding box
    ]
    make_yolo(tmp_path, None, {"a.jpg": (100, 100, "\n".join(lines))})
    dataset = load_yolo(tmp_path)
    assert dataset.report.boxes_dropped == {"malformed": 4, "degenerate": 2}
    assert dataset.report.boxes_clipped == 1
    np.testing.assert_allclose(dataset.records[0].boxes, [[85, 40, 100, 60], [10, 10, 30, 40]], atol=1e-4)


def test_yolo_class_index_out_of_range_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("cat\n")
    make_yolo(tmp_path, "train", {"a.jpg": (20, 20, "0 0.5 0.5 0.5 0.5\n3 0.5 0.5 0.5 0.5\n")})
    with pytest.raises(DatasetError, match=r"a\.txt:2: class index 3 is out of range"):
        load_yolo(tmp_path, "train")


def test_yolo_uses_the_displayed_frame_and_skips_corrupt_images(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("cat\n")
    make_image(tmp_path / "images" / "rotated.jpg", 60, 40, orientation=6)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "rotated.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "labels" / "broken.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "labels" / "lonely.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    dataset = load_yolo(tmp_path)
    assert [(r.path.name, r.image_id, r.width, r.height) for r in dataset.records] == [("rotated.jpg", 2, 40, 60)]
    np.testing.assert_allclose(dataset.records[0].boxes, [[10, 15, 30, 45]])
    assert [name for name, _ in dataset.report.images_skipped] == ["broken.jpg"]
    assert "1 label files" in dataset.report.warnings[0] and "lonely.txt" in dataset.report.warnings[0]


def test_yolo_without_class_list_or_with_a_different_one_raises(tmp_path: Path) -> None:
    make_yolo(tmp_path, "train", {"a.jpg": (20, 20, None)})
    with pytest.raises(DatasetError, match="no class list"):
        load_yolo(tmp_path, "train")
    assert load_yolo(tmp_path, "train", class_names=["cat"]).class_names == ["cat"]
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\nnc: 2\n")
    with pytest.raises(DatasetError, match="declares classes"):
        load_yolo(tmp_path, "train", class_names=["cat"])
    (tmp_path / "data.yaml").write_text("names: [cat, dog]\nnc: 3\n")
    with pytest.raises(DatasetError, match="nc: 3"):
        load_yolo(tmp_path, "train")


# ------------------------------------------------------------------------------------------------------------
# load_dataset
# ------------------------------------------------------------------------------------------------------------


def test_load_dataset_reads_a_coco_folder_with_all_splits(coco_dir: Path) -> None:
    train_content = json.loads((coco_dir / "train.json").read_text())
    write_json(coco_dir / "val.json", {**train_content, "images": train_content["images"][:1]})
    write_json(coco_dir / "test.json", {**train_content, "images": train_content["images"][1:2]})
    splits = load_dataset(coco_dir)
    assert list(splits) == ["train", "val", "test"]
    assert [len(split) for split in splits.values()] == [3, 1, 1]
    assert splits["val"].report.boxes_dropped == {"orphan": 1}
    assert all(split.class_names == ["cat", "dog"] for split in splits.values())


def test_load_dataset_reads_a_single_coco_json_as_train(coco_dir: Path) -> None:
    (coco_dir / "train.json").rename(coco_dir / "instances.json")
    with pytest.raises(DatasetError, match=r"found instances\.json"):
        load_dataset(coco_dir)
    splits = load_dataset(coco_dir / "instances.json")
    assert list(splits) == ["train"] and len(splits["train"]) == 3


def test_load_dataset_reads_yolo_split_folders(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    make_yolo(tmp_path, "train", {"a.jpg": (20, 20, "1 0.5 0.5 0.5 0.5"), "b.jpg": (20, 20, None)})
    make_yolo(tmp_path, "valid", {"c.jpg": (20, 20, "0 0.5 0.5 0.5 0.5")})
    splits = load_dataset(tmp_path)
    assert {name: len(split) for name, split in splits.items()} == {"train": 2, "val": 1}
    assert splits["val"].class_names == ["cat", "dog"]


def test_load_dataset_reads_a_roboflow_style_data_yaml(tmp_path: Path) -> None:
    # Roboflow: train/images + train/labels beside data.yaml, listed as ../train/images.
    (tmp_path / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['cat']\n")
    for split in ("train", "valid"):
        make_image(tmp_path / split / "images" / f"{split}.jpg", 32, 32)
        (tmp_path / split / "labels").mkdir()
        (tmp_path / split / "labels" / f"{split}.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    splits = load_dataset(tmp_path)
    assert list(splits) == ["train", "val"]
    np.testing.assert_allclose(splits["val"].records[0].boxes, [[12, 12, 20, 20]])


def test_load_dataset_reads_an_ultralytics_data_yaml_with_path(tmp_path: Path) -> None:
    root = tmp_path / "datasets" / "pets"
    make_yolo(root, "train", {"a.jpg": (20, 20, "0 0.5 0.5 0.5 0.5")})
    make_yolo(root, "val", {"b.jpg": (20, 20, "0 0.5 0.5 0.5 0.5")})
    (tmp_path / "pets.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames: [cat]\n")
    splits = load_dataset(tmp_path / "pets.yaml")
    assert {name: len(split) for name, split in splits.items()} == {"train": 1, "val": 1}


def test_load_dataset_reads_a_flat_yolo_folder_as_train(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("cat\n")
    make_yolo(tmp_path, None, {"a.jpg": (20, 20, "0 0.5 0.5 0.5 0.5")})
    assert list(load_dataset(tmp_path)) == ["train"]


def test_load_dataset_explains_the_accepted_layouts(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    with pytest.raises(DatasetError, match="no train split") as error:
        load_dataset(tmp_path)
    assert describe_layout() in str(error.value)
    assert "train.json" in describe_layout() and "data.yaml" in describe_layout()
    with pytest.raises(DatasetError, match="dataset not found"):
        load_dataset(tmp_path / "nowhere")
    make_yolo(tmp_path, "val", {"a.jpg": (20, 20, None)})
    (tmp_path / "classes.txt").write_text("cat\n")
    with pytest.raises(DatasetError, match="no train/ folder"):
        load_dataset(tmp_path)


def test_load_dataset_refuses_val_with_other_classes(coco_dir: Path) -> None:
    content = json.loads((coco_dir / "train.json").read_text())
    content["categories"] = [{"id": 3, "name": "cat"}]
    content["annotations"] = [a for a in content["annotations"] if a["category_id"] == 3]
    write_json(coco_dir / "val.json", content)
    with pytest.raises(DatasetError, match=r"val\.json' has different classes from the train split"):
        load_dataset(coco_dir)


def test_raccoon_dataset_loads_with_its_published_counts() -> None:
    if not (RACCOON / "train.json").is_file():
        pytest.skip(f"needs the raccoon dataset in {RACCOON} (present in CI, not in a user's clone)")
    meta = json.loads((RACCOON / "meta.json").read_text())
    splits = load_dataset(RACCOON)
    assert list(splits) == ["train", "val"]
    for name in ("train", "val"):
        report = splits[name].report
        assert (report.images, report.boxes) == (meta[name]["images"], meta[name]["boxes"])
        assert report.images_skipped == [] and report.boxes_dropped == {} and report.warnings == []
        assert splits[name].class_names == meta["classes"]
    assert (splits["train"].report.images, splits["train"].report.boxes) == (160, 172)
