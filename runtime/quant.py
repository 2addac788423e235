"""Quantizer primitives shared by calibration, simulation and export.

Everything is symmetric with zero point 0 (TensorRT's explicit-quantization rules). Numbers follow
ONNX ``QuantizeLinear``/``DequantizeLinear``: ``q = saturate(round_half_even(x / scale))``,
``x' = q * scale``; INT8 saturates to [-128, 127], INT4 to [-8, 7], FP8 E4M3 to +-448 and rounds
to nearest even (``torch.float8_e4m3fn``). So the fake-quant model and the Q/DQ graph agree.

Scale shapes by granularity (what ``DequantizeLinear`` takes for a ``[C_out, C_in]`` weight):
``tensor`` -> ``[]``, ``channel`` -> ``[C_out]`` (axis 0), ``group`` -> ``[C_out, C_in // g]``
(axis 1, block_size g).
"""

from __future__ import annotations

import torch

from ..formats import FORMATS  # the format names are the precision table's (dtq.formats)

GRANULARITIES = ("tensor", "channel", "group")  # scale layouts; dtq.formats names group sizes (group128)
# largest representable magnitude used to turn an amax into a scale (symmetric: 127, not 128)
QMAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0}
# saturation range of the integer formats, as ONNX QuantizeLinear clamps
INT_RANGE = {"int8": (-128, 127), "int4": (-8, 7)}
_MIN_SCALE = 1e-12  # an all-zero channel still gets a finite, positive scale


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; known: {', '.join(FORMATS)}")


def scale_from_amax(amax: torch.Tensor | float, fmt: str) -> torch.Tensor:
    """The scale that maps ``amax`` to the format's largest symmetric value."""
    check_format(fmt)
    if fmt == "none":
        raise ValueError("format 'none' has no scale")
    amax = torch.as_tensor(amax, dtype=torch.float32)
    return (amax / QMAX[fmt]).clamp_min(_MIN_SCALE)


def quantize(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x`` to its integer (int8 tensor, also for INT4 values) or float8 code; ``scale`` broadcasts."""
    check_format(fmt)
    y = x.float() / scale
    if fmt in INT_RANGE:
        lo, hi = INT_RANGE[fmt]
        return torch.round(y).clamp_(lo, hi).to(torch.int8)
    if fmt == "fp8_e4m3":
        return y.clamp(-QMAX[fmt], QMAX[fmt]).to(torch.float8_e4m3fn)  # torch's cast does not saturate
    raise ValueError("format 'none' is not quantized")


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize then dequantize, in float32 (the same numbers as ``dequantize(quantize(x))``)."""
    if fmt == "none":
        return x
    if fmt in INT_RANGE:
        lo, hi = INT_RANGE[fmt]
        return torch.round(x.float() / scale).clamp_(lo, hi) * scale
    return dequantize(quantize(x, scale, fmt), scale)


# -- activations -------------------------------------------------------------------------------------
ACT_GRANULARITIES = ("tensor", "token")  # dtq.formats: static per-tensor | dynamic per-token


def token_scale(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """ViDiT-Q's dynamic per-token scale: ``amax(|x| over the last axis) / qmax``, ``[..., 1]`` float32.
    The ONNX graph computes the same ops (``ReduceMax(Abs(x)) / qmax``, then ``Max`` with the floor)."""
    return scale_from_amax(x.float().abs().amax(dim=-1, keepdim=True), fmt)


def token_codes_int8(x: torch.Tensor, mul: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token INT8 codes of ``x' = x.float() * mul`` (``x`` ``[M, K]``, ``mul`` the layer's run-time
    balancing ``[K]`` or None) and their scales ``[M]`` float32, as plain torch ops: the numbers of
    :func:`token_scale` / ``fake_quant_act(x', None, "int8", "token")`` (scale ``max(amax / 127, 1e-12)``,
    round half to even, saturate) and of ``kernels.quant_rows_int8``. Written for Inductor, which fuses
    it into the kernel that computes ``x`` (LayerNorm + modulate, GELU) under ``torch.compile``: the
    row amax is taken from ``|x|`` (``|x * mul| = |x| * |mul|`` exactly: rounding to nearest is
    symmetric in sign), so the value the reduction and the quantizer share is ``x`` in its own dtype,
    which a looped (non-persistent) reduction kernel re-reads, or stores in bf16, not a float32 copy."""
    a = x.abs().float()
    if mul is not None:
        a = a * mul.abs()
    scale = a.amax(dim=-1).div(QMAX["int8"]).clamp_min(_MIN_SCALE)
    xf = x.float() if mul is None else x.float() * mul
    return torch.round(xf / scale[:, None]).clamp_(-128, 127).to(torch.int8), scale


def fake_quant_act(x: torch.Tensor, scale: torch.Tensor | None, fmt: str, granularity: str = "tensor") -> torch.Tensor:
    """An activation's quantize-dequantize: with the static ``scale`` (``tensor``) or a scale per
    token computed from ``x`` (``token``; ``scale`` unused)."""
    if fmt == "none":
        return x
    if granularity == "token":
        return fake_quant(x, token_scale(x, fmt), fmt)
    if granularity != "tensor":
        raise ValueError(f"unknown activation granularity {granularity!r}; known: {', '.join(ACT_GRANULARITIES)}")
    return fake_quant(x, scale, fmt)


# -- weights -----------------------------------------------------------------------------------------
def _check_group(w: torch.Tensor, group_size: int | None) -> int:
    if not group_size or group_size <= 0:
        raise ValueError("granularity 'group' needs a positive group_size")
    if w.shape[-1] % group_size:
        raise ValueError(f"C_in {w.shape[-1]} is not a multiple of group size {group_size}")
    return group_size


def weight_amax(w: torch.Tensor, granularity: str, group_size: int | None = None) -> torch.Tensor:
    """max |W| over the quantization blocks of a ``[C_out, C_in]`` weight (shape as the scale)."""
    a = w.detach().float().abs()
    if granularity == "tensor":
        return a.amax()
    if granularity == "channel":
        return a.amax(dim=1)
    if granularity == "group":
        g = _check_group(w, group_size)
        return a.reshape(w.shape[0], w.shape[1] // g, g).amax(dim=2)
    raise ValueError(f"unknown granularity {granularity!r}; known: {', '.join(GRANULARITIES)}")


def expand_weight_scale(scale: torch.Tensor, shape: torch.Size | tuple, granularity: str,
                        group_size: int | None = None) -> torch.Tensor:
    """Broadcastable (tensor/channel) or element-wise (group) form of a weight scale."""
    if granularity == "tensor":
        return scale.reshape(())
    if granularity == "channel":
        return scale.reshape(-1, 1)
    if granularity == "group":
        return scale.repeat_interleave(group_size, dim=1)
    raise ValueError(f"unknown granularity {granularity!r}")


def weight_scale(w: torch.Tensor, fmt: str, granularity: str, group_size: int | None = None) -> torch.Tensor:
    """Min-max scale of a weight (calibrate/ has percentile and MSE searches)."""
    return scale_from_amax(weight_amax(w, granularity, group_size), fmt)


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, fmt: str, granularity: str,
                    group_size: int | None = None) -> torch.Tensor:
    """Integer / float8 codes of ``w`` with a stored scale (what export writes as initializer)."""
    return quantize(w, expand_weight_scale(scale, w.shape, granularity, group_size), fmt)


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, fmt: str, granularity: str,
                      group_size: int | None = None) -> torch.Tensor:
    if fmt == "none":
        return w
    return fake_quant(w, expand_weight_scale(scale, w.shape, granularity, group_size), fmt)


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(|ref|^2 / |ref - test|^2)."""
    ref = reference.double()
    noise = (ref - test.double()).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-300)))


# -- two-level INT4 weights (QServe's progressive quantization, symmetric) ------------------------------
# w ~= s1[n] * s2[n, g] * q4 with q4 in [-8, 7] and an *integer* group scale s2 in [1, S2_MAX]: then
# q4 * s2 lies in [-128, 112], an exact int8, so a GEMM can unpack INT4 weights to int8 in registers,
# accumulate int8 x int8 MMAs in int32 over the whole K, and apply one float scale per output channel
# at the end (no per-group float rescaling of partial sums). S2_MAX = 16 keeps -8 * 16 = -128 in int8.
S2_MAX = 16
_S1_BITS = 20  # s1 rounded to 20 significant bits: s1 * s2 (s2 <= 16: <= 4 bits) is exact in float32


def _round_significand(x: torch.Tensor, bits: int) -> torch.Tensor:
    m, e = torch.frexp(x)  # float32 in, float32 out (exact: bits < 24)
    return torch.ldexp(torch.round(m * 2.0 ** bits) / 2.0 ** bits, e.float())


def progressive_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-level symmetric INT4 quantization of a ``[C_out, C_in]`` weight: ``(q4, s1, s2)`` with
    ``q4`` int8 codes in [-8, 7] ``[C_out, C_in]``, ``s1`` float32 ``[C_out]`` and ``s2`` int8 in
    [1, 16] ``[C_out, C_in / g]``. ``s1`` = channel amax / (7 * 16) (the largest group gets s2 = 16);
    each group's ``s2`` is the integer in [1, 16] of least squared error (exhaustive: 16 candidates);
    ``q4 = saturate(round(w / (s1 * s2)))``, one rounding from the float weight."""
    g = _check_group(w, group_size)
    wf = w.detach().float()
    n, k = wf.shape
    wg = wf.reshape(n, k // g, g)
    s1 = _round_significand(scale_from_amax(wf.abs().amax(dim=1), "int4") / S2_MAX, _S1_BITS)
    best_err = torch.full(wg.shape[:2], float("inf"), device=wf.device)
    best = torch.ones(wg.shape[:2], dtype=torch.int8, device=wf.device)
    lo, hi = INT_RANGE["int4"]
    for s2 in range(1, S2_MAX + 1):
        s = (s1 * s2)[:, None, None]
        err = (torch.round(wg / s).clamp_(lo, hi) * s - wg).pow_(2).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best[better] = s2
    scale = s1[:, None] * best.float()  # exact (see _S1_BITS)
    q4 = quantize(wf, scale.repeat_interleave(g, dim=1), "int4")
    return q4, s1, best


def dequantize_progressive(q4: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """float32 ``s1[n] * s2[n, g] * q4`` (= ``q4 * (s1 * s2)``: the product scale is exact)."""
    g = q4.shape[1] // s2.shape[1]
    return q4.float() * (s1[:, None] * s2.float()).repeat_interleave(g, dim=1)


def fake_quant_progressive(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Quantize-dequantize ``w`` with :func:`progressive_int4` (float32)."""
    return dequantize_progressive(*progressive_int4(w, group_size))
