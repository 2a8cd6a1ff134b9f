"""Continue training: a finished, stopped or early-stopped run trained for more minutes or more epochs, in its own
run folder, from its last.pt (docs/checkpoints.md).

`continued_config` turns "N more minutes / M more epochs" into the run's new totals, computed from the checkpoint
alone (its position, its elapsed training seconds), so every process of a distributed resume, and a second resume of
an interrupted continuation, reach the same totals whatever config.json says by then:

- more minutes: the time budget becomes elapsed + N minutes. The cosine runs over progress = elapsed / budget (or
  steps done / total steps, whichever is further), so its progress is recomputed over the longer total: the lr rises
  back to the cosine's value at that point and anneals again to its end by the new budget, a warm restart in the
  spirit of SGDR (Loshchilov & Hutter 2017, arXiv 1608.03983). Without more epochs, the epoch cap is lifted to twice
  the epochs the run's own speed gives those minutes, so the time, not the cap, ends the segment.
- more epochs: the run ends after epoch done + M (an epoch a budget or a cancel cut short is finished first, as one of
  those M); without more minutes the time budget is lifted: the epochs end the segment.
- early stopping starts counting again (its patience counter is reset): a run that stopped improving gets its whole
  patience in the new segment. best.pt keeps the run's best mAP50-95 and is replaced only by a better one.
"""

from __future__ import annotations

import math
from typing import Any

from backend.training.config import TrainConfig, TrainingError

EPOCH_CAP_MARGIN = 2.0  # minutes-only continuation: epochs cap = done + this x the epochs the extra minutes give


def continued_config(
    config: TrainConfig, checkpoint: dict[str, Any], more_minutes: float | None, more_epochs: int | None
) -> TrainConfig:
    """The run's config for a continuation of `more_minutes` and/or `more_epochs` from `checkpoint` (its last.pt).

    Raises:
        TrainingError: neither is a positive number.
    """
    if (more_minutes is not None and more_minutes <= 0) or (more_epochs is not None and more_epochs < 1):
        raise TrainingError("continue with a positive number of more minutes and/or at least one more epoch")
    if not more_minutes and not more_epochs:
        raise TrainingError("say how much longer to train: more minutes and/or more epochs")
    done = int(checkpoint["epoch"])  # whole epochs done (the one in progress, when cut short, is not counted)
    elapsed_s = float((checkpoint.get("metrics") or {}).get("elapsed_s") or 0.0)
    changes: dict[str, Any] = {}
    if more_minutes:
        changes["time_minutes"] = elapsed_s / 60.0 + float(more_minutes)
        if not more_epochs:
            changes["epochs"] = done + _epochs_in(float(more_minutes) * 60.0, checkpoint, config)
    else:
        changes["time_minutes"] = None
    if more_epochs:
        changes["epochs"] = done + int(more_epochs)
    return config.with_changes(**changes)


def _steps_per_epoch(checkpoint: dict[str, Any], config: TrainConfig) -> int:
    # The scheduler's total is the epochs of the config that saved the checkpoint times the steps of one epoch.
    saved_epochs = (checkpoint.get("train_config") or {}).get("epochs") or config.epochs
    return max(1, int((checkpoint.get("scheduler") or {}).get("total_steps", 0)) // max(1, int(saved_epochs)))


def _epochs_in(seconds: float, checkpoint: dict[str, Any], config: TrainConfig) -> int:
    """The epoch cap for `seconds` more: EPOCH_CAP_MARGIN x the epochs this run's own pace fits in them, plus one."""
    scheduler = checkpoint.get("scheduler") or {}
    steps_per_epoch = _steps_per_epoch(checkpoint, config)
    steps_done = int(scheduler.get("steps_done", 0))
    elapsed_s = float((checkpoint.get("metrics") or {}).get("elapsed_s") or 0.0)
    if steps_done < 1 or elapsed_s <= 0:
        return 1000  # no pace known (nothing trained yet): the time alone ends the segment
    seconds_per_epoch = elapsed_s / steps_done * steps_per_epoch
    return math.ceil(EPOCH_CAP_MARGIN * seconds / seconds_per_epoch) + 1


def prepare_checkpoint(checkpoint: dict[str, Any], config: TrainConfig, new: TrainConfig) -> dict[str, Any]:
    """`checkpoint` ready for the new segment (`config`: the run's config before it, `new`: after): the
    early-stopping counter reset, and the progress at which the warm-up ended re-expressed over the new totals (the
    cosine then restarts from the same point of its curve that a run planned this long from the start would be at)."""
    metrics = dict(checkpoint.get("metrics") or {})
    metrics["bad_epochs"] = 0
    prepared = {**checkpoint, "metrics": metrics}
    state = dict(checkpoint.get("scheduler") or {})
    needed = ("steps_done", "warmup_steps", "total_steps")
    if all(key in state for key in needed) and "warmup_end_progress" in state and state["steps_done"] > 0:
        steps_done, warmup = int(state["steps_done"]), int(state["warmup_steps"])
        if warmup and steps_done >= warmup:
            steps_per_epoch = _steps_per_epoch(checkpoint, config)
            by_steps = warmup / (new.epochs * steps_per_epoch)
            elapsed_s = float(metrics.get("elapsed_s") or 0.0)
            by_time = elapsed_s * warmup / steps_done / (new.time_minutes * 60) if new.time_minutes else 0.0
            state["warmup_end_progress"] = min(1.0, max(by_steps, by_time))
            prepared["scheduler"] = state
    return prepared
