"""Tests for backend/processing.py: loading, letterbox geometry, box mapping, IoU, NMS and post-processing."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backend.processing import (
    Detections,
    ImageLoadError,
    LetterboxInfo,
    PostprocessConfig,
    batched_nms_numpy,
    batched_nms_torch,
    box_iou_numpy,
    box_iou_torch,
    boxes_to_input,
    boxes_to_original,
    letterbox,
    load_image,
    nms_numpy,
    nms_torch,
    postprocess_numpy,
    postprocess_to_original,
    postprocess_torch,
    preprocess,
    to_tensor_batch,
)

# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def iou_numpy(a, b):
    return box_iou_numpy(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))


def iou_torch(a, b):
    return box_iou_torch(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).numpy()


def run_nms_numpy(boxes, scores, threshold, class_ids=None):
    boxes, scores = np.asarray(boxes, dtype=np.float32), np.asarray(scores, dtype=np.float32)
    if class_ids is None:
        return nms_numpy(boxes, scores, threshold)
    return batched_nms_numpy(boxes, scores, np.asarray(class_ids, dtype=np.int64), threshold)


def run_nms_torch(boxes, scores, threshold, class_ids=None):
    boxes = torch.tensor(np.asarray(boxes, dtype=np.float32))
    scores = torch.tensor(np.asarray(scores, dtype=np.float32))
    if class_ids is None:
        kept = nms_torch(boxes, scores, threshold)
    else:
        kept = batched_nms_torch(boxes, scores, torch.tensor(class_ids, dtype=torch.int64), threshold)
    assert kept.dtype == torch.int64
    return kept.numpy()


NMS_IMPLEMENTATIONS = [pytest.param(run_nms_numpy, id="numpy"), pytest.param(run_nms_torch, id="torch")]
IOU_IMPLEMENTATIONS = [pytest.param(iou_numpy, id="numpy"), pytest.param(iou_torch, id="torch")]


def reference_nms(boxes, scores, threshold, class_ids=None):
    """Greedy NMS straight from the definition, one pair at a time, to check both implementations against."""
    iou = box_iou_numpy(boxes, boxes)  # checked against hand-computed cases above
    order = sorted(range(len(scores)), key=lambda index: (-scores[index], index))
    kept = []
    for candidate in order:
        suppressed = any(
            (class_ids is None or class_ids[kept_index] == class_ids[candidate])
            and iou[kept_index, candidate] > threshold
            for kept_index in kept
        )
        if not suppressed:
            kept.append(candidate)
    return np.asarray(kept, dtype=np.int64)


def random_boxes(rng: np.random.Generator, count: int, extent: float = 200.0) -> np.ndarray:
    """(count, 4) float32 xyxy, crowded enough that many pairs overlap."""
    top_left = rng.uniform(0, extent, size=(count, 2))
    size = rng.uniform(5, extent / 3, size=(count, 2))
    return np.concatenate([top_left, top_left + size], axis=1).astype(np.float32)


def encode(image: Image.Image, image_format: str, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_options)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# IoU
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("iou", IOU_IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("box_a", "box_b", "expected"),
    [
        pytest.param([0, 0, 10, 10], [0, 0, 10, 10], 1.0, id="identical"),
        pytest.param([0, 0, 10, 10], [20, 20, 30, 30], 0.0, id="disjoint"),
        pytest.param([0, 0, 2, 2], [1, 0, 3, 2], 2 / 6, id="shifted-by-half"),
        pytest.param([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16, id="containment"),
        pytest.param([0, 0, 1, 1], [1, 0, 2, 1], 0.0, id="touching-edge"),
        pytest.param([0, 0, 1, 1], [1, 1, 2, 2], 0.0, id="touching-corner"),
        pytest.param([0, 0, 4, 2], [2, 1, 6, 5], 2 / (8 + 16 - 2), id="partial-both-axes"),
        pytest.param([5, 5, 5, 5], [5, 5, 5, 5], 0.0, id="degenerate-is-zero-not-nan"),
    ],
)
def test_iou_hand_computed(iou, box_a, box_b, expected):
    np.testing.assert_allclose(iou([box_a], [box_b]), [[expected]], rtol=0, atol=1e-12)
    np.testing.assert_allclose(iou([box_b], [box_a]), [[expected]], rtol=0, atol=1e-12)


@pytest.mark.parametrize("iou", IOU_IMPLEMENTATIONS)
def test_iou_matrix_is_rows_a_by_columns_b(iou):
    a = [[0, 0, 2, 2], [10, 10, 12, 12]]
    b = [[1, 0, 3, 2], [0, 0, 2, 2], [10, 10, 12, 12]]
    expected = [[1 / 3, 1.0, 0.0], [0.0, 0.0, 1.0]]
    result = iou(a, b)
    assert result.shape == (2, 3)
    np.testing.assert_allclose(result, expected, atol=1e-12)


def test_iou_numpy_and_torch_agree_bitwise_on_float32():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 60), random_boxes(rng, 70)
    from_numpy = box_iou_numpy(a, b)
    from_torch = box_iou_torch(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert from_numpy.dtype == from_torch.dtype == np.float32
    np.testing.assert_array_equal(from_numpy, from_torch)


# ----------------------------------------------------------------------------------------------------------------
# NMS
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nms", NMS_IMPLEMENTATIONS)
def test_nms_drops_the_lower_scoring_overlap_and_orders_by_score(nms):
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]]  # IoU(0, 1) = 81 / 119 ≈ 0.68
    kept = nms(boxes, [0.5, 0.9, 0.7], 0.5)
    np.testing.assert_array_equal(kept, [1, 2])
    assert kept.dtype == np.int64


@pytest.mark.parametrize("nms", NMS_IMPLEMENTATIONS)
def test_nms_keeps_a_box_whose_iou_equals_the_threshold(nms):
    boxes = [[0, 0, 2, 1], [0, 0, 1, 1]]  # IoU exactly 0.5, representable in float32
    np.testing.assert_array_equal(nms(boxes, [0.9, 0.8], 0.5), [0, 1])
    np.testing.assert_array_equal(nms(boxes, [0.9, 0.8], 0.49), [0])


@pytest.mark.parametrize("nms", NMS_IMPLEMENTATIONS)
def test_nms_suppressed_boxes_do_not_suppress_others(nms):
    # B overlaps both A and C, A and C do not overlap. Greedy NMS keeps A, drops B, and then keeps C because
    # the only box overlapping C was itself dropped.
    boxes = [[0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10]]  # IoU(A,B) = IoU(B,C) = 70/130, IoU(A,C) = 40/160
    np.testing.assert_array_equal(nms(boxes, [0.9, 0.8, 0.7], 0.5), [0, 2])


@pytest.mark.parametrize("nms", NMS_IMPLEMENTATIONS)
def test_nms_ties_are_broken_by_index(nms):
    boxes = [[0, 0, 10, 10], [100, 0, 110, 10], [0, 0, 10, 10], [200, 0, 210, 10]]
    np.testing.assert_array_equal(nms(boxes, [0.5, 0.5, 0.5, 0.5], 0.5), [0, 1, 3])


@pytest.mark.parametrize("nms", NMS_IMPLEMENTATIONS)
def test_nms_of_nothing_is_an_empty_int64_array(nms):
    kept = nms(np.zeros((0, 4)), np.zeros(0), 0.5)
    assert kept.shape == (0,)
    assert kept.dtype == np.int64
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5, class_ids=np.zeros(0, dtype=np.int64)).shape == (0,)


@pytest.mark.parametrize("nms", NMS_IMPLEMENTATIONS)
def test_batched_nms_only_suppresses_within_a_class(nms):
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [-20, -20, -10, -10], [-19, -19, -9, -9]]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    class_ids = [0, 0, 1, 1, 2]
    np.testing.assert_array_equal(nms(boxes, scores, 0.5, class_ids=class_ids), [0, 2, 3, 4])
    np.testing.assert_array_equal(nms(boxes, scores, 0.5), [0, 3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nms_implementations_match_the_reference_on_random_boxes(seed):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 300)
    scores = rng.random(300).astype(np.float32)
    scores[::7] = scores[0]  # some exact ties
    class_ids = rng.integers(0, 4, 300)

    expected = reference_nms(boxes, scores, 0.45)
    assert 10 < len(expected) < 290  # crowded enough that suppression actually happens
    np.testing.assert_array_equal(run_nms_numpy(boxes, scores, 0.45), expected)
    np.testing.assert_array_equal(run_nms_torch(boxes, scores, 0.45), expected)

    expected_batched = reference_nms(boxes, scores, 0.45, class_ids)
    assert len(expected_batched) > len(expected)
    np.testing.assert_array_equal(run_nms_numpy(boxes, scores, 0.45, class_ids), expected_batched)
    np.testing.assert_array_equal(run_nms_torch(boxes, scores, 0.45, class_ids), expected_batched)


# ----------------------------------------------------------------------------------------------------------------
# Letterbox and box mapping
# ----------------------------------------------------------------------------------------------------------------

COLOUR = (10, 200, 30)


@pytest.mark.parametrize(
    ("original_hw", "input_hw", "scale", "content_hw", "pad_xy"),
    [
        pytest.param((100, 200), (64, 64), 0.32, (32, 64), (0, 16), id="landscape"),
        pytest.param((300, 100), (64, 64), 64 / 300, (64, 21), (21, 0), id="portrait-odd-padding"),
        pytest.param((10, 20), (64, 64), 3.2, (32, 64), (0, 16), id="upscale"),
        pytest.param((10, 20), (64, 96), 4.8, (48, 96), (0, 8), id="upscale-into-non-square"),
        pytest.param((50, 50), (64, 96), 1.28, (64, 64), (16, 0), id="square-into-landscape"),
        pytest.param((64, 96), (64, 96), 1.0, (64, 96), (0, 0), id="same-size"),
    ],
)
def test_letterbox_geometry_and_padding(original_hw, input_hw, scale, content_hw, pad_xy):
    image = np.full((*original_hw, 3), COLOUR, dtype=np.uint8)
    padded, info = letterbox(image, input_hw)

    assert padded.shape == (*input_hw, 3)
    assert padded.dtype == np.uint8
    assert info == LetterboxInfo(
        scale=pytest.approx(scale), pad_x=pad_xy[0], pad_y=pad_xy[1], original_size=original_hw, input_size=input_hw
    )
    top, left = pad_xy[1], pad_xy[0]
    content = np.zeros(input_hw, dtype=bool)
    content[top : top + content_hw[0], left : left + content_hw[1]] = True
    assert (padded[content] == COLOUR).all()  # colour kept: no BGR swap
    assert (padded[~content] == 114).all()


def test_letterbox_places_content_where_boxes_to_input_says():
    # A white rectangle on black, at a known original-pixel box; after letterboxing, its bright pixels must
    # span the box that boxes_to_input predicts.
    image = np.zeros((120, 300, 3), dtype=np.uint8)
    box = np.array([[60.0, 30.0, 150.0, 90.0]])  # xyxy original pixels (edges)
    image[30:90, 60:150] = 255
    padded, info = letterbox(image, (160, 256))
    bright_rows, bright_cols = np.nonzero(padded[:, :, 0] > 127)
    found = [bright_cols.min(), bright_rows.min(), bright_cols.max() + 1, bright_rows.max() + 1]
    np.testing.assert_allclose(found, boxes_to_input(box, info)[0], atol=1.0)
    assert info.pad_y > 0  # the box really is shifted by padding in this case


@pytest.mark.parametrize("input_size", [(640, 630), (100, 640), (0, 640)])
def test_letterbox_rejects_input_sizes_that_are_not_multiples_of_32(input_size):
    with pytest.raises(ValueError, match="multiples of 32"):
        letterbox(np.zeros((10, 10, 3), dtype=np.uint8), input_size)


def test_letterbox_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        letterbox(np.zeros((10, 10), dtype=np.uint8), (64, 64))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        letterbox(np.zeros((10, 10, 3), dtype=np.float32), (64, 64))


@pytest.mark.parametrize("original_hw", [(480, 640), (640, 480), (333, 517), (20, 20)])
@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_boxes_to_original_inverts_boxes_to_input(original_hw, as_tensor):
    _, info = letterbox(np.zeros((*original_hw, 3), dtype=np.uint8), (320, 416))
    rng = np.random.default_rng(0)
    height, width = original_hw
    corners = rng.uniform(0, 1, size=(50, 4)) * [width, height, width, height]
    boxes = np.concatenate([corners[:, :2].clip(max=corners[:, 2:]), corners[:, :2].clip(min=corners[:, 2:])], 1)
    boxes = torch.from_numpy(boxes) if as_tensor else boxes

    to_input = boxes_to_input(boxes, info)
    round_trip = boxes_to_original(to_input, info)

    assert isinstance(round_trip, type(boxes))
    assert not np.allclose(np.asarray(to_input), np.asarray(boxes))  # the mapping is not the identity here
    np.testing.assert_allclose(np.asarray(round_trip), np.asarray(boxes), atol=1e-4)


def test_boxes_to_original_clips_to_the_image_and_keeps_dtype():
    _, info = letterbox(np.zeros((100, 200, 3), dtype=np.uint8), (64, 64))  # scale 0.32, pad_y 16
    in_padding = np.array([[-5.0, 0.0, 70.0, 10.0], [10.0, 20.0, 30.0, 40.0]], dtype=np.float32)
    result = boxes_to_original(in_padding, info)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result[0], [0, 0, 200, 0], atol=1e-4)
    np.testing.assert_allclose(result[1], [10 / 0.32, 4 / 0.32, 30 / 0.32, 24 / 0.32], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------------


def test_to_tensor_batch_is_nchw_rgb_divided_by_255():
    first = np.zeros((32, 64, 3), dtype=np.uint8)
    first[..., 0] = 255
    second = np.full((32, 64, 3), 51, dtype=np.uint8)
    batch = to_tensor_batch([first, second])
    assert batch.shape == (2, 3, 32, 64)
    assert batch.dtype == np.float32
    assert batch.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(batch[0, :, 0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(batch[1], 0.2, rtol=1e-6)


def test_to_tensor_batch_rejects_mixed_sizes_and_empty_lists():
    with pytest.raises(ValueError, match="same size"):
        to_tensor_batch([np.zeros((32, 32, 3), np.uint8), np.zeros((32, 64, 3), np.uint8)])
    with pytest.raises(ValueError, match="at least one"):
        to_tensor_batch([])


def test_preprocess_accepts_paths_bytes_pil_and_arrays(tmp_path: Path):
    red = Image.new("RGB", (80, 40), (255, 0, 0))
    path = tmp_path / "red.png"
    red.save(path)
    sources = [path, str(path), encode(red, "PNG"), red, np.asarray(red)]

    batch, infos = preprocess(sources, (64, 64))

    assert batch.shape == (5, 3, 64, 64)
    assert all(info == infos[0] for info in infos)
    assert infos[0].original_size == (40, 80)
    np.testing.assert_array_equal(batch[:, :, 32, 32], np.tile([1.0, 0.0, 0.0], (5, 1)))  # content, RGB order
    np.testing.assert_allclose(batch[:, :, 0, 0], 114 / 255, rtol=1e-6)  # top padding


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def test_load_image_applies_exif_orientation(tmp_path: Path):
    # Stored 40 wide × 20 high, red left half, blue right half. Orientation 6 means "rotate 90° clockwise to
    # display", which puts the left half on top and makes the image 20 wide × 40 high.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, format="JPEG", exif=exif.tobytes(), quality=95)

    loaded = load_image(path)

    assert loaded.shape == (40, 20, 3)
    assert loaded.dtype == np.uint8
    top, bottom = loaded[5:15].reshape(-1, 3).mean(0), loaded[25:35].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 50  # red on top
    assert bottom[2] > 200 and bottom[0] < 50  # blue at the bottom


def test_load_image_converts_alpha_grey_palette_and_cmyk_to_rgb():
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[:, :3] = (10, 20, 30, 255)  # opaque left half
    rgba[:, 3:] = (0, 0, 0, 0)  # transparent right half (stored as black)
    loaded = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert loaded.shape == (4, 6, 3)
    assert (loaded[:, :3] == (10, 20, 30)).all()
    assert (loaded[:, 3:] == 255).all()  # composited on white, not left black

    grey = load_image(Image.fromarray(np.full((5, 7), 77, dtype=np.uint8), "L"))
    assert grey.shape == (5, 7, 3)
    assert (grey == 77).all()

    palette = Image.new("P", (3, 2))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * (254 * 3))
    palette.putpixel((1, 1), 1)
    loaded_palette = load_image(encode(palette, "PNG"))
    assert loaded_palette.shape == (2, 3, 3)
    assert tuple(loaded_palette[1, 1]) == (200, 100, 50)
    assert tuple(loaded_palette[0, 0]) == (0, 0, 0)

    cmyk = load_image(Image.new("CMYK", (4, 4), (0, 255, 255, 0)))  # pure red in CMYK
    assert cmyk.shape == (4, 4, 3)
    assert tuple(cmyk[0, 0]) == (255, 0, 0)


def test_load_image_scales_16_bit_grey_instead_of_clipping():
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    loaded = load_image(encode(Image.fromarray(values), "PNG"))
    np.testing.assert_array_equal(loaded[0, :, 0], [0, 128, 255])


def test_load_image_takes_the_first_frame_of_an_animation():
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    animation = Image.open(io.BytesIO(data))
    assert animation.n_frames == 2
    animation.seek(1)  # a caller left it on the second frame
    for source in (data, animation):
        loaded = load_image(source)
        assert loaded[0, 0, 0] > 200 and loaded[0, 0, 2] < 50


def test_load_image_errors_name_the_file(tmp_path: Path):
    jpeg = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    cases = {
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "notes.txt": b"these are my notes, not a picture\n",
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "empty.jpg": b"",
    }
    for file_name, data in cases.items():
        path = tmp_path / file_name
        path.write_bytes(data)
        with pytest.raises(ImageLoadError, match=re.escape(file_name)) as caught:
            load_image(path)
        assert isinstance(caught.value, ValueError)
        assert caught.value.__cause__ is not None or data == b""

    with pytest.raises(ImageLoadError, match=r"upload\.webp"):
        load_image(b"\x00\x01garbage", name="upload.webp")
    with pytest.raises(ImageLoadError, match="<bytes>"):
        load_image(jpeg[:300])


def test_load_image_missing_file_is_file_not_found(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"missing\.jpg"):
        load_image(tmp_path / "missing.jpg")


# ----------------------------------------------------------------------------------------------------------------
# Post-processing
# ----------------------------------------------------------------------------------------------------------------


def as_outputs(boxes, scores):
    """One image's (A, 4) boxes and (A, C) scores → (1, A, 4), (1, A, C) float32."""
    return np.asarray(boxes, dtype=np.float32)[None], np.asarray(scores, dtype=np.float32)[None]


def run_postprocess(kind, boxes, scores, config):
    if kind == "numpy":
        return postprocess_numpy(boxes, scores, config)
    return postprocess_torch(torch.from_numpy(boxes), torch.from_numpy(scores), config)


POSTPROCESS_KINDS = ["numpy", "torch"]


@pytest.mark.parametrize("kind", POSTPROCESS_KINDS)
def test_multi_label_keeps_every_class_above_threshold_and_single_label_only_the_best(kind):
    boxes, scores = as_outputs(
        [[0, 0, 10, 10], [100, 100, 110, 110]],
        [[0.6, 0.8, 0.1], [0.2, 0.25, 0.3]],  # anchor 1: only class 2 passes 0.25 (0.25 itself does not)
    )
    multi = run_postprocess(kind, boxes, scores, PostprocessConfig(conf_threshold=0.25, multi_label=True))[0]
    np.testing.assert_array_equal(multi.class_ids, [1, 0, 2])
    np.testing.assert_allclose(multi.scores, [0.8, 0.6, 0.3])
    np.testing.assert_array_equal(multi.boxes, [[0, 0, 10, 10], [0, 0, 10, 10], [100, 100, 110, 110]])

    single = run_postprocess(kind, boxes, scores, PostprocessConfig(conf_threshold=0.25, multi_label=False))[0]
    np.testing.assert_array_equal(single.class_ids, [1, 2])
    np.testing.assert_allclose(single.scores, [0.8, 0.3])


@pytest.mark.parametrize("kind", POSTPROCESS_KINDS)
def test_top_k_applies_before_nms_and_max_detections_after(kind):
    # Three high-scoring near-duplicates of one box, then four disjoint lower-scoring boxes.
    duplicates = [[0, 0, 10, 10], [0, 0, 10, 10.5], [0, 0, 10.5, 10]]
    disjoint = [[100 * i, 50, 100 * i + 10, 60] for i in range(1, 5)]
    boxes, scores = as_outputs(duplicates + disjoint, [[0.9], [0.89], [0.88], [0.7], [0.6], [0.5], [0.4]])

    everything = run_postprocess(kind, boxes, scores, PostprocessConfig())[0]
    np.testing.assert_allclose(everything.scores, [0.9, 0.7, 0.6, 0.5, 0.4])

    # top_k = 3 keeps only the duplicates as candidates; NMS then leaves a single box.
    top_three = run_postprocess(kind, boxes, scores, PostprocessConfig(top_k=3))[0]
    np.testing.assert_allclose(top_three.scores, [0.9])

    capped = run_postprocess(kind, boxes, scores, PostprocessConfig(max_detections=2))[0]
    np.testing.assert_allclose(capped.scores, [0.9, 0.7])


@pytest.mark.parametrize("kind", POSTPROCESS_KINDS)
def test_postprocess_handles_each_image_separately_and_empty_results(kind):
    boxes = np.zeros((2, 3, 4), dtype=np.float32)
    boxes[..., 2:] = 10
    scores = np.zeros((2, 3, 2), dtype=np.float32)
    scores[1, 2, 1] = 0.9
    first, second = run_postprocess(kind, boxes, scores, PostprocessConfig())
    assert len(first) == 0
    assert first.boxes.shape == (0, 4) and first.boxes.dtype == np.float32
    assert first.class_ids.dtype == np.int64
    assert len(second) == 1 and second.class_ids[0] == 1


@pytest.mark.parametrize("multi_label", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_postprocess_numpy_and_torch_agree_on_random_outputs(multi_label, seed):
    rng = np.random.default_rng(seed)
    batch, anchors, classes = 2, 600, 5
    boxes = random_boxes(rng, batch * anchors, extent=320).reshape(batch, anchors, 4)
    scores = rng.random((batch, anchors, classes), dtype=np.float32) ** 3  # mostly low, like a real detector
    config = PostprocessConfig(
        conf_threshold=0.3, iou_threshold=0.5, top_k=400, max_detections=150, multi_label=multi_label
    )

    from_numpy = postprocess_numpy(boxes, scores, config)
    from_torch = postprocess_torch(torch.from_numpy(boxes), torch.from_numpy(scores), config)

    for expected, actual in zip(from_numpy, from_torch, strict=True):
        assert 20 < len(expected) <= 150
        np.testing.assert_array_equal(actual.boxes, expected.boxes)
        np.testing.assert_array_equal(actual.scores, expected.scores)
        np.testing.assert_array_equal(actual.class_ids, expected.class_ids)
        assert (np.diff(expected.scores) <= 0).all()


def test_postprocess_to_original_recovers_original_boxes():
    original_boxes = np.array([[20.0, 10.0, 120.0, 90.0], [200.0, 50.0, 290.0, 100.0]])  # original pixels
    _, info = letterbox(np.zeros((120, 300, 3), dtype=np.uint8), (128, 160))
    model_boxes = boxes_to_input(original_boxes, info).astype(np.float32)[None]  # (1, 2, 4) input pixels
    model_scores = np.array([[[0.9, 0.0], [0.0, 0.8]]], dtype=np.float32)  # (1, 2, 2)

    for boxes, scores in [
        (model_boxes, model_scores),
        (torch.from_numpy(model_boxes), torch.from_numpy(model_scores)),
    ]:
        (found,) = postprocess_to_original(boxes, scores, [info])
        np.testing.assert_allclose(found.boxes, original_boxes, atol=1e-3)
        np.testing.assert_array_equal(found.class_ids, [0, 1])


def test_detections_to_dict_is_json_friendly():
    detections = Detections(
        boxes=np.array([[1.5, 2, 3, 4]], dtype=np.float32), scores=np.array([0.75]), class_ids=np.array([1])
    )
    named = detections.to_dict(["pikachu", "eevee"])
    assert json.loads(json.dumps(named)) == [
        {"box": [1.5, 2.0, 3.0, 4.0], "score": 0.75, "class_id": 1, "class_name": "eevee"}
    ]
    assert detections.to_dict()[0]["class_name"] is None
    with pytest.raises(ValueError, match="class id 1"):
        detections.to_dict(["pikachu"])


def test_invalid_shapes_and_configs_raise():
    with pytest.raises(ValueError, match=r"\(B, A, 4\)"):
        postprocess_numpy(np.zeros((2, 4)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="same N"):
        nms_numpy(np.zeros((3, 4)), np.zeros(2), 0.5)
    with pytest.raises(ValueError, match="at least 1"):
        PostprocessConfig(top_k=0)
    with pytest.raises(ValueError, match="must have the same length"):
        Detections(np.zeros((2, 4)), np.zeros(1), np.zeros(2))
