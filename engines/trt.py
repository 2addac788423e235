"""One TensorRT code path for two products: TensorRT (>= 10, data-center GPUs, module ``tensorrt``)
and TensorRT for RTX (consumer RTX GPUs, module ``tensorrt_rtx``; builds without a GPU).

Their Python APIs are the same where dtq uses them (Builder, OnnxParser, BuilderConfig, Runtime,
optimization profiles, timing caches, memory pool limits). They differ in:

- target selection: RTX builds for listed compute capabilities (``set_compute_capability``; no GPU
  needed), TensorRT builds for the GPU it runs on;
- precision flags: none are needed by either here, since Q/DQ graphs are built strongly typed
  (RTX has no INT8/FP8 builder flags at all);
- which GPUs can run the engine (RTX: compute capability 8.x / 12.x; TensorRT: the build GPU's).

:class:`Backend` hides the module; everything else (``engines.build``, the runtime loader) takes a
``Backend`` and branches on ``backend.is_rtx`` only where the APIs differ.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
from dataclasses import dataclass

# the canonical names (CLI choices, engine.json "backend") and their Python modules
BACKENDS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL = {
    "tensorrt": "pip install 'tensorrt>=10' (data-center GPUs; needs NVIDIA's package index)",
    "tensorrt-rtx": "pip install tensorrt-rtx==1.7.1.116 (RTX GPUs; builds on CPU-only machines too)",
}
# compute capabilities TensorRT-RTX engines can target (its ComputeCapability enum names)
RTX_COMPUTE_CAPABILITIES = ("SM75", "SM80", "SM86", "SM89", "SM120", "SM121")
RTX_DEFAULT_TARGET = "SM89"


class TensorRTUnavailable(ImportError):
    """Neither (or not the requested) TensorRT flavour is importable; the message says what to install."""


@dataclass(frozen=True)
class Backend:
    name: str  # "tensorrt" | "tensorrt-rtx"
    trt: object  # the imported module

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    @property
    def version(self) -> str:
        return str(self.trt.__version__)

    def logger(self, verbose: bool = False):
        sev = self.trt.Logger.INFO if verbose else self.trt.Logger.WARNING
        return self.trt.Logger(sev)


def install_message(which: str | None = None) -> str:
    names = [which] if which else list(BACKENDS)
    lines = [f"  {n}: {INSTALL[n]}" for n in names]
    what = "TensorRT" if which is None else which
    return f"{what} is not installed; install one of:\n" + "\n".join(lines)


def _import(name: str, modules: dict[str, str] | None = None):
    try:
        return importlib.import_module((modules or BACKENDS)[name])
    except ImportError:
        return None
    except Exception as exc:  # a broken install (missing libnvinfer...) is also "not available"
        raise TensorRTUnavailable(f"{(modules or BACKENDS)[name]} is installed but fails to import: {exc}") from exc


def available_backends() -> list[str]:
    return [n for n in BACKENDS if _import(n) is not None]


def load_backend(name: str = "auto", modules: dict[str, str] | None = None) -> Backend:
    """``auto``: TensorRT when installed (data-center GPUs), else TensorRT for RTX. ``modules``
    overrides the module names (tests use it to see the "neither installed" path)."""
    if name == "auto":
        for candidate in BACKENDS:
            mod = _import(candidate, modules)
            if mod is not None:
                return Backend(candidate, mod)
        raise TensorRTUnavailable(install_message())
    if name not in BACKENDS:
        raise ValueError(f"unknown TensorRT backend {name!r}; known: auto, {', '.join(BACKENDS)}")
    mod = _import(name, modules)
    if mod is None:
        raise TensorRTUnavailable(install_message(name))
    return Backend(name, mod)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"
    driver: str = ""

    @property
    def sm(self) -> str:
        """``SM90`` (TensorRT-RTX's spelling)."""
        return "SM" + self.compute_capability.replace(".", "")


def query_gpu(index: int = 0) -> GpuInfo | None:
    """The GPU by ``nvidia-smi`` (engines/ does not import torch); None without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader",
                              f"--id={index}"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    parts = [p.strip() for p in out.strip().splitlines()[0].split(",")] if out.strip() else []
    return GpuInfo(parts[0], parts[1], parts[2]) if len(parts) == 3 else None


def sm_to_cc(sm: str) -> str:
    """``SM89`` -> ``8.9``, ``SM120`` -> ``12.0``."""
    digits = sm.upper().removeprefix("SM")
    return f"{digits[:-1]}.{digits[-1]}"
