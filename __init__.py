"""dtq: Diffusion Transformer checkpoints to quantized TensorRT engines, and sampling with them.

Subpackages: ``dtq.runtime`` (model, diffusion, sampler, backends), ``dtq.calibrate``
(calibration and PTQ recipes), ``dtq.export`` (ONNX and Q/DQ), ``dtq.engines`` (TensorRT
builds), ``dtq.tools`` (command-line tools and evaluation).
"""

__version__ = "0.1.0"
