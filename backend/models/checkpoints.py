"""Loading, saving and transferring YOLO-NAS weights.

Reads three layouts through one function, `load_model`:
- our checkpoints, which carry size, class names and image size: a run's last.pt (`{"model": state_dict,
  "config": {...}, "ema": ..., "optimizer": ..., ...}`, all that resuming needs) and its best.pt (`{"model": the EMA
  weights, "config": {...}, "weights": "ema", "epoch": ..., "metrics": ...}`, all that inference needs: a quarter of
  last.pt's size), see docs/checkpoints.md;
- official super-gradients files (`{"ema_net": ...}` preferred, else `{"net": ...}`), float16 or float32;
- a bare state dict.
State dicts use the official key layout in every case. Loads are all-or-nothing: a wrong size or architecture
raises `CheckpointError` naming the first mismatching keys and shapes, and the model is left untouched.
"""

from __future__ import annotations

import pickle
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backend.files import atomic_write
from backend.models.config import VARIANTS
from backend.models.yolo_nas import YoloNAS, build_model

# Our checkpoint format version, stored in every file we write.
CHECKPOINT_FORMAT = 1
MAX_LISTED_MISMATCHES = 5
FUSION_ORDER = {"none": 0, "partial": 1, "full": 2}
CLASS_PREDICTOR_SUFFIXES = ("cls_pred.weight", "cls_pred.bias")

COCO_CLASS_NAMES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)


ROOM_MARGIN_BYTES = 16 * 2**20  # beside the checkpoints: config.json, metrics.jsonl, eval.json, file system blocks


class CheckpointError(ValueError):
    """A weights file that cannot be used as asked; the message says why and what to do."""


class NotEnoughRoom(ValueError):
    """A folder without the free space the files of an operation need; raised before anything is written."""


@dataclass
class LoadReport:
    """What a load did: where the weights came from and what, if anything, was not loaded."""

    path: str
    layout: str  # "yolodex", "official" or "state_dict"
    entry: str | None  # the checkpoint entry the weights came from ("model", "ema_net", "net") or None
    size: str
    num_classes: int
    class_names: list[str]
    fusion: str
    imgsz: int | None = None
    loaded: int = 0
    skipped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def describe(self) -> str:
        entry = f" [{self.entry}]" if self.entry else ""
        text = (
            f"loaded {self.loaded} tensors from {self.path}{entry} ({self.layout} layout): YOLO-NAS "
            f"{self.size.upper()}, {self.num_classes} classes, fusion {self.fusion}"
        )
        if self.skipped:
            parts = ", ".join(f"{key} {list(old)} → {list(new)}" for key, old, new in self.skipped)
            text += f"; re-initialised for the new classes: {parts}"
        return text


def _first_line(error: BaseException) -> str:
    # An empty file raises EOFError with no message: name the error type rather than fail on an empty string.
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with tensors only (no arbitrary pickles) and errors that say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({_first_line(error)}): "
            "is the download complete? Delete it and download or copy it again."
        ) from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint or state dict")
    return checkpoint


def extract_state_dict(checkpoint: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """The model weights of a checkpoint, float32, without DDP `module.` prefixes.

    Returns:
        (state_dict, layout, entry): layout "yolodex", "official" or "state_dict"; entry the key used.
    """
    if "config" in checkpoint and "model" in checkpoint:
        # The EMA weights are the ones training evaluated and chose best.pt by, as the official files' ema_net.
        layout, entry = "yolodex", "ema" if checkpoint.get("ema") is not None else "model"
    elif "ema_net" in checkpoint and checkpoint["ema_net"] is not None:
        layout, entry = "official", "ema_net"  # the official recipes evaluate and publish the EMA weights
    elif "net" in checkpoint:
        layout, entry = "official", "net"
    elif checkpoint and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        layout, entry = "state_dict", None
    else:
        keys = ", ".join(list(checkpoint)[:8])
        raise CheckpointError(f"not a YOLO-NAS checkpoint: no 'model', 'ema_net' or 'net' entry (found: {keys})")
    raw = checkpoint[entry] if entry else checkpoint
    if not isinstance(raw, dict) or not all(isinstance(value, torch.Tensor) for value in raw.values()):
        raise CheckpointError(f"the checkpoint's {entry!r} entry is not a state dict of tensors")
    state_dict = {}
    for key, value in raw.items():
        key = key.removeprefix("module.")
        state_dict[key] = value.float() if value.is_floating_point() else value
    return state_dict, layout, entry


def state_dict_fusion(state_dict: dict[str, torch.Tensor]) -> str:
    if any(".branch_3x3." in key for key in state_dict):
        return "none"
    return "partial" if any(".post_bn." in key for key in state_dict) else "full"


def infer_architecture(state_dict: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(size, num_classes) of an official-layout state dict, from the stage-1 CSP width and the class predictor."""
    try:
        stage1_hidden = state_dict["backbone.stage1.blocks.conv1.conv.weight"].shape[0]
        num_classes = state_dict["heads.head1.cls_pred.weight"].shape[0]
    except KeyError as error:
        raise CheckpointError(f"not a YOLO-NAS state dict: key {error} is missing") from None
    for size, config in VARIANTS.items():
        if config.backbone[0].hidden_channels == stage1_hidden:
            return size, num_classes
    raise CheckpointError(f"not a YOLO-NAS S/M/L state dict: stage 1 has {stage1_hidden} hidden channels")


def _mismatches(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], skip: set[str]) -> list[str]:
    # Shape mismatches first: they name the layer that differs, which says most about what went wrong.
    problems = [
        f"{key}: checkpoint {list(given[key].shape)} vs model {list(value.shape)}"
        for key, value in expected.items()
        if key in given and key not in skip and given[key].shape != value.shape
    ]
    problems += [f"missing {key} {list(value.shape)}" for key, value in expected.items() if key not in given]
    problems += [f"unexpected {key} {list(value.shape)}" for key, value in given.items() if key not in expected]
    return problems


def load_weights(
    model: YoloNAS, state_dict: dict[str, torch.Tensor], *, allow_class_transfer: bool = False
) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """Loads an official-layout state dict into `model`, all or nothing.

    The model is fused first when the weights are in a fused form. With `allow_class_transfer`, class predictors
    of another shape are left at their fresh initialisation (transfer to another number of classes).

    Returns:
        The skipped (key, checkpoint shape, model shape) entries.
    """
    fusion = state_dict_fusion(state_dict)
    if FUSION_ORDER[fusion] < FUSION_ORDER[model.fusion]:
        raise CheckpointError(f"weights are in {fusion} form but the model is already {model.fusion}-fused: load first")
    expected = model.state_dict()
    if fusion != model.fusion:
        expected = build_model(model.config, model.num_classes).eval().fuse(full=fusion == "full").state_dict()
    skip = set()
    if allow_class_transfer:
        skip = {
            key
            for key in expected
            if key.endswith(CLASS_PREDICTOR_SUFFIXES)
            and key in state_dict
            and state_dict[key].shape != expected[key].shape
        }
    problems = _mismatches(expected, state_dict, skip)
    if problems:
        shown = "; ".join(problems[:MAX_LISTED_MISMATCHES])
        more = f" (and {len(problems) - MAX_LISTED_MISMATCHES} more)" if len(problems) > MAX_LISTED_MISMATCHES else ""
        try:
            size, num_classes = infer_architecture(state_dict)
            holds = f"they look like YOLO-NAS {size.upper()} with {num_classes} classes"
        except CheckpointError as error:
            holds = str(error)
        raise CheckpointError(
            f"weights do not fit YOLO-NAS {model.config.size.upper()} with {model.num_classes} classes ({holds}): "
            f"{shown}{more}. Check the model size (--size) and the number of classes."
        )
    if fusion != model.fusion:
        model.fuse(full=fusion == "full")
    kept = {key: value for key, value in state_dict.items() if key not in skip}
    model.load_state_dict(kept, strict=not skip)
    return [(key, tuple(state_dict[key].shape), tuple(expected[key].shape)) for key in sorted(skip)]


def load_model(
    path: str | Path,
    *,
    size: str | None = None,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> tuple[YoloNAS, LoadReport]:
    """Builds the model a weights file describes and loads it strictly (in eval mode).

    Args:
        path: our checkpoint, an official super-gradients file, or a bare state dict.
        size: "s"/"m"/"l"; inferred from the weights when omitted; a different size is an error.
        num_classes: when it differs from the weights', transfer: everything but the class predictors is loaded.
        class_names: names for the classes (defaults: the checkpoint's, COCO's for 80 official classes, or
            "class0"...).
    """
    checkpoint = read_checkpoint(path)
    state_dict, layout, entry = extract_state_dict(checkpoint)
    config = checkpoint.get("config", {}) if layout == "yolodex" else {}
    weights_size, weights_classes = infer_architecture(state_dict)
    size = (size or config.get("size") or weights_size).lower()
    num_classes = num_classes or (len(class_names) if class_names else weights_classes)
    if class_names is None:
        if num_classes == weights_classes and config.get("class_names"):
            class_names = list(config["class_names"])
        elif num_classes == 80 and layout != "yolodex":
            class_names = list(COCO_CLASS_NAMES)
        else:
            class_names = [f"class{index}" for index in range(num_classes)]
    if len(class_names) != num_classes:
        raise CheckpointError(f"{len(class_names)} class names given for {num_classes} classes")
    model = build_model(size, num_classes).eval()
    skipped = load_weights(model, state_dict, allow_class_transfer=num_classes != weights_classes)
    report = LoadReport(
        path=str(path),
        layout=layout,
        entry=entry,
        size=size,
        num_classes=num_classes,
        class_names=class_names,
        fusion=model.fusion,
        imgsz=config.get("imgsz"),
        loaded=len(state_dict) - len(skipped),
        skipped=skipped,
    )
    return model, report


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves a torn file."""
    return atomic_write(path, lambda file: torch.save(obj, file))


def save_checkpoint(
    path: str | Path,
    model: YoloNAS,
    *,
    class_names: list[str],
    imgsz: int,
    ema: nn.Module | None = None,
    **training_state: Any,
) -> Path:
    """Writes our checkpoint atomically.

    Args:
        model: its state dict is stored under "model" in the official key layout.
        class_names: one per class, in class-index order.
        imgsz: the training/inference input size (square side, multiple of 32).
        ema: an EMA copy of the model, stored under "ema".
        training_state: optimizer, scheduler, epoch, rng, metrics... stored as given (tensors/primitives only).
    """
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "config": {
            "size": model.config.size,
            "num_classes": model.num_classes,
            "class_names": list(class_names),
            "imgsz": imgsz,
            "fusion": model.fusion,
        },
        "model": model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        **training_state,
    }
    return atomic_save(checkpoint, path)


def save_inference_checkpoint(
    path: str | Path, model: YoloNAS, *, class_names: list[str], imgsz: int, weights: str, **metadata: Any
) -> Path:
    """Writes what inference (and starting a new run from these weights) needs, atomically: `model`'s weights under
    "model", its config, and `metadata` (epoch, metrics, train_config...; tensors/primitives only). No optimizer, no
    second copy of the weights: a run's best.pt is its EMA model, a quarter of last.pt's size.

    Args:
        weights: what `model` is ("ema": the EMA copy of a training, "model": the trained model itself).
    """
    return save_checkpoint(path, model, class_names=class_names, imgsz=imgsz, weights=weights, **metadata)


def checkpoint_sizes(size: str, num_classes: int) -> tuple[int, int]:
    """(last.pt, best.pt) bytes a training of YOLO-NAS `size` writes, estimated from its parameter count (a model
    built on the meta device: no memory): last.pt holds the model, its EMA and AdamW's two moments of every
    parameter; best.pt the EMA weights alone."""
    with torch.device("meta"):
        model = build_model(size, num_classes)
    weights = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    parameters = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    return 2 * weights + 2 * parameters, weights


def free_bytes(folder: str | Path) -> int:
    """Free bytes for an unprivileged writer on the file system `folder` is (or will be created) on."""
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def ensure_room(folder: str | Path, needed: int, what: str) -> None:
    """Raises NotEnoughRoom, naming `folder` and the free and needed bytes, when `folder`'s file system has less
    than `needed` (+ a small margin) free bytes for `what` (e.g. "this run's checkpoints")."""
    needed = max(0, needed) + ROOM_MARGIN_BYTES
    free = free_bytes(folder)
    if free < needed:
        raise NotEnoughRoom(
            f"not enough free space in {folder} for {what}: {_megabytes(free)} free, about {_megabytes(needed)} "
            "needed. Free some space there or write to another folder."
        )


def _megabytes(count: int) -> str:
    return f"{count / 1e6:,.0f} MB ({count:,} bytes)"
