"""Model size figures: parameter counts and GFLOPs, for the CLI, the app and the benchmarks."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from backend.models.yolo_nas import YoloNAS, build_model


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not (the official totals include the unused `rbr_reparam` placeholders)."""
    return sum(parameter.numel() for parameter in model.parameters())


@torch.no_grad()
def count_gflops(model: nn.Module, image_size: tuple[int, int] = (640, 640)) -> float:
    """Forward GFLOPs (2 × multiply-adds of convolutions) for one (1, 3, H, W) image, as counted by torch."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, *image_size, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 1e9


def summarise_model(model: YoloNAS, imgsz: int = 640) -> dict:
    """Figures of a model: parameters as given and after full fusion, and fused GFLOPs at imgsz².

    Fuses `model` in place (eval mode): pass a copy to keep the original.
    """
    model.eval()
    params_total = count_parameters(model)
    model.fuse(full=True)
    return {
        "size": model.config.size,
        "num_classes": model.num_classes,
        "imgsz": imgsz,
        "params_total": params_total,
        "params_fused": count_parameters(model),
        "gflops": round(count_gflops(model, (imgsz, imgsz)), 2),
    }


def model_summary(size: str, num_classes: int = 80, imgsz: int = 640) -> dict:
    """Figures of one size: total (training form) and fully fused parameters, and fused GFLOPs at imgsz²."""
    return summarise_model(build_model(size, num_classes), imgsz)
