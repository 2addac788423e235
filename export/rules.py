"""Check a Q/DQ graph against TensorRT's explicit-quantization rules (docs/export.md).

Every finding names the node and a stable rule id:

- ``zero-point``      zero points present must be all zero (symmetric only)
- ``scale-constant``  scales are constant initializers, finite and > 0
- ``act-per-tensor``  activation (non-constant input) Q/DQ scales are scalars
- ``weight-scale-shape`` per-channel weight scales are 1-D with length = weight.shape[axis]
                      (axis in range); scalars are fine (per tensor)
- ``block-shape``     blocked DQ: one blocked axis, scale rank = weight rank, scale dims match
                      the weight except ceil(dim/block) on the axis; block_size > 0
- ``int4-even-dim``   INT4 initializers have an even last dimension
- ``int4-weight-only`` INT4 only in a DequantizeLinear of a constant (weight-only, blocked)
- ``dtype``           quantized types are INT8, FLOAT8E4M3FN or INT4 (INT4 blocked only);
                      scales are float32/float16/bfloat16
- ``qdq-pair``        every activation QuantizeLinear feeds only DequantizeLinear nodes with
                      the same scale and zero-point type
- ``opset``           ai.onnx opset within TensorRT's parser range (13..22) and high enough
                      for the features used (FP8 >= 19, INT4/block_size >= 21)
- ``int4-int8-mix``   (warning) a MatMul whose weight is INT4 and activation INT8: no native
                      TensorRT kernel (see export/qdq.py for what TensorRT does with it)
- ``act-dynamic-scale`` (warning) an activation Q/DQ whose scale is computed in the graph and
                      blocked along the last axis (dtq's per-token dynamic activations): TensorRT fuses only constant-scale Q/DQ into
                      its quantized GEMMs (``DYNAMIC_SCALE_NOTE``); such a Q/DQ is exempt from
                      ``scale-constant`` / ``act-per-tensor`` / ``block-shape``, which it breaks by design
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

OPSET_RANGE = (13, 22)
Q_OPS = {"QuantizeLinear", "TRT_FP8QuantizeLinear"}
DQ_OPS = {"DequantizeLinear", "TRT_FP8DequantizeLinear"}
RULE_IDS = (
    "zero-point", "scale-constant", "act-per-tensor", "weight-scale-shape", "block-shape",
    "int4-even-dim", "int4-weight-only", "dtype", "qdq-pair", "opset", "int4-int8-mix", "act-dynamic-scale",
)
DYNAMIC_SCALE_NOTE = (
    "activation scale computed at run time (per-token dynamic quantization): TensorRT fuses only Q/DQ with "
    "constant scales into INT8/FP8 GEMMs, so it cannot run this MatMul as a quantized GEMM (TensorRT-RTX "
    "1.7.1's builder fails on such a graph: Myelin CHECK(is_constant())); calibrate static per-tensor "
    "activations for TensorRT")


def _np_dtype_names() -> dict[str, str]:
    import ml_dtypes

    return {np.dtype(ml_dtypes.float8_e4m3fn).name: "fp8", np.dtype(ml_dtypes.int4).name: "int4",
            "int8": "int8", "uint8": "uint8", np.dtype(ml_dtypes.float8_e5m2).name: "fp8e5m2",
            np.dtype(ml_dtypes.uint4).name: "uint4"}


@dataclass(frozen=True)
class Finding:
    rule: str
    node: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        return f"[{self.severity}] {self.rule}: node {self.node!r}: {self.message}"


@dataclass
class RuleReport:
    findings: list[Finding] = field(default_factory=list)
    checked_nodes: int = 0

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def rules(self) -> set[str]:
        return {f.rule for f in self.findings}

    def format(self) -> str:
        head = f"TensorRT rule check: {self.checked_nodes} Q/DQ nodes, {len(self.errors)} errors, {len(self.warnings)} warnings"
        return "\n".join([head, *map(str, self.findings)])


def _qtype(tensor: gs.Tensor) -> str | None:
    """Quantized type name of a tensor ('int8', 'fp8', 'int4', ...) or None if unknown."""
    dt = tensor.dtype
    if dt is None:
        return None
    if isinstance(dt, int) or (hasattr(onnx, "TensorProto") and not hasattr(dt, "name")):
        return {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
                onnx.TensorProto.FLOAT8E4M3FN: "fp8", onnx.TensorProto.INT4: "int4",
                onnx.TensorProto.UINT4: "uint4", onnx.TensorProto.FLOAT8E5M2: "fp8e5m2"}.get(int(dt), str(dt))
    try:
        name = np.dtype(dt).name
    except TypeError:
        return str(dt)
    return _np_dtype_names().get(name, name)


def _values(tensor: gs.Constant) -> np.ndarray:
    return np.asarray(tensor.values)


def _opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 0


class _quiet_gs:
    """onnx-graphsurgeon warns when FP8/INT4 constants are read as numpy; the checker only reads."""

    def __enter__(self):
        self.level = gs.logger.G_LOGGER.severity
        gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
        return self

    def __exit__(self, *exc):
        gs.logger.G_LOGGER.severity = self.level
        return False


def check_model(model: onnx.ModelProto | gs.Graph, opset: int | None = None) -> RuleReport:
    """Run every rule on a ModelProto (or a gs.Graph plus its ``opset``; its FP8/INT4 constants
    are read, which makes onnx-graphsurgeon convert them: pass a ModelProto to keep a graph)."""
    with _quiet_gs():
        return _check(model, opset)


def _check(model: onnx.ModelProto | gs.Graph, opset: int | None) -> RuleReport:
    if isinstance(model, onnx.ModelProto):
        opset = _opset(model)
        graph = gs.import_onnx(model)
    else:
        graph = model
        opset = opset if opset is not None else graph.opset
    report = RuleReport()
    out = report.findings
    lo, hi = OPSET_RANGE
    if not lo <= opset <= hi:
        out.append(Finding("opset", "<model>", f"ai.onnx opset {opset} outside TensorRT's parser range {lo}..{hi}"))
    q_nodes = [n for n in graph.nodes if n.op in Q_OPS | DQ_OPS]
    report.checked_nodes = len(q_nodes)
    for node in q_nodes:
        _check_node(node, opset, out)
    _check_int4_int8_mix(graph, out)
    return report


def _check_node(node: gs.Node, opset: int, out: list[Finding]) -> None:
    name = node.name or f"<{node.op}>"
    is_q = node.op in Q_OPS
    x = node.inputs[0]
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    zp = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    # quantized tensor: Q's output, DQ's input
    qtensor = node.outputs[0] if is_q else x
    qtype = _qtype(zp) if zp is not None else _qtype(qtensor)
    if node.op.startswith("TRT_FP8"):
        qtype = "fp8"
    elif zp is None and is_q:
        qtype = "uint8"  # ONNX default output type of QuantizeLinear without zero point / output_dtype
        if node.attrs.get("output_dtype"):
            qtype = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.FLOAT8E4M3FN: "fp8",
                     onnx.TensorProto.INT4: "int4"}.get(node.attrs["output_dtype"], str(node.attrs["output_dtype"]))
    if qtype not in ("int8", "fp8", "int4"):
        out.append(Finding("dtype", name, f"quantized type {qtype} is not INT8, FLOAT8E4M3FN or INT4"))
    if qtype == "fp8" and opset < 19 and not node.op.startswith("TRT_FP8"):
        out.append(Finding("opset", name, f"FP8 Q/DQ needs opset >= 19 (model has {opset})"))
    if qtype == "int4" and opset < 21:
        out.append(Finding("opset", name, f"INT4 needs opset >= 21 (model has {opset})"))
    block = int(node.attrs.get("block_size", 0) or 0)
    if block and opset < 21:
        out.append(Finding("opset", name, f"block_size needs opset >= 21 (model has {opset})"))

    # scale
    if _computed(scale) and block and _last_axis(node) and not (not is_q and isinstance(x, gs.Constant)):
        # a per-token dynamic activation quantizer (computed scale, one block = the last axis: dtq's
        # export): one finding, the static-scale rules skip it; any other computed scale stays an error
        if is_q:
            out.append(Finding("act-dynamic-scale", name, DYNAMIC_SCALE_NOTE, "warning"))
            _check_pair(node, name, out)
        if qtype == "int4":
            out.append(Finding("int4-weight-only", name, "INT4 on an activation: TensorRT supports INT4 only as weight-only blocked DequantizeLinear"))
        return
    if scale is None or not isinstance(scale, gs.Constant):
        out.append(Finding("scale-constant", name, "scale is not a constant initializer (TensorRT needs static scales)"))
        svals = None
    else:
        svals = _values(scale).astype(np.float64)
        if _qtype(scale) not in ("float32", "float16", "bfloat16"):
            out.append(Finding("dtype", name, f"scale dtype {_qtype(scale)} is not float32/float16/bfloat16"))
        if not np.all(np.isfinite(svals)) or not np.all(svals > 0):
            out.append(Finding("scale-constant", name, f"scale has non-positive or non-finite values (min {svals.min():.3g})"))
    # zero point
    if zp is not None:
        if not isinstance(zp, gs.Constant):
            out.append(Finding("zero-point", name, "zero point is not a constant"))
        else:
            zvals = _values(zp).astype(np.float64)
            if np.any(zvals != 0):
                out.append(Finding("zero-point", name, f"zero point is not zero (max |zp| {np.abs(zvals).max():g}): TensorRT is symmetric-only"))
            if svals is not None and zvals.shape != svals.shape:
                out.append(Finding("zero-point", name, f"zero point shape {zvals.shape} != scale shape {svals.shape}"))

    is_weight = (not is_q) and isinstance(x, gs.Constant)
    if not is_weight:
        # activation quantization: per tensor only
        if svals is not None and svals.size != 1:
            out.append(Finding("act-per-tensor", name, f"activation scale has shape {svals.shape}; TensorRT needs per-tensor"))
        if block:
            out.append(Finding("block-shape", name, "block quantization of an activation"))
        if qtype == "int4":
            out.append(Finding("int4-weight-only", name, "INT4 on an activation: TensorRT supports INT4 only as weight-only blocked DequantizeLinear"))
        if is_q:
            _check_pair(node, name, out)
        return
    # weight DQ
    w = _values(x)
    axis = int(node.attrs.get("axis", 1))
    if qtype == "int4":
        if w.ndim == 0 or w.shape[-1] % 2:
            out.append(Finding("int4-even-dim", name, f"INT4 weight shape {w.shape}: last dimension must be even"))
        if not block:
            out.append(Finding("int4-weight-only", name, "INT4 weight must be block-quantized (DequantizeLinear block_size)"))
    if svals is None:
        return
    if block:
        if block <= 0:
            out.append(Finding("block-shape", name, f"block_size {block} must be > 0"))
            return
        if svals.ndim != w.ndim:
            out.append(Finding("block-shape", name, f"blocked scale rank {svals.ndim} != weight rank {w.ndim}"))
            return
        ax = axis % w.ndim if -w.ndim <= axis < w.ndim else None
        if ax is None:
            out.append(Finding("block-shape", name, f"axis {axis} out of range for weight rank {w.ndim}"))
            return
        expect = tuple(math.ceil(d / block) if i == ax else d for i, d in enumerate(w.shape))
        if tuple(svals.shape) != expect:
            blocked = [i for i, (a, b) in enumerate(zip(svals.shape, w.shape)) if a != b]
            out.append(Finding("block-shape", name, f"scale shape {svals.shape} != {expect} (weight {w.shape}, axis {axis}, block {block}); "
                                                    f"dims differing from the weight: {blocked} (one blocked axis allowed)"))
        return
    if svals.size == 1 and svals.ndim <= 1:
        return  # per tensor
    if svals.ndim != 1:
        out.append(Finding("weight-scale-shape", name, f"per-channel scale must be 1-D, has shape {svals.shape}"))
        return
    if not -w.ndim <= axis < w.ndim:
        out.append(Finding("weight-scale-shape", name, f"axis {axis} out of range for weight rank {w.ndim}"))
        return
    if svals.shape[0] != w.shape[axis]:
        out.append(Finding("weight-scale-shape", name, f"scale length {svals.shape[0]} != weight.shape[{axis}] = {w.shape[axis]}"))


def _last_axis(node: gs.Node) -> bool:
    axis = int(node.attrs.get("axis", 1))
    shape = node.inputs[0].shape
    return axis == -1 or (shape is not None and axis == len(shape) - 1)


def _computed(tensor: gs.Tensor | None) -> bool:
    """A tensor some node of the graph produces (not an initializer, not a graph input)."""
    return isinstance(tensor, gs.Variable) and bool(tensor.inputs)


def _check_pair(node: gs.Node, name: str, out: list[Finding]) -> None:
    consumers = node.outputs[0].outputs
    if not consumers:
        out.append(Finding("qdq-pair", name, "QuantizeLinear output is unused"))
    scale = node.inputs[1]
    for c in consumers:
        if c.op not in DQ_OPS:
            out.append(Finding("qdq-pair", name, f"QuantizeLinear feeds {c.op} {c.name!r}, not a DequantizeLinear"))
            continue
        cs = c.inputs[1] if len(c.inputs) > 1 else None
        if _computed(scale) and cs is not scale:
            out.append(Finding("qdq-pair", name, f"computed Q scale is not the scale of its DequantizeLinear {c.name!r}"))
        if isinstance(scale, gs.Constant) and isinstance(cs, gs.Constant):
            if _values(scale).shape != _values(cs).shape or not np.array_equal(_values(scale), _values(cs)):
                out.append(Finding("qdq-pair", name, f"Q scale differs from the scale of its DequantizeLinear {c.name!r}"))


def _check_int4_int8_mix(graph: gs.Graph, out: list[Finding]) -> None:
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        kinds = []
        for inp in node.inputs[:2]:
            src = inp.inputs[0] if inp.inputs else None
            if src is not None and src.op in DQ_OPS:
                zp = src.inputs[2] if len(src.inputs) > 2 and src.inputs[2].name else None
                kinds.append(_qtype(zp) if zp is not None else _qtype(src.inputs[0]))
            else:
                kinds.append(None)
        if "int4" in kinds and "int8" in kinds:
            out.append(Finding("int4-int8-mix", node.name, "INT4 weight with INT8 activation (W4A8): TensorRT has no INT4xINT8 GEMM "
                                                           "(TensorRT-RTX 1.7 parses it and fails to build); export w4a16 for "
                                                           "TensorRT", "warning"))
