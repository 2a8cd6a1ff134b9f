"""The optimizer and learning-rate schedule of the YOLO-NAS fine-tuning recipe (docs/training_recipe.md §2).

AdamW with weight decay on weights only (none on biases and BatchNorm), a linear warm-up from 1e-6, then a cosine
down to `final_ratio` · lr. The recipe inherits two warm-ups (3 epochs and 1000 steps); we keep one, in steps.

The cosine runs over *progress*, the larger of steps done / total steps and seconds spent / time budget, so a run
with a wall-clock budget (`--time`) still anneals fully by the time it must stop, whatever speed the machine has.
"""

from __future__ import annotations

import math

import torch
from torch import nn

WARMUP_START_LR = 1e-6


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: convolution/linear weights with `weight_decay`; biases, BatchNorm and scalars without.

    The scalar `alpha` of QARepVGG blocks is 0-d: it gets no decay, which leaves it free to scale the identity branch.
    """
    decay, no_decay = [], []
    normalisations = (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            if isinstance(module, normalisations) or name == "bias" or parameter.ndim <= 1:
                no_decay.append(parameter)
            else:
                decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # The fused kernel updates all ≈470 tensors of YOLO-NAS S in one pass: 32 ms per step on this 2-core CPU
    # against 68 ms for the foreach one. Parameters on a device without a fused kernel fall back to foreach.
    groups = parameter_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, foreach=True)


class WarmupCosineSchedule:
    """Per-step learning rate: linear warm-up over `warmup_steps`, then cosine from `base_lr` to final_ratio·base_lr.

    Call `step(elapsed_s)` after each optimizer step; it sets the lr of the next step on every parameter group.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        warmup_steps: int,
        total_steps: int,
        final_ratio: float = 0.1,
        time_budget_s: float | None = None,
    ):
        if total_steps < 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}")
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.warmup_steps = max(0, min(warmup_steps, total_steps - 1))
        self.total_steps = total_steps
        self.final_ratio = final_ratio
        self.time_budget_s = time_budget_s
        self.steps_done = 0
        self.elapsed_s = 0.0
        self.warmup_end_progress = 0.0  # progress at which the cosine starts
        self._apply(self.lr_now())

    def progress(self) -> float:
        """Fraction of the run done, in [0, 1]: by steps, or by time when a budget is set and further along."""
        by_steps = self.steps_done / self.total_steps
        by_time = self.elapsed_s / self.time_budget_s if self.time_budget_s else 0.0
        return min(1.0, max(by_steps, by_time))

    def lr_now(self) -> float:
        if self.steps_done < self.warmup_steps:
            fraction = self.steps_done / self.warmup_steps
            return WARMUP_START_LR + fraction * (self.base_lr - WARMUP_START_LR)
        span = max(1e-9, 1.0 - self.warmup_end_progress)
        t = min(1.0, max(0.0, (self.progress() - self.warmup_end_progress) / span))
        return self.base_lr * (self.final_ratio + (1.0 - self.final_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))

    def step(self, elapsed_s: float | None = None) -> float:
        self.steps_done += 1
        if elapsed_s is not None:
            self.elapsed_s = elapsed_s
        if self.steps_done == self.warmup_steps:
            self.warmup_end_progress = self.progress()
        lr = self.lr_now()
        self._apply(lr)
        return lr

    def _apply(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {
            "steps_done": self.steps_done,
            "elapsed_s": self.elapsed_s,
            "warmup_end_progress": self.warmup_end_progress,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state["steps_done"])
        self.elapsed_s = float(state["elapsed_s"])
        self.warmup_end_progress = float(state["warmup_end_progress"])
        self.total_steps = int(state["total_steps"])
        self.warmup_steps = int(state["warmup_steps"])
        self._apply(self.lr_now())
