"""``ExportConfig``: what ``dtq-export`` writes, as one dataclass the Python API takes and the CLI is
generated from (``tools.cli.add_dataclass_arguments``). Free of torch and onnx, so ``dtq-export
--help`` works on a base install; ``export.api.export_model`` does the work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

from .. import formats

if TYPE_CHECKING:
    from ..runtime.recipe import Recipe

DTYPE_NAMES = ("fp32", "fp16")  # float types of a graph (export.api.DTYPES maps them to torch)


class ExportUsageError(ValueError):
    """Bad input: unknown precision, missing recipe, a --precision the recipe does not have (exit 2)."""


def _h(text: str) -> dict:
    return {"help": text}


PrecisionName = Literal["fp32", "fp16", "int8", "fp8", "w8a16", "w4a16", "w4a8"]  # = dtq.formats.PRECISIONS


@dataclass
class ExportConfig:
    """What ``dtq-export`` writes; the CLI's options are these fields."""

    out: str = field(metadata=_h("output FILE.onnx"))
    ckpt: str | None = field(default=None, metadata=_h("DiT checkpoint (.pt/.safetensors, facebookresearch layout) or diffusers DiT folder"))
    model: str | None = field(default=None, metadata=_h("or a built-in model name (e.g. dit-tiny-fmnist)"))
    recipe: str | None = field(default=None, metadata=_h(
        "recipe directory from dtq-calibrate: the graph gets its precision (per layer) and Q/DQ"))
    precision: PrecisionName | None = field(default=None, metadata=_h(
        "without a recipe: fp32 or fp16 (default fp16). With one: asserts the recipe's precision (it is read "
        "from the recipe), or names its TensorRT fallback (w4a8 recipe -> w4a16: activation Q/DQ dropped)"))
    opset: int | None = field(default=None, metadata=_h(
        "ai.onnx opset (default: the largest minimum of the graph's precisions: 18, int8/fp8/w8a16 19, w4a* 21)"))
    dtype: Literal["fp32", "fp16"] | None = field(default=None, metadata=_h("float type of a quantized graph (default fp16)"))
    text_tokens: int = field(default=120, metadata=_h(
        "text-conditioned models (PixArt): caption tokens of the graph's context input (PixArt-alpha 120, Sigma 300)"))
    min_batch: int = field(default=1, metadata=_h("smallest batch of the dynamic batch range"))
    max_batch: int = field(default=64, metadata=_h("largest batch of the dynamic batch range"))
    fp8_ops: Literal["onnx", "trt"] = field(default="onnx", metadata=_h(
        "FP8 Q/DQ as opset-19 ONNX ops or TensorRT's trt::TRT_FP8* ops"))
    external_data: bool | None = field(default=None, metadata=_h(
        "weights to FILE.onnx.<token>.data (default: when > 1 GiB)"))
    rule_check: bool = field(default=True, metadata=_h(
        "run the TensorRT rule check (--no-rule-check skips it; the ONNX checker still runs)"))

    def precision_for(self, recipe: "Recipe | None") -> tuple[str, str | None]:
        """(the graph's precision, the TensorRT fallback applied to the recipe or None).

        With a recipe the precision is the recipe's: ``precision`` may only repeat it or name its
        documented TensorRT fallback. Without one it chooses fp32/fp16."""
        if self.precision is not None and self.precision not in formats.PRECISIONS:
            raise ExportUsageError(f"unknown precision {self.precision!r}; known: {', '.join(formats.PRECISIONS)}")
        if recipe is None:
            precision = self.precision or (self.dtype or "fp16")
            if formats.get_precision(precision).quantized:
                raise ExportUsageError(f"precision {precision} needs a recipe (dtq-calibrate --precision {precision} "
                                       "--out DIR, then --recipe DIR)")
            return precision, None
        own = recipe.precision
        if self.precision in (None, own):
            return own, None
        if formats.get_precision(own).tensorrt_fallback == self.precision:
            return self.precision, self.precision
        fallback = formats.get_precision(own).tensorrt_fallback
        also = f" or its TensorRT fallback {fallback}" if fallback else ""
        raise ExportUsageError(f"the recipe is precision {own} (recipe.json), but --precision {self.precision} was "
                               f"given: omit --precision, or give {own}{also}; for another precision recalibrate "
                               f"(dtq-calibrate --precision {self.precision})")

    def check_usage(self) -> None:
        """The checks that need neither the model nor the recipe."""
        if self.precision is not None and self.precision not in formats.PRECISIONS:
            raise ExportUsageError(f"unknown precision {self.precision!r}; known: {', '.join(formats.PRECISIONS)}")
        if not 1 <= self.min_batch <= self.max_batch:
            raise ExportUsageError(f"bad batch range {self.min_batch}..{self.max_batch}")
        if self.text_tokens < 1:
            raise ExportUsageError(f"text_tokens must be >= 1, got {self.text_tokens}")
        if (self.ckpt is None) == (self.model is None):
            raise ExportUsageError("give exactly one of ckpt (a checkpoint path) or model (a built-in name)")
        if not str(self.out).endswith(".onnx"):
            raise ExportUsageError(f"output must end in .onnx: {self.out}")
        if self.fp8_ops not in ("onnx", "trt"):
            raise ExportUsageError(f"fp8_ops must be onnx or trt, got {self.fp8_ops!r}")

    def resolved(self, recipe: "Recipe | None" = None, precision: str | None = None) -> "ExportConfig":
        """A checked copy with precision, dtype and opset filled in. ``precision``: the graph's
        precision when the caller already resolved it (``precision_for``); without a recipe and
        without one, a quantized ``self.precision`` is kept (``build_graph`` takes the recipe)."""
        if precision is None:
            if recipe is None and self.precision is not None and formats.get_precision(self.precision).quantized:
                precision = self.precision
            else:
                precision, _ = self.precision_for(recipe)
        fp = not formats.get_precision(precision).quantized
        dtype = self.dtype or (precision if fp else "fp16")
        if dtype not in DTYPE_NAMES:
            raise ExportUsageError(f"dtype must be fp32 or fp16, got {dtype!r}")
        if fp and dtype != precision:
            raise ExportUsageError(f"precision {precision} with dtype {dtype}: give one of them")
        self.check_usage()
        graph_precisions = {precision} | (set(recipe.layer_precisions.values()) if recipe is not None else set())
        need = formats.min_opset(graph_precisions)  # fp32/fp16: 18 (the dynamo exporter's minimum)
        if recipe is not None and any(layer.act_granularity == "token" for layer in recipe.layers.values()):
            need = max(need, formats.TOKEN_MIN_OPSET)  # per-token Q/DQ: blocked along the channels
        opset = self.opset or need
        if opset < need:
            raise ExportUsageError(f"precision {precision} needs opset >= {need}, got {opset}")
        return ExportConfig(**{**asdict(self), "precision": precision, "dtype": dtype, "opset": opset})
