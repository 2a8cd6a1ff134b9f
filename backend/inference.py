"""One predictor for checkpoints (PyTorch) and exported ONNX files, with the shared pre/post-processing.

predictor = Predictor.from_path("runs/x/best.pt")   # or "model_int8.onnx"
detections = predictor.predict(["photo.jpg"])       # boxes xyxy in original-image pixels
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from backend.models.checkpoints import load_model
from backend.models.yolo_nas import YoloNAS
from backend.processing import (
    Detections,
    ImageSource,
    PostprocessConfig,
    boxes_to_original,
    postprocess_to_original,
    preprocess,
)

DEFAULT_IMGSZ = 640


@dataclass
class Predictor:
    """Runs a model on images. Use `from_path`; `engine` is "torch" or "onnxruntime"."""

    engine: str
    class_names: list[str]
    input_size: tuple[int, int]  # (h, w) letterbox target, multiples of 32
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    model: YoloNAS | None = None
    session: object | None = None  # onnxruntime.InferenceSession
    onnx_has_nms: bool = False
    device: str = "cpu"

    @classmethod
    def from_path(
        cls,
        path: str | Path,
        *,
        imgsz: int | None = None,
        postprocess: PostprocessConfig | None = None,
        device: str = "cpu",
        threads: int | None = None,
    ) -> Predictor:
        """A checkpoint (.pt/.pth, ours or official) or an ONNX file exported by yolodex.

        Args:
            imgsz: square input side for checkpoints (default: the checkpoint's, else 640); ONNX files have theirs.
            postprocess: thresholds; for ONNX files with NMS inside, the graph's own thresholds apply.
            threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        """
        path = Path(path)
        postprocess = postprocess or PostprocessConfig()
        if path.suffix.lower() == ".onnx":
            return cls._from_onnx(path, postprocess, threads)
        model, report = load_model(path)
        model = model.to(device).eval().fuse(full=True)
        side = imgsz or report.imgsz or DEFAULT_IMGSZ
        return cls("torch", report.class_names, (side, side), postprocess, model=model, device=device)

    @classmethod
    def _from_onnx(cls, path: Path, postprocess: PostprocessConfig, threads: int | None) -> Predictor:
        import onnxruntime as ort

        from backend.export.onnx_export import read_onnx_metadata

        if not path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {path}")
        metadata = read_onnx_metadata(path)
        if "class_names" not in metadata or "imgsz" not in metadata:
            raise ValueError(f"{path} has no yolodex metadata (class_names, imgsz): export it with `yolodex export`")
        names, (height, width) = metadata["class_names"], metadata["imgsz"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return cls(
            "onnxruntime", list(names), (int(height), int(width)), postprocess, session=session,
            onnx_has_nms=bool(metadata.get("with_nms", len(session.get_outputs()) == 4)),
        )  # fmt: skip

    def warm_up(self) -> float:
        """Runs the model once on a blank image of its input size, so that a first timed call measures the steady
        state, not onnxruntime's or PyTorch's first-run set-up (allocations, kernel choice: the first run of an INT8
        graph can take several times longer than the next). Returns the seconds it took."""
        height, width = self.input_size
        start = time.perf_counter()
        self.predict([np.full((height, width, 3), 114, dtype=np.uint8)])
        return time.perf_counter() - start

    def predict(self, images: Sequence[ImageSource | np.ndarray]) -> list[Detections]:
        """Detections per image, boxes (N, 4) xyxy in original-image pixels."""
        batch, infos = preprocess(images, self.input_size)  # (B, 3, h, w) float32 in [0, 1]
        if self.engine == "torch":
            assert self.model is not None
            with torch.inference_mode():
                boxes, scores = self.model.predict_boxes(torch.from_numpy(batch).to(self.device))
            return postprocess_to_original(boxes, scores, infos, self.postprocess)
        outputs = self.session.run(None, {"images": batch})  # type: ignore[union-attr]
        if not self.onnx_has_nms:
            return postprocess_to_original(outputs[0], outputs[1], infos, self.postprocess)
        num_detections, det_boxes, det_scores, det_classes = outputs
        results = []
        for index, info in enumerate(infos):
            count = int(num_detections[index, 0])
            boxes = boxes_to_original(det_boxes[index, :count], info)
            results.append(Detections(boxes, det_scores[index, :count], det_classes[index, :count]))
        return results
