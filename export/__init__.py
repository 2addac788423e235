"""ONNX export, graph surgery and Q/DQ insertion from a recipe."""
