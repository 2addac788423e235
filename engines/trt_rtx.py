"""Parse an ONNX file and build a serialized engine with TensorRT for RTX (CPU-only builds work).

A small helper over the shared builder (``engines.build.build_plan``): it answers "does NVIDIA's
parser accept the graph and does its builder produce a plan?" without writing an engine
directory. ``dtq-build-engine`` owns profiles, timing caches and engine.json. The
``tensorrt_rtx`` package is imported lazily, with an error that names the install command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .trt import Backend, TensorRTUnavailable, load_backend

INSTALL_HINT = "pip install tensorrt-rtx==1.7.1.116"

__all__ = ["INSTALL_HINT", "TensorRTUnavailable", "BuildResult", "import_trt_rtx", "build_rtx_engine"]


def import_trt_rtx():
    try:
        return load_backend("tensorrt-rtx").trt
    except TensorRTUnavailable as exc:
        raise TensorRTUnavailable(f"TensorRT for RTX is not installed: {INSTALL_HINT} ({exc})") from exc


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
    from .build import BuildError, build_plan

    backend = Backend("tensorrt-rtx", import_trt_rtx())
    try:
        plan = build_plan(backend, Path(onnx_path), (min_batch, opt_batch, max_batch), opt_level=opt_level,
                          targets=[compute_capability] if compute_capability else None)
    except BuildError as exc:
        return BuildResult(parsed=exc.stage != "parse", built=False, errors=exc.errors, layers=exc.layers)
    return BuildResult(parsed=True, built=True, plan=plan.plan, layers=plan.layers)
