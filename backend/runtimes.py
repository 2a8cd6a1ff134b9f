"""The runtimes an exported ONNX model runs in: onnxruntime (portable, the reference) and OpenVINO (Intel's runtime
for x86 CPUs, faster there for both FP32 and INT8 QDQ models; docs/runtimes.md).

`open_onnx(path, runtime="auto")` gives an `OnnxSession` whose `run(None, {"images": batch})` has onnxruntime's
call shape in every runtime, so the Predictor and everything timing it stay runtime-blind. The I/O contract is the
export's (docs/contracts.md §3): input `images` float32 (B, 3, H, W), outputs in the graph's order.

"auto" takes OpenVINO when it is installed, loads and compiles the model on this CPU, else onnxruntime; the reason
for falling back is logged once per process. "bf16" compute (an FP32 model run with bfloat16 arithmetic, a variant
of its own with its own accuracy) is offered only where the CPU has native bfloat16 (AVX512-BF16 or AMX).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

Runtime = Literal["auto", "onnxruntime", "openvino"]
Compute = Literal["f32", "bf16"]
RUNTIMES: tuple[str, ...] = ("auto", "onnxruntime", "openvino")
# Overrides "auto" for a whole installation (e.g. YOLODEX_RUNTIME=onnxruntime to compare, or on a CPU where
# OpenVINO misbehaves).
RUNTIME_ENV = "YOLODEX_RUNTIME"


class RuntimeUnavailable(RuntimeError):
    """The runtime asked for cannot run here; the message says why and what to do."""


@dataclass
class OnnxSession:
    """One ONNX model loaded in one runtime.

    Attributes:
        runtime: "onnxruntime" or "openvino".
        compute: "f32", or "bf16" (OpenVINO only: FP32 weights, bfloat16 arithmetic).
        input_names: the graph's input names, in order.
        output_count: how many outputs `run` returns.
        threads: intra-op threads asked for (None: the runtime's choice).
    """

    runtime: str
    compute: str
    input_names: list[str]
    output_count: int
    threads: int | None
    _run: Any = field(repr=False)

    def run(self, output_names: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Every output, in the graph's order (onnxruntime's `InferenceSession.run(None, feeds)` shape)."""
        del output_names
        return self._run(feeds)

    @property
    def label(self) -> str:
        """The runtime as pages and reports name it: "onnxruntime", "OpenVINO" or "OpenVINO bf16"."""
        return runtime_label(self.runtime, self.compute)


def runtime_label(runtime: str, compute: str = "f32") -> str:
    name = {"onnxruntime": "onnxruntime", "openvino": "OpenVINO", "torch": "PyTorch"}.get(runtime, runtime)
    return f"{name} bf16" if compute == "bf16" else name


@functools.cache
def _openvino_core() -> Any:
    """OpenVINO's Core, once per process (it enumerates devices and loads the CPU plugin)."""
    import openvino  # imported on first use: ~0.7 s, and only ONNX-model work needs it

    return openvino.Core()


def openvino_problem() -> str | None:
    """Why OpenVINO cannot run here (not installed, or its CPU plugin does not load), or None when it can."""
    try:
        core = _openvino_core()
    except ImportError as error:
        return f"OpenVINO is not installed ({error}); `make setup` installs it"
    except Exception as error:  # a wheel that does not load on this CPU or OS
        return f"OpenVINO does not load here ({type(error).__name__}: {error})"
    if "CPU" not in core.available_devices:
        return f"OpenVINO sees no CPU device (devices: {core.available_devices})"
    return None


def native_bf16() -> bool:
    """True when the CPU computes in bfloat16 natively (OpenVINO reports the BF16 capability: AVX512-BF16 or AMX)."""
    if openvino_problem() is not None:
        return False
    return "BF16" in _openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_runtime(runtime: str = "auto") -> str:
    """The runtime "auto" stands for here ("openvino" or "onnxruntime"); other names are checked and returned."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime != "auto":
        return runtime
    chosen = os.environ.get(RUNTIME_ENV, "").strip().lower()
    if chosen in ("onnxruntime", "openvino"):
        return chosen
    problem = openvino_problem()
    if problem is not None:
        _log_fallback_once(problem)
        return "onnxruntime"
    return "openvino"


@functools.cache
def _log_fallback_once(reason: str) -> None:
    logger.info("ONNX models run in onnxruntime: %s", reason)


def open_onnx(
    path: str | Path | bytes, *, runtime: str = "auto", compute: str = "f32", threads: int | None = None
) -> OnnxSession:
    """Loads `path` (an ONNX file, or a serialized model) in `runtime` ("auto": OpenVINO where it runs, else
    onnxruntime).

    Args:
        compute: "bf16" runs an FP32 model's arithmetic in bfloat16 (OpenVINO on a CPU with native bf16 only).
        threads: intra-op threads (None: the runtime's choice).

    Raises:
        RuntimeUnavailable: "openvino" or "bf16" asked for where they cannot run.
        Exception: the runtime's own error for a file it cannot load (the Predictor turns it into ModelFileError).
    """
    if compute not in ("f32", "bf16"):
        raise ValueError(f"compute must be 'f32' or 'bf16', got {compute!r}")
    asked = runtime
    runtime = resolve_runtime(runtime)
    if compute == "bf16":
        if runtime != "openvino":
            raise RuntimeUnavailable("bf16 compute runs in OpenVINO only; choose runtime 'openvino' or 'auto'")
        if not native_bf16():
            raise RuntimeUnavailable("this CPU has no native bfloat16 (AVX512-BF16 or AMX): run the model in f32")
    if runtime == "openvino":
        problem = openvino_problem()
        if problem is not None:
            raise RuntimeUnavailable(problem)
        name = "the serialized model" if isinstance(path, bytes) else Path(path).name
        try:
            if isinstance(path, bytes):  # OpenVINO reads ONNX from a file
                with tempfile.TemporaryDirectory(prefix="yolodex-onnx-") as scratch:
                    file = Path(scratch) / "model.onnx"
                    file.write_bytes(path)
                    return _open_openvino(file, compute, threads)  # compiled: the file is no longer needed
            return _open_openvino(Path(path), compute, threads)
        except Exception as error:
            if asked != "auto":
                raise
            _log_fallback_once(f"OpenVINO could not compile {name} ({type(error).__name__}: {error})")
    return _open_onnxruntime(path, threads)


def _open_onnxruntime(path: str | Path | bytes, threads: int | None) -> OnnxSession:
    # Imported here: each runtime loads only when a model is opened in it (about a second each).
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    source = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return OnnxSession(
        "onnxruntime",
        "f32",
        [item.name for item in session.get_inputs()],
        len(session.get_outputs()),
        threads,
        _run=lambda feeds: session.run(None, feeds),
    )


def _open_openvino(path: Path, compute: str, threads: int | None) -> OnnxSession:
    core = _openvino_core()
    model = core.read_model(str(path))
    # OpenVINO computes FP32 models in bf16 by default on CPUs that have it: f32 must be asked for explicitly.
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": compute}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    compiled = core.compile_model(model, "CPU", config)
    outputs = list(compiled.outputs)
    # An infer request holds its own output buffers and runs one inference at a time: one per calling thread
    # (Streamlit serves each browser session from its own thread).
    local = threading.local()

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        result = request.infer(feeds)
        # Copies: the arrays are views of the request's buffers, which the next inference overwrites.
        return [np.array(result[output], copy=True) for output in outputs]

    return OnnxSession(
        "openvino",
        compute,
        [item.get_any_name() for item in compiled.inputs],
        len(outputs),
        threads,
        _run=run,
    )


def save_openvino_ir(onnx_path: str | Path, xml_path: str | Path) -> Path:
    """Converts an exported ONNX model into OpenVINO's IR (`.xml` + `.bin` beside it), as `ov.save_model` writes it,
    with the weights kept in their precision (no FP16 compression: the INT8 QDQ model's scales stay exact)."""
    problem = openvino_problem()
    if problem is not None:
        raise RuntimeUnavailable(problem)
    # Imported here: OpenVINO is optional here and slow to import: loaded only when a model is opened in it.
    import openvino

    xml_path = Path(xml_path)
    model = _openvino_core().read_model(str(onnx_path))
    openvino.save_model(model, str(xml_path), compress_to_fp16=False)
    return xml_path
