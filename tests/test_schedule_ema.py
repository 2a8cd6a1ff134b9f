"""The optimizer groups, the warm-up/cosine schedule (by steps and by time) and the threshold EMA."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from backend.models import build_model
from backend.training.ema import ModelEMA
from backend.training.schedule import WARMUP_START_LR, WarmupCosineSchedule, build_optimizer, parameter_groups


def test_no_weight_decay_on_biases_batchnorm_and_scalars() -> None:
    model = build_model("s", 3)
    decay, no_decay = parameter_groups(model, weight_decay=1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    decayed = {id(parameter) for parameter in decay["params"]}
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            assert id(module.weight) not in decayed and id(module.bias) not in decayed, name
        if isinstance(module, nn.Conv2d):
            assert id(module.weight) in decayed, name
            if module.bias is not None:
                assert id(module.bias) not in decayed, name
    assert all(names[id(parameter)].endswith(("weight",)) for parameter in decay["params"])
    alphas = [parameter for name, parameter in model.named_parameters() if name.endswith("alpha")]
    assert alphas and all(id(parameter) not in decayed for parameter in alphas)


def _schedule(**kwargs) -> tuple[WarmupCosineSchedule, torch.optim.Optimizer]:
    optimizer = build_optimizer(nn.Linear(2, 2), lr=1e-3, weight_decay=1e-4)
    return WarmupCosineSchedule(optimizer, base_lr=1e-3, **kwargs), optimizer


def test_warmup_then_cosine_by_steps() -> None:
    schedule, optimizer = _schedule(warmup_steps=10, total_steps=110, final_ratio=0.1)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(110):
        lrs.append(schedule.step())
    assert lrs[0] == pytest.approx(WARMUP_START_LR)
    assert lrs[5] == pytest.approx(WARMUP_START_LR + 0.5 * (1e-3 - WARMUP_START_LR))
    assert lrs[10] == pytest.approx(1e-3)  # warm-up done: the cosine starts at the peak
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))  # then only decreases
    assert lrs[60] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))), rel=1e-6)
    assert lrs[-1] == pytest.approx(1e-4)  # cosine to 0.1x
    assert {group["lr"] for group in optimizer.param_groups} == {lrs[-1]}


def test_time_budget_drives_the_cosine_and_state_round_trips() -> None:
    schedule, _ = _schedule(warmup_steps=2, total_steps=10_000, final_ratio=0.1, time_budget_s=100.0)
    schedule.step(elapsed_s=1.0)
    schedule.step(elapsed_s=2.0)  # warm-up ends at 2 % of the budget
    lr_half = schedule.step(elapsed_s=51.0)  # halfway through the remaining budget, far from the step total
    assert lr_half == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-6)
    state = schedule.state_dict()
    assert schedule.step(elapsed_s=100.0) == pytest.approx(1e-4)

    restored, restored_optimizer = _schedule(warmup_steps=2, total_steps=10_000, time_budget_s=100.0)
    restored.load_state_dict(state)
    assert restored_optimizer.param_groups[0]["lr"] == pytest.approx(lr_half)
    assert restored.step(elapsed_s=100.0) == pytest.approx(1e-4)


def test_ema_threshold_decay_and_averaging() -> None:
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    ema = ModelEMA(model, decay=0.9)
    assert ema.current_decay() == pytest.approx(1 / 10)  # (1 + 0) / (10 + 0): follows the model closely at first
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].running_mean.fill_(2.0)
    before = ema.module[0].weight.clone()
    ema.update(model)
    assert ema.updates == 1
    torch.testing.assert_close(ema.module[0].weight, before + 0.9 * (1.0 - before))  # lerp by 1 - 0.1
    torch.testing.assert_close(ema.module[1].running_mean, torch.tensor([0.9 * 2.0]))  # BN buffers averaged too
    assert ema.module[1].num_batches_tracked == model[1].num_batches_tracked
    for _ in range(1000):
        ema.update(model)
    assert ema.current_decay() == 0.9  # the threshold caps it
    torch.testing.assert_close(ema.module[0].weight, torch.ones(1, 1, 1, 1))
    assert not any(parameter.requires_grad for parameter in ema.module.parameters())
    assert not ema.module.training


def test_default_learning_rates() -> None:
    from backend.training.config import TrainConfig

    assert TrainConfig(size="s", weights="coco").peak_lr == 5e-4  # the fine-tuning recipe
    assert TrainConfig(size="m", weights="runs/a").peak_lr == 4e-4
    assert TrainConfig(size="s").peak_lr == 1e-3  # from random initialisation: twice the recipe's
    assert TrainConfig(size="l", lr=3e-4).peak_lr == 3e-4
    with pytest.raises(ValueError, match="multiple of 32"):
        TrainConfig(imgsz=300)
