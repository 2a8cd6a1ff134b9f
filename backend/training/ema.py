"""Exponential moving average of the model weights, with super-gradients' "threshold" warm-up
(docs/training_recipe.md §2): decay_t = min(decay, (1 + t) / (10 + t)) after the t-th optimizer step.

Early on the average follows the model closely (decay 0.1, 0.18, ...), so a short run still gets a useful
average; later it settles at `decay`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """An eval-mode copy of a model whose floating state (parameters and BatchNorm statistics) is averaged.

    Attributes:
        module: the averaged model; evaluate and save this one.
        decay: the decay it settles at.
        updates: optimizer steps averaged so far (t above).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9, updates: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.updates = updates

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Call after every optimizer step."""
        decay = self.current_decay()
        self.updates += 1
        averaged, current = [], []
        for ema_value, value in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if ema_value.is_floating_point():
                averaged.append(ema_value)
                current.append(value.detach().to(ema_value.dtype))
            else:
                ema_value.copy_(value)  # num_batches_tracked
        # ema ← ema + (1 - decay)·(model - ema), on all tensors at once.
        torch._foreach_lerp_(averaged, current, 1.0 - decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
