"""Calibration and post-training quantization methods producing recipes (see docs/calibration.md)."""
