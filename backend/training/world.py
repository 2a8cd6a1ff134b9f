"""This process among the training processes (`World`), and the model as DistributedDataParallel trains it.

A `World()` is one process, and every method is then a no-op; `backend.training.launch` starts several under torchrun
and each builds its `World` from torchrun's environment (`world_from_env`).

What a `World` of N processes changes in training (see `trainer.py` and `engine.py`):

* `TrainConfig.batch_size` is the **global** batch: each process takes batch_size / N images per step (a global
  batch that N does not divide is refused). Step k of an epoch is the same global batch of images, with the same
  augmentations, for any N: the sampler's epoch order depends on (seed, epoch) only and each rank takes its slice
  of each global batch (`backend.data.loader.EpochSampler`). So last.pt (epoch, step in epoch, global steps) is
  independent of N, and a run resumes with another number of processes.
* The loss (docs/training_recipe.md §1): S, the sum of soft scores, is all-reduced over the processes, clamped
  to 1 and divided by N; each process divides its own three sums by it. DDP averages the gradients over the N
  processes: (1/N) Σ_r ∇(sums_r) / (S/N) = ∇(Σ_r sums_r) / S, the single-process gradient of the global batch.
  The logged loss terms are the mean of the processes' values: Σ_r sums_r / S, the single-process loss.
* BatchNorm statistics: with `sync_bn` (the recipe's SyncBN, default on) every BatchNorm normalises with the
  statistics of the global batch, so the forward pass too equals one process's. On CUDA that is
  `torch.nn.SyncBatchNorm`; torch's refuses CPU tensors, so on gloo `CpuSyncBatchNorm` below does the same with
  two differentiable all-reduces per layer (slower, meant for tests and CPU-only machines).
* Rank 0 alone writes metrics.jsonl, config.json, checkpoints (the unwrapped model: the official key layout),
  evaluates, and keeps the EMA (no other rank reads it; every rank's weights are identical after each step, so
  rank 0's EMA is the single-process EMA). The others wait for it at the end of each epoch.
* Stopping (time budget, cancel, early stop, a non-finite loss) is decided on values every process shares: the
  elapsed time and the stop flag are all-reduced (max) each step, the loss terms are all-reduced before the
  backward pass, and the early-stop decision is broadcast from rank 0. The lr schedule uses the shared elapsed
  time, so the processes' weights cannot drift apart.
"""

from __future__ import annotations

import datetime
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from backend.models.blocks import QARepVGGBlock
from backend.training.config import TrainingError

logger = logging.getLogger(__name__)

# Collectives wait this long: the other ranks wait while rank 0 evaluates (a large validation split on one GPU).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)

# ----------------------------------------------------------------------------------------------------------------
# The process group, as the trainer sees it
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; `World()` is a single process (every method a no-op).

    Attributes:
        rank: 0 .. size − 1; rank 0 writes files, evaluates and reports.
        size: the number of processes (torchrun's WORLD_SIZE).
        local_rank: the process's index on this machine (its GPU).
        device: the device this process trains on; None in a single process (the trainer resolves config.device).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def _tensor(self, values: list[float], dtype: torch.dtype) -> torch.Tensor:
        # nccl reduces CUDA tensors only; gloo takes CPU tensors.
        return torch.tensor(values, dtype=dtype, device=self.device if self.device is not None else "cpu")

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over the processes of a (detached) tensor; the tensor itself in a single process."""
        if not self.distributed:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.size

    def maximum(self, values: list[float]) -> list[float]:
        """The element-wise max over the processes of a few floats (float64, so seconds keep their precision)."""
        if not self.distributed:
            return list(values)
        tensor = self._tensor(values, torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's `flag` on every process (the others wait here until rank 0 gets to it)."""
        if not self.distributed:
            return flag
        tensor = self._tensor([float(flag)], torch.float32)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def world_from_env(device_name: str = "auto") -> World:
    """The `World` that torchrun's environment describes, with the process group initialised.

    Args:
        device_name: the run's `TrainConfig.device`: "auto" (a GPU per process when torch sees enough, else the
            CPU), "cpu" (gloo processes), "cuda" or "cuda:N" (process `LOCAL_RANK` takes cuda:LOCAL_RANK).

    Raises:
        TrainingError: not started by torchrun, or fewer GPUs than processes on this machine.
    """
    missing = [
        name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ
    ]
    if missing:
        raise TrainingError(
            f"{', '.join(missing)} not set: start distributed training through torchrun (yolodex train --gpus N, "
            "or python -m torch.distributed.run --nproc-per-node N -m backend.training.launch ...)"
        )
    rank, size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible < local_size:
            raise TrainingError(
                f"{local_size} processes on this machine need {local_size} GPUs, torch sees {visible}: "
                f"ask for at most {visible} GPUs (or --device cpu --nproc {local_size} for gloo processes on the CPU)"
            )
        if ":" in device_name and rank == 0:
            logger.info("device %s: under torchrun process %d trains on cuda:%d", device_name, local_rank, local_rank)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=PROCESS_GROUP_TIMEOUT)
    return World(rank=rank, size=size, local_rank=local_rank, device=device)


def check_processes(processes: int, batch_size: int) -> None:
    """Refuses a process count that cannot split the global batch evenly (the message says what to pick)."""
    if processes < 1:
        raise TrainingError(f"the number of training processes must be at least 1, got {processes}")
    if batch_size % processes:
        fitting = [count for count in range(processes, 0, -1) if batch_size % count == 0]
        raise TrainingError(
            f"the batch of {batch_size} images is the global batch, split evenly over {processes} processes: "
            f"pick a batch that is a multiple of {processes} (e.g. {batch_size + processes - batch_size % processes})"
            f" or train with {fitting[0]} process{'es' if fitting[0] > 1 else ''}"
        )


# ----------------------------------------------------------------------------------------------------------------
# The model under DDP
# ----------------------------------------------------------------------------------------------------------------


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span every process of the (gloo) process group.

    `torch.nn.SyncBatchNorm` raises on CPU tensors. This computes the global batch's mean, then its centred second
    moment (two passes, as `F.batch_norm` does) with differentiable all-reduces, so both the output and, through
    their backward all-reduces, the gradient equal one process's BatchNorm over the global batch (up to float
    summation order). Running statistics are updated as BatchNorm updates them (unbiased variance).
    Outside training, or in a single process, it is a plain BatchNorm2d (same state-dict keys).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, C, H, W)
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        # Imported here: torch.distributed.nn only in a multi-process run, where it is needed.
        from torch.distributed.nn.functional import all_reduce as differentiable_all_reduce

        def all_reduce(tensor: torch.Tensor, op: Any) -> torch.Tensor:  # op: a dist.ReduceOp member
            # Its backward all-reduces the gradients. Deprecated in favour of functional collectives made for
            # torch.compile, which have no backward: keep it, without a warning per layer and step.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return differentiable_all_reduce(tensor, op=op)

        dtype = x.dtype
        if dtype in (torch.float16, torch.bfloat16):  # statistics in float32 under autocast, as F.batch_norm's
            x = x.float()
        channels = x.shape[1]
        local = torch.cat([x.sum(dim=(0, 2, 3)), x.new_tensor([x.numel() / channels])])
        total = all_reduce(local, op=dist.ReduceOp.SUM)
        count = total[-1].detach()
        mean = total[:channels] / count  # (C,)
        centred = x - mean.view(1, -1, 1, 1)
        var = all_reduce(centred.pow(2).sum(dim=(0, 2, 3)), op=dist.ReduceOp.SUM) / count  # (C,) biased
        tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
        if self.track_running_stats and tracked is not None and running_mean is not None and running_var is not None:
            with torch.no_grad():
                tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                running_mean.lerp_(mean.detach(), factor)
                running_var.lerp_(var.detach() * count / max(float(count) - 1.0, 1.0), factor)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            output = centred * (self.weight * scale).view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        else:
            output = centred * scale.view(1, -1, 1, 1)
        return output.to(dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of `model` synchronised over the process group, keeping its parameters and buffers (the
    optimizer built before still holds them; state-dict keys do not change). Returns `model` (changed in place)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = CpuSyncBatchNorm  # a subclass without state of its own: nothing to copy
    return model


def unused_parameter_names(model: nn.Module) -> list[str]:
    """Parameters the training forward pass never uses: `rbr_reparam` of unfused QARepVGG blocks (they exist from
    construction so checkpoints match the official layout; fusion fills them)."""
    return [
        f"{name}.rbr_reparam.{parameter}"
        for name, module in model.named_modules()
        if isinstance(module, QARepVGGBlock) and module.fusion == "none"
        for parameter, _ in module.rbr_reparam.named_parameters()
    ]


def wrap_model(model: nn.Module, world: World, sync_bn: bool) -> nn.Module:
    """The module to train with: `model` itself in a single process, else `model` in DistributedDataParallel.

    `model` stays the unwrapped module (checkpoints, EMA and evaluation use it). Buffers are broadcast from rank 0
    once, not at every forward: with `sync_bn` they stay equal on every rank, and without it only rank 0's are
    ever saved or evaluated.
    """
    if not world.distributed:
        return model
    if sync_bn:
        if world.device is None:
            raise RuntimeError("a distributed World names its process's device")
        convert_sync_batchnorm(model, world.device)
    # Unused parameters would leave DDP waiting for their gradients; ignoring them keeps them out of its buckets
    # (their grad stays None, as in a single process), cheaper than find_unused_parameters=True every step.
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, unused_parameter_names(model)
    )
    device_ids = [world.device.index] if world.device is not None and world.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_gpus(processes: int) -> None:
    """Refuses `--gpus N` when torch sees fewer than N GPUs."""
    visible = visible_gpus()
    if processes > visible:
        raise TrainingError(
            f"{processes} GPUs asked for, torch sees {visible}: ask for at most {max(visible, 1)} "
            "(on a CPU, --nproc N --device cpu runs N gloo processes, for testing)"
        )
