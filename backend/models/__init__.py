"""YOLO-NAS S/M/L: configs, the model, decoding, checkpoints and weight downloads.

from backend.models import build_model, load_model, save_checkpoint
model = build_model("s", num_classes=3)           # random init
model, report = load_model("yolo_nas_s_coco.pth") # official or our own checkpoint, strict
model.eval().fuse()                               # partial fusion (trainable, quantization start point)
"""

from backend.models.checkpoints import (
    COCO_CLASS_NAMES,
    CheckpointError,
    LoadReport,
    load_model,
    load_weights,
    read_checkpoint,
    save_checkpoint,
)
from backend.models.config import VARIANTS, YoloNasConfig, get_config
from backend.models.decoding import decode_predictions, make_anchor_points
from backend.models.summary import count_gflops, count_parameters, model_summary
from backend.models.yolo_nas import YoloNAS, build_model

__all__ = [
    "COCO_CLASS_NAMES",
    "VARIANTS",
    "CheckpointError",
    "LoadReport",
    "YoloNAS",
    "YoloNasConfig",
    "build_model",
    "count_gflops",
    "count_parameters",
    "decode_predictions",
    "get_config",
    "load_model",
    "load_weights",
    "make_anchor_points",
    "model_summary",
    "read_checkpoint",
    "save_checkpoint",
]
