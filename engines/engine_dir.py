"""The engine directory: ``engine.plan`` (the serialized engine) + ``engine.json`` (what it is for).

engine.json::

    {"schema": "dtq.engine", "schema_version": 1,
     "backend": "tensorrt" | "tensorrt-rtx", "trt_version": "10.x.y" / "1.7.1.116",
     "target": {"gpu_name": "NVIDIA H100 80GB HBM3" | null, "compute_capabilities": ["9.0"]},
     "precision": "int8", "inputs": {"x": {"min": [...], "opt": [...], "max": [...], "dtype": "FLOAT"}, ...},
     "outputs": {"out": {"shape": [-1, ...], "dtype": "FLOAT"}},
     "onnx": {"path": "...", "sha256": "...", "metadata": {...dtq.* props of the ONNX...}},
     "build": {"opt_level": 3, "workspace_gb": null, "timing_cache": null, "seconds": 12.3, "dtq_version": "..."},
     "plan_sha256": "...", "created": "2026-..."}

Loading checks it against the running GPU and TensorRT (:func:`check_compatible`): TensorRT plans
are tied to the TensorRT version and to the GPU's compute capability (TensorRT: the build GPU's;
RTX: the listed targets). A mismatch is refused with a message saying what to rebuild.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..artifacts import ENGINE_JSON as META, ENGINE_PLAN as PLAN, ENGINE_SCHEMA as SCHEMA
from ..staging import staged_directory

SCHEMA_VERSION = 1


class EngineDirError(ValueError):
    """Not an engine directory, or an engine.json that cannot be read (bad input: exit 2)."""


class EngineMismatch(EngineDirError):
    """The engine was built for another GPU or TensorRT version."""


@dataclass
class EngineMeta:
    backend: str
    trt_version: str
    precision: str
    target: dict = field(default_factory=dict)  # gpu_name, compute_capabilities
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    onnx: dict = field(default_factory=dict)
    build: dict = field(default_factory=dict)
    plan_sha256: str = ""
    created: str = ""
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def batch_range(self) -> tuple[int, int]:
        x = self.inputs.get("x", {})
        return int(x.get("min", [1])[0]), int(x.get("max", [1])[0])


def read_meta(directory: str | os.PathLike) -> EngineMeta:
    directory = Path(directory)
    path = directory / META
    if not directory.is_dir() or not path.is_file():
        raise EngineDirError(f"{directory}: not an engine directory (no {META}); build one with dtq-build-engine")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineDirError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise EngineDirError(f"{path}: not a dtq engine description")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise EngineDirError(f"{path}: engine.json schema version {data.get('schema_version')} is not supported "
                             f"(this dtq reads {SCHEMA_VERSION}); rebuild with dtq-build-engine")
    known = set(EngineMeta.__dataclass_fields__)
    missing = {"backend", "trt_version", "precision"} - set(data)
    if missing:
        raise EngineDirError(f"{path}: missing fields {sorted(missing)}")
    return EngineMeta(**{k: v for k, v in data.items() if k in known})


def check_compatible(meta: EngineMeta, *, backend: str, trt_version: str, gpu_name: str | None,
                     compute_capability: str | None, strict_gpu_name: bool = True) -> None:
    """Refuse an engine built for another TensorRT flavour/version or GPU.

    ``compute_capability`` as ``"9.0"``. TensorRT (data-center): the compute capability must be the
    build GPU's and, with ``strict_gpu_name``, the GPU model too (TensorRT itself only warns, but
    tactics tuned for another SKU are a silent slowdown). TensorRT-RTX: the GPU's compute
    capability must be one of the engine's targets."""
    rebuild = "rebuild it here with dtq-build-engine"
    if meta.backend != backend:
        raise EngineMismatch(f"engine was built with {meta.backend}, this runtime is {backend}; {rebuild}")
    if meta.trt_version != trt_version:
        raise EngineMismatch(f"engine was built with {meta.backend} {meta.trt_version}, the installed version is "
                             f"{trt_version}; {rebuild}")
    if compute_capability is None:
        raise EngineMismatch("no CUDA GPU is visible: a TensorRT engine needs one")
    targets = [str(c) for c in meta.target.get("compute_capabilities", [])]
    if compute_capability not in targets:
        raise EngineMismatch(f"engine targets compute capability {', '.join(targets) or '?'}, this GPU "
                             f"({gpu_name}) is {compute_capability}; {rebuild}")
    built_on = meta.target.get("gpu_name")
    if backend == "tensorrt" and strict_gpu_name and built_on and gpu_name and built_on != gpu_name:
        raise EngineMismatch(f"engine was built on {built_on}, this GPU is {gpu_name}; {rebuild} "
                             "(or load with strict_gpu_name=False)")


def write_engine_dir(directory: str | os.PathLike, plan: bytes, meta: EngineMeta) -> Path:
    """Write ``engine.plan`` + ``engine.json`` atomically (:func:`dtq.staging.staged_directory`): a
    reader never sees a plan without its description or a half-written plan."""
    directory = Path(directory)
    if directory.exists() and not (directory / META).is_file() and (not directory.is_dir() or any(directory.iterdir())):
        raise EngineDirError(f"{directory} exists and is not an engine directory; refusing to replace it")
    with staged_directory(directory, marker=META) as tmp:
        (tmp / PLAN).write_bytes(plan)
        (tmp / META).write_text(json.dumps(meta.to_json(), indent=1, allow_nan=False) + "\n")
    return directory
