"""What the app says of a model after its run (issue 18, "After a run"): the recall recorded by the evaluation (the
share of the validation objects a model finds), each model's own validation mAP50 in the catalog, and the Pokédex's
still-learning notice and empty-result hint built from them.

The evaluations are real (`evaluate_detections` on hand-made ground truth and predictions, boxes xyxy in image
pixels), so the right recall is known by construction.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from backend import catalog
from backend.evaluation.coco_eval import evaluate_detections
from backend.evaluation.errors import found_share
from backend.evaluation.report import metric_rows
from backend.pokedex import (
    STILL_LEARNING_MAP50,
    continue_training_params,
    empty_result_hint,
    percent,
    still_learning,
    still_learning_note,
)
from tests.test_evaluation import BOX_A, BOX_B, BOX_C, CAT, DOG, detections, make_dataset

BOX_D = [500.0, 300.0, 560.0, 360.0]


def quarter_found():
    """Four objects; at the default score threshold 0.25 the detector finds exactly one of them with its class:
    the cat at A (0.9). The dog at B is called a cat (found, wrong name: not counted), the dog at C is found at 0.1
    (below the threshold), the cat at D is missed; one false positive."""
    dataset = make_dataset([([BOX_A, BOX_B], [CAT, DOG]), ([BOX_C, BOX_D], [DOG, CAT])])
    predictions = [
        detections([BOX_A, BOX_B], [0.9, 0.8], [CAT, CAT]),
        detections([BOX_C, [0.0, 0.0, 40.0, 40.0]], [0.1, 0.6], [DOG, DOG]),
    ]
    return evaluate_detections(dataset, predictions)


def test_found_share_is_the_diagonal_over_the_ground_truth():
    # Rows: ground truth cat, dog, background; columns: predicted cat, dog, background (misses).
    matrix = [[2, 1, 1], [0, 1, 2], [3, 0, 0]]
    assert found_share(matrix) == pytest.approx(3 / 7)  # 2 cats + 1 dog of 7 objects; false positives not counted
    assert found_share(np.zeros((3, 3), dtype=int)) is None  # no ground truth: nothing to find
    with pytest.raises(ValueError, match="square"):
        found_share([[1, 0], [0, 1], [0, 0]])


def test_the_evaluation_records_the_share_of_objects_found():
    result = quarter_found()
    assert result.score_threshold == 0.25
    assert result.metrics["recall"] == pytest.approx(0.25)
    assert found_share(result.confusion_matrix) == pytest.approx(0.25)
    # The threshold decides what counts: a dog found at 0.1 is found at a threshold of 0.05.
    assert (
        evaluate_detections(
            make_dataset([([BOX_C], [DOG])]), [detections([BOX_C], [0.1], [DOG])], score_threshold=0.05
        ).metrics["recall"]
        == 1.0
    )
    assert {row["metric"]: row["value"] for row in metric_rows(result.to_dict())}["recall"] == pytest.approx(0.25)


def write_evaluated_run(folder: Path, evaluation: dict, quant_report: dict | None = None) -> catalog.RunInfo:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train": {"size": "s"}, "class_names": ["cat", "dog"]}))
    (folder / "eval.json").write_text(json.dumps(evaluation))
    (folder / "best.pt").write_bytes(b"not read by the catalog")
    for name in ("model_fp32.onnx", "model_int8.onnx"):
        (folder / name).write_bytes(b"not read by the catalog")
    if quant_report is not None:
        (folder / "quant_report.json").write_text(json.dumps(quant_report))
    return catalog.run_info(folder)


def test_each_model_shows_its_own_evaluation(tmp_path):
    evaluation = quarter_found().to_dict()
    map50 = evaluation["metrics"]["mAP50"]
    info = write_evaluated_run(tmp_path / "run", evaluation)

    score = info.model_score("checkpoint")
    assert (score.map50, score.recall, score.score_threshold, score.source) == (map50, 0.25, 0.25, "eval.json")
    assert info.model_score("fp32") == score  # the export of best.pt, never evaluated apart: the same evaluation
    assert info.model_score("int8") is None  # never borrows FP32's figure
    labels = {model.kind: info.model_label(model) for model in info.models}
    assert labels["checkpoint"].endswith(f"(best.pt, 0.0 MB) · mAP50 {map50:.3f}")
    assert labels["int8"].endswith("(model_int8.onnx, 0.0 MB) · not evaluated")

    # An eval.json written before recall was recorded: the share comes from its confusion matrix.
    older = {**evaluation, "metrics": {k: v for k, v in evaluation["metrics"].items() if k != "recall"}}
    assert write_evaluated_run(tmp_path / "older", older).model_score("checkpoint").recall == pytest.approx(0.25)


def test_an_int8_model_shows_the_quantization_reports_figures(tmp_path):
    fp32_metrics = {"mAP50-95": 0.2, "mAP50": 0.41, "recall": 0.5}
    report = {
        "chosen": "ptq_selective",
        "budget_points": 1.0,
        "models": {
            "fp32": {"metrics": fp32_metrics},
            "ptq_selective": {"metrics": {"mAP50-95": 0.19, "mAP50": 0.28, "recall": 0.375}},
        },
    }
    info = write_evaluated_run(tmp_path / "run", quarter_found().to_dict(), report)
    int8, fp32 = info.model_score("int8"), info.model_score("fp32")
    assert (int8.map50, int8.recall, int8.source) == (0.28, 0.375, "quant_report.json")
    assert (fp32.map50, fp32.recall) == (0.41, 0.5)
    # The quantization scores its models at the evaluation's default threshold, which its report does not repeat.
    default = inspect.signature(evaluate_detections).parameters["score_threshold"].default
    assert int8.score_threshold == catalog.REPORT_SCORE_THRESHOLD == default
    assert catalog.score_text(int8) == "mAP50 0.280"

    # A report written before mAP50 and recall were read: the INT8 model is not evaluated, not FP32's 0.41.
    old = {"chosen": "ptq", "models": {"fp32": {"metrics": {"mAP50-95": 0.2}}, "ptq": {}}}
    (tmp_path / "run" / "quant_report.json").write_text(json.dumps(old))
    assert catalog.score_text(catalog.run_info(tmp_path / "run").model_score("int8")) == "not evaluated"


def test_the_still_learning_notice_says_what_the_model_finds():
    weak = catalog.ModelScore(map50=0.081, map50_95=0.02, recall=0.25, score_threshold=0.25, source="eval.json")
    assert still_learning(weak)
    assert still_learning_note(weak).startswith(
        "Still learning: it finds 25% of the objects in its validation photos (confidence 0.25 or more; validation "
        "mAP50 0.081, under 0.3)."
    )
    unmeasured = catalog.ModelScore(0.1, None, None, None, "quant_report.json")
    assert "was not measured" in still_learning_note(unmeasured) and "%" not in still_learning_note(unmeasured)
    ready = catalog.ModelScore(STILL_LEARNING_MAP50, 0.15, 0.7, 0.25, "eval.json")
    assert not still_learning(ready) and still_learning_note(ready) is None
    assert still_learning_note(None) is None  # never evaluated: nothing said of it
    assert continue_training_params("run-7") == {"continue": "run-7"}


def test_percent_never_rounds_to_all_or_nothing():
    assert [percent(value) for value in (0.0, 0.004, 0.25, 0.996, 1.0)] == ["0%", "<1%", "25%", ">99%", "100%"]


def test_empty_result_hint_of_a_model_still_learning():
    weak = catalog.ModelScore(0.081, 0.02, 0.0, 0.25, "eval.json")
    hint = empty_result_hint(0.25, 0.05, weak)
    assert hint.startswith("Nothing found above 0.25: this model is still learning (validation mAP50 0.081")
    assert "finding 0% of the objects of its validation photos" in hint and "lower the threshold" in hint
    assert "lower" not in empty_result_hint(0.05, 0.05, weak)  # already at the lowest
    ready = catalog.ModelScore(0.6, 0.3, 0.8, 0.25, "eval.json")
    assert "still learning" not in empty_result_hint(0.25, 0.05, ready) and "lower it" in empty_result_hint(
        0.25, 0.05, ready
    )
    assert "lowest threshold (0.05)" in empty_result_hint(0.05, 0.05, None)
