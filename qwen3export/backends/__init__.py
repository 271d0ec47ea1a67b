"""Emit stage: one module per backend, each turning a captured program into engine files."""

BACKENDS = ("onnx", "aoti", "tensorrt", "kernels")
