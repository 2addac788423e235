"""What a denoiser is, as the user names it: one grammar for dtq-sample ``--backend``,
dtq-compare ``--reference/--candidate`` and dtq-bench ``--backends``.

=================  ==========================================================================
spec               denoiser
=================  ==========================================================================
``torch``          the PyTorch model (in the tool's dtype); ``torch:fp16`` / ``torch:bf16`` /
                   ``torch:fp32`` name the dtype
``sim:DIR``        the recipe's fake-quant simulation (``recipe.apply_recipe``): the numbers
                   calibration measured, in float arithmetic
``recipe:DIR``     the quantized PyTorch engine (``qengine.build_qengine``): real INT8/FP8/INT4
                   kernels on CUDA, bit-identical to ``sim:DIR`` on the CPU
``onnx:FILE``      an ONNX export through ONNX Runtime (``onnx:DIR`` reads ``DIR/model.onnx``)
``trt:DIR``        a TensorRT or TensorRT-RTX engine directory (engine.plan + engine.json)
``PATH``           resolved by what it is: an ``.onnx`` file (or a directory with model.onnx)
                   is ``onnx``, a directory with engine.plan ``trt``, a directory with
                   recipe.json ``recipe`` (the engine, as in every tool)
=================  ==========================================================================

Parsing is done once (:func:`parse_denoiser_spec`) into a :class:`DenoiserSpec`; opening it is
``runtime.open.open_denoiser``. This module imports neither torch nor any backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..artifacts import ENGINE_PLAN as PLAN, ONNX_IN_DIR, RECIPE_JSON

Kind = Literal["torch", "sim", "recipe", "onnx", "trt"]
KINDS: tuple[str, ...] = ("torch", "sim", "recipe", "onnx", "trt")
MODULE_KINDS = ("torch", "sim", "recipe")  # opened as a PyTorch module (hookable, compilable)
DTYPE_NAMES = ("fp32", "fp16", "bf16")

FORMS = ("torch, torch:fp32|fp16|bf16, sim:DIR (recipe simulation), recipe:DIR (quantized PyTorch engine), "
         "onnx:FILE (ONNX Runtime), trt:DIR (TensorRT engine directory), or a path: an .onnx file, "
         "a directory with engine.plan, or a directory with recipe.json (= recipe:DIR)")


@dataclass(frozen=True)
class DenoiserSpec:
    kind: Kind
    path: Path | None = None  # every kind but torch
    dtype: str | None = None  # torch:DTYPE only; None = the caller's dtype

    def __str__(self) -> str:
        if self.kind == "torch":
            return "torch" + (f":{self.dtype}" if self.dtype else "")
        return f"{self.kind}:{self.path}"

    @property
    def is_module(self) -> bool:
        return self.kind in MODULE_KINDS


def parse_denoiser_spec(spec: str | DenoiserSpec) -> DenoiserSpec:
    """``spec`` as a :class:`DenoiserSpec`; ValueError naming the accepted forms otherwise.

    An explicit kind (``recipe:DIR``) is not checked against the file system here: opening it
    says what is missing. A bare path must exist and be recognisable."""
    if isinstance(spec, DenoiserSpec):
        return spec
    text = str(spec).strip()
    if not text:
        raise ValueError(f"empty denoiser spec; use one of: {FORMS}")
    head, sep, rest = text.partition(":")
    if head == "torch":
        if sep and rest not in DTYPE_NAMES:
            raise ValueError(f"{text!r}: use torch, or torch:DTYPE with DTYPE one of {', '.join(DTYPE_NAMES)}")
        return DenoiserSpec("torch", dtype=rest or None)
    if sep and head in KINDS:
        if not rest:
            raise ValueError(f"{text!r}: {head}: needs a path; use one of: {FORMS}")
        path = Path(rest)
        if head == "onnx" and path.is_dir():
            path = path / ONNX_IN_DIR
        return DenoiserSpec(head, path)
    return _from_path(text)


def _from_path(text: str) -> DenoiserSpec:
    path = Path(text)
    if path.is_file() and path.suffix == ".onnx":
        return DenoiserSpec("onnx", path)
    if path.is_dir():
        if (path / PLAN).is_file():
            return DenoiserSpec("trt", path)
        if (path / RECIPE_JSON).is_file():
            return DenoiserSpec("recipe", path)
        if (path / ONNX_IN_DIR).is_file():
            return DenoiserSpec("onnx", path / ONNX_IN_DIR)
    what = ("no such file or directory" if not path.exists() else
            "a directory without engine.plan, recipe.json or model.onnx" if path.is_dir() else "not an .onnx file")
    raise ValueError(f"{text!r}: {what}; a denoiser is one of: {FORMS}")
