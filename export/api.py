"""``export_model(config)``: checkpoint (+ recipe) -> checked ONNX file. The CLI parses into the
same :class:`ExportConfig`.

Pipeline: load the fp32 model -> (recipe: load with fingerprint check; the graph's precision is
the recipe's, per layer) -> torch export in the graph's float type -> online input rotations (fc2's
Hadamard), fold balancing, recipe weights
(GPTQ), low-rank side branches (surgery) -> Q/DQ per layer -> ONNX
checker + TensorRT rule check -> atomic write with metadata. Nothing is written when a check
fails.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from .. import artifacts, formats
from ..checks import check_output_path
from ..runtime.checkpoint import load_checkpoint
from ..runtime.recipe import Recipe, load_recipe, rescaled_output_layers
from . import qdq, rules, surgery
from .config import ExportConfig, ExportUsageError  # noqa: F401  (re-exported: the API takes ExportConfig)
from .onnx_export import IR_VERSION, export_torch, find_linears, graph_inputs
from .writer import write_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class ExportCheckError(RuntimeError):
    """The exported graph failed the ONNX checker or TensorRT's rules (exit 1)."""

    def __init__(self, message: str, report: rules.RuleReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class ExportResult:
    path: Path
    report: rules.RuleReport
    metadata: dict = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # what the CLI prints besides rule warnings (TensorRT refusals)


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
                             max_batch=cfg.max_batch, text_tokens=cfg.text_tokens)
    else:
        proto = onnx.ModelProto()
        proto.CopyFrom(fp_proto)
    if recipe is None:
        return proto
    graph = gs.import_onnx(proto)
    del proto
    master = surgery.MasterWeights.from_model(model, find_linears(graph))
    graph = surgery.apply_rotations(graph, master, recipe)  # first: a run-time balancing Mul follows it
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


def export_model(config: ExportConfig, model: nn.Module | None = None, recipe: Recipe | None = None,
                 fp_proto: onnx.ModelProto | None = None) -> ExportResult:
    """Export per ``config``; ``model``/``recipe`` objects may be passed instead of being loaded.
    The graph's precision is the recipe's (``config.precision`` asserts it) or, without a recipe,
    fp32/fp16. ``fp_proto``: an FP export of ``model`` at the resolved dtype and opset to reuse
    (several precisions of one model; see ``build_graph``)."""
    t0 = time.perf_counter()
    config.check_usage()  # usage errors before loading anything
    check_output_path(config.out, "file")  # before the model is loaded and exported
    if config.recipe is None and recipe is None:
        config.precision_for(None)  # a quantized precision without a recipe
    if model is None:
        if config.ckpt is not None:
            model = load_checkpoint(config.ckpt, dtype=torch.float32)
        else:
            from ..runtime.zoo import load_builtin

            model = load_builtin(config.model, dtype=torch.float32)
    model = model.float().eval()
    if recipe is None and config.recipe is not None:
        recipe = load_recipe(config.recipe, model)  # refuses a recipe of another checkpoint
    precision, fallback = config.precision_for(recipe)
    warnings = []
    recipe_hash = recipe_sha256(recipe) if recipe is not None else ""  # of the recipe as written, before a fallback
    if recipe is not None:
        refused = formats.tensorrt_refusals(recipe.layer_precisions.values())
        if fallback is not None:
            recipe = qdq.weight_only_fallback(recipe, fallback)
        elif refused:
            warnings += [f"TensorRT cannot build this graph (ONNX Runtime runs it): {m}" for m in refused]
        if any(layer.act_granularity == "token" and layer.act_format != "none" for layer in recipe.layers.values()):
            warnings.append(f"TensorRT cannot build this graph (ONNX Runtime runs it): {formats.TOKEN_TENSORRT_NOTE}")
    cfg = config.resolved(recipe, precision)
    proto = build_graph(model, cfg, recipe, fp_proto)
    report = rules.check_model(proto) if cfg.rule_check else rules.RuleReport()
    if not report.ok:
        raise ExportCheckError(report.format(), report)
    c = model.config
    metadata = {
        artifacts.META_PRECISION: cfg.precision,
        artifacts.META_LAYER_PRECISIONS: recipe.layer_precisions if recipe is not None else {},
        artifacts.META_DTYPE: cfg.dtype,
        artifacts.META_OPSET: cfg.opset,
        artifacts.META_RECIPE_SHA256: recipe_hash,
        artifacts.META_RECIPE_METHOD: recipe.method if recipe is not None else "",
        artifacts.META_RESCALED_OUTPUTS: rescaled_output_layers(recipe) if recipe is not None else [],
        artifacts.META_INPUTS: graph_inputs(model, cfg.text_tokens),
        artifacts.META_OUTPUTS: {"out": ["batch", c.out_channels, c.input_size, c.input_size]},
        artifacts.META_BATCH_RANGE: [cfg.min_batch, cfg.max_batch],
        artifacts.META_MODEL_CONFIG: c.to_dict(),
        artifacts.META_FP8_OPS: cfg.fp8_ops,
    }
    try:
        path = write_model(proto, cfg.out, metadata=metadata, external_data=cfg.external_data)
    except onnx.checker.ValidationError as exc:
        raise ExportCheckError(f"ONNX checker: {exc}") from exc
    return ExportResult(Path(path), report, metadata, time.perf_counter() - t0, warnings)
