"""fc1's INT8 GEMM writing fc2's per-token INT8 codes: the row scale made in the kernel that writes the activation.

A per-token (ViDiT-Q) fc2 needs each row's amax over all of fc1's N columns before any of its codes, and one
output tile sees only BLOCK_N of them. So far fc1 wrote its output in bf16 and one pass re-read the 4x-hidden
tensor for the GELU, the amax and the codes (``kernels.quant_rows_int8(gelu=True)``), a bf16 write and read of
32768 x 4608 per block at DiT-XL/2 batch 64 (issue #13: that round trip is what per-token costs over static).

Here the N tiles of one row block run at the same time in one *row group* of programs, and exchange their
parts of the row amax through global memory:

1. each program computes its tile (TMA loads, int8 ``tl.dot``), dequantizes it, rounds it to the activation
   type as fc1 would store it, applies 2 x GELU(tanh) rounded as ``nn.GELU`` writes it, and fc2's balancing
   Mul -- the paired pass's numbers (``kernels._pair_chunk``), from registers instead of HBM;
2. it stores its part of each row's amax (``parts [n_tiles, M]``) and arrives at the row block's counter;
3. once the row block's ``n_tiles`` programs have arrived it reads their parts, takes the row scale
   ``max(amax / 127, 1e-12)`` and writes the codes from its registers (the first N tile writes the scales).

A program waits for others of the same launch, so all of them must be resident at once: the grid is whole row
groups of ``n_tiles`` programs, no more than the GPU has SMs (one program per SM is all that is assumed), and
each group walks the row blocks ``group, group + groups, ...``. The counter is left at zero by the row block's
last program to leave (arrive + leave, ``2 n_tiles`` counts), so the buffer is reused without a memset and
re-launches (autotuning, CUDA-graph replays) start clean. One launch at a time per device uses it.

Triton's interpreter runs programs one after another, so nothing may wait there: it runs the same kernel twice,
once publishing the parts (``PUBLISH``) and once reading them and writing the codes (``QUANTIZE``), which checks
every number of the fused kernel but the wait. The codes equal the unfused fc1 + paired pass's (the same
operations in the same order); the GPU comparison is in ``benchmarks/token_pass_bench.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernels import (_INTERPRET, _dequantize, _gelu_tanh_x2, _m_bucket, _num_sms, _prune_k, _round_to_half,
                      tma_eligible)

# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps). DiT-XL/2's fc1 (N 4608, K 1152): BLOCK_N 256 makes 18 N tiles,
# so 7 row groups on an H200's 132 SMs (126 programs); BLOCK_N 128 makes 36 (3 groups), kept for narrower N.
_COOP = [(128, 256, 128, 3, 8), (128, 256, 128, 4, 8), (128, 256, 64, 4, 8), (64, 256, 128, 4, 4),
         (64, 256, 64, 4, 4), (128, 128, 128, 4, 8), (64, 128, 128, 4, 4)]


def _tma_blocks(nargs):
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["w_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, pre_hook=_tma_blocks)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w, pre_hook=_tma_blocks)
            for m, n, k, s, w in _COOP]


def _prune(configs, named_args, **kwargs):
    """K tiles dividing K; row groups that fit on the GPU (``n_tiles <= SMS``)."""
    N, sms = named_args["N"], named_args.get("SMS", kwargs.get("SMS"))
    kept = [c for c in _prune_k(configs, named_args, **kwargs) if triton.cdiv(N, c.kwargs["BLOCK_N"]) <= sms]
    return kept or configs


def row_groups(M: int, N: int, block_m: int, block_n: int, sms: int) -> int:
    """How many row groups run at once: as many whole groups of ``cdiv(N, block_n)`` programs as there are SMs
    for, no more than there are row blocks."""
    return max(1, min(sms // triton.cdiv(N, block_n), triton.cdiv(M, block_m)))


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "ROW_SCALE", "BF16"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _mm8_token_codes_kernel(a_desc, w_desc, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
                            mul_ptr, M, N: tl.constexpr, K: tl.constexpr, M_BUCKET, stride_qm, SMS: tl.constexpr,
                            ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MUL: tl.constexpr,
                            BF16: tl.constexpr, PUBLISH: tl.constexpr, QUANTIZE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n_tiles: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    group = tl.program_id(0) // n_tiles
    pid_n = tl.program_id(0) % n_tiles
    if PUBLISH and QUANTIZE:  # the row groups walk the row blocks
        for pid_m in range(group, tl.cdiv(M, BLOCK_M), tl.num_programs(0) // n_tiles):
            _token_codes_tile(pid_m, pid_n, n_tiles, a_desc, w_desc, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr,
                              w_scale_ptr, bias_ptr, mul_ptr, M, N, K, stride_qm, ROW_SCALE, HAS_BIAS, HAS_MUL, BF16,
                              PUBLISH, QUANTIZE, BLOCK_M, BLOCK_N, BLOCK_K)
    else:  # one phase, one row block per program (Triton's interpreter)
        _token_codes_tile(group, pid_n, n_tiles, a_desc, w_desc, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr,
                          w_scale_ptr, bias_ptr, mul_ptr, M, N, K, stride_qm, ROW_SCALE, HAS_BIAS, HAS_MUL, BF16,
                          PUBLISH, QUANTIZE, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _token_codes_tile(pid_m, pid_n, n_tiles: tl.constexpr, a_desc, w_desc, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr,
                      w_scale_ptr, bias_ptr, mul_ptr, M, N: tl.constexpr, K: tl.constexpr, stride_qm, ROW_SCALE: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_MUL: tl.constexpr, BF16: tl.constexpr, PUBLISH: tl.constexpr,
                      QUANTIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for ki in range(K // BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
        w = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
        acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    c = _dequantize(acc, offs_m, offs_n, M, N, a_scale_ptr, w_scale_ptr, ROW_SCALE)
    if HAS_BIAS:
        c += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    # fc1's output as it would be stored, then 2 x GELU rounded as nn.GELU writes it (bf16(2 g) = 2 bf16(g)):
    # the paired pass's values (kernels._pair_chunk); the 2 comes out of the scale below
    x = _round_to_half(_gelu_tanh_x2(_round_to_half(c, BF16)), BF16)
    if HAS_MUL:
        x = x * tl.load(mul_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if PUBLISH:
        part = tl.max(tl.where(n_ok[None, :], tl.abs(x), 0.0), axis=1)
        tl.store(parts_ptr + pid_n * M + offs_m, part, mask=m_ok)
    if PUBLISH and QUANTIZE:  # wait for the row block's other N tiles (all resident: see the module doc)
        tl.debug_barrier()  # every thread's part stored before the count says so
        tl.atomic_add(sync_ptr + pid_m, 1, sem="release", scope="gpu")
        while tl.atomic_add(sync_ptr + pid_m, 0, sem="acquire", scope="gpu") < n_tiles:
            pass
    if QUANTIZE:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for t in range(n_tiles):  # L2 reads: the parts were written by other SMs
            amax = tl.maximum(amax, tl.load(parts_ptr + t * M + offs_m, mask=m_ok, other=0.0, cache_modifier=".cg"))
        scale = tl.maximum(amax * 0.5 / 127.0, 1e-12)  # the values are 2x the GELU's
        if pid_n == 0:
            tl.store(s_ptr + offs_m, scale, mask=m_ok)
        inv = 0.5 / scale
        # round half to even by the add of 1.5 * 2**23, the code in its bits' low byte (|x * inv| <= 127)
        codes = ((x * inv[:, None] + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int8)
        tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_n[None, :], codes, mask=m_ok[:, None] & n_ok[None, :])
    if PUBLISH and QUANTIZE:  # leave; the last of 2 n_tiles counts resets the counter for the next launch
        if tl.atomic_add(sync_ptr + pid_m, 1, sem="relaxed", scope="gpu") == 2 * n_tiles - 1:
            tl.atomic_xchg(sync_ptr + pid_m, 0, sem="relaxed", scope="gpu")


_SYNC: dict[torch.device, torch.Tensor] = {}


def _row_counters(device: torch.device, row_blocks: int) -> torch.Tensor:
    """The per-row-block counters (zeros between launches), one buffer per device, grown when needed."""
    buf = _SYNC.get(device)
    if buf is None or buf.numel() < row_blocks:
        buf = _SYNC[device] = torch.zeros(max(row_blocks, 4096), device=device, dtype=torch.int32)
    return buf


def mm8_gelu_token_codes(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None, mul: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16,
                         config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 of a DiT MLP whose fc2 takes per-token INT8 input, writing fc2's codes and row scales: the numbers of
    ``quant_rows_int8(int8_mm(a, w, a_scale, w_scale, bias, out_dtype), mul, gelu=True)`` without fc1's output in
    HBM. ``a``, ``w``: int8 ``[M, K]`` / ``[N, K]``; ``a_scale``: static ``[]`` or per row ``[M]``; ``w_scale``
    ``[N]``; ``mul``: fc2's balancing Mul ``[N]``; ``out_dtype``: bf16 or fp16, the type fc1's output and the
    GELU are rounded to. -> (int8 codes ``[M, N]``, float32 scales ``[M]``). ``config``: pinned
    ``BLOCK_M/N/K`` (+ ``num_warps``/``num_stages``) instead of the autotuned choice. CUDA (or Triton's
    interpreter) only; the TMA loads need 16-byte aligned rows."""
    M, K = a.shape
    N, K2 = w.shape
    assert K == K2 and a.dtype == w.dtype == torch.int8, (a.shape, a.dtype, w.shape, w.dtype)
    assert out_dtype in (torch.bfloat16, torch.float16), out_dtype
    assert tma_eligible(a, w), "TMA loads need unit inner strides and 16-byte aligned rows"
    from triton.tools.tensor_descriptor import TensorDescriptor

    q = torch.empty((M, N), device=a.device, dtype=torch.int8)
    s = torch.empty((M,), device=a.device, dtype=torch.float32)
    if M == 0:
        return q, s
    a_desc = TensorDescriptor(a, list(a.shape), list(a.stride()), [1, 1])  # block shapes: _tma_blocks
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [1, 1])
    sms = _num_sms(a.device)
    min_block_n = config["BLOCK_N"] if config is not None else min(c.kwargs["BLOCK_N"] for c in _configs())
    parts = torch.empty((triton.cdiv(N, min_block_n), M), device=a.device, dtype=torch.float32)
    sync = _row_counters(a.device, triton.cdiv(M, 16))
    args = dict(ROW_SCALE=a_scale.dim() == 1, HAS_BIAS=bias is not None, HAS_MUL=mul is not None,
                BF16=out_dtype == torch.bfloat16)
    ptrs = (a_desc, w_desc, q, s, parts, sync, a_scale, w_scale, bias if bias is not None else w_scale,
            mul if mul is not None else w_scale, M, N, K, _m_bucket(M), q.stride(0))
    kernel = _mm8_token_codes_kernel
    if config is not None:
        kernel = _mm8_token_codes_kernel.fn
        _tma_blocks({"a_desc": a_desc, "w_desc": w_desc, **config})
        args.update(config)
    if _INTERPRET:  # nothing may wait: publish every part, then quantize (one row block per program each time)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        kernel[grid](*ptrs, SMS=sms, PUBLISH=True, QUANTIZE=False, **args)
        kernel[grid](*ptrs, SMS=sms, PUBLISH=False, QUANTIZE=True, **args)
        return q, s
    grid = lambda meta: (row_groups(M, N, meta["BLOCK_M"], meta["BLOCK_N"], sms)  # noqa: E731
                         * triton.cdiv(N, meta["BLOCK_N"]),)
    kernel[grid](*ptrs, SMS=sms, PUBLISH=True, QUANTIZE=True, **args)
    return q, s
