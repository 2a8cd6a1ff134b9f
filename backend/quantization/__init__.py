"""INT8 quantization of exported YOLO-NAS ONNX files: onnxruntime static PTQ (QDQ), the sensitivity scan and the
automatic float policy, quantization-aware training, and the FP32-vs-INT8 report (`pipeline.quantize_run`)."""

from backend.quantization.calibration import CalibrationImages
from backend.quantization.ptq import (
    calibrate,
    default_float_nodes,
    executed_op_types,
    preprocess_fp32,
    quantize_calibrated,
    quantize_onnx,
)

__all__ = [
    "CalibrationImages",
    "calibrate",
    "default_float_nodes",
    "executed_op_types",
    "preprocess_fp32",
    "quantize_calibrated",
    "quantize_onnx",
]
