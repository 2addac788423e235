"""``export_model(config)``: checkpoint (+ recipe) -> checked ONNX file. The CLI parses into the
same :class:`ExportConfig`.

Pipeline: load the fp32 model -> (recipe: load with fingerprint check, formats must match the
precision) -> torch export in the graph's float type -> fold balancing, recipe weights (GPTQ),
low-rank side branches (surgery) -> Q/DQ -> ONNX
checker + TensorRT rule check -> atomic write with metadata. Nothing is written when a check
fails.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from ..checks import check_output_path
from ..runtime.checkpoint import load_checkpoint
from ..runtime.recipe import Recipe, load_recipe, rescaled_output_layers
from . import qdq, rules, surgery
from .onnx_export import IR_VERSION, MIN_OPSET, export_torch, find_linears
from .writer import write_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class ExportUsageError(ValueError):
    """Bad input: unknown precision, missing recipe, recipe of another precision (exit 2)."""


class ExportCheckError(RuntimeError):
    """The exported graph failed the ONNX checker or TensorRT's rules (exit 1)."""

    def __init__(self, message: str, report: rules.RuleReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class ExportConfig:
    out: str
    ckpt: str | None = None  # checkpoint path
    model: str | None = None  # or a built-in model name (dtq.runtime.zoo)
    precision: str = "fp16"  # fp32 | fp16 | int8 | fp8 | w4a16 | w4a8
    recipe: str | None = None  # recipe directory (required for quantized precisions)
    opset: int | None = None  # default: the precision's minimum (18, fp8 19, int4 21)
    dtype: str | None = None  # float type of a quantized graph: fp16 (default) or fp32
    min_batch: int = 1
    max_batch: int = 64
    fp8_ops: str = "onnx"  # onnx (opset 19 Q/DQ) | trt (trt::TRT_FP8* ops)
    external_data: bool | None = None  # None: by size (> 1 GiB of weights)
    check_rules: bool = True

    def resolved(self) -> "ExportConfig":
        if self.precision not in qdq.PRECISIONS:
            raise ExportUsageError(f"unknown precision {self.precision!r}; known: {', '.join(qdq.PRECISIONS)}")
        dtype = self.dtype or (self.precision if self.precision in DTYPES else "fp16")
        if dtype not in DTYPES:
            raise ExportUsageError(f"dtype must be fp32 or fp16, got {dtype!r}")
        if self.precision in DTYPES and dtype != self.precision:
            raise ExportUsageError(f"precision {self.precision} with dtype {dtype}: give one of them")
        need = max(qdq.MIN_OPSET[self.precision], MIN_OPSET)
        opset = self.opset or need
        if opset < need:
            raise ExportUsageError(f"precision {self.precision} needs opset >= {need}, got {opset}")
        if not 1 <= self.min_batch <= self.max_batch:
            raise ExportUsageError(f"bad batch range {self.min_batch}..{self.max_batch}")
        if (self.ckpt is None) == (self.model is None):
            raise ExportUsageError("give exactly one of ckpt (a checkpoint path) or model (a built-in name)")
        if not str(self.out).endswith(".onnx"):
            raise ExportUsageError(f"output must end in .onnx: {self.out}")
        if self.fp8_ops not in ("onnx", "trt"):
            raise ExportUsageError(f"fp8_ops must be onnx or trt, got {self.fp8_ops!r}")
        return ExportConfig(**{**asdict(self), "dtype": dtype, "opset": opset})


@dataclass
class ExportResult:
    path: Path
    report: rules.RuleReport
    metadata: dict = field(default_factory=dict)
    seconds: float = 0.0


def recipe_sha256(recipe: Recipe) -> str:
    """Content hash of a recipe (its JSON and every tensor), independent of where it was read."""
    h = hashlib.sha256(json.dumps(recipe.to_json(), sort_keys=True).encode())
    for key in sorted(recipe.tensors):
        t = recipe.tensors[key].detach().float().contiguous().cpu()
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def build_graph(model: nn.Module, cfg: ExportConfig, recipe: Recipe | None = None,
                fp_proto: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The (not yet checked) ModelProto for a resolved config. ``fp_proto``: reuse an FP export
    of ``model`` made with ``export_torch`` at the config's dtype and opset (a copy is edited)."""
    if fp_proto is None:
        proto = export_torch(model, dtype=DTYPES[cfg.dtype], opset=cfg.opset, min_batch=cfg.min_batch,
                             max_batch=cfg.max_batch)
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(fp_proto)
    if recipe is None:
        return proto
    graph = gs.import_onnx(proto)
    del proto
    master = surgery.MasterWeights.from_model(model, find_linears(graph))
    graph = surgery.apply_balancing(graph, master, recipe)
    graph = surgery.apply_recipe_weights(graph, master, recipe)
    graph = qdq.insert_qdq(graph, master, recipe, fp8_ops=cfg.fp8_ops)
    if cfg.fp8_ops == "trt":
        graph.import_domains = None
    out = gs.export_onnx(graph, do_type_check=True)
    del graph
    out.ir_version = IR_VERSION
    out.producer_name = "dtq"
    if cfg.fp8_ops == "trt" and not any(o.domain == "trt" for o in out.opset_import):
        out.opset_import.append(onnx.helper.make_opsetid("trt", 1))
    return out


def export_model(config: ExportConfig, model: nn.Module | None = None, recipe: Recipe | None = None) -> ExportResult:
    """Export per ``config``; ``model``/``recipe`` objects may be passed instead of being loaded."""
    t0 = time.perf_counter()
    cfg = config.resolved()
    check_output_path(cfg.out, "file")  # before the model is loaded and exported
    if model is None:
        if cfg.ckpt is not None:
            model = load_checkpoint(cfg.ckpt, dtype=torch.float32)
        else:
            from ..runtime.zoo import load_builtin

            model = load_builtin(cfg.model, dtype=torch.float32)
    model = model.float().eval()
    if recipe is None and cfg.recipe is not None:
        recipe = load_recipe(cfg.recipe, model)  # refuses a recipe of another checkpoint
    quantized = qdq.PRECISIONS[cfg.precision] is not None
    if quantized and recipe is None:
        raise ExportUsageError(f"precision {cfg.precision} needs a recipe (dtq-calibrate --out DIR)")
    if not quantized and recipe is not None:
        raise ExportUsageError(f"precision {cfg.precision} is not quantized: it takes no recipe")
    if recipe is not None:
        try:
            qdq.check_recipe_precision(recipe, cfg.precision)
        except qdq.QDQError as exc:
            raise ExportUsageError(str(exc)) from exc
    proto = build_graph(model, cfg, recipe)
    report = rules.check_model(proto) if cfg.check_rules else rules.RuleReport()
    if not report.ok:
        raise ExportCheckError(report.format(), report)
    c = model.config
    metadata = {
        "precision": cfg.precision,
        "dtype": cfg.dtype,
        "opset": cfg.opset,
        "recipe_sha256": recipe_sha256(recipe) if recipe is not None else "",
        "recipe_method": recipe.method if recipe is not None else "",
        "rescaled_outputs": rescaled_output_layers(recipe) if recipe is not None else [],
        "inputs": {"x": ["batch", c.in_channels, c.input_size, c.input_size], "t": ["batch"], "y": ["batch"]},
        "outputs": {"out": ["batch", c.out_channels, c.input_size, c.input_size]},
        "batch_range": [cfg.min_batch, cfg.max_batch],
        "model_config": c.to_dict(),
        "fp8_ops": cfg.fp8_ops,
    }
    try:
        path = write_model(proto, cfg.out, metadata=metadata, external_data=cfg.external_data)
    except onnx.checker.ValidationError as exc:
        raise ExportCheckError(f"ONNX checker: {exc}") from exc
    return ExportResult(Path(path), report, metadata, time.perf_counter() - t0)
