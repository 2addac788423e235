"""Parse an ONNX file and build a serialized engine with TensorRT for RTX (CPU-only builds work).

A small shared helper: ``dtq-build-engine`` owns profiles/timing caches/engine.json; this only
answers "does NVIDIA's parser accept the graph and does its builder produce a plan?". The
``tensorrt_rtx`` package is imported lazily, with an error that names the install command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

INSTALL_HINT = "pip install tensorrt-rtx==1.7.1.116"


class TensorRTUnavailable(ImportError):
    pass


def import_trt_rtx():
    try:
        import tensorrt_rtx as trt  # noqa: PLC0415 - optional, heavy dependency
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT for RTX is not installed: {INSTALL_HINT} ({exc})") from exc
    return trt


@dataclass
class BuildResult:
    parsed: bool
    built: bool
    plan: bytes | None = None
    errors: list[str] = field(default_factory=list)
    layers: int = 0

    @property
    def ok(self) -> bool:
        return self.parsed and self.built


def build_rtx_engine(
    onnx_path: str | os.PathLike,
    min_batch: int = 1,
    opt_batch: int = 2,
    max_batch: int = 4,
    compute_capability: str = "SM89",
    opt_level: int = 0,
) -> BuildResult:
    """Strongly-typed parse + build. Every input's dim 0 gets the batch profile; other dims are
    taken from the graph. ``compute_capability`` picks the target (no GPU is needed to build)."""
    trt = import_trt_rtx()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    result = BuildResult(parsed=False, built=False)
    # parse_from_file resolves external data next to the model
    if not parser.parse_from_file(str(Path(onnx_path).resolve())):
        result.errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        return result
    result.parsed = True
    result.layers = network.num_layers
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if compute_capability:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, compute_capability), 0)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        dims = [[b, *shape[1:]] for b in (min_batch, opt_batch, max_batch)]
        if any(d < 0 for d in shape[1:]):
            raise ValueError(f"input {tensor.name} has dynamic non-batch dims {shape}")
        profile.set_shape(tensor.name, *dims)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        result.errors = ["build_serialized_network returned None (see the TensorRT log)"]
        return result
    result.built = True
    result.plan = bytes(plan)
    return result
