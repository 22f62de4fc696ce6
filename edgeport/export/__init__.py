"""torch -> artifacts (ONNX now; Core ML and TensorRT join here), and their verification."""
