"""Starting a training run: `train` and `resume`, in this process or in N torchrun processes.

The CLI, the training job and the labeling loop call these two; they decide in one place (`_start`) whether the
run goes in this process (`trainer.fit` / `trainer.resume`) or in N processes (DistributedDataParallel: one per GPU,
or gloo processes on a CPU), and the rest of the code never needs to know which.

A run crosses the process boundary as one JSON request (`Request.to_json` / `Request.from_json`, the TrainConfig in
it as `TrainConfig.to_dict()`), converted once on each side.

With N processes, `_launch` starts `python -m torch.distributed.run --standalone --nproc-per-node N -m
backend.training.launch` as a child process group and waits for it. It relays the run's events from metrics.jsonl
(rank 0 writes them) to `on_event`, the processes' output lines to `on_log`, turns `stop_requested()` into a stop
file that rank 0 reads (the run then stops after the current step, saves last.pt and ends "cancelled", as a
single-process run does), and kills the process group if that takes longer than `CANCEL_GRACE_S` or when the caller
is interrupted. Each rank (`main`, under torchrun) builds its `World` from torchrun's environment
(`backend.training.world`) and runs the same request with it. What N processes change in training is described in
`backend/training/world.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist

from backend.data.records import DatasetError
from backend.models.checkpoints import CheckpointError
from backend.training import trainer
from backend.training.config import TrainConfig, TrainingError
from backend.training.engine import EventCallback
from backend.training.trainer import FitResult
from backend.training.world import World, check_gpus, check_processes, world_from_env

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
POLL_INTERVAL_S = 0.2
CANCEL_GRACE_S = 120.0  # a cancel stops after the current step; evaluation of a large val split may come first
TERMINATE_GRACE_S = 15.0  # SIGTERM → SIGKILL
LOG_NAME = "distributed.log"  # in the run folder: torchrun's and every rank's output
# The errors a rank's failure is raised as again here (by name); any other becomes a TrainingError with its message.
RAISED_AS: dict[str, type[Exception]] = {
    error.__name__: error for error in (TrainingError, DatasetError, CheckpointError, ValueError, FileNotFoundError)
}
MODULE = "backend.training.launch"  # what torchrun starts in each process (`main`)


@dataclass(frozen=True)
class Request:
    """One run to start: a new run (`config`) or a resume (`overrides` of `trainer.resume`), on `device`."""

    mode: str  # "fit" | "resume"
    device: str
    config: TrainConfig | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        config = self.config.to_dict() if self.config is not None else None
        return json.dumps({"mode": self.mode, "device": self.device, "config": config, "overrides": self.overrides})

    @classmethod
    def from_json(cls, text: str) -> Request:
        values = json.loads(text)
        config = TrainConfig.from_dict(values["config"]) if values["config"] is not None else None
        return cls(values["mode"], values["device"], config, values["overrides"])

    def run(
        self, run_dir: Path, world: World, on_event: EventCallback | None, stop_requested: Callable[[], bool] | None
    ) -> FitResult:
        """This process's part of the run (all of it in a single process)."""
        if self.mode == "fit":
            if self.config is None:
                raise ValueError("a new run needs its TrainConfig")
            return trainer.fit(self.config, run_dir, on_event=on_event, stop_requested=stop_requested, world=world)
        return trainer.resume(run_dir, on_event=on_event, stop_requested=stop_requested, world=world, **self.overrides)


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    processes: int = 1,
    gpus: bool = False,
    on_event: EventCallback | None = None,
    stop_requested: Callable[[], bool] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> FitResult:
    """Trains a new run in `run_dir` (`trainer.fit`), in this process or in `processes` torchrun processes.

    Args:
        config: the run's configuration; `batch_size` is the global batch (a multiple of `processes`).
        processes: 1 trains here; more start one per GPU on CUDA, gloo processes on the CPU (`config.device="cpu"`).
        gpus: the processes must each have a GPU (refused if torch sees fewer); the device becomes "cuda".
        on_event: receives the run's events as `trainer.fit` gives them (with several processes, relayed from
            metrics.jsonl).
        stop_requested: polled while the run goes; True stops it after the current step (last.pt saved).
        on_log: receives the processes' output lines (default: this module's logger at INFO); unused in one process.

    Raises:
        TrainingError (or the DatasetError / CheckpointError / ValueError a rank raised), with its message.
    """
    device = _device(config.device, processes, gpus)
    request = Request("fit", device, config=config.with_changes(device=device))
    return _start(request, Path(run_dir), processes, config.batch_size, on_event, stop_requested, on_log)


def resume(
    run_dir: str | Path,
    *,
    processes: int = 1,
    gpus: bool = False,
    on_event: EventCallback | None = None,
    stop_requested: Callable[[], bool] | None = None,
    on_log: Callable[[str], None] | None = None,
    **overrides: Any,
) -> FitResult:
    """Continues a run (`trainer.resume`, with its `overrides`) with any number of processes: the checkpoint does
    not depend on it."""
    run_dir = Path(run_dir)
    _, config = trainer.read_run_config(run_dir)
    overrides = {key: value for key, value in overrides.items() if value is not None}
    device = _device(overrides.get("device") or config.device, processes, gpus)
    if device != config.device:
        overrides["device"] = device
    request = Request("resume", device, overrides=overrides)
    return _start(request, run_dir, processes, config.batch_size, on_event, stop_requested, on_log)


def _device(device: str, processes: int, gpus: bool) -> str:
    if not gpus:
        return device
    check_gpus(processes)
    if device == "cpu":
        raise TrainingError("--gpus trains on GPUs: drop --device cpu (or use --nproc for CPU processes)")
    return "cuda"


def _start(
    request: Request,
    run_dir: Path,
    processes: int,
    batch_size: int,
    on_event: EventCallback | None,
    stop_requested: Callable[[], bool] | None,
    on_log: Callable[[str], None] | None,
) -> FitResult:
    check_processes(processes, batch_size)
    if processes == 1:
        return request.run(run_dir, World(), on_event, stop_requested)
    return _launch(request, run_dir, processes, on_event, stop_requested, on_log)


# ----------------------------------------------------------------------------------------------------------------
# Several processes: torchrun
# ----------------------------------------------------------------------------------------------------------------


def torchrun_command(processes: int, control_dir: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(processes),
        "-m",
        MODULE,
        "--run-dir",
        str(run_dir),
        "--control",
        str(control_dir),
    ]


def _launch(
    request: Request,
    run_dir: Path,
    processes: int,
    on_event: EventCallback | None,
    stop_requested: Callable[[], bool] | None,
    on_log: Callable[[str], None] | None,
) -> FitResult:
    run_dir.mkdir(parents=True, exist_ok=True)
    control_dir = Path(tempfile.mkdtemp(prefix="yolodex-ddp-"))
    (control_dir / "request.json").write_text(request.to_json())
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
    """Rank 0's FitResult fields, or the error a rank raised (as its own type when it is one of `RAISED_AS`)."""
    result_path = control_dir / "result.json"
    if returncode == 0 and result_path.is_file():
        result = json.loads(result_path.read_text())
        return {**result, "run_dir": Path(result["run_dir"])}
    errors = sorted(control_dir.glob("error-rank*.json"), key=lambda path: path.stat().st_mtime_ns)
    if errors:  # the first to fail; the others then fail on their lost peers
        error = json.loads(errors[0].read_text())
        raise RAISED_AS.get(error["type"], TrainingError)(error["message"])
    tail = log_path.read_text(errors="replace").splitlines()[-15:] if log_path.exists() else []
    raise TrainingError(
        f"distributed training failed (torchrun exit status {returncode}); the end of {log_path}:\n" + "\n".join(tail)
    )


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
            if MODULE.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                groups.append(pid)
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    if process.poll() is None:
        process.wait()


def main(argv: list[str] | None = None) -> int:
    """One rank of a distributed run, started by torchrun: runs the request in `--control` with this rank's World."""
    parser = argparse.ArgumentParser(description="one rank of a distributed training run (started by torchrun)")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--control", type=Path, required=True, help="holds request.json; result and stop files")
    args = parser.parse_args(argv)
    request = Request.from_json((args.control / "request.json").read_text())
    rank = int(os.environ.get("RANK", 0))
    (args.control / f"pid-rank{rank}").write_text(str(os.getpid()))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    try:
        world = world_from_env(request.device)
        stop_file = args.control / "stop"
        result = request.run(args.run_dir, world, None, stop_file.exists if world.is_main else None)
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
