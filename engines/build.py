"""``build_engine(BuildConfig)``: ONNX -> engine directory, with TensorRT or TensorRT for RTX.

One code path (see ``engines.trt``): parse strongly typed (Q/DQ graphs carry their own types: no
precision flags), one optimization profile over a batch range for every input's dim 0, workspace
limit, builder optimization level, timing cache read and written back, then ``engine.plan`` +
``engine.json`` written atomically. Everything up to importing TensorRT validates the inputs
(ONNX readable and valid, batch range inside the ONNX's, output path usable), so a machine
without TensorRT still reports bad input as such; with neither flavour installed the error names
the packages (``TensorRTUnavailable``, exit code 2 in the CLI).

Polygraphy's TensorRT loaders pick ``tensorrt`` or ``tensorrt_rtx`` from a process-wide
environment variable read at import (``POLYGRAPHY_USE_TENSORRT_RTX``), which does not fit a
per-call ``--backend``; the few builder calls are made directly instead.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from .. import __version__ as DTQ_VERSION
from .. import artifacts, formats
from ..checks import check_finite_fields, check_output_path
from .engine_dir import META, EngineDirError, EngineMeta, write_engine_dir
from .trt import RTX_COMPUTE_CAPABILITIES, RTX_DEFAULT_TARGET, Backend, load_backend, query_gpu, sm_to_cc



def _meta(text: str) -> dict:
    return {"help": text}


class BuildUsageError(ValueError):
    """Bad input to a build (exit code 2)."""


class BuildError(RuntimeError):
    """TensorRT's parser or builder failed (exit code 1); ``errors`` holds its messages."""

    def __init__(self, message: str, errors: list[str] | None = None, stage: str = "build", layers: int = 0):
        super().__init__(message + ("".join(f"\n  {e}" for e in errors) if errors else ""))
        self.errors = errors or [message]
        self.stage = stage  # "parse" | "build"
        self.layers = layers


@dataclass
class Plan:
    plan: bytes
    inputs: dict
    outputs: dict
    layers: int


@dataclass
class BuildConfig:
    onnx: Path = field(metadata=_meta("the ONNX model (dtq-export output)"))
    out: Path = field(metadata=_meta("engine directory to write (engine.plan + engine.json)"))
    backend: Literal["auto", "tensorrt", "tensorrt-rtx"] = field(default="auto", metadata=_meta(
        "TensorRT flavour: tensorrt (>= 10, data-center GPUs), tensorrt-rtx (RTX GPUs), auto = the installed one "
        "(tensorrt first)"))
    min_batch: int = field(default=1, metadata=_meta("smallest batch of the optimization profile"))
    opt_batch: int | None = field(default=None, metadata=_meta("batch the builder tunes for (default: max batch)"))
    max_batch: int | None = field(default=None, metadata=_meta(
        "largest batch (default: the ONNX's batch range maximum, else 16); guidance doubles the sampler's batch"))
    timing_cache: Path | None = field(default=None, metadata=_meta(
        "timing cache file: read when present, written back after the build (speeds up rebuilds)"))
    opt_level: int = field(default=3, metadata=_meta("builder optimization level 0..5 (higher: slower build, faster engine)"))
    workspace_gb: float | None = field(default=None, metadata=_meta("workspace memory pool limit in GiB (default: TensorRT's)"))
    compute_capability: list[str] | None = field(default=None, metadata=_meta(
        f"TensorRT-RTX targets ({', '.join(RTX_COMPUTE_CAPABILITIES)}; default: this GPU, or {RTX_DEFAULT_TARGET} "
        "without one); TensorRT builds for the GPU it runs on"))
    verbose: bool = field(default=False, metadata=_meta("TensorRT's INFO log"))

    def __post_init__(self) -> None:
        check_finite_fields(self)
        self.onnx, self.out = Path(self.onnx), Path(self.out)
        if self.timing_cache is not None:
            self.timing_cache = Path(self.timing_cache)


@dataclass
class BuildReport:
    out: Path
    meta: EngineMeta
    seconds: float
    plan_bytes: int


@dataclass
class OnnxFacts:
    inputs: dict[str, tuple[list, str]]  # name -> (shape with -1 for dynamic dims, elem type name)
    outputs: dict[str, tuple[list, str]]
    metadata: dict[str, str]
    sha256: str
    dynamic_act_qdq: int = 0  # QuantizeLinear nodes whose scale another node computes (per-token activations)


def inspect_onnx(path: Path) -> OnnxFacts:
    """Read and check the ONNX (external data included) without TensorRT."""
    import onnx

    from ..onnx_file import OnnxFileError, open_onnx

    try:
        model = open_onnx(path)  # also a truncated or missing external data file
    except OnnxFileError as exc:
        raise BuildUsageError(str(exc)) from exc
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:  # ValidationError, ...
        raise BuildUsageError(f"{path}: not a valid ONNX model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc

    def shapes(values) -> dict[str, tuple[list, str]]:
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
            out[v.name] = (dims, onnx.TensorProto.DataType.Name(t.elem_type))
        return out

    inits = {i.name for i in model.graph.initializer}
    meta = artifacts.read_onnx_metadata(model)
    computed = {o for n in model.graph.node for o in n.output}
    dynamic = sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 1
                  and n.input[1] in computed)
    return OnnxFacts(shapes(v for v in model.graph.input if v.name not in inits), shapes(model.graph.output),
                     meta, artifacts.file_sha256(path), dynamic)


def _tensorrt_refusals(metadata: dict[str, str]) -> list[str]:
    """What the precision table says TensorRT refuses among the graph's layer precisions (dtq-export
    records them; a graph without the key, e.g. from elsewhere, is left to the builder)."""
    try:
        layer_precisions = artifacts.metadata_json(metadata, artifacts.META_LAYER_PRECISIONS, {})
    except ValueError:
        return []
    known = [p for p in set(layer_precisions.values()) if p in formats.PRECISIONS]
    return formats.tensorrt_refusals(known)


def _batch_profile(cfg: BuildConfig, facts: OnnxFacts) -> tuple[int, int, int]:
    onnx_range = None
    if "batch_range" in facts.metadata:
        try:
            onnx_range = [int(v) for v in json.loads(facts.metadata["batch_range"])]
        except (ValueError, TypeError):
            onnx_range = None
    max_b = cfg.max_batch if cfg.max_batch is not None else (onnx_range[1] if onnx_range else 16)
    opt_b = cfg.opt_batch if cfg.opt_batch is not None else max_b
    if not 1 <= cfg.min_batch <= opt_b <= max_b:
        raise BuildUsageError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {cfg.min_batch}, {opt_b}, {max_b}")
    if onnx_range and not (onnx_range[0] <= cfg.min_batch and max_b <= onnx_range[1]):
        raise BuildUsageError(f"batch range {cfg.min_batch}..{max_b} is outside the ONNX's exported range "
                              f"{onnx_range[0]}..{onnx_range[1]}; re-export with --min-batch/--max-batch")
    return cfg.min_batch, opt_b, max_b


def validate(cfg: BuildConfig) -> tuple[OnnxFacts, tuple[int, int, int]]:
    """Every check that needs no TensorRT."""
    if cfg.out.exists() and (not cfg.out.is_dir() or (any(cfg.out.iterdir()) and not (cfg.out / META).is_file())):
        raise BuildUsageError(f"{cfg.out} exists and is not an engine directory; refusing to replace it")
    try:
        check_output_path(cfg.out, "dir", marker=META)  # a parent that is a file, no write permission
    except ValueError as exc:
        raise BuildUsageError(str(exc)) from exc
    facts = inspect_onnx(cfg.onnx)
    if not facts.inputs:
        raise BuildUsageError(f"{cfg.onnx}: the graph has no inputs")
    for name, (shape, _) in facts.inputs.items():
        if not shape:
            raise BuildUsageError(f"{cfg.onnx}: input {name!r} is a scalar; dtq engines batch along dim 0")
        if any(d < 0 for d in shape[1:]):
            raise BuildUsageError(f"{cfg.onnx}: input {name!r} has dynamic non-batch dims {shape}")
    refused = _tensorrt_refusals(facts.metadata)
    if facts.dynamic_act_qdq:
        refused.append(f"{facts.dynamic_act_qdq} activation quantizers with computed scales: {formats.TOKEN_TENSORRT_NOTE}")
    if refused:
        raise BuildUsageError(f"{cfg.onnx}: TensorRT cannot build this graph's precision: " + "; ".join(refused))
    profile = _batch_profile(cfg, facts)
    if not 0 <= cfg.opt_level <= 5:
        raise BuildUsageError(f"opt_level must be 0..5, got {cfg.opt_level}")
    if cfg.workspace_gb is not None and not cfg.workspace_gb > 0:
        raise BuildUsageError(f"workspace_gb must be positive, got {cfg.workspace_gb}")
    if cfg.timing_cache is not None and cfg.timing_cache.exists() and not cfg.timing_cache.is_file():
        raise BuildUsageError(f"timing cache {cfg.timing_cache} is not a file")
    for cc in cfg.compute_capability or []:
        if cc.upper() not in RTX_COMPUTE_CAPABILITIES:
            raise BuildUsageError(f"unknown compute capability {cc!r}; TensorRT-RTX targets: {', '.join(RTX_COMPUTE_CAPABILITIES)}")
    return facts, profile


def _targets(cfg: BuildConfig, backend: Backend, log: Callable[[str], None]) -> tuple[list[str], str | None]:
    """(target SM names for RTX / [] for TensorRT, build GPU name)."""
    gpu = query_gpu()
    if not backend.is_rtx:
        if cfg.compute_capability:
            raise BuildUsageError("--compute-capability applies to TensorRT-RTX only; TensorRT builds for this GPU")
        if gpu is None:
            raise BuildUsageError("TensorRT builds need a CUDA GPU (none visible); TensorRT-RTX builds without one")
        return [gpu.sm], gpu.name
    if cfg.compute_capability:
        return [c.upper() for c in cfg.compute_capability], gpu.name if gpu else None
    if gpu is not None and gpu.sm in RTX_COMPUTE_CAPABILITIES:
        return [gpu.sm], gpu.name
    if gpu is not None:
        log(f"this GPU ({gpu.name}, {gpu.sm}) cannot run TensorRT-RTX engines; building for {RTX_DEFAULT_TARGET}")
    return [RTX_DEFAULT_TARGET], None


def build_plan(backend: Backend, onnx_path: Path, profile: tuple[int, int, int], *, opt_level: int = 3,
               workspace_gb: float | None = None, targets: list[str] | None = None,
               timing_cache: Path | None = None, verbose: bool = False,
               log: Callable[[str], None] = lambda s: None) -> Plan:
    """The shared parse + build (``dtq-build-engine`` and ``trt_rtx.build_rtx_engine``)."""
    trt = backend.trt
    logger = backend.logger(verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    log(f"parsing {onnx_path} with {backend.name} {backend.version}")
    if not parser.parse_from_file(str(Path(onnx_path).resolve())):  # resolves external data
        raise BuildError(f"{backend.name}'s ONNX parser rejected {onnx_path}",
                         [str(parser.get_error(i)) for i in range(parser.num_errors)], stage="parse")
    config = builder.create_builder_config()
    config.builder_optimization_level = opt_level
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if backend.is_rtx:  # API difference: RTX targets compute capabilities, TensorRT the current GPU
        targets = targets or [RTX_DEFAULT_TARGET]
        config.num_compute_capabilities = len(targets)
        for i, sm in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, sm), i)
    cache = None
    if timing_cache is not None and backend.is_rtx:  # API difference: no-ops since TensorRT-RTX 1.2
        log(f"timing cache {timing_cache} ignored: TensorRT-RTX has no build-time timing cache "
            "(it picks kernels on the target GPU at run time)")
        timing_cache = None
    if timing_cache is not None:
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
        log(f"timing cache {timing_cache} ({'read ' + str(len(blob)) + ' bytes' if blob else 'new'})")
    lo, opt, hi = profile
    prof = builder.create_optimization_profile()
    inputs, outputs = {}, {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = list(t.shape)
        if not shape or any(d < 0 for d in shape[1:]):
            raise BuildUsageError(f"input {t.name} has shape {shape}: dtq engines batch along dim 0 only")
        dims = [[b, *shape[1:]] for b in (lo, opt, hi)]
        prof.set_shape(t.name, *dims)
        inputs[t.name] = {"min": dims[0], "opt": dims[1], "max": dims[2], "dtype": str(t.dtype).split(".")[-1]}
    for i in range(network.num_outputs):
        t = network.get_output(i)
        outputs[t.name] = {"shape": list(t.shape), "dtype": str(t.dtype).split(".")[-1]}
    config.add_optimization_profile(prof)
    log(f"building ({network.num_layers} layers, batch {lo}..{hi} opt {opt}, opt level {opt_level}"
        + (f", targets {','.join(targets)}" if backend.is_rtx else "") + ")")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"{backend.name}'s builder failed for {onnx_path} (build_serialized_network returned None; "
                         "see the TensorRT log)", layers=network.num_layers)
    if cache is not None:
        data = bytes(config.get_timing_cache().serialize())
        tmp = timing_cache.with_name(f".{timing_cache.name}.partial-{os.getpid()}")
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, timing_cache)
        log(f"timing cache written: {timing_cache} ({len(data)} bytes)")
    return Plan(bytes(plan), inputs, outputs, network.num_layers)


def build_engine(cfg: BuildConfig, log: Callable[[str], None] = print, backend: Backend | None = None) -> BuildReport:
    t0 = time.perf_counter()
    facts, profile = validate(cfg)
    backend = backend or load_backend(cfg.backend)  # TensorRTUnavailable names what to install
    targets, gpu_name = _targets(cfg, backend, log)
    built = build_plan(backend, cfg.onnx, profile, opt_level=cfg.opt_level,
                                       workspace_gb=cfg.workspace_gb, targets=targets if backend.is_rtx else None,
                                       timing_cache=cfg.timing_cache, verbose=cfg.verbose, log=log)
    plan, inputs, outputs = built.plan, built.inputs, built.outputs
    seconds = time.perf_counter() - t0
    meta = EngineMeta(
        backend=backend.name, trt_version=backend.version, precision=facts.metadata.get(artifacts.META_PRECISION, "unknown"),
        target={"gpu_name": gpu_name, "compute_capabilities": [sm_to_cc(t) for t in targets]},
        inputs=inputs, outputs=outputs,
        onnx={"path": str(cfg.onnx.resolve()), "sha256": facts.sha256, "metadata": facts.metadata},
        build={"opt_level": cfg.opt_level, "workspace_gb": cfg.workspace_gb,
               "timing_cache": str(cfg.timing_cache) if cfg.timing_cache else None,
               "seconds": round(seconds, 3), "dtq_version": DTQ_VERSION},
        plan_sha256=hashlib.sha256(plan).hexdigest(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    try:
        write_engine_dir(cfg.out, plan, meta)
    except EngineDirError as exc:
        raise BuildUsageError(str(exc)) from exc
    log(f"wrote {cfg.out} ({len(plan) / 1e6:.1f} MB plan, {meta.precision}, {backend.name} {backend.version}, "
        f"{seconds:.1f} s)")
    return BuildReport(cfg.out, meta, seconds, len(plan))
