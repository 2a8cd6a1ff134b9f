"""Evaluating a trained model on a dataset split: the steps `yolodex eval` and the "evaluate" job share.

Kept apart from `backend.runs` (which every layer reads, training included): this module calls the training
engine's `evaluate`, so it sits above training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.data.folders import load_dataset
from backend.evaluation.coco_eval import EvaluationResult, evaluate_detections
from backend.inference import Predictor
from backend.models import load_model
from backend.processing import Detections
from backend.runs import RunFolder
from backend.training.engine import EVAL_POSTPROCESS, EvalImages, evaluate, resolve_device


@dataclass(frozen=True)
class RunEvaluation:
    """One evaluation: which checkpoint on which images, and its result.

    Attributes:
        model: the checkpoint evaluated (a run folder given stands for its best.pt, else its last.pt).
        images: how many images the split holds.
        imgsz: the input size used (given, else the checkpoint's, else 640).
        out: where the result was saved, None when it was not.
    """

    model: Path
    data: str
    split: str
    images: int
    imgsz: int
    result: EvaluationResult
    out: Path | None

    @property
    def summary(self) -> str:
        """ "mAP50-95 0.4123", or what stands in for it when the split has no box to score."""
        headline = self.result.metrics.get("mAP50-95")
        return f"mAP50-95 {headline:.4f}" if isinstance(headline, float) else "no ground-truth boxes to score"

    def text(self) -> str:
        """The report in lines: the headline metrics, then AP per class."""
        payload = self.result.to_dict()
        lines = [f"{self.model} on {self.data} [{self.split}], {self.images} images, imgsz {self.imgsz}"]
        lines += [f"  {key}: {_fmt(value)}" for key, value in self.result.metrics.items()]
        lines += [
            f"  {item['class_name']}: AP50-95 {_fmt(item['AP50-95'])}, AP50 {_fmt(item['AP50'])} "
            f"({item['gt_count']} boxes)"
            for item in payload["per_class"]
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """What an evaluate job records as its result."""
        return {
            "model": str(self.model),
            "data": self.data,
            "split": self.split,
            "images": self.images,
            "imgsz": self.imgsz,
            "out": str(self.out) if self.out else None,
            "metrics": dict(self.result.metrics),
            "summary": self.summary,
        }


def evaluate_run(
    model: str | Path,
    data: str | Path,
    split: str = "val",
    *,
    imgsz: int | None = None,
    batch: int = 16,
    conf: float = 0.25,
    device: str = "auto",
    out: str | Path | None = None,
    on_start: Callable[[str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> RunEvaluation:
    """COCO metrics of a checkpoint (or a run folder's best.pt, else last.pt) on one split of a dataset.

    Args:
        conf: the score threshold of the confusion matrix and the per-image errors (mAP uses every detection).
        out: also save the full result there as JSON (`EvaluationResult.save_json`).
        on_start: called once the model and the images are loaded, with a line saying what is evaluated.
        on_progress: `(done, total)` images.

    Raises:
        ValueError: the dataset has no such split, or its classes are not the model's.
    """
    folder = Path(model)
    path = RunFolder(folder).checkpoint() if folder.is_dir() else folder
    if path.suffix.lower() == ".onnx":
        return _evaluate_onnx(path, data, split, batch, conf, out, on_start, on_progress)
    network, report = load_model(path)
    size = int(imgsz or report.imgsz or 640)
    splits = load_dataset(data)
    if split not in splits:
        raise ValueError(f"{data} has no {split!r} split (it has: {', '.join(splits)})")
    dataset = splits[split]
    if dataset.class_names != report.class_names:
        raise ValueError(
            f"the model's classes {report.class_names} differ from the dataset's {dataset.class_names}: "
            "evaluate on the dataset it was trained for"
        )
    target = resolve_device(device)
    if on_start is not None:
        on_start(f"evaluating {path.name} on {len(dataset)} {split} images at {size}px")
    result = evaluate(
        network.to(target),
        EvalImages(dataset, size),
        device=target,
        batch_size=batch,
        score_threshold=conf,
        on_progress=on_progress,
    )
    saved = Path(out) if out else None
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        result.save_json(saved)
    return RunEvaluation(path, str(data), split, len(dataset), size, result, saved)


def _evaluate_onnx(
    path: Path,
    data: str | Path,
    split: str,
    batch: int,
    conf: float,
    out: str | Path | None,
    on_start: Callable[[str], None] | None,
    on_progress: Callable[[int, int], None] | None,
) -> RunEvaluation:
    """`evaluate_run` of an exported ONNX model (FP32 or INT8): the Predictor in the faster runtime here ("auto",
    docs/runtimes.md) with the validation post-processing of training, then the same COCO evaluation."""
    predictor = Predictor.from_path(path, postprocess=EVAL_POSTPROCESS, runtime="auto")
    splits = load_dataset(data)
    if split not in splits:
        raise ValueError(f"{data} has no {split!r} split (it has: {', '.join(splits)})")
    dataset = splits[split]
    if dataset.class_names != predictor.class_names:
        raise ValueError(
            f"the model's classes {predictor.class_names} differ from the dataset's {dataset.class_names}: "
            "evaluate on the dataset it was trained for"
        )
    size = predictor.input_size[0]
    if on_start is not None:
        on_start(f"evaluating {path.name} on {len(dataset)} {split} images at {size}px in {predictor.runtime_label}")
    predictions: list[Detections] = []
    for start in range(0, len(dataset), batch):
        predictions += predictor.predict([record.path for record in dataset.records[start : start + batch]])
        if on_progress is not None:
            on_progress(len(predictions), len(dataset))
    result = evaluate_detections(dataset, predictions, score_threshold=conf)
    saved = Path(out) if out else None
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        result.save_json(saved)
    return RunEvaluation(path, str(data), split, len(dataset), size, result, saved)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
