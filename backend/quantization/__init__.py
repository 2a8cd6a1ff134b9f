"""INT8 quantization of exported YOLO-NAS ONNX files (onnxruntime static quantization, QDQ)."""

from backend.quantization.calibration import CalibrationImages
from backend.quantization.ptq import default_float_nodes, executed_op_types, quantize_onnx

__all__ = ["CalibrationImages", "default_float_nodes", "executed_op_types", "quantize_onnx"]
