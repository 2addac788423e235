"""``torch.ops.dtq.quant_rows_int8`` / ``torch.ops.dtq.int8_mm`` / ``mm8_gelu_quant`` / ``mm8_gate_residual`` / ``w4a16_mm`` / ``w4a8_mm`` /
``w4a8_gate_residual`` / ``w4a8_progressive_mm`` (+ ``_gelu_quant`` / ``_gate_residual``) / ``gelu_quant_rows_int8`` /
``unpack_progressive_int8`` / ``unpack_int4_dequant`` / ``norm_quant`` / ``norm_quant_rows_int8``: the Triton kernels as custom ops, so that
``torch.compile`` treats them as opaque calls (with shape functions) and CUDA graphs capture them.
``linear_gelu_tanh``: a dense GEMM with bias + GELU(tanh) in cuBLASLt's epilogue, opaque so that
Inductor does not split it back into a GEMM and a pointwise kernel. Importing this module needs triton."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels


@torch.library.custom_op("dtq::int8_mm", mutates_args=())
def int8_mm(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return kernels.int8_mm(a, w, a_scale, w_scale, bias, out_dtype)


@int8_mm.register_fake
def _(a, w, a_scale, w_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


@torch.library.custom_op("dtq::mm8_gelu_quant", mutates_args=())
def mm8_gelu_quant(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, q_mul: torch.Tensor | None, q_scale: torch.Tensor) -> torch.Tensor:
    return kernels.mm8_gelu_quant(a, w, a_scale, w_scale, bias, q_mul, q_scale)


@mm8_gelu_quant.register_fake
def _(a, w, a_scale, w_scale, bias, q_mul, q_scale):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=a.dtype)


@torch.library.custom_op("dtq::w4a16_mm", mutates_args=())
def w4a16_mm(a: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, group: int,
             bias: torch.Tensor | None) -> torch.Tensor:
    return kernels.w4a16_mm(a, w_packed, scales, group, bias)


@w4a16_mm.register_fake
def _(a, w_packed, scales, group, bias):
    return a.new_empty((a.shape[0], w_packed.shape[0]), dtype=a.dtype)


@torch.library.custom_op("dtq::w4a8_mm", mutates_args=())
def w4a8_mm(a: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, group: int, a_scale: torch.Tensor,
            bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return kernels.w4a8_mm(a, w_packed, scales, group, a_scale, bias, out_dtype)


@w4a8_mm.register_fake
def _(a, w_packed, scales, group, a_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], w_packed.shape[0]), dtype=out_dtype)


@torch.library.custom_op("dtq::w4a8_gate_residual", mutates_args=())
def w4a8_gate_residual(a: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, group: int,
                       a_scale: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                       residual: torch.Tensor) -> torch.Tensor:
    return kernels.w4a8_gate_residual(a, w_packed, scales, group, a_scale, bias, gate, residual)


@w4a8_gate_residual.register_fake
def _(a, w_packed, scales, group, a_scale, bias, gate, residual):
    return residual.new_empty((a.shape[0], w_packed.shape[0]))


@torch.library.custom_op("dtq::w4a8_progressive_mm", mutates_args=())
def w4a8_progressive_mm(a: torch.Tensor, w_packed: torch.Tensor, s2: torch.Tensor, group: int, s1: torch.Tensor,
                        a_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return kernels.w4a8_progressive_mm(a, w_packed, s2, group, s1, a_scale, bias, out_dtype)


@w4a8_progressive_mm.register_fake
def _(a, w_packed, s2, group, s1, a_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], w_packed.shape[0]), dtype=out_dtype)


@torch.library.custom_op("dtq::mm8_gate_residual", mutates_args=())
def mm8_gate_residual(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None, gate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return kernels.mm8_gate_residual(a, w, a_scale, w_scale, bias, gate, residual)


@mm8_gate_residual.register_fake
def _(a, w, a_scale, w_scale, bias, gate, residual):
    return residual.new_empty((a.shape[0], w.shape[0]))


@torch.library.custom_op("dtq::w4a8_progressive_gelu_quant", mutates_args=())
def w4a8_progressive_gelu_quant(a: torch.Tensor, w_packed: torch.Tensor, s2: torch.Tensor, group: int,
                                s1: torch.Tensor, a_scale: torch.Tensor, bias: torch.Tensor | None,
                                q_mul: torch.Tensor | None, q_scale: torch.Tensor) -> torch.Tensor:
    return kernels.w4a8_progressive_gelu_quant(a, w_packed, s2, group, s1, a_scale, bias, q_mul, q_scale)


@w4a8_progressive_gelu_quant.register_fake
def _(a, w_packed, s2, group, s1, a_scale, bias, q_mul, q_scale):
    return a.new_empty((a.shape[0], w_packed.shape[0]), dtype=torch.int8)


@torch.library.custom_op("dtq::w4a8_progressive_gate_residual", mutates_args=())
def w4a8_progressive_gate_residual(a: torch.Tensor, w_packed: torch.Tensor, s2: torch.Tensor, group: int,
                                   s1: torch.Tensor, a_scale: torch.Tensor, bias: torch.Tensor | None,
                                   gate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return kernels.w4a8_progressive_gate_residual(a, w_packed, s2, group, s1, a_scale, bias, gate, residual)


@w4a8_progressive_gate_residual.register_fake
def _(a, w_packed, s2, group, s1, a_scale, bias, gate, residual):
    return residual.new_empty((a.shape[0], w_packed.shape[0]))


@torch.library.custom_op("dtq::quant_rows_int8", mutates_args=())
def quant_rows_int8(x: torch.Tensor, mul: torch.Tensor | None,
                    mul_pairs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.quant_rows_int8(x, mul, mul_pairs=mul_pairs)


@quant_rows_int8.register_fake
def _(x, mul, mul_pairs=None):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("dtq::gelu_quant_rows_int8", mutates_args=())
def gelu_quant_rows_int8(x: torch.Tensor, mul: torch.Tensor | None,
                         mul_pairs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return kernels.quant_rows_int8(x, mul, gelu=True, mul_pairs=mul_pairs)


@gelu_quant_rows_int8.register_fake
def _(x, mul, mul_pairs=None):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("dtq::unpack_progressive_int8", mutates_args=())
def unpack_progressive_int8(w_packed: torch.Tensor, s2: torch.Tensor, group: int) -> torch.Tensor:
    return kernels.unpack_progressive_int8(w_packed, s2, group)


@unpack_progressive_int8.register_fake
def _(w_packed, s2, group):
    return w_packed.new_empty((w_packed.shape[0], 2 * w_packed.shape[1]), dtype=torch.int8)


@torch.library.custom_op("dtq::unpack_int4_dequant", mutates_args=())
def unpack_int4_dequant(w_packed: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    return kernels.unpack_int4_dequant(w_packed, scales, group, dtype)


@unpack_int4_dequant.register_fake
def _(w_packed, scales, group, dtype):
    return w_packed.new_empty((w_packed.shape[0], 2 * w_packed.shape[1]), dtype=dtype)


@torch.library.custom_op("dtq::norm_quant", mutates_args=())
def norm_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, mul: torch.Tensor | None,
               a_scale: torch.Tensor, codes: str) -> torch.Tensor:
    """Static codes ("int8" / "fp8") of ``modulate(LayerNorm(x))`` for a layer with scale ``a_scale``."""
    return kernels.norm_quant(x, shift, scale, eps, mul, a_scale, codes)[0]


@norm_quant.register_fake
def _(x, shift, scale, eps, mul, a_scale, codes):
    dtype = torch.float8_e4m3fn if codes == "fp8" else torch.int8
    return x.new_empty((x.shape[0] * x.shape[1], x.shape[2]), dtype=dtype)


@torch.library.custom_op("dtq::norm_quant_rows_int8", mutates_args=())
def norm_quant_rows_int8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                         mul: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token INT8 codes and row scales of ``modulate(LayerNorm(x))``."""
    return kernels.norm_quant(x, shift, scale, eps, mul, None, "int8-token")


@norm_quant_rows_int8.register_fake
def _(x, shift, scale, eps, mul):
    m = x.shape[0] * x.shape[1]
    return x.new_empty((m, x.shape[2]), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("dtq::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``GELU_tanh(a @ w.T + bias)``. On CUDA with a bias: ``torch._addmm_activation``, cuBLASLt's
    GELU_BIAS epilogue (GELU on the float32 accumulator, one rounding to ``a``'s type; its GELU is
    checked against the tanh form by ``benchmarks/w4a16_bench.py``). Elsewhere ``linear`` then
    ``gelu(approximate="tanh")``: torch's CPU ``_addmm_activation`` computes the erf GELU. Opaque, as
    Inductor would split ``_addmm_activation`` back into a GEMM and a GELU kernel (one more write and
    read of the 4x-hidden tensor)."""
    if bias is None or not a.is_cuda:
        return F.gelu(F.linear(a, w, bias), approximate="tanh")
    return torch._addmm_activation(bias, a, w.t(), use_gelu=True)


@linear_gelu_tanh.register_fake
def _(a, w, bias):
    return a.new_empty((a.shape[0], w.shape[0]))


@torch.library.custom_op("dtq::mm8_gelu_rowmax", mutates_args=())
def mm8_gelu_rowmax(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, q_mul: torch.Tensor | None,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 with GELU and the row amaxes of fc2's per-token input in its epilogue (``kernels.mm8_gelu_rowmax``)."""
    return kernels.mm8_gelu_rowmax(a, w, a_scale, w_scale, bias, q_mul, out_dtype)


@mm8_gelu_rowmax.register_fake
def _(a, w, a_scale, w_scale, bias, q_mul, out_dtype):
    return (a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype),
            a.new_empty((a.shape[0],), dtype=torch.float32))


@torch.library.custom_op("dtq::mm8_gelu_token_codes", mutates_args=())
def mm8_gelu_token_codes(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None, mul: torch.Tensor | None,
                         out_dtype: torch.dtype, exact: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 writing fc2's per-token INT8 codes and row scales (``token_gemm.mm8_gelu_token_codes``)."""
    from . import token_gemm

    return token_gemm.mm8_gelu_token_codes(a, w, a_scale, w_scale, bias, mul, out_dtype, exact=exact)


@mm8_gelu_token_codes.register_fake
def _(a, w, a_scale, w_scale, bias, mul, out_dtype, exact):
    return (a.new_empty((a.shape[0], w.shape[0]), dtype=torch.int8), a.new_empty((a.shape[0],), dtype=torch.float32))


@torch.library.custom_op("dtq::mm8_rowquant", mutates_args=())
def mm8_rowquant(h: torch.Tensor, amax: torch.Tensor, h_mul: torch.Tensor | None, w: torch.Tensor,
                 w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
                 gate: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    """The INT8 GEMM quantizing its float input per token on load (``kernels.mm8_rowquant``), optionally with
    the gated residual epilogue."""
    return kernels.mm8_rowquant(h, amax, h_mul, w, w_scale, bias, out_dtype, gate, residual)


@mm8_rowquant.register_fake
def _(h, amax, h_mul, w, w_scale, bias, out_dtype, gate, residual):
    return h.new_empty((h.shape[0], w.shape[0]), dtype=out_dtype if residual is None else residual.dtype)
