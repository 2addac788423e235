"""PyTorch DiT -> FP ONNX graph, with every checkpoint Linear findable by name.

Exporter: torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``) at opset >= 18. It
gives a clean graph (no Constant-node clutter, SDPA as MatMul/Softmax/MatMul) and records the
module path of every node in ``pkg.torch.onnx.name_scopes``. The dynamo exporter is broken at
opset 17 (invalid Split), so 18 is the floor; the legacy TorchScript exporter is deprecated and
renames the transposed Linear weights to ``onnx::MatMul_N``.

After export, :func:`canonicalize_linears` renames the nodes and weights of each Linear so that
the graph reads like the checkpoint:

- a Linear ``L`` on a 3-D input (qkv, proj, fc1, fc2, final_layer.linear) becomes
  ``MatMul`` node ``L/MatMul`` whose constant input 1 is ``L.weight`` holding ``W^T``
  (``[C_in, C_out]``), followed by ``Add`` node ``L/Add`` with ``L.bias``;
- a Linear on a 2-D input (t_embedder, adaLN_modulation) is ``Gemm`` node ``L/Gemm`` with
  ``transB=1`` and ``L.weight`` as ``W`` (``[C_out, C_in]``) and ``L.bias``.

:func:`find_linears` then returns a ``{checkpoint name: LinearSite}`` map of the graph.
"""

from __future__ import annotations

import ast
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from ..runtime.model import DiT

MIN_OPSET = 18
# onnxruntime 1.18+ reads IR 10; the exporter writes 10 at opset 18..21.
IR_VERSION = 10
_SCOPE_KEY = "pkg.torch.onnx.name_scopes"


class ExportError(RuntimeError):
    """The torch model could not be exported to a usable ONNX graph."""


class _ExportWrapper(nn.Module):
    """Fixed I/O for every precision: x float32 [B,C,H,W], t/y int64 [B] -> float32 output;
    the model itself runs in ``dtype`` (casts at the graph's boundary)."""

    def __init__(self, model: DiT, dtype: torch.dtype):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype), t, y).float()


class _TextExportWrapper(_ExportWrapper):
    """The same for a text-conditioned model: x, t, context float32 [B, tokens, D], mask [B, tokens]."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype), t, context.to(self.dtype), mask.to(self.dtype)).float()


def graph_inputs(model: nn.Module, text_tokens: int) -> dict[str, list]:
    """Input names and shapes (``"batch"`` for the dynamic dim) of the graph of ``model``."""
    c = model.config
    image = ["batch", c.in_channels, c.input_size, c.input_size]
    if _is_text_conditioned(model):
        return {"x": image, "t": ["batch"], "context": ["batch", text_tokens, c.caption_channels],
                "mask": ["batch", text_tokens]}
    return {"x": image, "t": ["batch"], "y": ["batch"]}


def _is_text_conditioned(model: nn.Module) -> bool:
    return getattr(model.config, "text_conditioned", False)  # runtime.pixart.PixArtDenoiser: (x, t, context, mask)


@dataclass(frozen=True)
class LinearSite:
    """Where a checkpoint Linear lives in the graph."""

    name: str  # checkpoint module name, e.g. "blocks.0.attn.qkv"
    node: str  # MatMul or Gemm node name
    op: str  # "MatMul" (weight [C_in, C_out]) or "Gemm" (weight [C_out, C_in], transB=1)
    weight: str  # initializer name
    bias: str | None  # initializer name
    bias_node: str | None  # the Add node after a MatMul (None for Gemm)

    @property
    def out_axis(self) -> int:
        """Axis of the weight initializer that indexes output channels."""
        return 1 if self.op == "MatMul" else 0


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def export_torch(
    model: DiT,
    dtype: torch.dtype = torch.float32,
    opset: int = MIN_OPSET,
    min_batch: int = 1,
    max_batch: int = 64,
    example_batch: int = 2,
    text_tokens: int = 120,
) -> onnx.ModelProto:
    """Export ``model`` (not modified; a cast copy is used for fp16) to an ONNX ModelProto with a
    dynamic batch dimension named ``batch`` on every input (x, t, y; or x, t, context, mask of a
    text-conditioned model, with ``text_tokens`` tokens) and out, then canonicalize Linear names."""
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} < {MIN_OPSET}: torch's dynamo exporter emits an invalid Split at opset 17")
    if not 1 <= min_batch <= max_batch:
        raise ExportError(f"bad batch range {min_batch}..{max_batch}")
    # an example batch of 1 would make torch.export specialize the dimension
    example_batch = min(max(example_batch, min_batch, 2), max_batch)
    cfg = model.config
    work = model if next(model.parameters()).dtype == dtype else _cast_copy(model, dtype)
    if _is_text_conditioned(model):
        wrapper = _TextExportWrapper(work.for_export(), dtype).eval()
        args = model.example_inputs(example_batch, text_tokens)
    else:
        wrapper = _ExportWrapper(work.eval(), dtype).eval()
        x = torch.randn(example_batch, cfg.in_channels, cfg.input_size, cfg.input_size)
        t = torch.arange(example_batch, dtype=torch.int64) * 7 % 1000
        y = torch.arange(example_batch, dtype=torch.int64) % cfg.num_classes
        args = (x, t, y)
    names = list(graph_inputs(model, text_tokens))
    batch = torch.export.Dim("batch", min=min_batch, max=max_batch)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=opset, input_names=names,
                output_names=["out"], dynamic_shapes={n: {0: batch} for n in names},
                external_data=True, optimize=True, verbose=False,
            )
        except Exception as exc:  # the exporter raises many types
            raise ExportError(f"torch.onnx.export failed: {exc}") from exc
    proto = program.model_proto
    del program
    proto.ir_version = IR_VERSION
    scopes = node_scopes(proto, strip_prefix="model.")  # the wrapper's attribute name
    graph = canonicalize_linears(drop_noop_squeezes(gs.import_onnx(proto)), linear_names(model), scopes)
    out = gs.export_onnx(graph, do_type_check=True)
    out.ir_version = IR_VERSION
    out.producer_name = "dtq"
    return out


def _cast_copy(model: DiT, dtype: torch.dtype) -> DiT:
    if not isinstance(model, DiT):  # another family (PixArt): a plain cast copy
        import copy as _copy

        return _copy.deepcopy(model).to(dtype).eval()
    with torch.device("meta"):
        copy = DiT(model.config)
    copy.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, assign=True)
    copy.pos_embed.requires_grad_(False)
    return copy.eval()


class _quiet_exporter:
    """Silence the exporter's progress prints and registration warnings (logging only)."""

    def __enter__(self):
        self._levels = {}
        for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript"):
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        return False


def node_scopes(proto: onnx.ModelProto, strip_prefix: str = "") -> dict[str, list[str]]:
    """``{node name: module name scopes}`` from the exporter's node metadata (which
    onnx-graphsurgeon does not carry, so it is read before import)."""
    out: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for prop in node.metadata_props:
            if prop.key == _SCOPE_KEY:
                try:
                    scopes = list(ast.literal_eval(prop.value))
                    out[node.name] = [s.removeprefix(strip_prefix) for s in scopes]
                except (ValueError, SyntaxError):
                    pass
    return out


def drop_noop_squeezes(graph: gs.Graph) -> gs.Graph:
    """Bypass ``Squeeze`` nodes on an axis whose static size is not 1. torch's ``squeeze(dim)`` is a
    no-op there, but the exporter emits the Squeeze under a dynamic batch (PixArt's
    ``hidden_states.squeeze(1)`` on ``[batch, tokens, C]``), which ONNX shape inference rejects."""
    dropped = 0
    for node in list(graph.nodes):
        if node.op != "Squeeze" or len(node.inputs) != 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        src, out = node.inputs[0], node.outputs[0]
        shape = src.shape
        if shape is None or out.shape is None or list(shape) != list(out.shape):
            continue
        axes = [int(a) % len(shape) for a in np.asarray(node.inputs[1].values).ravel()]
        if all(isinstance(shape[a], int) and shape[a] != 1 for a in axes):
            for consumer in list(out.outputs):
                for i, t in enumerate(list(consumer.inputs)):
                    if t is out:
                        consumer.inputs[i] = src
            if out in graph.outputs:
                graph.outputs[graph.outputs.index(out)] = src
                src.name, out.name = out.name, src.name + "_unused"
            node.outputs.clear()
            dropped += 1
    return graph.cleanup().toposort() if dropped else graph  # a graph without one is left as it was


def canonicalize_linears(graph: gs.Graph, names: list[str], scopes: dict[str, list[str]]) -> gs.Graph:
    """Rename each Linear's MatMul/Gemm, Add and weight after its checkpoint module name.

    A node belongs to Linear ``L`` when ``L`` is in its ``name_scopes``. The MatMul weight
    (a constant ``W^T``) and the Gemm weight are renamed to ``L.weight``."""
    wanted = set(names)
    found: dict[str, list[gs.Node]] = {}
    for node in graph.nodes:
        owner = [s for s in scopes.get(node.name, []) if s in wanted]
        if owner:
            found.setdefault(owner[-1], []).append(node)
    for name in names:
        nodes = found.get(name, [])
        mm = [n for n in nodes if n.op in ("MatMul", "Gemm")]
        if len(mm) != 1:
            raise ExportError(f"Linear {name!r}: expected one MatMul/Gemm in the graph, found {len(mm)}")
        node = mm[0]
        node.name = f"{name}/{node.op}"
        w = node.inputs[1]
        if not isinstance(w, gs.Constant):
            raise ExportError(f"Linear {name!r}: weight input of {node.op} is not a constant")
        w.name = f"{name}.weight"
        if node.op == "Gemm":
            if node.attrs.get("transB", 0) != 1 or node.attrs.get("transA", 0) != 0:
                raise ExportError(f"Linear {name!r}: unexpected Gemm attributes {node.attrs}")
            if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
                node.inputs[2].name = f"{name}.bias"
            continue
        adds = [n for n in nodes if n.op == "Add" and n.inputs[0] is node.outputs[0]]
        if len(adds) == 1:
            adds[0].name = f"{name}/Add"
            if isinstance(adds[0].inputs[1], gs.Constant):
                adds[0].inputs[1].name = f"{name}.bias"
    return graph.cleanup().toposort()


def find_linears(graph: gs.Graph) -> dict[str, LinearSite]:
    """``{checkpoint Linear name: LinearSite}`` for a canonicalized graph (see module doc)."""
    sites: dict[str, LinearSite] = {}
    by_name = {n.name: n for n in graph.nodes}
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or "/" not in node.name:
            continue
        name, op = node.name.rsplit("/", 1)
        if op != node.op:
            continue
        weight = _source_constant_name(node.inputs[1])
        if weight != f"{name}.weight":
            continue
        if op == "Gemm":
            bias = node.inputs[2].name if len(node.inputs) > 2 else None
            sites[name] = LinearSite(name, node.name, op, weight, bias, None)
        else:
            add = by_name.get(f"{name}/Add")
            bias = add.inputs[1].name if add is not None else None
            sites[name] = LinearSite(name, node.name, op, weight, bias, add.name if add is not None else None)
    return sites


def _source_constant_name(tensor: gs.Tensor) -> str | None:
    """The weight's name: the constant itself, or the constant behind a DequantizeLinear."""
    if isinstance(tensor, gs.Constant):
        return tensor.name
    if tensor.inputs and tensor.inputs[0].op == "DequantizeLinear":
        src = tensor.inputs[0].inputs[0]
        if isinstance(src, gs.Constant):
            return src.name.removesuffix("_quantized")
    return None


def weight_matrix(graph: gs.Graph, site: LinearSite) -> np.ndarray:
    """The Linear's weight as ``W`` ``[C_out, C_in]`` (the checkpoint layout), from the graph."""
    const = graph.tensors()[site.weight]
    values = np.asarray(const.values)
    return values.T if site.op == "MatMul" else values
