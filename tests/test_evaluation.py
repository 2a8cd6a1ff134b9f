"""Evaluation: COCOeval metrics on hand-computed cases, category-id mapping, confusion matrix, per-image errors,
and the eval.json round trip. Boxes are xyxy in original-image pixels; fixtures use fake paths (nothing is read)."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from backend.data.records import DatasetError, DetectionSet, ImageRecord, LoadReport
from backend.evaluation.coco_eval import evaluate_detections, load_evaluation
from backend.evaluation.errors import match_image
from backend.processing import Detections

CAT, DOG = 0, 1
BACKGROUND = 2


def make_dataset(
    images: list[tuple[list[list[float]], list[int]]],
    class_names: tuple[str, ...] = ("cat", "dog"),
    category_ids: tuple[int, ...] = (1, 2),
) -> DetectionSet:
    """One 640×480 ImageRecord per (boxes, labels), image ids 1..N, boxes xyxy original px."""
    records = [
        ImageRecord(Path(f"/fake/image_{index}.jpg"), index + 1, 640, 480, np.array(boxes).reshape(-1, 4), labels)
        for index, (boxes, labels) in enumerate(images)
    ]
    return DetectionSet(records, list(class_names), list(category_ids), LoadReport(), source=Path("/fake/val.json"))


def detections(boxes: list[list[float]], scores: list[float], class_ids: list[int]) -> Detections:
    return Detections(np.array(boxes, dtype=np.float32).reshape(-1, 4), scores, class_ids)


def no_detections() -> Detections:
    return detections([], [], [])


# Medium-sized boxes (32² < area < 96²) so only the medium area range has ground truth.
BOX_A = [100.0, 100.0, 160.0, 160.0]
BOX_B = [300.0, 200.0, 360.0, 260.0]
BOX_C = [400.0, 50.0, 460.0, 110.0]


def test_perfect_predictions() -> None:
    dataset = make_dataset([([BOX_A, BOX_B], [CAT, DOG]), ([BOX_C], [DOG])])
    predictions = [
        Detections(record.boxes, np.full(len(record.boxes), 0.9), record.labels) for record in dataset.records
    ]

    result = evaluate_detections(dataset, predictions)

    assert result.metrics["mAP50-95"] == pytest.approx(1.0)
    assert result.metrics["mAP50"] == pytest.approx(1.0)
    assert result.metrics["mAP75"] == pytest.approx(1.0)
    assert result.metrics["mAP_medium"] == pytest.approx(1.0)
    assert result.metrics["AR100"] == pytest.approx(1.0)
    # No small or large ground truth: pycocotools' -1 becomes None.
    assert result.metrics["mAP_small"] is None
    assert result.metrics["mAP_large"] is None
    np.testing.assert_array_equal(result.confusion_matrix, [[1, 0, 0], [0, 2, 0], [0, 0, 0]])
    assert result.per_image == []
    assert [row["gt_count"] for row in result.per_class] == [1, 2]
    assert all(row["AP50-95"] == pytest.approx(1.0) for row in result.per_class)
    assert result.counts == {"images": 2, "ground_truth": 3, "predictions": 3}
    assert "maxDets=300 ] = 1.000" in result.summary_text
    assert result.warnings == []


def test_shifted_box_counts_only_for_iou_thresholds_up_to_its_iou() -> None:
    # Shift by 24 px along x: IoU = (100 - 24) / (100 + 24) = 0.613, a match at IoU 0.50, 0.55 and 0.60 only.
    dataset = make_dataset([([[100, 100, 200, 200]], [CAT])])
    predictions = [detections([[124, 100, 224, 200]], [0.9], [CAT])]

    result = evaluate_detections(dataset, predictions)

    assert result.metrics["mAP50"] == pytest.approx(1.0)
    assert result.metrics["mAP75"] == pytest.approx(0.0)
    # 3 of the 10 IoU thresholds with AP 1, the other 7 with AP 0.
    assert result.metrics["mAP50-95"] == pytest.approx(0.3)
    # The confusion matrix matches at IoU 0.5 but not at 0.7.
    assert result.confusion_matrix[CAT, CAT] == 1
    strict = evaluate_detections(dataset, predictions, iou_threshold=0.7)
    np.testing.assert_array_equal(strict.confusion_matrix, [[0, 0, 1], [0, 0, 0], [1, 0, 0]])


def test_101_point_interpolation_with_a_false_positive_between_two_hits() -> None:
    # Ranked: hit (0.9), false positive (0.8), hit (0.7) on 2 ground-truth boxes. Precision is 1 up to recall 0.5
    # (recall points 0.00..0.50, 51 of them) and 2/3 from there to recall 1 (0.51..1.00, 50 points).
    dataset = make_dataset([([BOX_A, BOX_B], [CAT, CAT])])
    predictions = [detections([BOX_A, BOX_C, BOX_B], [0.9, 0.8, 0.7], [CAT, CAT, CAT])]

    result = evaluate_detections(dataset, predictions)

    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    assert result.metrics["mAP50"] == pytest.approx(expected)
    assert result.per_class[CAT]["AP50"] == pytest.approx(expected)
    curve = result.pr_curves[CAT]
    assert len(curve["recall"]) == len(curve["precision"]) == len(curve["scores"]) == 101
    assert curve["precision"][50] == pytest.approx(1.0)
    assert curve["precision"][51] == pytest.approx(2 / 3)
    assert curve["scores"][50] == pytest.approx(0.9)
    assert curve["scores"][100] == pytest.approx(0.7)
    # Dog has no ground truth: undefined AP and an undefined curve.
    assert result.per_class[DOG]["AP50"] is None
    assert all(value is None for value in result.pr_curves[DOG]["precision"])


def test_wrong_class_false_positive_and_miss() -> None:
    dataset = make_dataset([([BOX_A, BOX_B], [CAT, DOG])])
    predictions = [
        detections(
            [BOX_A, BOX_C, [10, 10, 20, 20]],
            [0.9, 0.8, 0.1],  # the last one is below the score threshold and must not count anywhere
            [DOG, CAT, CAT],
        )
    ]

    result = evaluate_detections(dataset, predictions, score_threshold=0.25)

    # Rows: ground truth cat, dog, background; columns: predicted cat, dog, background.
    np.testing.assert_array_equal(
        result.confusion_matrix,
        [
            [0, 1, 0],  # the cat was called a dog
            [0, 0, 1],  # the dog was missed
            [1, 0, 0],  # a cat where there is nothing
        ],
    )
    (image,) = result.per_image
    assert image["image_id"] == 1
    assert image["path"] == str(Path("/fake/image_0.jpg"))
    assert image["wrong_class"] == [
        {"box": BOX_A, "class_id": DOG, "score": pytest.approx(0.9), "gt_box": BOX_A, "gt_class_id": CAT}
    ]
    assert image["false_positives"] == [{"box": BOX_C, "score": pytest.approx(0.8), "class_id": CAT}]
    assert image["misses"] == [{"box": BOX_B, "class_id": DOG}]
    assert image["counts"] == {
        "ground_truth": 2,
        "predictions": 2,
        "true_positives": 0,
        "false_positives": 1,
        "misses": 1,
        "wrong_class": 1,
        "errors": 3,
    }


def test_matching_is_greedy_by_score_and_prefers_the_highest_iou() -> None:
    gt = np.array([[0, 0, 100, 100], [20, 0, 120, 100]], dtype=np.float32)
    predictions = np.array([[0, 0, 100, 100], [15, 0, 115, 100], [10, 0, 110, 100]], dtype=np.float32)
    scores = np.array([0.3, 0.9, 0.6], dtype=np.float32)

    match = match_image(gt, predictions, scores, score_threshold=0.0, iou_threshold=0.5)

    # Prediction 1 (0.9) overlaps both (IoU 0.74 and 0.90) and takes the closer gt 1; prediction 2 (0.6) takes
    # gt 0 (IoU 0.82); prediction 0 (0.3) fits gt 0 perfectly but comes last by score and finds it taken.
    np.testing.assert_array_equal(match.pairs, [[1, 1], [2, 0]])
    np.testing.assert_array_equal(match.unmatched_predictions, [0])
    assert match.unmatched_ground_truth.size == 0


def test_a_confident_wrong_class_takes_the_object_from_a_right_class_duplicate() -> None:
    # The documented consequence of class-agnostic matching (backend/evaluation/errors.py).
    dataset = make_dataset([([BOX_A], [CAT])])
    predictions = [detections([BOX_A, BOX_A], [0.9, 0.8], [DOG, CAT])]

    result = evaluate_detections(dataset, predictions)

    np.testing.assert_array_equal(result.confusion_matrix, [[0, 1, 0], [0, 0, 0], [1, 0, 0]])
    (image,) = result.per_image
    assert [entry["class_id"] for entry in image["wrong_class"]] == [DOG]
    assert [entry["class_id"] for entry in image["false_positives"]] == [CAT]
    # COCOeval is class-aware: the cat prediction still gives cat a perfect AP.
    assert result.per_class[CAT]["AP50-95"] == pytest.approx(1.0)


def test_no_predictions_at_all() -> None:
    dataset = make_dataset([([BOX_A], [CAT]), ([BOX_B, BOX_C], [DOG, CAT])])

    result = evaluate_detections(dataset, [no_detections(), no_detections()])

    assert result.metrics["mAP50-95"] == 0.0
    assert result.metrics["mAP50"] == 0.0
    assert result.metrics["AR100"] == 0.0
    assert [row["AP50-95"] for row in result.per_class] == [0.0, 0.0]
    np.testing.assert_array_equal(result.confusion_matrix, [[0, 0, 2], [0, 0, 1], [0, 0, 0]])
    misses = [(image["image_id"], miss["class_id"]) for image in result.per_image for miss in image["misses"]]
    assert misses == [(1, CAT), (2, DOG), (2, CAT)]
    assert all(not image["false_positives"] and not image["wrong_class"] for image in result.per_image)


def test_image_without_ground_truth_gives_false_positives() -> None:
    dataset = make_dataset([([BOX_A], [CAT]), ([], [])])
    predictions = [detections([BOX_A], [0.9], [CAT]), detections([BOX_B, BOX_C], [0.8, 0.6], [DOG, CAT])]

    result = evaluate_detections(dataset, predictions)

    np.testing.assert_array_equal(result.confusion_matrix, [[1, 0, 0], [0, 0, 0], [1, 1, 0]])
    (image,) = result.per_image
    assert image["image_id"] == 2
    assert [fp["class_id"] for fp in image["false_positives"]] == [DOG, CAT]
    assert image["misses"] == []
    # The cat's only hit outranks its false positive, so its AP stays 1; dog has no ground truth.
    assert result.per_class[CAT]["AP50-95"] == pytest.approx(1.0)
    assert result.per_class[DOG]["AP50-95"] is None


def test_split_without_any_ground_truth() -> None:
    dataset = make_dataset([([], [])])

    result = evaluate_detections(dataset, [detections([BOX_A], [0.9], [CAT])])

    assert all(value is None for value in result.metrics.values())
    assert result.warnings and "no ground-truth" in result.warnings[0]
    np.testing.assert_array_equal(result.confusion_matrix[BACKGROUND], [1, 0, 0])
    json.dumps(result.to_dict(), allow_nan=False)


def test_category_ids_that_are_not_one_to_c() -> None:
    # Class index 0 "cat" is category 7 and index 1 "dog" is category 3: COCOeval sorts category ids, so its
    # column 0 is the dog. Cats are found perfectly, dogs not at all.
    dataset = make_dataset([([BOX_A, BOX_B], [CAT, DOG])], category_ids=(7, 3))
    predictions = [detections([BOX_A], [0.9], [CAT])]

    result = evaluate_detections(dataset, predictions)

    cat, dog = result.per_class
    assert (cat["class_name"], cat["category_id"], cat["gt_count"]) == ("cat", 7, 1)
    assert (dog["class_name"], dog["category_id"], dog["gt_count"]) == ("dog", 3, 1)
    assert cat["AP50-95"] == pytest.approx(1.0)
    assert dog["AP50-95"] == pytest.approx(0.0)
    assert result.pr_curves[CAT]["class_name"] == "cat"
    assert result.pr_curves[CAT]["precision"][100] == pytest.approx(1.0)
    assert result.pr_curves[DOG]["precision"][0] == pytest.approx(0.0)
    assert result.metrics["mAP50-95"] == pytest.approx(0.5)


def test_metrics_agree_with_pycocotools_own_summary() -> None:
    """Our reading of COCOeval's arrays equals `summarize()` on a file-style evaluation at maxDets 100."""
    rng = np.random.default_rng(0)
    images, predictions = [], []
    for _ in range(6):
        corners = rng.uniform(0, 400, (5, 2))
        gt = np.concatenate([corners, corners + rng.uniform(8, 200, (5, 2))], axis=1)  # small to large
        labels = rng.integers(0, 2, 5)
        images.append((gt.tolist(), labels.tolist()))
        noisy = gt + rng.normal(0, 6, gt.shape)
        extra = np.concatenate([corners[:3], corners[:3] + 50], axis=1)
        predictions.append(
            detections(
                np.concatenate([noisy, extra]).tolist(),
                rng.uniform(0.05, 1, 8).tolist(),
                np.concatenate([labels, rng.integers(0, 2, 3)]).tolist(),
            )
        )
    dataset = make_dataset(images, category_ids=(5, 2))

    result = evaluate_detections(dataset, predictions, max_detections=100)

    # The reference: pycocotools driven the way the COCO tutorial does it, with loadRes and summarize().
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": [{"id": r.image_id, "width": r.width, "height": r.height} for r in dataset.records],
            "categories": [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [
                {
                    "id": len(images) * 100 + index * 10 + j,
                    "image_id": r.image_id,
                    "category_id": dataset.category_ids[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
                for index, r in enumerate(dataset.records)
                for j, ((x1, y1, x2, y2), label) in enumerate(zip(r.boxes.tolist(), r.labels.tolist(), strict=True))
            ],
        }
        ground_truth.createIndex()
        results = [
            [r.image_id, x1, y1, x2 - x1, y2 - y1, score, dataset.category_ids[class_id]]
            for r, d in zip(dataset.records, predictions, strict=True)
            for (x1, y1, x2, y2), score, class_id in zip(
                d.boxes.tolist(), d.scores.tolist(), d.class_ids.tolist(), strict=True
            )
        ]
        coco_eval = COCOeval(ground_truth, ground_truth.loadRes(np.array(results)), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = coco_eval.stats
    names = ["mAP50-95", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR1", "AR10", "AR100"]
    reference = [*stats[:8], stats[8]]
    for name, expected in zip(names, reference, strict=True):
        ours = result.metrics[name]
        assert (ours if ours is not None else -1.0) == pytest.approx(expected, abs=1e-9), name
    assert 0.2 < result.metrics["mAP50"] < 1.0  # a case that exercises the interpolation, not a trivial 0 or 1


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    dataset = make_dataset([([BOX_A, BOX_B], [CAT, DOG]), ([], [])], category_ids=(3, 7))
    predictions = [
        detections([BOX_A, BOX_C], [0.91234567, 0.5], [CAT, DOG]),
        detections([BOX_B], [0.4], [CAT]),
    ]
    result = evaluate_detections(dataset, predictions)

    path = result.save_json(tmp_path / "run" / "eval.json")

    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = load_evaluation(path)
    assert loaded == json.loads(text)
    assert loaded == result.to_dict()
    assert loaded["class_names"] == ["cat", "dog"]
    assert loaded["confusion_matrix"] == result.confusion_matrix.tolist()
    assert loaded["per_image"][0]["wrong_class"] == [] and loaded["per_image"][0]["misses"][0]["class_id"] == DOG
    assert loaded["per_image"][0]["false_positives"][0]["score"] == 0.5
    assert loaded["metrics"]["mAP_small"] is None
    assert loaded["summary_text"] == result.summary_text
    assert list(tmp_path.joinpath("run").iterdir()) == [path]  # no temporary file left behind
    for value in _floats(loaded):
        assert math.isfinite(value) and round(value, 4) == value


def _floats(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _floats(item)
    elif isinstance(value, list):
        for item in value:
            yield from _floats(item)
    elif isinstance(value, float):
        yield value


def test_load_evaluation_rejects_a_broken_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="evaluate the run"):
        load_evaluation(tmp_path / "eval.json")
    (tmp_path / "eval.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid evaluation file"):
        load_evaluation(tmp_path / "eval.json")


def test_bad_inputs_raise_clear_errors() -> None:
    dataset = make_dataset([([BOX_A], [CAT])])
    with pytest.raises(ValueError, match="one per image"):
        evaluate_detections(dataset, [])
    with pytest.raises(ValueError, match="class ids"):
        evaluate_detections(dataset, [detections([BOX_A], [0.9], [2])])
    with pytest.raises(DatasetError, match="no images"):
        evaluate_detections(make_dataset([]), [])
    duplicate = make_dataset([([BOX_A], [CAT]), ([BOX_B], [CAT])])
    duplicate.records[1].image_id = 1
    with pytest.raises(DatasetError, match="image ids repeat"):
        evaluate_detections(duplicate, [no_detections(), no_detections()])
    with pytest.raises(DatasetError, match="labels"):
        evaluate_detections(make_dataset([([BOX_A], [5])]), [no_detections()])
