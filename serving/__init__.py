"""multiclip serving: torch-free batch inference on onnxruntime (see the ONNX issue)."""
