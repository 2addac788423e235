"""Calibration and post-training quantization methods producing recipes (see METHODS.md)."""
