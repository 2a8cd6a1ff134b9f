"""ONNX export of a fused YOLO-NAS with decoding (and optionally NMS) inside the graph.

I/O contract (docs/contracts.md §3), FP32 and INT8 alike:
- input `images`: float32 (B, 3, H, W) RGB in [0, 1], letterboxed (backend.processing); B is dynamic.
- without NMS: `boxes` (B, A, 4) xyxy in input pixels, `scores` (B, A, C) sigmoid.
- with NMS (ONNX NonMaxSuppression, class-aware, multi-label): `num_detections` (B, 1) int64,
  `det_boxes` (B, K, 4) xyxy input pixels, `det_scores` (B, K), `det_classes` (B, K) int64, K = max_detections;
  rows past num_detections are zero. Candidates: the `top_k` anchors with the highest class score, then every
  (anchor, class) pair above the confidence threshold.
Metadata: class_names (JSON), imgsz, model_size, run_id, with_nms, postprocess settings.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from backend.models.decoding import decode_predictions, feature_sizes
from backend.models.yolo_nas import YoloNAS
from backend.processing import PostprocessConfig, nms_torch

DEFAULT_OPSET = 17


class _NonMaxSuppression(torch.autograd.Function):
    """ONNX NonMaxSuppression: eager forward for tracing, `symbolic` emits the ONNX node.

    boxes (B, N, 4) xyxy, scores (B, C, N) → selected (S, 3) int64 rows (batch, class, box index).
    """

    @staticmethod
    def forward(ctx, boxes, scores, max_output_per_class, iou_threshold, score_threshold):  # type: ignore[override]
        rows = []
        for batch_index in range(boxes.shape[0]):
            for class_index in range(scores.shape[1]):
                class_scores = scores[batch_index, class_index]
                candidates = torch.nonzero(class_scores > score_threshold).flatten()
                keep = nms_torch(boxes[batch_index, candidates], class_scores[candidates], float(iou_threshold))
                keep = keep[: int(max_output_per_class)]
                for box_index in candidates[keep].tolist():
                    rows.append([batch_index, class_index, box_index])
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)

    @staticmethod
    def symbolic(g, boxes, scores, max_output_per_class, iou_threshold, score_threshold):
        # center_point_box=0: corners; ONNX reads them as (y1, x1, y2, x2) but IoU is symmetric in x and y.
        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            max_output_per_class,
            iou_threshold,
            score_threshold,
            center_point_box_i=0,
        )


class ExportableDetector(nn.Module):
    """A fused YOLO-NAS plus decoding, and optionally NMS, with tensor-only outputs for tracing."""

    def __init__(self, model: YoloNAS, with_nms: bool = False, postprocess: PostprocessConfig | None = None):
        super().__init__()
        self.model = model
        self.with_nms = with_nms
        self.postprocess = postprocess or PostprocessConfig()

    def forward(self, images: torch.Tensor):
        cls_logits, reg_distri = self.model(images)
        boxes, scores = decode_predictions(
            cls_logits, reg_distri, (images.shape[-2], images.shape[-1]), self.model.strides
        )
        if not self.with_nms:
            return boxes, scores
        return self._nms(boxes, scores)

    def _nms(self, boxes: torch.Tensor, scores: torch.Tensor):
        config = self.postprocess
        num_anchors, num_classes = scores.shape[1], scores.shape[2]
        top_k = min(config.top_k, num_anchors)
        _, top_anchors = scores.amax(dim=-1).topk(top_k, dim=1)  # (B, k)
        boxes = boxes.gather(1, top_anchors.unsqueeze(-1).expand(-1, -1, 4))  # (B, k, 4)
        scores = scores.gather(1, top_anchors.unsqueeze(-1).expand(-1, -1, num_classes))  # (B, k, C)
        selected = _NonMaxSuppression.apply(
            boxes,
            scores.transpose(1, 2).contiguous(),
            torch.tensor([config.max_detections], dtype=torch.int64),
            torch.tensor([config.iou_threshold], dtype=torch.float32),
            torch.tensor([config.conf_threshold], dtype=torch.float32),
        )  # (S, 3) batch, class, box
        batch_index, class_index, box_index = selected[:, 0], selected[:, 1], selected[:, 2]
        # Scatter the kept scores into a (B, C·k) grid and take the best K per image: a batched, static-shape
        # result without loops, which every runtime executes.
        grid = scores.transpose(1, 2).reshape(scores.shape[0], -1) * 0.0
        grid = grid.index_put(
            (batch_index, class_index * top_k + box_index), scores[batch_index, box_index, class_index]
        )
        det_scores, flat_index = grid.topk(min(config.max_detections, num_classes * top_k), dim=1)  # (B, K)
        det_classes = torch.div(flat_index, top_k, rounding_mode="floor")
        det_boxes = boxes.gather(1, (flat_index % top_k).unsqueeze(-1).expand(-1, -1, 4))
        valid = det_scores > 0
        det_boxes = det_boxes * valid.unsqueeze(-1).to(det_boxes.dtype)
        num_detections = valid.sum(dim=1, keepdim=True)
        return num_detections, det_boxes, det_scores, det_classes * valid


def export_onnx(
    model: YoloNAS,
    path: str | Path,
    *,
    imgsz: int | tuple[int, int] = 640,
    with_nms: bool = False,
    postprocess: PostprocessConfig | None = None,
    class_names: list[str] | None = None,
    run_id: str = "",
    opset: int = DEFAULT_OPSET,
    fuse: bool = True,
) -> Path:
    """Exports a copy of `model` (fully fused unless `fuse=False`) to ONNX with a dynamic batch axis.

    Args:
        imgsz: the input side (square) or (H, W), multiples of 32; fixed in the graph.
        postprocess: thresholds for the NMS graph (ignored without NMS).

    Returns:
        The written path (written to a temporary name, then renamed).
    """
    height, width = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    if height % 32 or width % 32:
        raise ValueError(f"imgsz must be a multiple of 32, got {height}x{width}")
    model = copy.deepcopy(model).cpu().float().eval()
    if fuse:
        model.fuse(full=True)
    wrapper = ExportableDetector(model, with_nms, postprocess).eval()
    if with_nms:
        output_names = ["num_detections", "det_boxes", "det_scores", "det_classes"]
    else:
        output_names = ["boxes", "scores"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks that are constants for a fixed size
        torch.onnx.export(
            wrapper,
            (torch.zeros(1, 3, height, width),),
            str(temporary),
            input_names=["images"],
            output_names=output_names,
            dynamic_axes={"images": {0: "batch"}, **{name: {0: "batch"} for name in output_names}},
            opset_version=opset,
            dynamo=False,  # the tracing exporter: the dynamo one cannot carry our custom NMS symbolic
        )
    onnx_model = onnx.load(str(temporary))
    config = wrapper.postprocess
    _declare_static_output_sizes(onnx_model, model, (height, width), with_nms, config)
    metadata = {
        "class_names": json.dumps(class_names or [f"class{i}" for i in range(model.num_classes)]),
        "imgsz": json.dumps([height, width]),
        "model_size": model.config.size,
        "run_id": run_id,
        "with_nms": json.dumps(with_nms),
        "postprocess": json.dumps(config.__dict__),
        "producer": "yolodex",
    }
    for key, value in metadata.items():
        onnx_model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(temporary))
    temporary.replace(path)
    return path


def _declare_static_output_sizes(
    onnx_model: onnx.ModelProto,
    model: YoloNAS,
    image_size: tuple[int, int],
    with_nms: bool,
    config: PostprocessConfig,
) -> None:
    """Writes the anchor, class and detection counts into the output shapes (the tracer leaves them symbolic)."""
    num_anchors = sum(h * w for h, w in feature_sizes(image_size, model.strides))
    num_classes = model.num_classes
    max_detections = min(config.max_detections, num_classes * min(config.top_k, num_anchors))
    sizes = {
        "boxes": [num_anchors, 4],
        "scores": [num_anchors, num_classes],
        "num_detections": [1],
        "det_boxes": [max_detections, 4],
        "det_scores": [max_detections],
        "det_classes": [max_detections],
    }
    for output in onnx_model.graph.output:
        if output.name in sizes and (with_nms or output.name in ("boxes", "scores")):
            for dim, value in zip(output.type.tensor_type.shape.dim[1:], sizes[output.name], strict=True):
                dim.dim_value = value


def read_onnx_metadata(path: str | Path) -> dict:
    """The yolodex metadata of an exported file, decoded (class_names list, imgsz [H, W], ...)."""
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    decoded: dict = dict(props)
    for key in ("class_names", "imgsz", "with_nms", "postprocess"):
        if key in props:
            decoded[key] = json.loads(props[key])
    return decoded
