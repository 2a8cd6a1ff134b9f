"""Multi-process (DistributedDataParallel) training: one process per GPU, or several gloo processes on a CPU.

Two halves, both here so that `trainer.py` only learns about a `World`:

* **The launcher** (`fit`, `resume`): starts `python -m torch.distributed.run --standalone --nproc-per-node N
  -m backend.training.distributed` as a child process group and waits for it. It relays the run's events from
  metrics.jsonl (rank 0 writes them) to `on_event`, the processes' output lines to `on_log`, turns
  `stop_requested()` into a stop file that rank 0 reads (the run then stops after the current step, saves last.pt
  and ends "cancelled", as a single-process run does), and kills the process group if that takes longer than
  `CANCEL_GRACE_S` or when the caller is interrupted.
* **The worker** (`main`, one per rank under torchrun): reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK /
  MASTER_ADDR / MASTER_PORT, initialises the process group (nccl on CUDA, gloo on CPU) and calls
  `trainer.fit` / `trainer.resume` with its `World`.

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

import argparse
import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from backend.training.config import TrainingError

if TYPE_CHECKING:
    from backend.training.config import TrainConfig
    from backend.training.trainer import FitResult

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
POLL_INTERVAL_S = 0.2
CANCEL_GRACE_S = 120.0  # a cancel stops after the current step; evaluation of a large val split may come first
TERMINATE_GRACE_S = 15.0  # SIGTERM → SIGKILL
# Collectives wait this long: the other ranks wait while rank 0 evaluates (a large validation split on one GPU).
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=60)
LOG_NAME = "distributed.log"  # in the run folder: torchrun's and every rank's output


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
            "or python -m torch.distributed.run --nproc-per-node N -m backend.training.distributed ...)"
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
    from backend.models.blocks import QARepVGGBlock

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


# ----------------------------------------------------------------------------------------------------------------
# The launcher
# ----------------------------------------------------------------------------------------------------------------

EventCallback = Callable[..., None]


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


def fit(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    processes: int,
    gpus: bool = False,
    on_event: EventCallback | None = None,
    stop_requested: Callable[[], bool] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> FitResult:
    """`trainer.fit` in `processes` torchrun processes; returns rank 0's result.

    Args:
        config: the run's configuration; `batch_size` is the global batch (a multiple of `processes`).
        processes: processes to start: one per GPU on CUDA, gloo processes on the CPU (`config.device="cpu"`).
        gpus: the processes must each have a GPU (refused if torch sees fewer); the device becomes "cuda".
        on_event: receives the run's events as `trainer.fit` gives them (relayed from metrics.jsonl).
        stop_requested: polled while the run goes; True stops it after the current step (last.pt saved).
        on_log: receives the processes' output lines (default: this module's logger at INFO).

    Raises:
        TrainingError (or the DatasetError / CheckpointError / ValueError a rank raised), with its message.
    """
    if gpus:
        check_gpus(processes)
        if config.device == "cpu":
            raise TrainingError("--gpus trains on GPUs: drop --device cpu (or use --nproc for CPU processes)")
        config = config.with_changes(device="cuda")
    check_processes(processes, config.batch_size)
    request = {"mode": "fit", "config": config.to_dict(), "device": config.device}
    return _launch(request, Path(run_dir), processes, on_event, stop_requested, on_log)


def resume(
    run_dir: str | Path,
    *,
    processes: int,
    gpus: bool = False,
    on_event: EventCallback | None = None,
    stop_requested: Callable[[], bool] | None = None,
    on_log: Callable[[str], None] | None = None,
    **overrides: Any,
) -> FitResult:
    """`trainer.resume` in `processes` torchrun processes (any number: the checkpoint does not depend on it)."""
    from backend.training.config import TrainConfig

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file() or not (run_dir / "last.pt").is_file():
        raise TrainingError(f"{run_dir} holds no run to resume (config.json and last.pt are needed)")
    config = TrainConfig.from_dict(json.loads(config_path.read_text())["train"])
    overrides = {key: value for key, value in overrides.items() if value is not None}
    device = overrides.get("device") or config.device
    if gpus:
        check_gpus(processes)
        if device == "cpu":
            raise TrainingError("--gpus trains on GPUs: drop --device cpu (or use --nproc for CPU processes)")
        device = overrides["device"] = "cuda"
    check_processes(processes, config.batch_size)
    request = {"mode": "resume", "overrides": overrides, "device": device}
    return _launch(request, run_dir, processes, on_event, stop_requested, on_log)


def torchrun_command(processes: int, control_dir: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        "-m",
        "backend.training.distributed",
        "--run-dir",
        str(run_dir),
        "--control",
        str(control_dir),
    ]


def _launch(
    request: dict[str, Any],
    run_dir: Path,
    processes: int,
    on_event: EventCallback | None,
    stop_requested: Callable[[], bool] | None,
    on_log: Callable[[str], None] | None,
) -> FitResult:
    from backend.training.trainer import FitResult

    run_dir.mkdir(parents=True, exist_ok=True)
    control_dir = Path(tempfile.mkdtemp(prefix="yolodex-ddp-"))
    (control_dir / "request.json").write_text(json.dumps(request))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    # torchrun would set 1 thread per process; on a CPU the processes share the cores instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    events = _Tail(run_dir / "metrics.jsonl")
    log_path = run_dir / LOG_NAME
    log_file = log_path.open("ab")
    lines = _Tail(log_path)
    relay_log = on_log or (lambda line: logger.info("%s", line))
    process = subprocess.Popen(
        torchrun_command(processes, control_dir, run_dir),
        cwd=REPO_ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: killed as one
    )
    cancelled_at = None
    try:
        while True:
            returncode = process.poll()
            _relay(events, lines, on_event, relay_log)
            if returncode is not None:
                break
            if cancelled_at is None and stop_requested is not None and stop_requested():
                (control_dir / "stop").touch()
                cancelled_at = time.monotonic()
                relay_log("cancel requested: the processes stop after the current step")
            if cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_GRACE_S:
                _terminate(process, control_dir)
                raise TrainingError(
                    f"cancelled: the training processes did not stop within {CANCEL_GRACE_S:.0f} s and were killed; "
                    "resume from the run's last.pt"
                )
            time.sleep(POLL_INTERVAL_S)
        return FitResult(**_outcome(control_dir, returncode, log_path))
    finally:
        _terminate(process, control_dir)  # nothing left running, whatever happened here (KeyboardInterrupt too)
        _relay(events, lines, on_event, relay_log)
        log_file.close()
        shutil.rmtree(control_dir, ignore_errors=True)


class _Tail:
    """New complete lines of a growing file (from its size when created)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""

    def read(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as file:
            file.seek(self.offset)
            data = file.read()
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        return [line.decode("utf-8", "replace") for line in complete]


def _relay(events: _Tail, lines: _Tail, on_event: EventCallback | None, on_log: Callable[[str], None]) -> None:
    for line in lines.read():
        if line.strip():
            on_log(line)
    for line in events.read():
        if on_event is not None and line.strip():
            record = json.loads(line)
            record.pop("time", None)
            on_event(record.pop("event"), **record)


def _outcome(control_dir: Path, returncode: int, log_path: Path) -> dict[str, Any]:
    """Rank 0's FitResult fields, or the error a rank raised (as its own type when the CLI knows it)."""
    result_path = control_dir / "result.json"
    if returncode == 0 and result_path.is_file():
        result = json.loads(result_path.read_text())
        return {**result, "run_dir": Path(result["run_dir"])}
    errors = sorted(control_dir.glob("error-rank*.json"), key=lambda path: path.stat().st_mtime_ns)
    if errors:  # the first to fail; the others then fail on their lost peers
        error = json.loads(errors[0].read_text())
        raise _error_types().get(error["type"], TrainingError)(error["message"])
    tail = log_path.read_text(errors="replace").splitlines()[-15:] if log_path.exists() else []
    raise TrainingError(
        f"distributed training failed (torchrun exit status {returncode}); the end of {log_path}:\n" + "\n".join(tail)
    )


def _error_types() -> dict[str, type[Exception]]:  # built late: these imports are heavy
    from backend.data.records import DatasetError
    from backend.models.checkpoints import CheckpointError

    return {
        "TrainingError": TrainingError,
        "DatasetError": DatasetError,
        "CheckpointError": CheckpointError,
        "ValueError": ValueError,
        "FileNotFoundError": FileNotFoundError,
    }


def _terminate(process: subprocess.Popen, control_dir: Path) -> None:
    """Stops torchrun and every worker: SIGTERM to torchrun (it passes it on to the workers, each in a session of
    its own), then SIGKILL to each process group that is still there."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(TERMINATE_GRACE_S)
    groups = [process.pid] if process.poll() is None else []
    for pid_file in control_dir.glob("pid-rank*"):
        pid = int(pid_file.read_text())
        with contextlib.suppress(OSError):  # gone, or another process by now: only our workers are killed
            if b"backend.training.distributed" in Path(f"/proc/{pid}/cmdline").read_bytes():
                groups.append(pid)
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    if process.poll() is None:
        process.wait()


# ----------------------------------------------------------------------------------------------------------------
# The worker (one per rank, started by torchrun)
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one rank of a distributed training run (started by torchrun)")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--control", type=Path, required=True, help="holds request.json; result and stop files")
    args = parser.parse_args(argv)
    request = json.loads((args.control / "request.json").read_text())
    rank = int(os.environ.get("RANK", 0))
    (args.control / f"pid-rank{rank}").write_text(str(os.getpid()))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        from backend.training import trainer
        from backend.training.config import TrainConfig

        world = world_from_env(request["device"])
        stop_file = args.control / "stop"
        stop_requested = stop_file.exists if world.is_main else None
        if request["mode"] == "fit":
            config = TrainConfig.from_dict(request["config"])
            result = trainer.fit(config, args.run_dir, stop_requested=stop_requested, world=world)
        else:
            overrides = request["overrides"]
            result = trainer.resume(args.run_dir, stop_requested=stop_requested, world=world, **overrides)
        world.barrier()
        if world.is_main:
            (args.control / "result.json").write_text(json.dumps(result.to_dict()))
    except BaseException as error:
        # torchrun stops the other ranks when one fails; the launcher reports this message.
        error_path = args.control / f"error-rank{rank}.json"
        error_path.write_text(json.dumps({"type": type(error).__name__, "message": str(error) or repr(error)}))
        raise
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
