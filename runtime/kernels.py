"""Triton GEMMs for the quantized PyTorch engine (``runtime.qengine``), CUDA only.

- :func:`mm8_gelu_quant`: the same GEMM for int8 or FP8 E4M3 operands, whose epilogue applies
  GELU(tanh), the next layer's balancing Mul and its input quantization (8-bit codes out).
- :func:`mm8_gate_residual`: the same GEMM whose epilogue adds a DiT block's adaLN-gated residual
  (``residual + gate * out``) and writes the new residual stream (attention proj, MLP fc2). The
  two-level W4A8 GEMM (:func:`w4a8_progressive_mm`) shares both epilogues (``_epilogue_store``).
- ``_mm8`` runs these 8-bit GEMMs on one of two kernels with the same epilogues and the same numbers:
  ``_mm8_kernel`` (pointer loads, one program per tile) or ``_mm8_tma_kernel`` (TMA loads through
  host-side tensor descriptors, one program per SM walking the tiles); the faster per shape is timed
  at the first call (``_tma_wins``, from ``TMA_MIN_M`` rows).
- :func:`unpack_progressive_int8`: two-level INT4 weights to their exact int8 products ``q4 * s2``,
  so the two-level W4A8 layer can run the INT8 GEMM (``qengine.EngineLinear.staged``);
  :func:`unpack_int4_dequant`: INT4 with float group scales to the activation type (W4A16, opt-in).
- :func:`int8_mm`: ``A int8 [M, K]`` x ``W int8 [N, K]`` -> int32 accumulate, epilogue
  ``acc * a_scale * w_scale[n] (+ bias[n])`` -> bf16/fp16. ``a_scale`` is one static per-tensor
  activation scale (TensorRT's rule and the recipe's), ``w_scale`` per output channel. On Hopper
  Triton lowers the int8 ``tl.dot`` to wgmma (both operands K-major: W is read as stored,
  ``[N, K]`` row-major), which is what makes it faster than bf16 where ``torch._int_mm`` is not.
- :func:`w4a8_mm`: ``A int8 [M, K]`` (static per-tensor scale) x INT4 ``W`` (packed as below,
  per-group scales, group a multiple of the K tile): each weight tile is unpacked to int8 in
  registers, an int8 ``tl.dot`` accumulates the tile in int32, and the tile's partial sum is scaled
  by its group's scales into an fp32 accumulator: int8 tensor-core rate with 4-bit weight memory.
- :func:`w4a16_mm`: ``A bf16/fp16 [M, K]`` x INT4 ``W`` packed two per byte (``[N, K/2]`` uint8,
  element ``2j`` in the low nibble, ``2j+1`` in the high one, stored ``+8``) with per-group scales
  ``[N, K/g]``: each weight tile is unpacked and scaled in registers (fp32, then the activation's
  type), then a bf16 ``tl.dot`` with fp32 accumulation. Weight memory is 4 bits a weight plus
  the scales; compute runs at bf16 rate.

K (and the INT4 group size) are compile-time constants: a DiT has two K values, and constant loop
bounds unroll/pipeline better. Both run under ``TRITON_INTERPRET=1`` on CPU (the tests do, when triton is importable), so their
indexing and epilogues are checked without a GPU. Importing this module needs triton.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .kernels_ref import pack_int4, pair_columns, unpack_int4  # noqa: F401  (the layouts the kernels read)


def _configs(int8: bool):
    """Tile shapes of Triton's matmul tutorial for Hopper (int8/fp8 there: BLOCK_K 128)."""
    if int8:
        shapes = [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 256, 128, 4, 8), (256, 128, 128, 4, 8), (256, 64, 128, 4, 4), (64, 256, 128, 4, 4),
                  (128, 128, 128, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
    else:
        shapes = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8), (64, 256, 64, 4, 4),
                  (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in shapes]


# INT8 / FP8 8-bit GEMM (``_mm8_kernel``) candidates per M range: (BLOCK_M, BLOCK_N, BLOCK_K, stages,
# warps). DiT-XL/2's block GEMMs (N, K): qkv (3456, 1152), proj (1152, 1152), fc1 (4608, 1152),
# fc2 (1152, 4608); H200: 132 SMs, 228 KB shared memory per SM. Programs per GEMM = cdiv(M, BM) x
# cdiv(N, BN); a "wave" is one program on every SM (more where shared memory and registers allow).
INT8_SMALL_M = 4096  # M buckets up to this (batch <= 8 with guidance) tune over the small-M tiles
_INT8_LARGE = [
    # M = 32768 (batch 64): the previous winners (256x128x128 s3 qkv/fc2, s4 proj; 128x256x128 s4 fc1) ...
    (256, 128, 128, 3, 8), (256, 128, 128, 4, 8), (128, 256, 128, 4, 8), (128, 256, 128, 3, 8),
    # ... proj (K = 1152: 9 K steps per tile) ran at 0.77x bf16 with 256x128 tiles: 1152 programs = 8.7
    # waves of ONE 192 KB CTA per SM, so each tile's pipeline fill and epilogue (scale, bf16 store of
    # 64 KB) run with nothing overlapping them. 128x128x128 at 3 stages needs 96 KB: two CTAs per SM,
    # 2304 programs = 8.7 waves of 264, one CTA's epilogue under the other's MMAs (4 stages: 128 KB,
    # one CTA, the deeper pipeline instead). 128x256 wastes the half-empty 5th column tile of N=1152.
    (128, 128, 128, 3, 8), (128, 128, 128, 4, 8),
    # BLOCK_K 64 halves the per-stage footprint (128x256x64: 24 KB a stage) for deeper pipelines
    (128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 4, 8),
    # the fused fc1 (GELU + quantize epilogue, int8 out) chose the small tile at M = 32768
    (64, 128, 64, 4, 4),
]
_INT8_SMALL = [
    # M = 512 (batch 1): proj in 128x128 tiles = 36 programs on 132 SMs; 64x64 gives 144 (fc1 576,
    # qkv 432). M = 4096 (batch 8): proj 64x64 = 1152 programs, 64 KB each at 4 stages (3 per SM).
    (64, 64, 128, 4, 4), (64, 64, 128, 6, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
    # the previous autotuner's picks at M = 512 / 4096 (bench_speed_h200_8a3a937.json)
    (64, 128, 64, 4, 4), (128, 128, 128, 4, 4), (64, 256, 128, 4, 4), (256, 64, 128, 4, 4),
    (256, 128, 128, 3, 8), (128, 256, 128, 3, 8),
]


def _int8_shapes(small_m: bool):
    return _INT8_SMALL if small_m else _INT8_LARGE


def _int8_configs():
    """Both ranges' candidates, each once (``_prune_int8`` keeps the call's range)."""
    shapes = list(dict.fromkeys(_INT8_SMALL + _INT8_LARGE))
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for m, n, k, s, w in shapes]


def _prune_int8(configs, named_args, **kwargs):
    """The candidates of the call's M range, K tiles dividing K (the unmasked loop)."""
    m_bucket = named_args.get("M_BUCKET", kwargs.get("M_BUCKET"))
    K = named_args.get("K", kwargs.get("K"))
    want = set(_int8_shapes(m_bucket <= INT8_SMALL_M))
    kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages,
                                   c.num_warps) in want and K % c.kwargs["BLOCK_K"] == 0]
    return kept or configs


def _interpret_configs():
    # Triton's interpreter pays per program, not per element: 32 x 32 output tiles (K tiles of 32 keep
    # groups inside / across a K tile in the tests' shapes)
    return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2})]


def _m_bucket(M: int) -> int:
    """Autotune key: M rounded up to a power of two (few distinct tunings per layer shape)."""
    return 1 << max(0, (M - 1).bit_length())


_INTERPRET = __import__("os").environ.get("TRITON_INTERPRET", "0") == "1"
# GPU-only instruction choices (inline PTX, the hardware's E4M3 rounding); the interpreter runs the portable
# forms of the same numbers
_GPU_MATH = tl.constexpr(not _INTERPRET)
# GELU(tanh) through tanh.approx.f32 on the GPU (``_gelu_tanh``); DTQ_GELU_TANH_APPROX=0 keeps the exp2 form
# (the ablation of benchmarks/epilogue_math_bench.py), read once at import as Triton bakes it into the kernels
GELU_TANH_APPROX = tl.constexpr(__import__("os").environ.get("DTQ_GELU_TANH_APPROX", "1") != "0")


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    return _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile ``pid``, grouped by GROUP_M rows of tiles (L2 reuse of W)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    group = pid // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % size_m)
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


# the epilogue flags are part of the autotune key: a plain and a gated-residual GEMM of one shape (same
# output dtype) would otherwise share one tuning, whichever ran first (the fused/unfused ablation); so is
# ROW_SCALE: a static and a per-token engine in one process (dtq-bench's per-token cost) shared the first
# one's tuning, and session 25's runs picked other proj / fc2 tiles depending on which engine ran first
_EPILOGUE_KEY = ["GELU_QUANT", "GATE_RESIDUAL", "ROW_SCALE"]


@triton.autotune(configs=_interpret_configs() if _INTERPRET else _int8_configs(),
                 key=["M_BUCKET", "N", "K"] + _EPILOGUE_KEY + ["A_ROWQUANT", "GELU_ROWMAX"],
                 prune_configs_by={"early_config_prune": _prune_int8})
@triton.jit
def _mm8_kernel(a_ptr, w_ptr, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, q_mul_ptr, q_scale_ptr, M, N,
                K: tl.constexpr, M_BUCKET, stride_am, stride_ak, stride_wn, stride_wk, stride_cm, stride_cn,
                gate_ptr, res_ptr, stride_gb, stride_gn, stride_rm, stride_rn, rows_per_gate, a_mul_ptr,
                FP8: tl.constexpr, HAS_BIAS: tl.constexpr, GELU_QUANT: tl.constexpr, HAS_QMUL: tl.constexpr,
                GATE_RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr, A_ROWQUANT: tl.constexpr,
                HAS_AMUL: tl.constexpr, GELU_ROWMAX: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # 8-bit x 8-bit GEMM: INT8 (int32 accumulate) or FP8 E4M3 (FP8=True, fp32 accumulate). A_ROWQUANT: A is
    # a float tensor quantized per row as it is loaded (a_scale_ptr: each row's amax, a_mul_ptr: the
    # balancing Mul over K): per-token INT8 without a quantization pass (mm8_rowquant)
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = tl.where(offs_m < M, offs_m, 0)
    w_cols = tl.where(offs_n < N, offs_n, 0)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + w_cols[None, :] * stride_wn  # [BLOCK_K, BLOCK_N], K-major
    ACC: tl.constexpr = tl.float32 if FP8 else tl.int32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    if A_ROWQUANT:  # the row scales of quant_rows_int8: s = max(amax / 127, 1e-12), one reciprocal per row
        row_scale = tl.maximum(tl.load(a_scale_ptr + a_rows) / 127.0, 1e-12)
        inv_row_scale = 1.0 / row_scale
    for k0 in range(0, K, BLOCK_K):
        if K % BLOCK_K == 0:  # compile-time: no masks (DiT's K are multiples of 64)
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k0, other=0.0 if FP8 or A_ROWQUANT else 0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < K - k0, other=0.0 if FP8 else 0)
        if A_ROWQUANT:  # balance, scale, round half to even, saturate: INT8 codes in registers
            x = a.to(tl.float32)
            if HAS_AMUL:
                x = x * tl.load(a_mul_ptr + k0 + offs_k, mask=offs_k < K - k0, other=0.0)[None, :]
            a = _int8_codes(x * inv_row_scale[:, None])
        acc = tl.dot(a, w, acc, out_dtype=ACC)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if A_ROWQUANT:
        c = acc.to(tl.float32) * (row_scale[:, None] * tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :])
    else:
        c = _dequantize(acc, offs_m, offs_n, M, N, a_scale_ptr, w_scale_ptr, ROW_SCALE)
    if GELU_ROWMAX:
        _gelu_rowmax_store(c, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, bias_ptr, q_mul_ptr, q_scale_ptr,
                           HAS_BIAS, HAS_QMUL)
    else:
        _epilogue_store(c, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, bias_ptr, q_mul_ptr, q_scale_ptr,
                        gate_ptr, res_ptr, stride_gb, stride_gn, stride_rm, stride_rn, rows_per_gate,
                        HAS_BIAS, GELU_QUANT, HAS_QMUL, FP8, GATE_RESIDUAL)


@triton.jit
def _gelu_rowmax_store(c, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, bias_ptr, q_mul_ptr, rowmax_ptr,
                       HAS_BIAS: tl.constexpr, HAS_QMUL: tl.constexpr):
    """fc1 of a per-token INT8 MLP: + bias, GELU(tanh), stored in the output type; and the tile's part of
    each row's amax of what fc2 quantizes (the stored value times fc2's balancing Mul), merged into
    ``rowmax_ptr`` (zeros before the launch) by atomic max: float bits of non-negative values order as
    integers, so the maximum is exact and independent of the tiles' order."""
    n_ok = offs_n < N
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    if HAS_BIAS:
        c += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    h = _gelu_tanh(c).to(c_ptr.dtype.element_ty)
    x = h.to(tl.float32)
    if HAS_QMUL:
        x = x * tl.load(q_mul_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
    tl.atomic_max(rowmax_ptr + offs_m, amax, mask=offs_m < M)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, h, mask=mask)


# The same GEMM with TMA loads in a persistent loop (issue #13: the pointer-load kernel above runs the INT8
# GEMMs at 39-51% of the H200's INT8 peak). Host-side tensor descriptors (``TensorDescriptor``; their block
# shapes set per candidate by ``_tma_blocks``); one program per SM walks the output tiles, and
# ``flatten=True`` lets the software pipeliner overlap a tile's epilogue with the next tile's loads.
# Out-of-range rows / columns load as zeros (TMA), so only K % BLOCK_K == 0 is required (prune).
_TMA_LARGE = [(128, 256, 128, 3, 8), (128, 256, 128, 4, 8), (128, 128, 128, 4, 8), (128, 128, 128, 5, 8),
              (128, 256, 64, 4, 8), (128, 128, 64, 5, 4), (256, 128, 128, 3, 8), (64, 256, 128, 4, 4)]


def _tma_blocks(nargs):
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _tma_configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2}, pre_hook=_tma_blocks)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=st, num_warps=w,
                          pre_hook=_tma_blocks) for m, n, k, st, w in _TMA_LARGE]


def _prune_k(configs, named_args, **kwargs):
    K = named_args.get("K", kwargs.get("K"))
    return [c for c in configs if K % c.kwargs["BLOCK_K"] == 0] or configs


@triton.autotune(configs=_tma_configs(), key=["M_BUCKET", "N", "K"] + _EPILOGUE_KEY,
                 prune_configs_by={"early_config_prune": _prune_k})
@triton.jit
def _mm8_tma_kernel(a_desc, w_desc, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, q_mul_ptr, q_scale_ptr, M, N,
                    K: tl.constexpr, M_BUCKET, stride_cm, stride_cn,
                    gate_ptr, res_ptr, stride_gb, stride_gn, stride_rm, stride_rn, rows_per_gate,
                    FP8: tl.constexpr, HAS_BIAS: tl.constexpr, GELU_QUANT: tl.constexpr, HAS_QMUL: tl.constexpr,
                    GATE_RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr, NUM_SMS: tl.constexpr,
                    PERSISTENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    if PERSISTENT:  # one program per SM walks the tiles (Triton's interpreter: one program per tile)
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
            _mm8_tma_tile(tile, a_desc, w_desc, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, q_mul_ptr, q_scale_ptr,
                          M, N, K, stride_cm, stride_cn, gate_ptr, res_ptr, stride_gb, stride_gn, stride_rm,
                          stride_rn, rows_per_gate, FP8, HAS_BIAS, GELU_QUANT, HAS_QMUL, GATE_RESIDUAL, ROW_SCALE,
                          BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    else:
        _mm8_tma_tile(tl.program_id(0), a_desc, w_desc, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, q_mul_ptr,
                      q_scale_ptr, M, N, K, stride_cm, stride_cn, gate_ptr, res_ptr, stride_gb, stride_gn, stride_rm,
                      stride_rn, rows_per_gate, FP8, HAS_BIAS, GELU_QUANT, HAS_QMUL, GATE_RESIDUAL, ROW_SCALE,
                      BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)


@triton.jit
def _mm8_tma_tile(tile, a_desc, w_desc, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, q_mul_ptr, q_scale_ptr, M, N,
                  K: tl.constexpr, stride_cm, stride_cn, gate_ptr, res_ptr, stride_gb, stride_gn, stride_rm, stride_rn,
                  rows_per_gate, FP8: tl.constexpr, HAS_BIAS: tl.constexpr, GELU_QUANT: tl.constexpr,
                  HAS_QMUL: tl.constexpr, GATE_RESIDUAL: tl.constexpr, ROW_SCALE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    ACC: tl.constexpr = tl.float32 if FP8 else tl.int32
    pid_m, pid_n = _tile_of(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for ki in range(K // BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
        w = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
        acc = tl.dot(a, w.T, acc, out_dtype=ACC)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = _dequantize(acc, offs_m, offs_n, M, N, a_scale_ptr, w_scale_ptr, ROW_SCALE)
    _epilogue_store(c, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, bias_ptr, q_mul_ptr, q_scale_ptr,
                    gate_ptr, res_ptr, stride_gb, stride_gn, stride_rm, stride_rn, rows_per_gate,
                    HAS_BIAS, GELU_QUANT, HAS_QMUL, FP8, GATE_RESIDUAL)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return 4 if device.type != "cuda" else torch.cuda.get_device_properties(device).multi_processor_count


def tma_eligible(a: torch.Tensor, w: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides, unit inner strides."""
    return all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in (a, w))


@triton.jit
def _dequantize(acc, offs_m, offs_n, M, N, a_scale_ptr, w_scale_ptr, ROW_SCALE: tl.constexpr):
    """The integer / float32 accumulator tile times ``a_scale * w_scale[n]``: ``a_scale`` static (one
    value) or, ROW_SCALE, per row of A (dynamic per-token activations, ViDiT-Q)."""
    w_scale = tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    if ROW_SCALE:
        a_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
        return acc.to(tl.float32) * (a_scale[:, None] * w_scale[None, :])
    return acc.to(tl.float32) * (tl.load(a_scale_ptr) * w_scale)[None, :]


@triton.jit
def _epilogue_store(c, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, bias_ptr, q_mul_ptr, q_scale_ptr,
                    gate_ptr, res_ptr, stride_gb, stride_gn, stride_rm, stride_rn, rows_per_gate,
                    HAS_BIAS: tl.constexpr, GELU_QUANT: tl.constexpr, HAS_QMUL: tl.constexpr,
                    FP8_CODES: tl.constexpr, GATE_RESIDUAL: tl.constexpr):
    """The epilogue the 8-bit GEMMs share, on the dequantized float32 tile ``c``: + bias, then one of
    (GELU_QUANT) the next Linear's input: GELU(tanh), its balancing Mul, 8-bit codes (E4M3 when
    FP8_CODES), or (GATE_RESIDUAL) a DiT block's adaLN-gated residual add ``res + gate[row // rows_per_gate]
    * c`` (gate ``[B, N]``, any strides: a chunk of the adaLN output), then the store."""
    n_ok = offs_n < N
    mask = (offs_m[:, None] < M) & n_ok[None, :]
    if HAS_BIAS:
        c += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU_QUANT:  # the next Linear's input, quantized here: GELU(tanh), its balancing Mul, 8-bit codes
        c = _gelu_tanh(c)
        # one reciprocal per tile and one multiply per element (as TensorRT quantizes): the codes can differ
        # from round(c / scale) by one where c / scale lies within an ulp of a rounding tie
        inv_scale = 1.0 / tl.load(q_scale_ptr)
        if HAS_QMUL:  # the balancing Mul and 1 / scale as one factor per column
            c = c * (tl.load(q_mul_ptr + offs_n, mask=n_ok, other=0.0) * inv_scale)[None, :]
        else:
            c = c * inv_scale
        c = _e4m3_codes(c) if FP8_CODES else _int8_codes(c)
    if GATE_RESIDUAL:  # one float32 multiply-add, one rounding (unfused: three bf16 roundings)
        b = tl.where(offs_m < M, offs_m, 0) // rows_per_gate
        gate = tl.load(gate_ptr + b[:, None] * stride_gb + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
        c = res.to(tl.float32) + gate.to(tl.float32) * c
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_tanh(x):
    """GELU(tanh) of a float32 tile, ``0.5 x (1 + tanh(z)) = x sigmoid(2z) = x / (1 + 2^(x (C0 + C1 x^2)))``
    with ``z = sqrt(2/pi) (x + 0.044715 x^3)`` and log2(e) folded into ``C0, C1`` (runtime.gelu): one
    ``ex2.approx``, one approximate division, a few multiplies. With the rounding below and one reciprocal
    scale per tile, fc1's GELU + INT8-quantize epilogue compiled for sm_90 went from 5744 to 3192 SASS
    instructions (the plain epilogue's kernel: 1016): it had run fc1 at two thirds of the plain GEMM's rate
    (issue #13). For very negative x the power overflows to inf and the quotient is -0, GELU's limit.

    On the GPU (``GELU_TANH_APPROX``), ``0.5 x (1 + tanh(z))`` with PTX's ``tanh.approx.f32`` instead: one
    MUFU operation where ``ex2`` + the division take two. Hopper's MUFU and conversion units run at 16 results
    per clock per SM, an eighth of its float32 rate, and they bound the GELU passes and fc1's epilogue
    (docs/engines.md, session 16). Its error (relative ~2^-11) is below the bfloat16 rounding the simulation's
    unfused GELU applies (2^-9). Triton's interpreter has no inline PTX; there the exp2 form runs."""
    if _GPU_MATH and GELU_TANH_APPROX:
        h = 0.5 * x
        return h + h * _tanh_of_gelu_arg(x)
    return tl.fdiv(x, 1.0 + tl.exp2(x * (-2.302208198144325 + -0.1029432395800235 * x * x)))


@triton.jit
def _tanh_of_gelu_arg(x):
    """``tanh(z)``, ``z = sqrt(2/pi) (x + 0.044715 x^3)``, by PTX's ``tanh.approx.f32`` (GPU only)."""
    z = x * (0.7978845608028654 + 0.035677408136300125 * x * x)
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [z], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _round_half_even(x):
    """torch.round / QuantizeLinear rounding (half to even), exact for |x| < 2**22 (callers clamp first):
    after adding 1.5 * 2**23 no fraction bits are left, so the float add itself rounds to the nearest
    integer, ties to even, and the subtraction is exact. Two adds, the same on the GPU and in Triton's
    interpreter (which has no libdevice ``rint``); the floor, tie test and ``% 2`` it replaces were about ten."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _int8_codes(x):
    """int8 codes of a float32 tile: saturate to [-128, 127], round half to even, convert. The conversion
    reads the integer out of the rounding add's bits (``x + 1.5 * 2**23`` has bits ``0x4B400000 + round(x)``
    for |x| < 2**22) with one integer subtract, where a float-to-int convert would take a conversion-unit
    slot per element (an eighth of the float32 rate on Hopper). Saturating first is the same as after:
    the bounds are integers and rounding is monotone."""
    x = tl.minimum(tl.maximum(x, -128.0), 127.0)
    return ((x + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int8)


@triton.jit
def _e4m3_codes(x):
    """FP8 E4M3 codes of a float32 tile: saturate to +-448, round to nearest even. On the GPU the convert
    (``cvt.rn.satfinite.e4m3x2.f32``, two per instruction) rounds that way itself; Triton's interpreter
    converts without ties to even, so there the value is first rounded onto the E4M3 grid (exact cast)."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if not _GPU_MATH:
        x = _round_to_e4m3(x)
    return x.to(tl.float8e4nv)


@triton.jit
def _round_to_e4m3(x):
    """Round float32 to the nearest FP8 E4M3 value, ties to even (torch's ``.to(float8_e4m3fn)``) for
    |x| <= 448: 3 mantissa bits, so the grid step is 2**(exponent - 3), and 2**-9 below 2**-6
    (subnormals). Exponent and step by bit manipulation: exact, unlike log2/exp2."""
    bits = x.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_step = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)  # powers of two: x * inv_step == x / step
    return _round_half_even(x * inv_step) * step


def _gate_residual_args(c: torch.Tensor, gate: torch.Tensor | None, residual: torch.Tensor | None) -> dict:
    """Kernel arguments of ``_epilogue_store``'s gated residual (absent: placeholders, GATE_RESIDUAL off).
    ``residual`` ``[M, N]``, ``gate`` ``[B, N]`` with M a multiple of B: rows ``b*T .. b*T+T-1`` (one
    sample's tokens) take gate row ``b``."""
    if gate is None:
        return dict(gate_ptr=c, res_ptr=c, stride_gb=0, stride_gn=0, stride_rm=0, stride_rn=0, rows_per_gate=1,
                    GATE_RESIDUAL=False)
    M, N = c.shape
    assert residual is not None and residual.shape == (M, N) and gate.dim() == 2 and gate.shape[1] == N, \
        (c.shape, None if residual is None else residual.shape, gate.shape)
    assert gate.shape[0] > 0 and M % gate.shape[0] == 0, (M, gate.shape)
    return dict(gate_ptr=gate, res_ptr=residual, stride_gb=gate.stride(0), stride_gn=gate.stride(1),
                stride_rm=residual.stride(0), stride_rn=residual.stride(1), rows_per_gate=M // gate.shape[0],
                GATE_RESIDUAL=True)


# _mm8's choice between the pointer-load and the TMA kernel, per (M bucket, N, K, dtypes, epilogue): both
# are autotuned and timed once at the first call (as Triton's autotuner times its candidates), the faster
# kept. Measured on an H200 at M = 32768 (benchmarks/tma_gemm_bench.py): TMA 1.02-1.15x on qkv / proj /
# fc1, 0.95x on INT8 fc2 (K = 4608), so neither wins everywhere. Below TMA_MIN_M rows (the TMA candidates
# are large tiles) the pointer kernel runs without a trial.
TMA_MIN_M = 8192
_TMA_WINS: dict[tuple, bool] = {}


def _tma_wins(key: tuple, launch) -> bool:
    if key not in _TMA_WINS:
        import triton.testing

        launch(False)  # each kernel's own autotuning first
        launch(True)
        t_ptr = triton.testing.do_bench(lambda: launch(False), warmup=5, rep=25, return_mode="median")
        t_tma = triton.testing.do_bench(lambda: launch(True), warmup=5, rep=25, return_mode="median")
        _TMA_WINS[key] = t_tma < t_ptr
    return _TMA_WINS[key]


def _mm8(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
         bias: torch.Tensor | None, q_mul: torch.Tensor | None = None, q_scale: torch.Tensor | None = None,
         config: dict | None = None, gate: torch.Tensor | None = None,
         residual: torch.Tensor | None = None, tma: bool | None = None, *, a_rowquant: bool = False,
         a_mul: torch.Tensor | None = None, gelu_rowmax: bool = False) -> torch.Tensor:
    """Launch the 8-bit GEMM into ``c``; ``q_scale`` given: the GELU + quantize epilogue; ``gate`` and
    ``residual`` given: the gated residual epilogue (``_epilogue_store``). ``config``:
    pinned meta-parameters (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``, optional
    ``num_warps``/``num_stages``) instead of the autotuned choice, as for :func:`w4a16_mm`. ``tma``: True
    runs ``_mm8_tma_kernel`` (where ``tma_eligible``), False ``_mm8_kernel``, None (default) the faster of
    the two for this shape on a GPU at ``TMA_MIN_M`` rows or more (``_tma_wins``), else ``_mm8_kernel``.
    Both give the same output (INT8: the same int32 sums; FP8: float32 sums in the same K order).
    ``a_rowquant``: ``a`` is a float tensor quantized per row on load (``a_scale``: row amaxes; ``a_mul``:
    balancing over K); ``gelu_rowmax``: the GELU + row-amax epilogue (``q_scale``: the amax buffer). Both
    run on ``_mm8_kernel`` only."""
    if a_rowquant or gelu_rowmax:
        tma = False
    launch = lambda t: _mm8_launch(a, w, c, a_scale, w_scale, bias, q_mul, q_scale, config, gate, residual, t,  # noqa: E731
                                   a_rowquant, a_mul, gelu_rowmax)
    if tma is not None:
        return launch(tma)
    M = a.shape[0]
    if config is not None or not a.is_cuda or _INTERPRET or M < TMA_MIN_M or not tma_eligible(a, w):
        return launch(False)
    key = (_m_bucket(M), w.shape[0], a.shape[1], a.dtype, c.dtype, q_scale is not None, gate is not None, a_scale.dim())
    return launch(_tma_wins(key, launch))


def _mm8_launch(a, w, c, a_scale, w_scale, bias, q_mul, q_scale, config, gate, residual, tma: bool,
                a_rowquant: bool = False, a_mul=None, gelu_rowmax: bool = False) -> torch.Tensor:
    assert q_scale is None or gate is None, "one epilogue: GELU + quantize or gated residual"
    M, K = a.shape
    N, K2 = w.shape
    if a_rowquant:
        assert K == K2 and w.dtype == torch.int8 and a.is_floating_point() and a_scale.shape == (M,), \
            (a.shape, a.dtype, w.shape, w.dtype, a_scale.shape)
    else:
        assert K == K2 and a.dtype == w.dtype and a.dtype in (torch.int8, torch.float8_e4m3fn), (a.shape, a.dtype, w.shape, w.dtype)
    assert not gelu_rowmax or (q_scale is not None and q_scale.shape == (M,) and q_scale.dtype == torch.float32)
    args = dict(FP8=w.dtype == torch.float8_e4m3fn, HAS_BIAS=bias is not None,
                GELU_QUANT=q_scale is not None and not gelu_rowmax, HAS_QMUL=q_mul is not None,
                ROW_SCALE=a_scale.dim() == 1, **_gate_residual_args(c, gate, residual))
    if tma and tma_eligible(a, w):
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [1, 1])  # block shapes: _tma_blocks
        w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [1, 1])
        sms = _num_sms(a.device)
        tiles = lambda meta: triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])  # noqa: E731
        grid = lambda meta: (tiles(meta) if _INTERPRET else min(sms, tiles(meta)),)  # noqa: E731
        if config is None:
            kernel = _mm8_tma_kernel
        else:
            kernel = _mm8_tma_kernel.fn
            _tma_blocks({"a_desc": a_desc, "w_desc": w_desc, **config})
        kernel[grid](a_desc, w_desc, c, a_scale, w_scale, bias if bias is not None else w_scale,
                     q_mul if q_mul is not None else w_scale, q_scale if q_scale is not None else a_scale,
                     M, N, K, _m_bucket(M), c.stride(0), c.stride(1), NUM_SMS=sms, PERSISTENT=not _INTERPRET, **args,
                     **({} if config is None else dict(config)))
        return c
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    kernel = _mm8_kernel if config is None else _mm8_kernel.fn
    kernel[grid](a, w, c, a_scale, w_scale, bias if bias is not None else w_scale,
                      q_mul if q_mul is not None else w_scale, q_scale if q_scale is not None else a_scale,
                      M, N, K, _m_bucket(M), a.stride(0), a.stride(1), w.stride(0), w.stride(1), c.stride(0),
                      c.stride(1), a_mul_ptr=a_mul if a_mul is not None else w_scale, A_ROWQUANT=a_rowquant,
                      HAS_AMUL=a_mul is not None, GELU_ROWMAX=gelu_rowmax, **args,
                      **({} if config is None else dict(config)))
    return c


def mm8_gelu_quant(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, q_mul: torch.Tensor | None, q_scale: torch.Tensor,
                   config: dict | None = None) -> torch.Tensor:
    """A DiT MLP's fc1 with the fc2 input made in its epilogue: ``quant(GELU_tanh(a @ w.T * a_scale *
    w_scale + bias) * q_mul / q_scale)``. ``a``, ``w``: both int8 (-> int8 codes, round half to even,
    saturate) or both float8_e4m3fn (-> E4M3 codes, saturate at 448). Saves writing fc1's output in
    bf16 and the separate GELU + quantize pass over it."""
    c = torch.empty((a.shape[0], w.shape[0]), device=a.device, dtype=a.dtype)
    return _mm8(a, w, c, a_scale, w_scale, bias, q_mul, q_scale, config)


def mm8_gate_residual(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None, gate: torch.Tensor, residual: torch.Tensor,
                      config: dict | None = None) -> torch.Tensor:
    """A DiT block's attention proj / MLP fc2 with its adaLN-gated residual add in the epilogue:
    ``residual + gate[b] * (a @ w.T * a_scale * w_scale + bias)`` -> a new tensor of ``residual``'s dtype
    (the block's next residual stream). ``a``, ``w``: both int8 or both float8_e4m3fn ``[M, K]`` /
    ``[N, K]``; ``residual`` ``[M, N]``; ``gate`` ``[B, N]`` (strided views are fine), M = B x tokens.
    Saves writing the GEMM's output and the separate gate-multiply + add pass over it."""
    c = torch.empty((a.shape[0], w.shape[0]), device=a.device, dtype=residual.dtype)
    return _mm8(a, w, c, a_scale, w_scale, bias, config=config, gate=gate, residual=residual)


def mm8_gelu_rowmax(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, q_mul: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16,
                    config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 of a MLP whose fc2 takes per-token INT8 input: ``h = GELU_tanh(a @ w.T * a_scale * w_scale + bias)``
    in ``out_dtype`` and ``amax[m] = max_n |h[m, n] * q_mul[n]|`` (fc2's balanced input; float32), taken in
    the epilogue (atomic max over the N tiles), so fc2's per-token scales need no pass over ``h``
    (:func:`mm8_rowquant`). ``a``, ``w`` int8 (``a_scale`` static ``[]`` or per row ``[M]``)."""
    h = torch.empty((a.shape[0], w.shape[0]), device=a.device, dtype=out_dtype)
    amax = torch.zeros((a.shape[0],), device=a.device, dtype=torch.float32)
    _mm8(a, w, h, a_scale, w_scale, bias, q_mul, amax, config, gelu_rowmax=True)
    return h, amax


def mm8_rowquant(h: torch.Tensor, amax: torch.Tensor, h_mul: torch.Tensor | None, w: torch.Tensor,
                 w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16,
                 gate: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """The INT8 GEMM on ``h`` (float ``[M, K]``) quantized per token as it is loaded: ``x = h * h_mul``,
    ``s[m] = max(amax[m] / 127, 1e-12)``, codes ``saturate(round_half_even(x * (1 / s[m])))`` in registers
    (:func:`quant_rows_int8`'s scales; its codes up to the reciprocal: they can differ by one where
    ``x / s`` lies within an ulp of a rounding tie), then ``acc * s[m] * w_scale[n] + bias``. With ``gate``
    and ``residual``: the gated residual epilogue (:func:`mm8_gate_residual`)."""
    c = torch.empty((h.shape[0], w.shape[0]), device=h.device, dtype=out_dtype if residual is None else residual.dtype)
    return _mm8(h, w, c, amax, w_scale, bias, config=config, gate=gate, residual=residual, a_rowquant=True, a_mul=h_mul)


def int8_mm(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
            bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
            config: dict | None = None) -> torch.Tensor:
    """``(a @ w.T) * a_scale * w_scale + bias``: a int8 [M, K], w int8 [N, K], a_scale float32 [] (static)
    or [M] (per-token: row m scaled by a_scale[m]),
    w_scale float32 [N], bias [N] or None -> [M, N] ``out_dtype``. ``config``: see ``_mm8``."""
    assert a.dtype == torch.int8, a.dtype
    c = torch.empty((a.shape[0], w.shape[0]), device=a.device, dtype=out_dtype)
    return _mm8(a, w, c, a_scale, w_scale, bias, config=config)


@triton.jit
def _int4_nibbles(packed):
    """Packed uint8 ``[R, C]`` -> int32 codes (low nibble, high nibble), each ``[R, C]`` in -8..7."""
    p = packed.to(tl.int32)
    return (p & 0xF) - 8, ((p >> 4) & 0xF) - 8


@triton.jit
def _unpack_int4_tile(packed, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Packed ``[BLOCK_K/2, BLOCK_N]`` uint8 (row j: element 2j low nibble, 2j+1 high, stored +8)
    -> int32 codes ``[BLOCK_K, BLOCK_N]`` in -8..7, rows 2j and 2j+1 interleaved back."""
    lo, hi = _int4_nibbles(packed)
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (BLOCK_K, BLOCK_N))


@triton.jit
def _a_even_odd(a_ptrs, stride_ak, SPLIT_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """A's K columns 2j and 2j+1 of one K tile (``a_ptrs``: the tile's first column, contiguous K),
    to meet the INT4 tile's low and high nibbles without interleaving the weights: SPLIT_DOT 1 loads
    them as two strided tiles, 2 loads the tile once and splits it in registers."""
    offs = tl.arange(0, BLOCK_K // 2)
    if SPLIT_DOT == 1:
        a_lo = tl.load(a_ptrs + (2 * offs)[None, :] * stride_ak)
        a_hi = tl.load(a_ptrs + (2 * offs + 1)[None, :] * stride_ak)
    else:
        a = tl.load(a_ptrs + tl.arange(0, BLOCK_K)[None, :] * stride_ak)
        a_lo, a_hi = tl.split(tl.reshape(a, (BLOCK_M, BLOCK_K // 2, 2)))
    return a_lo, a_hi


@triton.jit
def _int4_tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    """The INT4 GEMMs' tile indices: rows of A and of W (out-of-range ones clamped to 0, masked at the
    store), K offsets and packed-K offsets."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_rows = tl.where(offs_m < M, offs_m, 0)
    w_rows = tl.where(offs_n < N, offs_n, 0)
    return offs_m, offs_n, tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_K // 2), a_rows, w_rows


def _w4a16_shapes(small_m: bool, tiny_m: bool = False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, SPLIT_DOT, SWAP_AB). Large M: the matmul tutorial's bf16
    tiles. M <= 4096 (batch 1-8 with guidance: 512-4096 rows, 3456-4608 columns at most): big tiles
    leave most of 132 SMs idle (512 x 1152 in 128 x 256 tiles = 20 programs), so smaller tiles and
    a deeper K tile; each also with SPLIT_DOT 1 / 2 (two half-K dots on the even / odd K columns of
    A, no interleaving shuffle of the unpacked weight tile; see ``_a_even_odd``), and SWAP_AB tiles
    (``out^T = W @ A^T``: the dequantized weight is the tensor-core op's first operand, which Hopper's
    wgmma reads from registers, so it skips the round trip through shared memory that the second operand
    takes; the activation rows become wgmma's N, which may be as small as 8): the GPU's autotuner
    picks. Split-K is not needed at these M: 64 x 64 tiles already give >= 144 programs for every
    DiT-XL/2 block GEMM at 512 rows. ``tiny_m`` (M <= ``W4A16_TINY_M``: a DiT's adaLN at batch rows, a
    GEMV in all but name): 16-row tiles, narrow N tiles (216 programs for adaLN's 6912 columns at 32),
    deep K tiles, so the 4-bit weight streams in at memory speed; 64-row tiles at 2-16 rows ran at
    12-14 us where cuBLAS on the bf16 weight took 5 (session 17)."""
    if tiny_m:  # (K tiles of 256 serve K = 4608; 1152 takes 128 at most)
        return [(16, 32, 256, 4, 4, 0, 1), (16, 64, 256, 4, 4, 0, 1), (16, 32, 128, 4, 4, 0, 1),
                (16, 64, 128, 4, 4, 0, 1), (16, 32, 256, 3, 2, 0, 1), (16, 64, 256, 4, 4, 0, 0),
                (16, 32, 256, 4, 4, 0, 0), (16, 128, 128, 4, 4, 0, 1), (16, 16, 128, 4, 2, 0, 1),
                (16, 16, 128, 6, 2, 0, 1), (16, 32, 128, 6, 2, 0, 1), (16, 16, 128, 4, 1, 0, 0),
                (16, 32, 64, 8, 2, 0, 1)]
    if not small_m:
        return [(128, 256, 64, 3, 8, 0, 0), (256, 128, 64, 3, 8, 0, 0), (128, 128, 64, 4, 8, 0, 0),
                (64, 256, 64, 4, 4, 0, 0), (64, 128, 64, 4, 4, 0, 0), (64, 64, 64, 4, 4, 0, 0),
                (128, 256, 64, 3, 8, 2, 0), (128, 128, 64, 4, 8, 2, 0), (128, 256, 64, 3, 8, 0, 1),
                (256, 128, 64, 3, 8, 0, 1)]
    tiles = [(64, 64, 128, 4, 4), (64, 128, 128, 3, 4), (128, 64, 128, 3, 4), (64, 128, 64, 4, 4), (128, 128, 64, 4, 8)]
    swapped = [(64, 64, 128, 4, 4), (64, 128, 128, 3, 4), (128, 128, 64, 4, 8), (32, 128, 128, 4, 4),
               (128, 64, 128, 3, 4)]
    return [t + (split, 0) for t in tiles for split in (0, 1, 2)] + [t + (0, 1) for t in swapped]


W4A16_SMALL_M = 4096  # M buckets up to this tune over the small-M candidates
W4A16_TINY_M = 64  # ... and up to this over the tiny-M ones


def _w4a16_config(m, n, k, stages, warps, split, swap):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "SPLIT_DOT": split, "SWAP_AB": swap},
                         num_stages=stages, num_warps=warps)


def _w4a16_configs():
    shapes = dict.fromkeys(_w4a16_shapes(True, True) + _w4a16_shapes(True) + _w4a16_shapes(False))  # the union
    return [_w4a16_config(*shape) for shape in shapes]


def _config_shape(c) -> tuple:
    kw = c.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages, c.num_warps, kw["SPLIT_DOT"], kw["SWAP_AB"])


def _prune_w4a16(configs, named_args, **kwargs):
    """Only the candidates of the call's M range, with K tiles dividing K."""
    m_bucket = named_args.get("M_BUCKET", kwargs.get("M_BUCKET"))
    K = named_args.get("K", kwargs.get("K"))
    want = set(_w4a16_shapes(m_bucket <= W4A16_SMALL_M, m_bucket <= W4A16_TINY_M))
    kept = [c for c in configs if _config_shape(c) in want and K % c.kwargs["BLOCK_K"] == 0]
    return kept or configs


def _w4a16_interpret_configs():
    return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "SPLIT_DOT": 0, "SWAP_AB": 0})]


@triton.autotune(configs=_w4a16_interpret_configs() if _INTERPRET else _w4a16_configs(), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_w4a16})
@triton.jit
def _w4a16_mm_kernel(a_ptr, w_ptr, s_ptr, c_ptr, bias_ptr, M, N, K: tl.constexpr, M_BUCKET, GROUP: tl.constexpr,
                     stride_am, stride_ak, stride_wn, stride_wk, stride_sn, stride_sg, stride_cm, stride_cn,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, SPLIT_DOT: tl.constexpr, SWAP_AB: tl.constexpr):
    # requires K % BLOCK_K == 0 (checked by the wrapper); any group size dividing K
    if SWAP_AB:
        _w4a16_swapped_tile(a_ptr, w_ptr, s_ptr, c_ptr, bias_ptr, M, N, K, GROUP, stride_am, stride_ak, stride_wn,
                            stride_wk, stride_sn, stride_sg, stride_cm, stride_cn, HAS_BIAS, BLOCK_M, BLOCK_N,
                            BLOCK_K, GROUP_M)
        return
    offs_m, offs_n, offs_k, offs_kp, a_rows, w_cols = _int4_tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    a_row_ptrs = a_ptr + a_rows[:, None] * stride_am  # SPLIT_DOT: A's K columns by parity (_a_even_odd)
    w_ptrs = w_ptr + offs_kp[:, None] * stride_wk + w_cols[None, :] * stride_wn  # packed [BLOCK_K/2, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if SPLIT_DOT:  # low nibbles (K = k0 + 2j) against A's even columns, high ones against the odd
            a_lo, a_hi = _a_even_odd(a_row_ptrs + k0 * stride_ak, stride_ak, SPLIT_DOT, BLOCK_M, BLOCK_K)
            lo, hi = _int4_nibbles(tl.load(w_ptrs))
            if GROUP % BLOCK_K == 0:
                s = tl.load(s_ptr + w_cols * stride_sn + (k0 // GROUP) * stride_sg)[None, :]
                s_hi = s
            else:
                g = (k0 + 2 * offs_kp) // GROUP
                s = tl.load(s_ptr + w_cols[None, :] * stride_sn + g[:, None] * stride_sg)
                s_hi = tl.load(s_ptr + w_cols[None, :] * stride_sn + ((k0 + 2 * offs_kp + 1) // GROUP)[:, None] * stride_sg)
            acc = tl.dot(a_lo, (lo.to(tl.float32) * s).to(a_lo.dtype), acc)
            acc = tl.dot(a_hi, (hi.to(tl.float32) * s_hi).to(a_hi.dtype), acc)
        else:
            a = tl.load(a_ptrs)
            q = _unpack_int4_tile(tl.load(w_ptrs), BLOCK_K, BLOCK_N)
            if GROUP % BLOCK_K == 0:  # the tile lies in one group: one scale row
                s = tl.load(s_ptr + w_cols * stride_sn + (k0 // GROUP) * stride_sg)
                w = (q.to(tl.float32) * s[None, :]).to(a.dtype)
            else:
                g = (k0 + offs_k) // GROUP
                s2 = tl.load(s_ptr + w_cols[None, :] * stride_sn + g[:, None] * stride_sg)  # [BLOCK_K, BLOCK_N]
                w = (q.to(tl.float32) * s2).to(a.dtype)
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += (BLOCK_K // 2) * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _w4a16_swapped_tile(a_ptr, w_ptr, s_ptr, c_ptr, bias_ptr, M, N, K: tl.constexpr, GROUP: tl.constexpr,
                        stride_am, stride_ak, stride_wn, stride_wk, stride_sn, stride_sg, stride_cm, stride_cn,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        GROUP_M: tl.constexpr):
    """One output tile as its transpose, ``acc[n, m] = sum_k W[n, k] A[m, k]``: the dequantized weight tile
    ``[BLOCK_N, BLOCK_K]`` is the dot's first operand (Hopper's wgmma takes it from registers) and A's tile
    the second, read as stored (K-major). The packed weight rows unpack in place: byte j of a row holds
    elements 2j and 2j+1, so the two nibbles joined on a last axis are the row in order."""
    offs_m, offs_n, offs_k, offs_kp, a_rows, w_rows = _int4_tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + w_rows[:, None] * stride_wn + offs_kp[None, :] * stride_wk  # packed [BLOCK_N, BLOCK_K/2]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs)
        lo, hi = _int4_nibbles(tl.load(w_ptrs))
        q = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
        if GROUP % BLOCK_K == 0:  # the tile lies in one group: one scale per weight row
            s = tl.load(s_ptr + w_rows * stride_sn + (k0 // GROUP) * stride_sg)[:, None]
        else:
            s = tl.load(s_ptr + w_rows[:, None] * stride_sn + ((k0 + offs_k) // GROUP)[None, :] * stride_sg)
        acc = tl.dot((q.to(tl.float32) * s).to(a.dtype), tl.trans(a), acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += (BLOCK_K // 2) * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + offs_n[:, None] * stride_cn + offs_m[None, :] * stride_cm
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))


def w4a16_mm(a: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, group: int,
             bias: torch.Tensor | None = None, config: dict | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ dequant(W).T + bias`` with W INT4 packed ``[N, K/2]`` and scales ``[N, K/group]`` (float32).
    ``config``: launch with these meta-parameters (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M``,
    ``SPLIT_DOT``, ``SWAP_AB``, optional ``num_warps``/``num_stages``) instead of the autotuned choice: benchmarks
    and tests pin a candidate with it. ``out``: write into this ``[M, N]`` tensor of ``a``'s dtype."""
    M, K = a.shape
    N = w_packed.shape[0]
    assert w_packed.shape[1] * 2 == K and scales.shape == (N, K // group), (a.shape, w_packed.shape, scales.shape)
    c = torch.empty((M, N), device=a.device, dtype=a.dtype) if out is None else out
    assert c.shape == (M, N) and c.dtype == a.dtype, (c.shape, c.dtype)
    kernel = _w4a16_mm_kernel if config is None else _w4a16_mm_kernel.fn
    meta = {} if config is None else {"SPLIT_DOT": 0, "SWAP_AB": 0, **config}
    kernel[_int4_grid(M, N, K, group, one_group_per_tile=False)](
        a, w_packed, scales, c, bias if bias is not None else scales, M, N, K, _m_bucket(M), group,
        a.stride(0), a.stride(1), w_packed.stride(0), w_packed.stride(1), scales.stride(0), scales.stride(1),
        c.stride(0), c.stride(1), HAS_BIAS=bias is not None, **meta)
    return c


def _int4_grid(M: int, N: int, K: int, group: int, one_group_per_tile: bool):
    """Launch grid of the INT4-weight kernels (one program per output tile), checking the K tiling."""
    def grid(meta):
        assert K % meta["BLOCK_K"] == 0, (K, meta["BLOCK_K"])
        assert not one_group_per_tile or group % meta["BLOCK_K"] == 0, (group, meta["BLOCK_K"])
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    return grid


def _prune_w4a8(configs, named_args, **kwargs):
    """INT4 kernels: K tiles that divide K, preferably inside one group (one scale row per tile)."""
    group = named_args.get("GROUP", kwargs.get("GROUP"))
    K = named_args.get("K", kwargs.get("K"))
    fits = [c for c in configs if K is None or K % c.kwargs["BLOCK_K"] == 0]
    kept = [c for c in fits if group % c.kwargs["BLOCK_K"] == 0]
    return kept or fits or configs


@triton.autotune(configs=_interpret_configs() if _INTERPRET else _configs(True),
                 key=["M_BUCKET", "N", "K", "GATE_RESIDUAL", "ROW_SCALE"],
                 prune_configs_by={"early_config_prune": _prune_w4a8})
@triton.jit
def _w4a8_mm_kernel(a_ptr, w_ptr, s_ptr, c_ptr, a_scale_ptr, bias_ptr, M, N, K: tl.constexpr, M_BUCKET,
                    GROUP: tl.constexpr, stride_am, stride_ak, stride_wn, stride_wk, stride_sn, stride_sg,
                    stride_cm, stride_cn, gate_ptr, res_ptr, stride_gb, stride_gn, stride_rm, stride_rn, rows_per_gate,
                    HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, GATE_RESIDUAL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # requires K % BLOCK_K == 0 and GROUP % BLOCK_K == 0 (one group scale per K tile)
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kp = tl.arange(0, BLOCK_K // 2)
    a_rows = tl.where(offs_m < M, offs_m, 0)
    w_cols = tl.where(offs_n < N, offs_n, 0)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_kp[:, None] * stride_wk + w_cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs)
        q = _unpack_int4_tile(tl.load(w_ptrs), BLOCK_K, BLOCK_N).to(tl.int8)
        part = tl.dot(a, q, out_dtype=tl.int32)
        s = tl.load(s_ptr + w_cols * stride_sn + (k0 // GROUP) * stride_sg)
        acc += part.to(tl.float32) * s[None, :]
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += (BLOCK_K // 2) * stride_wk
    if ROW_SCALE:  # dynamic per-token activation scales
        acc = acc * tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    else:
        acc = acc * tl.load(a_scale_ptr)
    # bias, then (GATE_RESIDUAL) the block's gated residual add: the 8-bit GEMMs' shared epilogue
    _epilogue_store(acc, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, bias_ptr, a_scale_ptr, a_scale_ptr,
                    gate_ptr, res_ptr, stride_gb, stride_gn, stride_rm, stride_rn, rows_per_gate,
                    HAS_BIAS, False, False, False, GATE_RESIDUAL)


def w4a8_mm(a: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, group: int, a_scale: torch.Tensor,
            bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
            gate: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``(a @ dequant(W).T) * a_scale + bias``: a int8 [M, K], W INT4 packed ``[N, K/2]``, scales
    ``[N, K/group]`` float32, a_scale float32 [] or [M] (per token) -> [M, N] ``out_dtype``. ``gate`` and
    ``residual`` given: ``residual + gate[b] * (...)`` in the epilogue, ``residual``'s dtype out (see
    :func:`w4a8_gate_residual`)."""
    M, K = a.shape
    N = w_packed.shape[0]
    assert a.dtype == torch.int8 and w_packed.shape[1] * 2 == K and scales.shape == (N, K // group)
    c = torch.empty((M, N), device=a.device, dtype=out_dtype if gate is None else residual.dtype)
    _w4a8_mm_kernel[_int4_grid(M, N, K, group, one_group_per_tile=True)](a, w_packed, scales, c, a_scale, bias if bias is not None else scales, M, N, K, _m_bucket(M),
                          group, a.stride(0), a.stride(1), w_packed.stride(0), w_packed.stride(1), scales.stride(0),
                          scales.stride(1), c.stride(0), c.stride(1), HAS_BIAS=bias is not None,
                          ROW_SCALE=a_scale.dim() == 1, **_gate_residual_args(c, gate, residual))
    return c


def w4a8_gate_residual(a: torch.Tensor, w_packed: torch.Tensor, scales: torch.Tensor, group: int,
                       a_scale: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                       residual: torch.Tensor) -> torch.Tensor:
    """proj / fc2 of a W4A8 block (group-scaled INT4 weights) with the gated residual add in the
    epilogue (as :func:`mm8_gate_residual`): ``residual + gate[b] * w4a8_mm(...)``; ``a_scale`` static
    ``[]`` or per token ``[M]``."""
    return w4a8_mm(a, w_packed, scales, group, a_scale, bias, gate=gate, residual=residual)


def _progressive_configs():
    """The INT8 GEMM's tiles (SPLIT_DOT 0: the weight tile interleaved back) plus the four largest
    with SPLIT_DOT 1 / 2 (A split by K parity instead): the GPU's autotuner picks."""
    base = _configs(True)
    out = [triton.Config({**c.kwargs, "SPLIT_DOT": 0}, num_stages=c.num_stages, num_warps=c.num_warps) for c in base]
    return out + [triton.Config({**c.kwargs, "SPLIT_DOT": split}, num_stages=c.num_stages, num_warps=c.num_warps)
                  for c in base[:4] for split in (1, 2)]


@triton.autotune(configs=[triton.Config({**c.kwargs, "SPLIT_DOT": 0}) for c in _interpret_configs()] if _INTERPRET
                 else _progressive_configs(), key=["M_BUCKET", "N", "K"] + _EPILOGUE_KEY,
                 prune_configs_by={"early_config_prune": _prune_w4a8})
@triton.jit
def _w4a8_progressive_kernel(a_ptr, w_ptr, s2_ptr, s1_ptr, c_ptr, a_scale_ptr, bias_ptr, M, N, K: tl.constexpr,
                             M_BUCKET, GROUP: tl.constexpr, stride_am, stride_ak, stride_wn, stride_wk, stride_sn,
                             stride_sg, stride_cm, stride_cn, q_mul_ptr, q_scale_ptr, gate_ptr, res_ptr, stride_gb,
                             stride_gn, stride_rm, stride_rn, rows_per_gate, GELU_QUANT: tl.constexpr,
                             HAS_QMUL: tl.constexpr, GATE_RESIDUAL: tl.constexpr,
                             HAS_BIAS: tl.constexpr, ROW_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                             SPLIT_DOT: tl.constexpr):
    # requires K % BLOCK_K == 0; GROUP % BLOCK_K == 0 is the fast path (one s2 row per K tile)
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kp = tl.arange(0, BLOCK_K // 2)
    a_rows = tl.where(offs_m < M, offs_m, 0)
    w_cols = tl.where(offs_n < N, offs_n, 0)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_kp[:, None] * stride_wk + w_cols[None, :] * stride_wn
    a_row_ptrs = a_ptr + a_rows[:, None] * stride_am
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if SPLIT_DOT:  # as in the W4A16 kernel: two half-K dots, no interleaving of the weight tile
            a_lo, a_hi = _a_even_odd(a_row_ptrs + k0 * stride_ak, stride_ak, SPLIT_DOT, BLOCK_M, BLOCK_K)
            lo, hi = _int4_nibbles(tl.load(w_ptrs))
            if GROUP % BLOCK_K == 0:
                s2 = tl.load(s2_ptr + w_cols * stride_sn + (k0 // GROUP) * stride_sg).to(tl.int32)[None, :]
                s2_hi = s2
            else:
                s2 = tl.load(s2_ptr + w_cols[None, :] * stride_sn + ((k0 + 2 * offs_kp) // GROUP)[:, None] * stride_sg)
                s2_hi = tl.load(s2_ptr + w_cols[None, :] * stride_sn + ((k0 + 2 * offs_kp + 1) // GROUP)[:, None] * stride_sg)
                s2, s2_hi = s2.to(tl.int32), s2_hi.to(tl.int32)
            acc = tl.dot(a_lo, (lo * s2).to(tl.int8), acc, out_dtype=tl.int32)
            acc = tl.dot(a_hi, (hi * s2_hi).to(tl.int8), acc, out_dtype=tl.int32)
        else:
            a = tl.load(a_ptrs)
            q = _unpack_int4_tile(tl.load(w_ptrs), BLOCK_K, BLOCK_N)  # int32 in -8..7
            if GROUP % BLOCK_K == 0:
                s2 = tl.load(s2_ptr + w_cols * stride_sn + (k0 // GROUP) * stride_sg).to(tl.int32)
                w = (q * s2[None, :]).to(tl.int8)  # exact: |q4 * s2| <= 128
            else:
                g = (k0 + offs_k) // GROUP
                s2 = tl.load(s2_ptr + w_cols[None, :] * stride_sn + g[:, None] * stride_sg).to(tl.int32)
                w = (q * s2).to(tl.int8)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)  # int32 across the whole K: no per-group float work
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += (BLOCK_K // 2) * stride_wk
    c = _dequantize(acc, offs_m, offs_n, M, N, a_scale_ptr, s1_ptr, ROW_SCALE)  # a_scale * s1[n]
    _epilogue_store(c, offs_m, offs_n, M, N, c_ptr, stride_cm, stride_cn, bias_ptr, q_mul_ptr, q_scale_ptr,
                    gate_ptr, res_ptr, stride_gb, stride_gn, stride_rm, stride_rn, rows_per_gate,
                    HAS_BIAS, GELU_QUANT, HAS_QMUL, False, GATE_RESIDUAL)


def w4a8_progressive_mm(a: torch.Tensor, w_packed: torch.Tensor, s2: torch.Tensor, group: int, s1: torch.Tensor,
                        a_scale: torch.Tensor, bias: torch.Tensor | None = None,
                        out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None, *,
                        q_mul: torch.Tensor | None = None, q_scale: torch.Tensor | None = None,
                        gate: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Two-level INT4 weights (``quant.progressive_int4``): ``(a @ (q4 * s2).T) * a_scale * s1[n] + bias``
    with a int8 [M, K], q4 packed ``[N, K/2]``, s2 int8 ``[N, K/group]`` in [1, 16], s1 float32 [N],
    a_scale float32 ``[]`` (static) or ``[M]`` (per-token codes: row m scaled by ``a_scale[m]``) ->
    [M, N] ``out_dtype``. The integer part is exact (int32 accumulation);
    only the epilogue rounds. ``config``: pinned meta-parameters, as for :func:`w4a16_mm`. The epilogues
    of the 8-bit GEMM (``_epilogue_store``): ``q_scale`` (and ``q_mul``) given: GELU + the next layer's
    INT8 quantization, int8 codes out (``out_dtype`` ignored); ``gate`` and ``residual`` given: the
    gated residual add, ``residual``'s dtype out (see :func:`w4a8_progressive_gelu_quant`,
    :func:`w4a8_progressive_gate_residual`)."""
    M, K = a.shape
    N = w_packed.shape[0]
    assert a.dtype == torch.int8 and s2.dtype == torch.int8, (a.dtype, s2.dtype)
    assert w_packed.shape[1] * 2 == K and s2.shape == (N, K // group) and s1.shape == (N,), (w_packed.shape, s2.shape, s1.shape)
    assert q_scale is None or gate is None, "one epilogue: GELU + quantize or gated residual"
    assert a_scale.shape in ((), (M,)), f"a_scale: [] or [{M}], got {tuple(a_scale.shape)}"
    if q_scale is not None:
        out_dtype = torch.int8
    elif gate is not None:
        out_dtype = residual.dtype
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    kernel = _w4a8_progressive_kernel if config is None else _w4a8_progressive_kernel.fn
    kernel[_int4_grid(M, N, K, group, one_group_per_tile=False)](
        a, w_packed, s2, s1, c, a_scale, bias if bias is not None else s1, M, N, K, _m_bucket(M), group,
        a.stride(0), a.stride(1), w_packed.stride(0), w_packed.stride(1), s2.stride(0), s2.stride(1),
        c.stride(0), c.stride(1), q_mul if q_mul is not None else s1, q_scale if q_scale is not None else a_scale,
        GELU_QUANT=q_scale is not None, HAS_QMUL=q_mul is not None, HAS_BIAS=bias is not None,
        ROW_SCALE=a_scale.dim() == 1, **_gate_residual_args(c, gate, residual),
        **({} if config is None else dict(config)))
    return c


def w4a8_progressive_gelu_quant(a: torch.Tensor, w_packed: torch.Tensor, s2: torch.Tensor, group: int,
                                s1: torch.Tensor, a_scale: torch.Tensor, bias: torch.Tensor | None,
                                q_mul: torch.Tensor | None, q_scale: torch.Tensor,
                                config: dict | None = None) -> torch.Tensor:
    """fc1 of a two-level W4A8 MLP with fc2's INT8 input made in the epilogue (as :func:`mm8_gelu_quant`):
    ``quant(GELU_tanh(w4a8_progressive_mm(...)) * q_mul / q_scale)`` -> int8 codes."""
    return w4a8_progressive_mm(a, w_packed, s2, group, s1, a_scale, bias, config=config, q_mul=q_mul, q_scale=q_scale)


def w4a8_progressive_gate_residual(a: torch.Tensor, w_packed: torch.Tensor, s2: torch.Tensor, group: int,
                                   s1: torch.Tensor, a_scale: torch.Tensor, bias: torch.Tensor | None,
                                   gate: torch.Tensor, residual: torch.Tensor,
                                   config: dict | None = None) -> torch.Tensor:
    """proj / fc2 of a two-level W4A8 block with the gated residual add in the epilogue (as
    :func:`mm8_gate_residual`): ``residual + gate[b] * w4a8_progressive_mm(...)``."""
    return w4a8_progressive_mm(a, w_packed, s2, group, s1, a_scale, bias, config=config, gate=gate, residual=residual)


# -- INT4 weights unpacked once per call (staged): two-level to int8 for the INT8 GEMM, W4A16 to bf16/fp16 --
@triton.jit
def _unpack_int4_kernel(w_ptr, s_ptr, out_ptr, N, KP, GROUP: tl.constexpr, stride_wn, stride_sn, stride_on,
                        OUT_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr):
    # one [BLOCK_N, BLOCK_KP] tile of packed bytes -> the same tile of output *pairs*: packed byte j holds K
    # columns 2j (low nibble) and 2j + 1 (high), both in group (2j) // GROUP (the group size is even), and
    # the two outputs are stored as one 32-bit (16-bit types) or 16-bit (int8) word, column 2j in its low
    # half. Loads and stores then share one register layout (an interleave of two tiles, tl.join + reshape,
    # moved them through shared memory). OUT_DTYPE 0: int8 from integer s2 (two-level INT4, exact products,
    # |q4 * s2| <= 128); 1 / 2: bf16 / fp16 from float group scales (W4A16: q4 * s in float32, rounded once)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kp = tl.program_id(1) * BLOCK_KP + tl.arange(0, BLOCK_KP)
    mask = (offs_n[:, None] < N) & (offs_kp[None, :] < KP)
    lo, hi = _int4_nibbles(tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_kp[None, :], mask=mask, other=0))
    if (GROUP // 2) % BLOCK_KP == 0:  # one group across the tile: a scale per row (no gather, no layout change)
        s = tl.load(s_ptr + offs_n * stride_sn + (2 * BLOCK_KP * tl.program_id(1)) // GROUP, mask=offs_n < N,
                    other=0)[:, None]
    else:
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + ((2 * offs_kp) // GROUP)[None, :], mask=mask, other=0)
    if OUT_DTYPE == 0:
        s = s.to(tl.int32)
        pair = (((lo * s) & 0xFF) | (((hi * s) & 0xFF) << 8)).to(tl.int16)
    elif OUT_DTYPE == 3:  # float32 (an engine on the CPU): no pairs, the two columns stored apart
        s = s.to(tl.float32)
        out = out_ptr + offs_n[:, None] * stride_on + 2 * offs_kp[None, :]
        tl.store(out, lo.to(tl.float32) * s, mask=mask)
        tl.store(out + 1, hi.to(tl.float32) * s, mask=mask)
        return
    else:
        s = s.to(tl.float32)
        pair = _pack_half_pair(lo.to(tl.float32) * s, hi.to(tl.float32) * s, OUT_DTYPE == 1)
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_kp[None, :], pair, mask=mask)


def _unpack_int4(w_packed: torch.Tensor, scales: torch.Tensor, group: int, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    N, KP = w_packed.shape
    assert w_packed.dtype == torch.uint8 and group % 2 == 0, (w_packed.dtype, group)
    assert scales.shape == (N, 2 * KP // group) and scales.stride(1) == 1 and w_packed.stride(1) == 1, \
        (scales.shape, w_packed.shape, group)
    if out is None:
        out = torch.empty((N, 2 * KP), device=w_packed.device, dtype=dtype)
    assert out.shape == (N, 2 * KP) and out.dtype == dtype and out.stride(1) == 1, (out.shape, out.dtype)
    # the output as words of two elements (a slot's views start at even offsets: their K is even)
    out_dtype = {torch.int8: 0, torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}[dtype]
    pairs = out if out_dtype == 3 else out.view(torch.int16 if dtype == torch.int8 else torch.int32)
    # 64 x 64 bytes in, 16 KB of bf16 out a program: KP is 576 or 2304 on DiT-XL/2's layers (no masked tail)
    bn, bkp = (16, 16) if _INTERPRET else (64, 64)
    if group // 2 < bkp and not _INTERPRET:  # keep a tile within one group (group 64: 32 bytes a row)
        bn, bkp = bn * bkp // max(group // 2, 16), max(group // 2, 16)
    _unpack_int4_kernel[(triton.cdiv(N, bn), triton.cdiv(KP, bkp))](
        w_packed, scales, pairs, N, KP, group, w_packed.stride(0), scales.stride(0), pairs.stride(0),
        OUT_DTYPE=out_dtype, BLOCK_N=bn, BLOCK_KP=bkp)
    return out


def unpack_int4_dequant(w_packed: torch.Tensor, scales: torch.Tensor, group: int,
                        dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """INT4 weights with float group scales (``w4a16_mm``'s layout) -> the dequantized weight ``[N, K]`` in
    ``dtype`` (``q4 * s`` in float32, one rounding): what ``w4a16_mm`` computes per tile in registers,
    written once so that a dense GEMM (cuBLAS) can run on it. One pass over the weight. ``out``: write
    into this ``[N, K]`` tensor (``runtime.weight_prefetch``'s slots) instead of a new one."""
    assert scales.dtype == torch.float32, scales.dtype
    return _unpack_int4(w_packed, scales, group, dtype, out)


def unpack_progressive_int8(w_packed: torch.Tensor, s2: torch.Tensor, group: int) -> torch.Tensor:
    """Two-level INT4 weights (``quant.progressive_int4``: q4 packed ``[N, K/2]``, integer ``s2`` ``[N, K/group]``)
    -> the exact int8 products ``q4 * s2`` ``[N, K]``: what the two-level kernel computes in registers,
    written once so that the layer runs on the INT8 GEMM (``int8_mm`` / ``mm8_*`` with ``w_scale = s1``:
    the same int32 sums and the same epilogue, so the same output). One pass over the layer's weight
    (``N * K * 1.5`` bytes); on an H200 it cost less than unpacking in the GEMM's registers at every
    batch measured (``qengine.W4A8_STAGED_MIN_ROWS``)."""
    assert s2.dtype == torch.int8, s2.dtype
    return _unpack_int4(w_packed, s2, group, torch.int8)


# -- per-token dynamic activation quantization ----------------------------------------------------------
@triton.jit
def _quant_rows_kernel(x_ptr, mul_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, HAS_MUL: tl.constexpr,
                       GELU: tl.constexpr, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    # ROWS rows per program: load them once, (GELU,) balance, amax -> scale, round half to even, saturate.
    # A row in two power-of-two parts, [0, BLOCK_A) and [BLOCK_A, BLOCK_A + BLOCK_B) (4608 = 4096 + 512,
    # 1152 = 1024 + 128; BLOCK_B = 0: K is BLOCK_A): one next-power-of-two block computed 44% masked-off
    # lanes at both DiT-XL/2 widths, and these passes are bound by instruction issue, not memory
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    cols_a = tl.arange(0, BLOCK_A)
    xa = _quant_rows_part(x_ptr, mul_ptr, rows, rmask, cols_a, K, stride_xm, HAS_MUL, GELU)
    amax = tl.max(tl.abs(xa), axis=1)
    if BLOCK_B > 0:
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        xb = _quant_rows_part(x_ptr, mul_ptr, rows, rmask, cols_b, K, stride_xm, HAS_MUL, GELU)
        amax = tl.maximum(amax, tl.max(tl.abs(xb), axis=1))
    scale = tl.maximum(amax / QMAX, MIN_SCALE)
    tl.store(s_ptr + rows, scale, mask=rmask)
    _store_codes(xa / scale[:, None], rows, cols_a, rmask, K, q_ptr, stride_qm, 0)  # the simulation's x / s
    if BLOCK_B > 0:
        _store_codes(xb / scale[:, None], rows, cols_b, rmask, K, q_ptr, stride_qm, 0)


@triton.jit
def _quant_rows_part(x_ptr, mul_ptr, rows, rmask, cols, K, stride_xm, HAS_MUL: tl.constexpr, GELU: tl.constexpr):
    cmask = cols < K
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                other=0.0).to(tl.float32)
    if GELU:  # fc1's output -> GELU(tanh) rounded to the activation's type, as the unfused nn.GELU writes it
        x = _round_to_half(_gelu_tanh(x), x_ptr.dtype.element_ty == tl.bfloat16)
    if HAS_MUL:
        x = x * tl.load(mul_ptr + cols, mask=cmask, other=0.0)[None, :]
    return x


def _row_parts(K: int) -> tuple[int, int]:
    """A row of K as two power-of-two blocks (the largest <= K, then the rest's next power of two; 0: none)."""
    block_a = 1 << (K.bit_length() - 1)
    return block_a, (triton.next_power_of_2(K - block_a) if K > block_a else 0)


def _row_block(K: int, rows: int | None, warps: int | None) -> tuple[int, int, int]:
    """(BLOCK_K, rows per program, warps) of a row-wise pass over ``[M, K]``: whole rows in registers,
    about 8K elements per program, so a program moves tens of KB (one short row per program, as before,
    left the passes latency-bound: 115 us for 32768 x 1152 on an H200, 4x their bandwidth time)."""
    block_k = triton.next_power_of_2(K)
    if _INTERPRET:  # the interpreter's cost is per program: few, numpy-wide ones
        return block_k, rows or 16, warps or 1
    # H200, 32768 rows (benchmarks/norm_quant_bench.py): 4 rows x 4 warps at K = 1152, as fast as or
    # faster than 8 warps in both sweeps
    return block_k, rows or max(1, min(16, 8192 // block_k)), warps or 4


def quant_rows_int8(x: torch.Tensor, mul: torch.Tensor | None = None, gelu: bool = False,
                    _rows: int | None = None, _warps: int | None = None, mul_pairs: torch.Tensor | None = None,
                    _paired: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ViDiT-Q's dynamic per-token INT8 quantization in one pass over ``x`` [M, K] (any float type):
    ``x' = x.float() * mul`` (the layer's run-time balancing, optional), ``s[m] = max(amax|x'[m]| / 127,
    1e-12)``, ``q = saturate(round_half_even(x' / s))`` -> (int8 [M, K], float32 [M]): the numbers of
    ``quant.fake_quant_act(..., "token")`` and of the ONNX graph's per-token Q/DQ. Feeds ``int8_mm`` /
    ``w4a8_mm`` with a per-row ``a_scale``. K up to a few thousand (whole rows per program, in registers;
    ``_rows`` / ``_warps`` override the launch for benchmarks).
    ``gelu``: ``x`` is fc1's output and the pass first applies GELU(tanh), rounded to ``x``'s dtype (what
    an unfused ``nn.GELU`` would write): fc2's per-token input without the GELU pass over the 4x-hidden tensor.

    16-bit ``x`` with an even K (every DiT width) runs the paired pass (``_quant_pairs_kernel``), which
    reads ``mul`` as :func:`pair_columns` lays it out: pass ``mul_pairs`` (a layer keeps it,
    ``EngineLinear.input_mul_pairs``) or it is laid out here. Its codes are ``round(x' * (1 / s))``: they
    can differ from ``x' / s`` by one step where that quotient lies within an ulp of a rounding tie.
    ``_paired=False`` forces the row-block kernel (benchmarks)."""
    M, K = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty((M, K), device=x.device, dtype=torch.int8)
    s = torch.empty((M,), device=x.device, dtype=torch.float32)
    plan = _pair_plan(K, x.dtype, _warps) if _paired is not False else None
    if M and plan is not None:
        chunk, full, tail, warps = plan
        has_mul = mul is not None or mul_pairs is not None
        if has_mul and mul_pairs is None:
            mul_pairs = pair_columns(mul)
        _quant_pairs_kernel[(M,)](
            x.view(torch.int32), mul_pairs if has_mul else s, q.view(torch.int16), s, K // 2, x.stride(0) // 2,
            q.stride(0) // 2, BF16=x.dtype == torch.bfloat16, HAS_MUL=has_mul, GELU=gelu, QMAX=127.0,
            MIN_SCALE=1e-12, CHUNK=chunk, FULL=full, TAIL=tail, num_warps=warps)
    elif M:
        if mul is None and mul_pairs is not None:
            mul = mul_pairs.t().reshape(-1)
        block_a, block_b = _row_parts(K)
        _, rows, warps = _row_block(block_a + block_b, _rows, _warps)
        _quant_rows_kernel[(triton.cdiv(M, rows),)](
            x, mul if mul is not None else s, q, s, M, K, x.stride(0), q.stride(0), HAS_MUL=mul is not None,
            GELU=gelu, QMAX=127.0, MIN_SCALE=1e-12, ROWS=rows, BLOCK_A=block_a, BLOCK_B=block_b, num_warps=warps)
    return q, s


# -- the paired per-token pass ----------------------------------------------------------------------------
# quant_rows_int8 on 16-bit rows of even width, read as int32 pairs (bf16/fp16 columns 2j, 2j + 1) and written
# as int16 pairs of codes. Every load and store of a program then has the same register layout (4 pairs a
# thread); the row-block kernel's bf16 loads, float32 Mul and int8 stores had three, and Triton moved the
# tensors between them through shared memory (9 layout conversions, a barrier each). With the GELU's 1/2 moved
# into the scale (exact: a power of two), a packed bf16x2 rounding and the codes read from the rounding add's
# bits without a clamp (|x' / s| <= 127 by construction), fc2's GELU pass compiled for sm_90 went from 28 to
# 15.6 SASS instructions per element.
PAIR_CHUNKS = 4  # a row's pairs in up to 4 full chunks of 128 x warps + one tail chunk, each in registers


def _pair_plan(K: int, dtype: torch.dtype, warps: int | None = None) -> tuple[int, int, int, int] | None:
    """(CHUNK, FULL, TAIL, warps) of the paired pass over rows of K, or None where it does not apply (odd K,
    a 32-bit input, rows too wide). One row per program; the fewest warps whose chunks hold the row:
    4 warps at K = 4608, 1 at K = 1152 (chunks of 512 / 128 pairs + a 256 / 64 tail)."""
    if K % 2 or dtype not in (torch.bfloat16, torch.float16):
        return None
    pairs = K // 2
    for w in ((warps,) if warps else (1, 2, 4, 8, 16)):
        chunk = 4 * 32 * w
        full, rest = divmod(pairs, chunk)
        if full == 0:
            return triton.next_power_of_2(pairs), 1, 0, w  # one masked chunk
        if full <= PAIR_CHUNKS:
            return chunk, full, (triton.next_power_of_2(rest) if rest else 0), w
    return None


@triton.jit
def _half_pair(u, BF16: tl.constexpr):
    """The two 16-bit floats packed in int32 ``u`` (column 2j in the low half) as float32."""
    if BF16:
        return (u << 16).to(tl.float32, bitcast=True), (u & -65536).to(tl.float32, bitcast=True)
    lo = (u & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, (u >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _round_half_pair(lo, hi, BF16: tl.constexpr):
    """``lo``, ``hi`` rounded to the 16-bit type (nearest even) and back to float32: on the GPU one packed
    convert (``cvt.rn.bf16x2.f32``) for both, where a convert each takes a conversion-unit slot."""
    if _GPU_MATH:
        return _half_pair(_pack_half_pair(lo, hi, BF16), BF16)
    return _round_to_half(lo, BF16), _round_to_half(hi, BF16)


@triton.jit
def _pack_half_pair(lo, hi, BF16: tl.constexpr):
    """float32 ``lo``, ``hi`` rounded to the 16-bit type (nearest even) and packed in one int32, ``lo`` in the
    low half (the layout :func:`_half_pair` reads): on the GPU one ``cvt.rn.bf16x2.f32`` for both."""
    if _GPU_MATH:
        cvt: tl.constexpr = "cvt.rn.bf16x2.f32 $0, $1, $2;" if BF16 else "cvt.rn.f16x2.f32 $0, $1, $2;"
        return tl.inline_asm_elementwise(cvt, "=r,f,f", [hi, lo], dtype=tl.int32, is_pure=True, pack=1)
    if BF16:  # the interpreter truncates float32 -> bf16: take the rounded bits
        return (_round_to_half(hi, BF16).to(tl.int32, bitcast=True) & -65536) | \
            ((_round_to_half(lo, BF16).to(tl.int32, bitcast=True) >> 16) & 0xFFFF)
    u_lo = lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return (hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16) | u_lo


@triton.jit
def _round_to_half(x, BF16: tl.constexpr):
    """float32 ``x`` rounded to bfloat16 (BF16) or float16, nearest even, as float32. Triton's interpreter
    truncates float32 to bfloat16, so there the rounding is done on the bits (finite values)."""
    if BF16:
        if _GPU_MATH:
            return x.to(tl.bfloat16).to(tl.float32)
        u = x.to(tl.int32, bitcast=True)
        u = (u + (0x7FFF + ((u >> 16) & 1))) & -65536
        return u.to(tl.float32, bitcast=True)
    return x.to(tl.float16).to(tl.float32)


@triton.jit
def _gelu_tanh_x2(x):
    """2 GELU(tanh)(x) = x + x tanh(z): ``_gelu_tanh`` without its multiply by 1/2 (the caller's scale has it)."""
    if _GPU_MATH and GELU_TANH_APPROX:
        return x + x * _tanh_of_gelu_arg(x)
    return 2.0 * _gelu_tanh(x)


@triton.jit
def _pair_chunk(x_ptr, mul_ptr, row, start: tl.constexpr, SIZE: tl.constexpr, P: tl.constexpr, stride_xm,
                BF16: tl.constexpr, HAS_MUL: tl.constexpr, GELU: tl.constexpr):
    """Pairs ``[start, start + SIZE)`` of a row: even and odd columns as float32 after (2x) GELU and the Mul,
    and their elementwise ``max(|even|, |odd|)`` (the caller reduces it once per row)."""
    cols = start + tl.arange(0, SIZE)
    FULL: tl.constexpr = start + SIZE <= P
    if FULL:
        u = tl.load(x_ptr + row * stride_xm + cols)
    else:
        u = tl.load(x_ptr + row * stride_xm + cols, mask=cols < P, other=0)
    lo, hi = _half_pair(u, BF16)
    if GELU:  # rounded as the unfused nn.GELU writes it: bf16(2 g) = 2 bf16(g)
        lo, hi = _round_half_pair(_gelu_tanh_x2(lo), _gelu_tanh_x2(hi), BF16)
    if HAS_MUL:
        if FULL:
            lo = lo * tl.load(mul_ptr + cols)
            hi = hi * tl.load(mul_ptr + P + cols)
        else:
            lo = lo * tl.load(mul_ptr + cols, mask=cols < P, other=0.0)
            hi = hi * tl.load(mul_ptr + P + cols, mask=cols < P, other=0.0)
    return lo, hi, tl.maximum(tl.abs(lo), tl.abs(hi))


@triton.jit
def _store_pair_codes(lo, hi, inv, row, start: tl.constexpr, SIZE: tl.constexpr, P: tl.constexpr, q_ptr,
                      stride_qm):
    """int16 pairs of INT8 codes ``round_half_even(x * inv)``: ``x * inv + 1.5 * 2**23`` rounds to the integer
    and its bits' low byte is the code (no clamp: ``|x * inv| <= 127`` up to an ulp, as inv is 127 / amax)."""
    cols = start + tl.arange(0, SIZE)
    b_lo = (lo * inv + 12582912.0).to(tl.int32, bitcast=True)
    b_hi = (hi * inv + 12582912.0).to(tl.int32, bitcast=True)
    q = ((b_lo & 0xFF) | ((b_hi & 0xFF) << 8)).to(tl.int16)
    if start + SIZE <= P:
        tl.store(q_ptr + row * stride_qm + cols, q)
    else:
        tl.store(q_ptr + row * stride_qm + cols, q, mask=cols < P)


@triton.jit
def _quant_pairs_kernel(x_ptr, mul_ptr, q_ptr, s_ptr, P: tl.constexpr, stride_xm, stride_qm, BF16: tl.constexpr,
                        HAS_MUL: tl.constexpr, GELU: tl.constexpr, QMAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                        CHUNK: tl.constexpr, FULL: tl.constexpr, TAIL: tl.constexpr):
    # one row per program: its P pairs in FULL chunks of CHUNK (up to 4, written out: Triton has no lists of
    # tensors) and a TAIL chunk, all in registers until the row's scale is known
    row = tl.program_id(0).to(tl.int64)
    l0, h0, m = _pair_chunk(x_ptr, mul_ptr, row, 0, CHUNK, P, stride_xm, BF16, HAS_MUL, GELU)
    if FULL > 1:
        l1, h1, m1 = _pair_chunk(x_ptr, mul_ptr, row, CHUNK, CHUNK, P, stride_xm, BF16, HAS_MUL, GELU)
        m = tl.maximum(m, m1)
    if FULL > 2:
        l2, h2, m2 = _pair_chunk(x_ptr, mul_ptr, row, 2 * CHUNK, CHUNK, P, stride_xm, BF16, HAS_MUL, GELU)
        m = tl.maximum(m, m2)
    if FULL > 3:
        l3, h3, m3 = _pair_chunk(x_ptr, mul_ptr, row, 3 * CHUNK, CHUNK, P, stride_xm, BF16, HAS_MUL, GELU)
        m = tl.maximum(m, m3)
    amax = tl.max(m, axis=0)
    if TAIL > 0:
        lt, ht, mt = _pair_chunk(x_ptr, mul_ptr, row, FULL * CHUNK, TAIL, P, stride_xm, BF16, HAS_MUL, GELU)
        amax = tl.maximum(amax, tl.max(mt, axis=0))
    if GELU:  # the values are 2x the GELU's: halve the amax and the reciprocal (exact)
        amax = amax * 0.5
    scale = tl.maximum(amax / QMAX, MIN_SCALE)
    tl.store(s_ptr + row, scale)
    inv = (0.5 if GELU else 1.0) / scale
    _store_pair_codes(l0, h0, inv, row, 0, CHUNK, P, q_ptr, stride_qm)
    if FULL > 1:
        _store_pair_codes(l1, h1, inv, row, CHUNK, CHUNK, P, q_ptr, stride_qm)
    if FULL > 2:
        _store_pair_codes(l2, h2, inv, row, 2 * CHUNK, CHUNK, P, q_ptr, stride_qm)
    if FULL > 3:
        _store_pair_codes(l3, h3, inv, row, 3 * CHUNK, CHUNK, P, q_ptr, stride_qm)
    if TAIL > 0:
        _store_pair_codes(lt, ht, inv, row, FULL * CHUNK, TAIL, P, q_ptr, stride_qm)


# -- LayerNorm + adaLN modulate + the next layer's input quantization, one pass --------------------------
NORM_CODES = ("int8", "int8-token", "fp8")  # static INT8, per-token INT8 (ViDiT-Q), static FP8 E4M3


@triton.jit
def _norm_quant_kernel(x_ptr, shift_ptr, scale_ptr, mul_ptr, a_scale_ptr, q_ptr, s_ptr, M, K, T, eps,
                       stride_xm, stride_mb, stride_qm, HAS_MUL: tl.constexpr, CODES: tl.constexpr,
                       ROWS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
    # ROWS whole rows of one sample per program (ROWS divides T): the row in two power-of-two parts,
    # [0, BLOCK_A) and [BLOCK_A, BLOCK_A + BLOCK_B) (1152 = 1024 + 128: no masked-off lanes, whose
    # instructions a single 2048-wide block would issue anyway; BLOCK_B = 0: K is BLOCK_A). The LayerNorm
    # (no affine) and the modulate round to x's dtype where the unfused torch ops write it; then the
    # layer's balancing and the codes. CODES: 0 static INT8, 1 per-token INT8 (scale per row), 2 static FP8.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    sample = (tl.program_id(0) * ROWS) // T
    cols_a = tl.arange(0, BLOCK_A)
    xa = tl.load(x_ptr + rows[:, None] * stride_xm + cols_a[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
    total = tl.sum(xa, axis=1)
    if BLOCK_B > 0:
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        mask_b = rmask[:, None] & (cols_b[None, :] < K)
        xb = tl.load(x_ptr + rows[:, None] * stride_xm + cols_b[None, :], mask=mask_b, other=0.0).to(tl.float32)
        total += tl.sum(xb, axis=1)
    # two dependent reductions, as torch's: on the H200, sums of x - x[0] and its square in one step were
    # no faster (62 against 57 us for static INT8 at 32768 x 1152, 4 rows x 2 warps; noisy timings)
    mean = total / K
    xa = xa - mean[:, None]
    sq = tl.sum(xa * xa, axis=1)
    if BLOCK_B > 0:
        xb = tl.where(mask_b, xb - mean[:, None], 0.0)  # padding stays 0: out of the per-token amax
        sq += tl.sum(xb * xb, axis=1)
    rstd = 1.0 / tl.sqrt(sq / K + eps)
    if CODES != 1:
        inv = 1.0 / tl.load(a_scale_ptr)  # static: one multiplier per column, the balancing folded in
    else:
        inv = 1.0
    ya = _modulate_part(xa, rstd, sample, cols_a, K, shift_ptr, scale_ptr, mul_ptr, stride_mb, inv, HAS_MUL,
                        x_ptr.dtype.element_ty)
    if BLOCK_B > 0:
        yb = _modulate_part(xb, rstd, sample, cols_b, K, shift_ptr, scale_ptr, mul_ptr, stride_mb, inv, HAS_MUL,
                            x_ptr.dtype.element_ty)
    if CODES == 1:  # per token: the row's amax over both parts, then x / scale (quant_rows_int8's codes)
        amax = tl.max(tl.abs(ya), axis=1)
        if BLOCK_B > 0:
            amax = tl.maximum(amax, tl.max(tl.abs(yb), axis=1))
        s = tl.maximum(amax / 127.0, 1e-12)
        tl.store(s_ptr + rows, s, mask=rmask)
        ya = ya / s[:, None]
        if BLOCK_B > 0:
            yb = yb / s[:, None]
    _store_codes(ya, rows, cols_a, rmask, K, q_ptr, stride_qm, CODES)
    if BLOCK_B > 0:
        _store_codes(yb, rows, cols_b, rmask, K, q_ptr, stride_qm, CODES)


@triton.jit
def _modulate_part(xc, rstd, sample, cols, K, shift_ptr, scale_ptr, mul_ptr, stride_mb, inv, HAS_MUL: tl.constexpr,
                   dt: tl.constexpr):
    # (x - mean) * rstd -> dtype; * (1 + scale) -> dtype; + shift -> dtype (modulate's three roundings);
    # then * balancing * inv in float32. shift / scale / mul: one row of the program's sample, per column
    cmask = cols < K
    sc = tl.load(scale_ptr + sample * stride_mb + cols, mask=cmask, other=0.0).to(tl.float32)
    sh = tl.load(shift_ptr + sample * stride_mb + cols, mask=cmask, other=0.0).to(tl.float32)
    y = (xc * rstd[:, None]).to(dt).to(tl.float32)
    y = (y * (1.0 + sc).to(dt).to(tl.float32)[None, :]).to(dt).to(tl.float32)
    y = (y + sh[None, :]).to(dt).to(tl.float32)
    if HAS_MUL:
        y = y * (tl.load(mul_ptr + cols, mask=cmask, other=0.0) * inv)[None, :]
    else:
        y = y * inv
    return y


@triton.jit
def _store_codes(y, rows, cols, rmask, K, q_ptr, stride_qm, CODES: tl.constexpr):
    q = _e4m3_codes(y) if CODES == 2 else _int8_codes(y)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q, mask=rmask[:, None] & (cols[None, :] < K))


def norm_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, mul: torch.Tensor | None,
               a_scale: torch.Tensor | None, codes: str, _rows: int | None = None,
               _warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A DiT block's ``LayerNorm(x)`` (no affine), adaLN ``modulate`` and the next layer's input
    quantization in one pass: ``x`` ``[B, T, K]``, ``shift`` / ``scale`` ``[B, K]`` (views of the adaLN
    output are fine), ``mul`` the layer's run-time balancing ``[K]`` float32 or None; ``codes`` one of
    :data:`NORM_CODES`, static ones with the layer's ``a_scale``. Returns (codes ``[B*T, K]`` int8 /
    float8_e4m3fn, scale: ``a_scale`` or per row ``[B*T]`` float32). The LayerNorm and the modulate
    round to ``x``'s dtype as the unfused torch ops do, so the codes are those of the layer's quantizer
    on the unfused ``modulate(norm(x))``, up to the LayerNorm's reduction order and, for static scales,
    one multiply by ``mul / a_scale`` where the quantizer multiplies, then divides (a code can differ
    where the two roundings straddle a rounding tie; the tests bound both). Per-token codes divide by
    the row's scale, as ``quant_rows_int8``. Replaces Inductor's LayerNorm + modulate + quantize kernel,
    which took 2.3x this kernel's first version's time at 32768 x 1152 on an H200 (docs/engines.md)."""
    if codes not in NORM_CODES:
        raise ValueError(f"codes must be one of {NORM_CODES}, got {codes!r}")
    B, T, K = x.shape
    M = B * T
    x2 = x.reshape(M, K)
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    assert shift.shape == scale.shape == (B, K) and shift.stride() == scale.stride() and shift.stride(1) == 1, \
        (shift.shape, shift.stride(), scale.stride())
    fp8 = codes == "fp8"
    q = torch.empty((M, K), device=x.device, dtype=torch.float8_e4m3fn if fp8 else torch.int8)
    token = codes == "int8-token"
    s = torch.empty((M,), device=x.device, dtype=torch.float32) if token else a_scale
    if M:
        block_a, block_b = _row_parts(K)
        _, rows, warps = _row_block(block_a + block_b, _rows, _warps)
        while T % rows:  # a program's rows share one sample's shift / scale
            rows //= 2
        _norm_quant_kernel[(triton.cdiv(M, rows),)](
            x2, shift, scale, mul if mul is not None else s, a_scale if a_scale is not None else s, q, s,
            M, K, T, eps, x2.stride(0), shift.stride(0), q.stride(0), HAS_MUL=mul is not None,
            CODES=NORM_CODES.index(codes), ROWS=rows, BLOCK_A=block_a, BLOCK_B=block_b, num_warps=warps)
    return q, s
