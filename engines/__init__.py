"""TensorRT / TensorRT-RTX engine building and engine descriptions."""
