"""Label Studio config and box conversion, on plain dicts shaped like Label Studio 1.23.2's JSON
(docs/label_studio.md, "Results and boxes").

No server here: the tests against a real Label Studio (sync, pull vs its COCO export) live with the server code.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from backend.labeling.config import DEFAULT_COLOURS, config_change, config_labels, labeling_config
from backend.labeling.convert import (
    IMAGE_ID_KEY,
    LsBox,
    Problem,
    boxes_to_ls_results,
    ls_result_to_box,
    pick_annotation,
    rotated_hull,
    task_boxes,
    task_uncertainty,
    to_coco_like,
)

CLASSES = ["Bulbasaur", "Charmander", "Squirtle"]


def rect(label, x, y, w, h, width=640, height=480, rotation=0.0, result_id=None, sized=True):
    """A rectanglelabels result as Label Studio stores it, from a top-left pixel box (docs/label_studio.md)."""
    result = {
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "image_rotation": 0,
        "value": {
            "x": 100 * x / width,
            "y": 100 * y / height,
            "width": 100 * w / width,
            "height": 100 * h / height,
            "rotation": rotation,
            "rectanglelabels": [label],
        },
    }
    if sized:
        result["original_width"], result["original_height"] = width, height
    if result_id is not None:
        result["id"] = result_id
    return result


def annotation(annotation_id, results, updated_at="2026-11-27T10:00:00.000000Z", cancelled=False):
    return {
        "id": annotation_id,
        "completed_by": 1,
        "result": results,
        "was_cancelled": cancelled,
        "ground_truth": False,
        "lead_time": 3.5,
        "updated_at": updated_at,
    }


def task(task_id, annotations, image_id=42):
    data = {"image": f"/data/local-files/?d=p/{task_id}.jpg"}
    if image_id is not None:
        data[IMAGE_ID_KEY] = image_id
    return {"id": task_id, "data": data, "annotations": annotations, "predictions": [], "total_annotations": 1}


# ----------------------------------------------------------------------------------------------------------------
# Pull
# ----------------------------------------------------------------------------------------------------------------


def test_recipe_result_gives_the_recipe_pixels():
    # A result measured on Label Studio 1.23.2, whose COCO bbox LS exported as [217, 127, 110, 133].
    result = {
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 640,
        "original_height": 480,
        "image_rotation": 0,
        "value": {
            "x": 33.90625,
            "y": 26.458333333333332,
            "width": 17.1875,
            "height": 27.708333333333332,
            "rotation": 0,
            "rectanglelabels": ["Bulbasaur"],
        },
    }
    box = ls_result_to_box(result, None, CLASSES)
    assert isinstance(box, LsBox)
    np.testing.assert_allclose(box.box, [217, 127, 327, 260], rtol=1e-12)
    assert (box.label, box.label_index, box.clipped, box.rotated) == ("Bulbasaur", 0, False, False)


def test_round_trip_pixels_percent_pixels():
    rng = np.random.default_rng(0)
    width, height = 1013, 677
    top_left = rng.uniform(0, 600, size=(50, 2))
    sizes = rng.uniform(1, 400, size=(50, 2))
    boxes = np.concatenate([top_left, np.minimum(top_left + sizes, [width, height])], axis=1)
    labels = rng.integers(0, len(CLASSES), size=50)
    pushed = boxes_to_ls_results(boxes, labels, None, (width, height), CLASSES)
    assert len(pushed.results) == 50 and pushed.dropped == {} and pushed.clipped == 0
    back = task_boxes(task(1, [annotation(1, pushed.results)]), CLASSES)
    assert back.problems == []
    np.testing.assert_allclose(back.boxes, boxes, rtol=1e-6)
    np.testing.assert_array_equal(back.labels, labels)
    # Through JSON as well (what the server returns), in float64 via ls_result_to_box.
    for result, expected in zip(json.loads(json.dumps(pushed.results)), boxes):
        np.testing.assert_allclose(ls_result_to_box(result, None, CLASSES).box, expected, rtol=1e-12)


def test_rotation_90_gives_the_hull():
    # 40x20 px at (100, 50) turned 90° clockwise about its top-left corner: the width now points down and the
    # height to the left, so the hull spans x 80..100, y 50..90.
    result = rect("Squirtle", 100, 50, 40, 20, rotation=90)
    box = ls_result_to_box(result, None, CLASSES)
    assert isinstance(box, LsBox) and box.rotated
    np.testing.assert_allclose(box.box, [80, 50, 100, 90], atol=1e-9)


def test_rotation_45_on_a_non_square_image_is_computed_in_pixels():
    # In pixels, a 20x20 square at (100, 100) turned 45° has its corners at (100, 100), (100 + d, 100 + d),
    # (100, 100 + 2d), (100 - d, 100 + d) with d = 20/√2. Rotating in percent space (W != H) would give a different
    # hull, which is what Label Studio's own COCO export does.
    box = ls_result_to_box(rect("Squirtle", 100, 100, 20, 20, width=640, height=320, rotation=45), None, CLASSES)
    half_diagonal = 20 / math.sqrt(2)
    np.testing.assert_allclose(box.box, [100 - half_diagonal, 100, 100 + half_diagonal, 100 + 2 * half_diagonal])
    assert rotated_hull(0, 0, 10, 5, 360) == pytest.approx((0, 0, 10, 5), abs=1e-9)


def test_cancelled_annotation_ignored_and_latest_completed_used():
    older = annotation(1, [rect("Bulbasaur", 10, 10, 50, 50)], updated_at="2026-11-27T09:00:00Z")
    newest_but_cancelled = annotation(
        3, [rect("Charmander", 20, 20, 50, 50)], updated_at="2026-11-27T12:00:00Z", cancelled=True
    )
    latest = annotation(
        2,
        [rect("Squirtle", 30, 30, 50, 50), rect("Bulbasaur", 300, 200, 40, 40)],
        updated_at="2026-11-27T11:00:00.5+00:00",
    )
    the_task = task(7, [older, newest_but_cancelled, latest])
    assert pick_annotation(the_task)["id"] == 2
    boxes = task_boxes(the_task, CLASSES)
    assert boxes.annotation_id == 2 and boxes.image_id == 42 and boxes.task_id == 7
    np.testing.assert_array_equal(boxes.labels, [2, 0])
    np.testing.assert_allclose(boxes.boxes, [[30, 30, 80, 80], [300, 200, 340, 240]], rtol=1e-6)
    assert boxes.image_size == (640, 480)


def test_several_annotations_same_time_larger_id_wins_and_all_cancelled_is_unlabeled():
    same_time = "2026-11-27T10:00:00Z"
    the_task = task(1, [annotation(5, [], same_time), annotation(9, [rect("Squirtle", 0, 0, 9, 9)], same_time)])
    assert pick_annotation(the_task)["id"] == 9
    # A legacy `skipped` flag counts as cancelled too; nothing left → not labeled.
    only_cancelled = task(
        2, [annotation(1, [rect("Squirtle", 0, 0, 9, 9)], cancelled=True), {"id": 2, "skipped": True}]
    )
    assert pick_annotation(only_cancelled) is None
    unlabeled = task_boxes(only_cancelled, CLASSES)
    assert not unlabeled.labeled and unlabeled.boxes.shape == (0, 4) and unlabeled.problems == []
    # A submitted annotation without boxes is a labeled background image.
    background = task_boxes(task(3, [annotation(4, [])]), CLASSES)
    assert background.labeled and background.boxes.shape == (0, 4) and background.labels.shape == (0,)


def test_unknown_label_no_size_outside_and_clipped_are_each_reported():
    results = [
        rect("Pikachu", 10, 10, 50, 50, result_id="unknown"),
        rect("Bulbasaur", 10, 10, 50, 50, result_id="unsized", sized=False),
        rect("Bulbasaur", 700, 10, 50, 50, result_id="outside"),
        rect("Bulbasaur", 600, 400, 100, 100, result_id="clipped"),
        rect("Bulbasaur", 10, 10, 0.2, 50, result_id="thin"),
        {"type": "choices", "value": {"choices": ["x"]}, "id": "choice"},
        rect("Charmander", 100, 100, 20, 20, result_id="good"),
    ]
    boxes = task_boxes(task(1, [annotation(1, results)], image_id=None), CLASSES)
    reasons = {(problem.result_id, problem.reason, problem.kept) for problem in boxes.problems}
    assert reasons == {
        (None, "no image id", False),
        ("unknown", "unknown label", False),
        ("unsized", "no original size", False),
        ("outside", "outside image", False),
        ("clipped", "clipped", True),
        ("thin", "degenerate", False),
        ("choice", "not a rectangle", False),
    }
    assert "Pikachu" in next(p.detail for p in boxes.problems if p.reason == "unknown label")
    np.testing.assert_allclose(boxes.boxes, [[600, 400, 640, 480], [100, 100, 120, 120]], rtol=1e-6)
    np.testing.assert_array_equal(boxes.labels, [0, 1])
    assert boxes.image_id is None


def test_image_size_fills_in_a_missing_original_size_and_catches_a_mismatch():
    unsized = rect("Bulbasaur", 10, 20, 30, 40, sized=False)
    np.testing.assert_allclose(ls_result_to_box(unsized, (640, 480), CLASSES).box, [10, 20, 40, 60])
    # Same percentages measured on a portrait image (e.g. EXIF rotation that we applied and LS did not).
    mismatch = ls_result_to_box(rect("Bulbasaur", 10, 20, 30, 40), (480, 640), CLASSES)
    assert isinstance(mismatch, Problem) and mismatch.reason == "size mismatch"
    malformed = rect("Bulbasaur", 10, 20, 30, 40)
    malformed["value"]["x"] = float("nan")
    assert ls_result_to_box(malformed, None, CLASSES).reason == "malformed"


def test_to_coco_like_uses_ls_arithmetic():
    the_task = task(3, [annotation(8, [rect("Squirtle", 217, 127, 110, 133)])], image_id=5)
    converted = to_coco_like([the_task, task(4, [], image_id=6)], CLASSES)
    entry = converted[3]
    assert (entry["image_id"], entry["annotation_id"], entry["width"], entry["height"]) == (5, 8, 640, 480)
    ((name, bbox),) = entry["boxes"]
    value = the_task["annotations"][0]["result"][0]["value"]
    # What LS's COCO export writes: percent * size / 100, unrounded.
    expected = [value["x"] * 640 / 100, value["y"] * 480 / 100, value["width"] * 640 / 100, value["height"] * 480 / 100]
    assert name == "Squirtle"
    np.testing.assert_allclose(bbox, expected, rtol=1e-12)
    assert converted[4]["boxes"] == [] and converted[4]["annotation_id"] is None


# ----------------------------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------------------------


def test_predictions_are_cleaned_and_counted():
    boxes = np.array(
        [
            [10, 10, 100, 100],  # good
            [np.nan, 10, 100, 100],  # non-finite
            [10, 10, np.inf, 100],  # non-finite
            [-20, -10, 50, 60],  # negative corner: clipped
            [600, 400, 700, 500],  # partly outside: clipped
            [650, 10, 700, 50],  # entirely outside
            [50, 50, 40, 60],  # x2 < x1
            [5, 5, 5.5, 40],  # under 1 px wide
            [20, 20, 60, 60],  # unknown label
            [30, 30, 90, 90],  # NaN score
        ],
        dtype=np.float32,
    )
    labels = np.array([0, 1, 1, 2, 0, 0, 0, 0, 7, 1])
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 0.5, np.nan])
    pushed = boxes_to_ls_results(boxes, labels, scores, (640, 480), CLASSES)
    assert pushed.dropped == {"non-finite": 3, "outside image": 1, "degenerate": 2, "unknown label": 1}
    assert pushed.clipped == 2
    assert len(pushed.results) == 3
    assert len({result["id"] for result in pushed.results}) == 3
    for result in pushed.results:
        value = result["value"]
        assert value["x"] >= 0 and value["x"] + value["width"] <= 100 + 1e-9
        assert value["y"] >= 0 and value["y"] + value["height"] <= 100 + 1e-9
        assert (result["original_width"], result["original_height"]) == (640, 480)
        assert result["from_name"] == "label" and result["to_name"] == "image"
        assert math.isfinite(result["score"])
    json.dumps(pushed.results, allow_nan=False)  # what the SDK will send must be valid JSON
    back = task_boxes(task(1, [annotation(1, pushed.results)]), CLASSES)
    np.testing.assert_allclose(back.boxes, [[10, 10, 100, 100], [0, 0, 50, 60], [600, 400, 640, 480]], rtol=1e-6)
    np.testing.assert_array_equal(back.labels, [0, 2, 0])
    assert [result["score"] for result in pushed.results] == pytest.approx([0.9, 0.7, 0.6])


def test_push_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one label"):
        boxes_to_ls_results(np.zeros((2, 4)), np.zeros(1, dtype=int), None, (640, 480), CLASSES)
    with pytest.raises(ValueError, match="width, height"):
        boxes_to_ls_results(np.zeros((0, 4)), np.zeros(0, dtype=int), None, (0, 480), CLASSES)


def test_uncertainty_orders_least_confident_first():
    tasks = {"sure": [0.9, 0.2], "unsure": [0.3], "nothing": []}
    for kind in ("least_confident", "margin"):
        uncertainty = {name: task_uncertainty(scores, kind) for name, scores in tasks.items()}
        assert sorted(uncertainty, key=uncertainty.get, reverse=True) == ["nothing", "unsure", "sure"], kind
        assert uncertainty["nothing"] == 1.0
    assert task_uncertainty([0.3, 0.9]) == pytest.approx(0.1)
    # Per-class scores: the box torn between two classes is the uncertain one.
    assert task_uncertainty([[0.8, 0.1, 0.1], [0.45, 0.4, 0.15]], "margin") == pytest.approx(0.95)
    with pytest.raises(ValueError, match="unknown uncertainty kind"):
        task_uncertainty([0.5], "entropy")


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------


def test_config_escapes_names_and_parses_back():
    names = ['Mr. "Mime" & co <3>', "Pokémon ' quote", "Plain"]
    xml = labeling_config(names, ["#123456", None, "#ABCDEF"])
    assert '"Mime"' not in xml and "<3>" not in xml and "& co" not in xml
    assert 'value="Mr. &quot;Mime&quot; &amp; co &lt;3&gt;"' in xml
    assert config_labels(xml) == names
    assert 'value="$image"' in xml and '<RectangleLabels name="label" toName="image">' in xml
    assert f'background="{DEFAULT_COLOURS[1]}"' in xml
    with pytest.raises(ValueError, match="duplicate"):
        labeling_config(["a", "a"])
    with pytest.raises(ValueError, match="#rrggbb"):
        labeling_config(["a"], ["red"])
    with pytest.raises(ValueError, match="not valid XML"):
        config_labels("<View><RectangleLabels>")


def test_config_change_keeps_a_removed_class_that_has_annotations():
    old = labeling_config(CLASSES, ["#111111", "#222222", "#333333"])
    change = config_change(old, ["Bulbasaur", "Pikachu"], labels_in_use={"Charmander", "Bulbasaur"})
    assert change.added == ["Pikachu"]
    assert change.kept == ["Charmander"]
    assert change.removed == ["Squirtle"]
    assert config_labels(change.xml) == ["Bulbasaur", "Pikachu", "Charmander"]
    # Existing classes keep their colours.
    assert 'value="Bulbasaur" background="#111111"' in change.xml
    assert 'value="Charmander" background="#222222"' in change.xml
    # Once nothing uses it any more, the kept label goes.
    later = config_change(change.xml, ["Bulbasaur", "Pikachu"])
    assert later.removed == ["Charmander"] and later.kept == [] and later.added == []
    assert config_labels(later.xml) == ["Bulbasaur", "Pikachu"]
