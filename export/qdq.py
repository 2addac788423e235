"""Q/DQ insertion from a recipe, per layer in the layer's own precision (``dtq.formats``), so a
recipe with per-layer overrides exports as a mixed-format graph.

- Weights: stored as quantized initializers (INT8 / FLOAT8E4M3FN / packed INT4) with a
  ``DequantizeLinear`` in front of the MatMul: per output channel (1-D scale, ``axis`` = the
  output axis of the stored layout), per tensor, or blocked along C_in (INT4, opset 21
  ``block_size``). The integers are ``runtime.quant.quantize_weight`` of the float32 master
  weight (the balanced ``W diag(b)``) with the recipe's scale: the simulated model's integers.
- Activations: ``QuantizeLinear -> DequantizeLinear`` on the MatMul's input, per tensor, zero
  point 0 (INT8) or FP8 E4M3 zero (FP8). With a run-time balancing ``Mul`` the Q/DQ follows it.
- FP8 uses the standard opset-19 ops by default; ``fp8_ops="trt"`` emits TensorRT's
  ``trt::TRT_FP8QuantizeLinear``/``TRT_FP8DequantizeLinear`` instead (TensorRT only; ONNX Runtime
  cannot run them).

W4A8 (INT4 blocked weight, INT8 per-tensor activation) exports as exactly that: the INT8 Q/DQ on
the activation and the blocked INT4 DQ on the weight; ONNX Runtime runs it. TensorRT has no
INT4 x INT8 GEMM (its INT4 is weight-only with FP16/BF16 activations; NVIDIA's W4A8 is INT4 x FP8
and only in TensorRT-LLM). Measured with TensorRT-RTX 1.7.1: the parser accepts the graph and the
builder fails (Myelin internal error ``CHECK(is_constant())``: it tries to fuse the INT8
activation Q/DQ into an INT8 GEMM whose weight is not an INT8 constant). For TensorRT deploy the
same recipe as w4a16 (``weight_only_fallback``: weights identical, activation Q/DQ dropped);
``dtq-export --precision w4a16`` on a w4a8 recipe does that, and ``dtq-build-engine`` refuses a
W4A8 graph with this explanation (``formats.PRECISIONS["w4a8"].tensorrt_note``).

W8A16 (INT8 per-channel/tensor weight, no activation Q/DQ) is TensorRT's INT8 weight-only form.

Per-token dynamic activations (a layer's ``act_granularity`` "token", ViDiT-Q): the scale is computed
in the graph, ``Max(ReduceMax(Abs(x), axes=[-1], keepdims=1) / qmax, floor)`` (``[..., 1]``, the
simulation's ``quant.token_scale`` op for op), and feeds an opset-21 blocked ``QuantizeLinear`` /
``DequantizeLinear`` pair with ``axis=-1, block_size=C`` (one block per token; no zero point,
``output_dtype`` names the type). ONNX Runtime runs it. TensorRT fuses only Q/DQ with constant
scales into its quantized GEMMs: ``rules.check_model`` reports these under ``act-dynamic-scale``.
"""

from __future__ import annotations

import copy
import dataclasses

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from .. import formats
from ..runtime import quant
from ..runtime.recipe import Recipe
from .onnx_export import find_linears
from .surgery import MasterWeights

PRECISIONS = formats.PRECISIONS
_NP = {"int8": np.int8, "int4": ml_dtypes.int4, "fp8_e4m3": ml_dtypes.float8_e4m3fn}
_FP16_TINY = float(np.finfo(np.float16).tiny)


class QDQError(ValueError):
    pass


def weight_only_fallback(recipe: Recipe, precision: str) -> Recipe:
    """The recipe as TensorRT deploys it when the recipe's precision is one TensorRT refuses and
    ``precision`` is its documented fallback (w4a8 -> w4a16): every layer of a precision whose
    ``tensorrt_fallback`` is ``precision`` loses its activation quantization; weights stay."""
    out = copy.copy(recipe)
    out.layers = {}
    for name, layer in recipe.layers.items():
        if formats.get_precision(layer.precision).tensorrt_fallback == precision:
            layer = dataclasses.replace(layer, act_format="none", act_scale=None, act_granularity="tensor")
        out.layers[name] = layer
    out.precision = precision
    return out


def _quant_initializer(name: str, codes: torch.Tensor, fmt: str) -> gs.Constant:
    """Quantized codes (int8 container for INT8/INT4, torch float8 for FP8) as an initializer of
    the right ONNX type (INT4 packed two per byte by onnx.numpy_helper)."""
    if fmt == "fp8_e4m3":
        arr = codes.contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    else:
        arr = codes.numpy().astype(_NP[fmt])
    return gs.Constant(name, LazyValues(numpy_helper.from_array(np.ascontiguousarray(arr), name)))


def _zero_point(name: str, fmt: str, shape: tuple) -> gs.Constant:
    zeros = np.zeros(shape, dtype=np.float32 if fmt == "fp8_e4m3" else np.int8).astype(_NP[fmt])
    return gs.Constant(name, LazyValues(numpy_helper.from_array(zeros, name)))


def _scale(name: str, values: np.ndarray, dtype) -> gs.Constant:
    values = np.asarray(values, np.float32)
    if np.dtype(dtype) == np.float16:
        values = np.maximum(values, _FP16_TINY)
    return gs.Constant(name, np.array(values, dtype=dtype, order="C"))


_ONNX_TYPE = {"int8": onnx.TensorProto.INT8, "fp8_e4m3": onnx.TensorProto.FLOAT8E4M3FN}


def _token_qdq(graph: gs.Graph, name: str, x: gs.Variable, fmt: str, dtype) -> gs.Variable:
    """``x`` quantized-dequantized with a scale per token computed from ``x`` (see the module doc);
    returns the dequantized tensor."""
    def var(suffix, dt=None, shape=None):
        return gs.Variable(f"{name}/{suffix}", dtype=dt if dt is not None else x.dtype, shape=shape)

    floor = _FP16_TINY if np.dtype(dtype) == np.float16 else quant._MIN_SCALE  # fp16: 1e-12 underflows
    ab, amax, div, scale = var("input_abs", shape=x.shape), var("input_amax"), var("input_amax_div"), var("input_scale")
    q_out = var("input_quantized", np.dtype(_NP[fmt]), x.shape)
    dq_out = var("input_dequantized", shape=x.shape)
    block = {"axis": -1, "block_size": int(x.shape[-1])}
    graph.nodes += [
        gs.Node("Abs", name=f"{name}/input_abs", inputs=[x], outputs=[ab]),
        gs.Node("ReduceMax", name=f"{name}/input_amax", attrs={"keepdims": 1},
                inputs=[ab, gs.Constant(f"{name}.input_amax_axes", np.array([-1], np.int64))], outputs=[amax]),
        gs.Node("Div", name=f"{name}/input_amax_div",
                inputs=[amax, gs.Constant(f"{name}.input_qmax", np.array(quant.QMAX[fmt], dtype=dtype))],
                outputs=[div]),
        gs.Node("Max", name=f"{name}/input_scale",
                inputs=[div, gs.Constant(f"{name}.input_scale_floor", np.array(floor, dtype=dtype))], outputs=[scale]),
        gs.Node("QuantizeLinear", name=f"{name}/input_q", attrs={**block, "output_dtype": _ONNX_TYPE[fmt]},
                inputs=[x, scale], outputs=[q_out]),
        gs.Node("DequantizeLinear", name=f"{name}/input_dq", attrs=block, inputs=[q_out, scale], outputs=[dq_out]),
    ]
    return dq_out


def insert_qdq(graph: gs.Graph, master: MasterWeights, recipe: Recipe, fp8_ops: str = "onnx") -> gs.Graph:
    """Q/DQ for every recipe layer (weights and/or activation), returns the cleaned graph."""
    if fp8_ops not in ("onnx", "trt"):
        raise QDQError(f"fp8_ops must be 'onnx' or 'trt', got {fp8_ops!r}")
    sites = find_linears(graph)
    nodes = {n.name: n for n in graph.nodes}
    for name, layer in recipe.layers.items():
        if name not in sites:
            raise QDQError(f"recipe layer {name!r} is not a Linear of this graph")
        site = sites[name]
        node = nodes[site.node]
        dtype = graph.tensors()[site.weight].dtype  # the graph's float type (float32 / float16)
        use_trt = fp8_ops == "trt"
        if layer.act_format != "none" and layer.act_granularity == "token":
            if use_trt and layer.act_format == "fp8_e4m3":
                raise QDQError(f"{name}: per-token FP8 activations need the ONNX Q/DQ ops (fp8_ops='onnx')")
            node.inputs[0] = _token_qdq(graph, name, node.inputs[0], layer.act_format, dtype)
        elif layer.act_format != "none":
            fmt = layer.act_format
            x = node.inputs[0]
            s = _scale(f"{name}.input_scale", np.float32(layer.act_scale), dtype)
            q_out = gs.Variable(f"{name}/input_quantized", dtype=np.dtype(_NP[fmt]), shape=x.shape)
            dq_out = gs.Variable(f"{name}/input_dequantized", dtype=x.dtype, shape=x.shape)
            if fmt == "fp8_e4m3" and use_trt:
                q = gs.Node("TRT_FP8QuantizeLinear", name=f"{name}/input_q", domain="trt", inputs=[x, s], outputs=[q_out])
                dq = gs.Node("TRT_FP8DequantizeLinear", name=f"{name}/input_dq", domain="trt", inputs=[q_out, s], outputs=[dq_out])
            else:
                zp = _zero_point(f"{name}.input_zero_point", fmt, ())
                q = gs.Node("QuantizeLinear", name=f"{name}/input_q", inputs=[x, s, zp], outputs=[q_out])
                dq = gs.Node("DequantizeLinear", name=f"{name}/input_dq", inputs=[q_out, s, zp], outputs=[dq_out])
            graph.nodes += [q, dq]
            node.inputs[0] = dq_out
        if layer.weight_format != "none":
            fmt, gran, group = layer.weight_format, layer.weight_granularity, layer.weight_group_size
            w_stored = master[site.weight]
            w = torch.from_numpy(np.ascontiguousarray(w_stored.T if site.op == "MatMul" else w_stored))  # [C_out, C_in]
            scale = recipe.weight_scale(name)
            if scale is None:  # QuantLinear.set_quant does the same: min-max of the balanced weight
                scale = quant.weight_scale(w, fmt, gran, group)
            scale = scale.detach().float().cpu()
            codes = quant.quantize_weight(w, scale, fmt, gran, group)  # [C_out, C_in]
            s_np = scale.numpy()
            attrs = {}
            if site.op == "MatMul":  # stored [C_in, C_out]
                codes = codes.T.contiguous()
                if gran == "channel":
                    attrs["axis"] = 1
                elif gran == "group":
                    s_np = s_np.T
                    attrs.update(axis=0, block_size=int(group))
            else:  # Gemm, stored [C_out, C_in]
                if gran == "channel":
                    attrs["axis"] = 0
                elif gran == "group":
                    attrs.update(axis=1, block_size=int(group))
            if fmt == "int4" and gran != "group":
                raise QDQError(f"{name}: INT4 weights must be block-quantized (granularity 'group') for TensorRT")
            wq = _quant_initializer(f"{name}.weight_quantized", codes, fmt)
            ws = _scale(f"{name}.weight_scale", s_np, dtype)
            out = gs.Variable(f"{name}/weight_dequantized", dtype=dtype, shape=list(codes.shape))
            if fmt == "fp8_e4m3" and use_trt:
                dq = gs.Node("TRT_FP8DequantizeLinear", name=f"{name}/weight_dq", domain="trt", inputs=[wq, ws], outputs=[out], attrs=attrs)
            else:
                dq = gs.Node("DequantizeLinear", name=f"{name}/weight_dq", inputs=[wq, ws], outputs=[out], attrs=attrs)
            graph.nodes.append(dq)
            node.inputs[1] = out
    return graph.cleanup().toposort()
