"""backend.evaluation.report: what the Evaluate page reads from an evaluation, on hand-made detections whose
pycocotools result is known. Boxes are xyxy in original-image pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.data.records import DetectionSet, ImageRecord, LoadReport
from backend.evaluation import report
from backend.evaluation.coco_eval import evaluate_detections
from backend.processing import Detections

CAT, DOG = 0, 1
BOX_A = [100.0, 100.0, 160.0, 160.0]
BOX_B = [300.0, 200.0, 360.0, 260.0]
BOX_C = [400.0, 50.0, 460.0, 110.0]
BOX_D = [20.0, 300.0, 80.0, 360.0]


def make_dataset(images: list[tuple[list[list[float]], list[int]]], folder: Path = Path("/fake")) -> DetectionSet:
    """One 640×480 record per (boxes, labels); image ids 11, 12, ... and file names `<id>_photo.jpg` as a frozen
    version writes them."""
    records = [
        ImageRecord(folder / f"{index + 11}_photo.jpg", index + 11, 640, 480, np.array(boxes).reshape(-1, 4), labels)
        for index, (boxes, labels) in enumerate(images)
    ]
    return DetectionSet(records, ["cat", "dog"], [1, 2], LoadReport())


def detections(boxes: list[list[float]], scores: list[float], class_ids: list[int]) -> Detections:
    return Detections(np.array(boxes, dtype=np.float32).reshape(-1, 4), scores, class_ids)


def evaluation_of(dataset: DetectionSet, predictions: list[Detections], **options) -> dict:
    """Through the JSON round trip, as the page reads an eval.json."""
    return json.loads(json.dumps(evaluate_detections(dataset, predictions, **options).to_dict()))


# ----------------------------------------------------------------------------------------------------------------
# PR curves
# ----------------------------------------------------------------------------------------------------------------


def test_pr_curve_of_a_hit_a_false_positive_and_a_hit() -> None:
    # Ranked: hit (0.9), false positive (0.8), hit (0.7) on 2 cat boxes. pycocotools: precision 1 at recall
    # 0.00..0.50 (51 points), 2/3 at 0.51..1.00 (50 points). Dog has no ground truth: no curve.
    dataset = make_dataset([([BOX_A, BOX_B], [CAT, CAT])])
    evaluation = evaluation_of(dataset, [detections([BOX_A, BOX_C, BOX_B], [0.9, 0.8, 0.7], [CAT, CAT, CAT])])

    curves = report.pr_curves(evaluation)

    assert [curve.name for curve in curves] == ["cat"]  # no mean over a single class
    (cat,) = curves
    assert len(cat.recall) == len(cat.precision) == 101 and cat.recall[-1] == pytest.approx(1.0)
    assert cat.precision[:51] == pytest.approx([1.0] * 51)
    assert cat.precision[51:] == pytest.approx([2 / 3] * 50, abs=1e-4)  # eval.json keeps 4 decimals
    assert cat.ap == pytest.approx(evaluation["per_class"][CAT]["AP50"], abs=1e-4)
    assert cat.ap == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-4)
    # Score ≥ 0.25 keeps all three predictions: the detector works at recall 1, precision 2/3.
    assert cat.operating_point == pytest.approx((1.0, 2 / 3), abs=1e-4)


def test_pr_curve_ends_at_the_highest_recall_reached_and_the_mean_is_map50() -> None:
    # Cat: both boxes found (AP50 1). Dog: one of two found, so the curve stops at recall 0.5 and pycocotools fills
    # the 50 points past it with 0 (AP50 51/101). The mean curve's area is mAP50.
    dataset = make_dataset([([BOX_A, BOX_B], [CAT, CAT]), ([BOX_C, BOX_D], [DOG, DOG])])
    predictions = [
        detections([BOX_A, BOX_B], [0.9, 0.6], [CAT, CAT]),
        detections([BOX_C], [0.3], [DOG]),
    ]
    evaluation = evaluation_of(dataset, predictions, score_threshold=0.5)

    mean, cat, dog = report.pr_curves(evaluation)

    assert (mean.name, cat.name, dog.name) == ("all classes", "cat", "dog")
    assert len(cat.recall) == 101 and cat.ap == pytest.approx(1.0)
    assert len(dog.recall) == 51 and dog.recall[-1] == pytest.approx(0.5)
    assert dog.ap == pytest.approx(51 / 101, abs=1e-4)
    assert mean.ap == pytest.approx(evaluation["metrics"]["mAP50"], abs=1e-4)
    assert mean.precision[60] == pytest.approx(0.5)  # cat 1, dog 0 past its reach
    # At score ≥ 0.5 the dog prediction (0.3) is not counted: no operating point on its curve.
    assert dog.operating_point is None
    assert cat.operating_point == pytest.approx((1.0, 1.0))


# ----------------------------------------------------------------------------------------------------------------
# Confusion matrix and tables
# ----------------------------------------------------------------------------------------------------------------


def test_confusion_view_counts_hand_made_detections() -> None:
    # Image 1: cat found as cat, dog found but called cat. Image 2: a dog missed, a cat predicted on nothing,
    # and a prediction below the score threshold that counts nowhere.
    dataset = make_dataset([([BOX_A, BOX_B], [CAT, DOG]), ([BOX_C], [DOG])])
    predictions = [
        detections([BOX_A, BOX_B], [0.9, 0.8], [CAT, CAT]),
        detections([BOX_D, BOX_C], [0.7, 0.1], [CAT, DOG]),
    ]
    view = report.confusion_view(evaluation_of(dataset, predictions, score_threshold=0.25))

    assert view.labels == ["cat", "dog", "background"]
    assert view.counts == [[1, 0, 0], [1, 0, 1], [1, 0, 0]]  # rows true, columns predicted
    assert view.totals == {"correct": 1, "wrong_class": 1, "false_positives": 1, "misses": 1}
    assert view.shares[1] == pytest.approx([0.5, 0.0, 0.5])
    assert view.shares[2] == pytest.approx([1.0, 0.0, 0.0])
    assert (view.iou_threshold, view.score_threshold) == (0.5, 0.25)


def test_confusion_view_refuses_a_matrix_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="not 3x3"):
        report.confusion_view({"class_names": ["cat", "dog"], "confusion_matrix": [[1, 0], [0, 1]]})


def test_metric_and_per_class_rows() -> None:
    dataset = make_dataset([([BOX_A, BOX_B], [CAT, DOG])])
    evaluation = evaluation_of(dataset, [detections([BOX_A], [0.9], [CAT])])

    rows = report.metric_rows(evaluation)
    assert [row["metric"] for row in rows][:3] == ["mAP50-95", "mAP50", "mAP75"]
    assert {row["metric"]: row["value"] for row in rows} == evaluation["metrics"]
    per_class = report.per_class_rows(evaluation)
    assert [(row["class"], row["boxes"], row["predictions"]) for row in per_class] == [("cat", 1, 1), ("dog", 1, 0)]
    assert per_class[CAT]["AP50"] == pytest.approx(1.0) and per_class[DOG]["AP50"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_error_items_are_flat_ordered_and_keep_store_ids() -> None:
    dataset = make_dataset([([BOX_A, BOX_B], [CAT, DOG]), ([BOX_C], [DOG])])
    predictions = [
        detections([BOX_A, BOX_B, BOX_D], [0.9, 0.8, 0.4], [CAT, CAT, DOG]),
        detections([BOX_D], [0.7], [CAT]),
    ]
    evaluation = evaluation_of(dataset, predictions)

    items = report.error_items(evaluation)

    assert [(item.kind, item.image_id, item.score) for item in items] == [
        ("false_positive", 12, pytest.approx(0.7)),  # the more confident false positive first
        ("false_positive", 11, pytest.approx(0.4)),
        ("miss", 12, None),
        ("wrong_class", 11, pytest.approx(0.8)),
    ]
    wrong = items[-1]
    assert (wrong.class_id, wrong.gt_class_id, wrong.gt_box) == (CAT, DOG, tuple(BOX_B))
    assert all(item.store_image_id == item.image_id for item in items)  # "<id>_photo.jpg": a frozen version
    assert [item.kind for item in report.error_items(evaluation, ["miss"])] == ["miss"]
    assert "a dog called cat (0.80)" in report.describe_error(wrong, ["cat", "dog"])
    assert "missed a dog" in report.describe_error(items[2], ["cat", "dog"])
    with pytest.raises(ValueError, match="unknown error kind"):
        report.error_items(evaluation, ["typo"])


def test_store_image_id_needs_the_file_name_to_agree() -> None:
    assert report.store_image_id("/v1/images/7_pikachu.png", 7) == 7
    assert report.store_image_id("/elsewhere/images/7_pikachu.png", 8) is None  # ids of another dataset
    assert report.store_image_id("/elsewhere/images/pikachu.png", 7) is None


def test_page_of_clamps_and_counts_pages() -> None:
    items = list(range(10))
    assert report.page_of(items, 1, 4) == ([0, 1, 2, 3], 3)
    assert report.page_of(items, 3, 4) == ([8, 9], 3)
    assert report.page_of(items, 9, 4) == ([8, 9], 3)
    assert report.page_of([], 1, 4) == ([], 1)


def test_draw_error_draws_the_boxes_scaled_to_the_thumbnail(tmp_path: Path) -> None:
    Image.new("RGB", (640, 480), (128, 128, 128)).save(tmp_path / "11_photo.jpg")
    wrong = report.ErrorItem(
        "wrong_class", 11, 11, str(tmp_path / "11_photo.jpg"), tuple(BOX_A), CAT, 0.8, tuple(BOX_C), DOG
    )

    picture = report.draw_error(wrong, ["cat", "dog"], max_side=320)

    assert picture.size == (320, 240)
    # Half scale: the prediction's bottom edge (y 160 → 80) red, the ground truth's right edge (x 460 → 230) green.
    red = np.array(picture.getpixel((65, 79)))
    green = np.array(picture.getpixel((229, 40)))
    assert red[0] > 200 and red[1] < 80, red
    assert green[1] > 150 and green[0] < 80, green
    assert picture.getpixel((300, 200)) == (128, 128, 128)  # away from the boxes the image is untouched


def test_evaluation_file_is_the_runs_eval_json_only_for_its_own_case(tmp_path: Path) -> None:
    run, data, other = tmp_path / "run", tmp_path / "datasets" / "proj" / "v1", tmp_path / "datasets" / "proj" / "v2"
    data.mkdir(parents=True)
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"data": str(data)}}))

    assert report.evaluation_file(run, run / "best.pt", data, "val") == run / "eval.json"
    assert report.evaluation_file(run, run / "best.pt", data, "test") == run / "evals" / "best_pt-proj_v1-test.json"
    assert report.evaluation_file(run, run / "last.pt", data, "val") == run / "evals" / "last_pt-proj_v1-val.json"
    assert report.evaluation_file(run, run / "best.pt", other, "val") == run / "evals" / "best_pt-proj_v2-val.json"
