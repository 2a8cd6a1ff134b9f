"""Export of trained models: ONNX FP32 with decoding, optionally NMS, in the graph."""
