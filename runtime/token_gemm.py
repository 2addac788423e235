"""fc1's INT8 GEMM writing fc2's per-token INT8 codes: the row scale made in the kernel that writes the activation.

A per-token (ViDiT-Q) fc2 needs each row's amax over all of fc1's N columns before any of its codes, and one
output tile sees only BLOCK_N of them. So far fc1 wrote its output in bf16 and one pass re-read the 4x-hidden
tensor for the GELU, the amax and the codes (``kernels.quant_rows_int8(gelu=True)``), a bf16 write and read of
32768 x 4608 per block at DiT-XL/2 batch 64 (issue #13: that round trip is what per-token costs over static).

Here the programs of one row block's N tiles (a *row group*) exchange their parts of the row amax through
global memory:

1. each program computes its tile (TMA loads, int8 ``tl.dot``), dequantizes it, rounds it to the activation
   type as fc1 would store it, applies 2 x GELU(tanh) rounded as ``nn.GELU`` writes it, and fc2's balancing
   Mul -- the paired pass's numbers (``kernels._pair_chunk``), from registers instead of HBM;
2. it stores its part of each row's amax (``parts [n_tiles, M]``) and counts its columns at the row block's
   counter;
3. once the row block's N columns are counted it reads their parts, takes the row scale
   ``max(amax / 127, 1e-12)`` and writes the codes from its registers (the first N tile writes the scales).

A program waits for others of its row group, which must then get onto the GPU while it holds its SM. Programs
take their tile from a ticket counter as they start (CUB's decoupled look-back does the same), row block by
row block, not from their program id: while any tile of the lowest unfinished row group has not started, no
tile of a later group has either, so the programs on the GPU are that group's started ones and finished
groups' leaving ones, and the rest of the group starts as those leave. So no launch can deadlock whatever the
occupancy, as long as one row group fits on the GPU at once (``n_tiles`` programs: 18 for DiT-XL/2's fc1).
The buffer is reused without a memset, and re-launches (autotuning, CUDA-graph replays) start clean: the
program drawing the last ticket zeroes the ticket counter, and a row block's counter only grows, by N a launch,
so a launch's row group is complete at the next multiple of N (``_count_and_wait``). Nothing is counted on a
program's way out (session 26: until then each program also counted its departure from the row block and its
finish, two more L2 round trips at the end of every program, which at batch 1 all end together). One launch
at a time per device may use it (the engine's kernels run on one stream).

Triton's interpreter runs programs one after another, so nothing may wait there: it runs the same kernel twice,
once publishing the parts (``PUBLISH``) and once reading them and writing the codes (``QUANTIZE``), which checks
every number of the fused kernel but the wait. The codes equal the unfused fc1 + paired pass's (the same
operations in the same order); the GPU comparison is in ``benchmarks/token_pass_bench.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernels import (_GPU_MATH, _INTERPRET, _dequantize, _gelu_tanh_x2, _m_bucket, _prune_k, _round_to_half,
                      _tma_blocks, tma_eligible)

# Candidates (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, maxnreg). DiT-XL/2's fc1 is N 4608, K 1152. A program
# waits at the barrier and does its epilogue with nothing overlapping it unless another program shares its SM,
# so register caps (``maxnreg``) that let 2-3 programs of BLOCK_N 128 share an SM are candidates next to one
# 128 x 256 program per SM.
_CANDIDATES = [(128, 256, 128, 3, 8, None), (128, 256, 64, 4, 8, None),
               (128, 128, 128, 3, 8, 128), (128, 128, 64, 4, 8, 128), (128, 128, 64, 3, 8, 128),
               (64, 128, 128, 3, 4, 168), (64, 128, 64, 4, 4, 168), (64, 256, 64, 3, 4, None)]


def _config(bm, bn, bk, stages, warps, maxnreg) -> dict:
    """A candidate as ``mm8_gelu_token_codes(config=)`` takes it."""
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages, num_warps=warps,
                **({} if maxnreg is None else {"maxnreg": maxnreg}))


def _configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}, pre_hook=_tma_blocks)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_stages=s, num_warps=w, maxnreg=r,
                          pre_hook=_tma_blocks) for m, n, k, s, w, r in _CANDIDATES]


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "ROW_SCALE", "BF16", "ROUND"],
                 prune_configs_by={"early_config_prune": _prune_k})
@triton.jit
def _mm8_token_codes_kernel(a_desc, w_desc, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
                            mul_ptr, M, N: tl.constexpr, K: tl.constexpr, M_BUCKET, stride_qm,
                            ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MUL: tl.constexpr,
                            BF16: tl.constexpr, ROUND: tl.constexpr, PUBLISH: tl.constexpr,
                            QUANTIZE: tl.constexpr, WAIT: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n_tiles: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    if PUBLISH and QUANTIZE:  # tiles in the order the programs start (see the module doc), row block by row block
        tile = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu").to(tl.int32)
        # the last ticket drawn: every program has its tile, so the counter goes back to zero for the next launch
        tl.store(sync_ptr, 0, mask=tile == tl.num_programs(0) - 1)
    else:  # one phase (Triton's interpreter)
        tile = tl.program_id(0)
    _token_codes_tile(tile // n_tiles, tile % n_tiles, n_tiles, a_desc, w_desc, q_ptr, s_ptr, parts_ptr, sync_ptr + 1,
                      a_scale_ptr, w_scale_ptr, bias_ptr, mul_ptr, M, N, K, stride_qm, ROW_SCALE, HAS_BIAS, HAS_MUL,
                      BF16, ROUND, PUBLISH, QUANTIZE, WAIT, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _token_codes_tile(pid_m, pid_n, n_tiles: tl.constexpr, a_desc, w_desc, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr,
                      w_scale_ptr, bias_ptr, mul_ptr, M, N: tl.constexpr, K: tl.constexpr, stride_qm, ROW_SCALE: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_MUL: tl.constexpr, BF16: tl.constexpr, ROUND: tl.constexpr,
                      PUBLISH: tl.constexpr, QUANTIZE: tl.constexpr, WAIT: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x = _fc1_gelu_tile(pid_m, pid_n, offs_m, offs_n, a_desc, w_desc, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, K,
                       ROW_SCALE, HAS_BIAS, BF16, ROUND, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_MUL:
        x = x * tl.load(mul_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if PUBLISH:
        _publish_part(x, pid_n, offs_m, offs_n, parts_ptr, M, N)
    if PUBLISH and QUANTIZE and WAIT:  # count the tile, wait for the row block's others (all resident: module doc)
        _count_and_wait(sync_ptr + pid_m, pid_n, N, BLOCK_N)
    if QUANTIZE:
        inv = _row_inverse_scale(pid_n, n_tiles, offs_m, parts_ptr, s_ptr, M)
        _store_codes(x, inv, offs_m, offs_n, q_ptr, stride_qm, M, N)


@triton.jit
def _fc1_gelu_tile(pid_m, pid_n, offs_m, offs_n, a_desc, w_desc, a_scale_ptr, w_scale_ptr, bias_ptr, M, N, K: tl.constexpr,
                   ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BF16: tl.constexpr, ROUND: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fc1's tile (TMA loads, int8 ``tl.dot``), dequantized, + bias, -> 2 x GELU(tanh) in float32."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for ki in range(K // BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
        w = w_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
        acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
    c = _dequantize(acc, offs_m, offs_n, M, N, a_scale_ptr, w_scale_ptr, ROW_SCALE)
    if HAS_BIAS:
        c += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    # fc1's output as it would be stored, then 2 x GELU rounded as nn.GELU writes it (bf16(2 g) = 2 bf16(g)):
    # the paired pass's values (kernels._pair_chunk); the 2 comes out of the scale (_row_inverse_scale)
    if ROUND:
        return _round_tile_to_half(_gelu_tanh_x2(_round_tile_to_half(c, BF16)), BF16)
    return _gelu_tanh_x2(c)  # float32 throughout, as the static engine's fused fc1 (two conversions less)


@triton.jit
def _publish_part(x, pid_n, offs_m, offs_n, parts_ptr, M, N):
    """This tile's part of its rows' amax (``parts [n_tiles, M]``)."""
    part = tl.max(tl.where((offs_n < N)[None, :], tl.abs(x), 0.0), axis=1)
    tl.store(parts_ptr + pid_n * M + offs_m, part, mask=offs_m < M)


@triton.jit
def _count_and_wait(counter_ptr, pid_n, N: tl.constexpr, BLOCK_N: tl.constexpr):
    """Count the tile's columns at its row block's counter (acquire-release: every thread's part stored before
    says so), then wait until the row group's N columns are in. The counter is never reset: every launch adds N,
    so it is a multiple of N between launches and this launch's row group is complete at the next multiple of N
    above the count taken. The last tile of the group sees that in its own count; the others poll relaxed, then
    read once with acquire: an acquire is also an invalidation of the SM's L1 (``CCTL.IVALL``), which in a
    polling loop cost the other program's cached loads (session 25)."""
    tl.debug_barrier()
    cols = tl.minimum(N - pid_n * BLOCK_N, BLOCK_N).to(tl.int64)
    old = tl.atomic_add(counter_ptr, cols, sem="acq_rel", scope="gpu")
    done = old - old % N + N
    if old + cols < done:
        while tl.atomic_add(counter_ptr, 0, sem="relaxed", scope="gpu") < done:
            pass
        while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < done:  # once (a lone one is dropped)
            pass


@triton.jit
def _row_inverse_scale(pid_n, n_tiles: tl.constexpr, offs_m, parts_ptr, s_ptr, M):
    """The rows' amax from every N tile's part (L2 reads: other SMs wrote them), their scale
    ``max(amax / 127, 1e-12)`` stored by the first N tile; -> the multiplier of the (2x) values."""
    m_ok = offs_m < M
    amax = tl.zeros(offs_m.shape, dtype=tl.float32)
    for t in range(n_tiles):
        amax = tl.maximum(amax, tl.load(parts_ptr + t * M + offs_m, mask=m_ok, other=0.0, cache_modifier=".cg"))
    scale = tl.maximum(amax * 0.5 / 127.0, 1e-12)  # the values are 2x the GELU's
    if pid_n == 0:
        tl.store(s_ptr + offs_m, scale, mask=m_ok)
    return 0.5 / scale


@triton.jit
def _store_codes(x, inv, offs_m, offs_n, q_ptr, stride_qm, M, N):
    # round half to even by the add of 1.5 * 2**23, the code in its bits' low byte (|x * inv| <= 127)
    codes = ((x * inv[:, None] + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000).to(tl.int8)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_n[None, :], codes,
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _round_tile_to_half(x, BF16: tl.constexpr):
    """``kernels._round_to_half``; for bf16 on the GPU one packed convert per two elements (``cvt.rn.bf16x2.f32``,
    unpacked by a shift and a mask): the conversion unit, at an eighth of the float32 rate on Hopper, bounds
    this epilogue with the GELU's ``tanh.approx`` and the accumulator's int-to-float converts."""
    if _GPU_MATH and BF16:
        u = tl.inline_asm_elementwise(
            "{ .reg .b32 p; cvt.rn.bf16x2.f32 p, $3, $2; shl.b32 $0, p, 16; and.b32 $1, p, 0xffff0000; }",
            "=r,=r,f,f", [x], dtype=tl.int32, is_pure=True, pack=2)
        return u.to(tl.float32, bitcast=True)
    return _round_to_half(x, BF16)


def ws_enabled(environ=__import__("os").environ) -> bool:
    """Whether Hopper's exact calls from ``WS_MIN_ROWS`` rows take token_gemm_ws's warp-specialized kernel (one
    consumer warpgroup's epilogue under the other's MMAs, the row groups synchronised by a warp of their own):
    measured faster than this module's kernel at 4096 and 32768 rows, and end to end at batch 64 (session 24,
    docs/engines.md). It needs every CTA of its grid (one per SM) on the GPU eventually, so it is off where a
    process may get only part of the GPU: with DTQ_TOKEN_CODES_WS=0, and under MPS with
    CUDA_MPS_ACTIVE_THREAD_PERCENTAGE below 100. Read once, at import."""
    if environ.get("DTQ_TOKEN_CODES_WS", "1") != "1":
        return False
    share = environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "100")
    try:
        return float(share) >= 100
    except ValueError:
        return False


WARP_SPECIALIZED = ws_enabled()
WS_MIN_ROWS = 4096  # below, unmeasured against this module's kernel (batch 1's 512 rows was not timed alone)


def _ws_usable(a: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> bool:
    if _INTERPRET or a.device.type != "cuda":
        return False
    from . import token_gemm_ws

    return token_gemm_ws.usable(a, w, out_dtype)


_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _mm8_token_codes_kernel.configs)  # sizes the amax parts
_SYNC: dict[tuple, list[torch.Tensor]] = {}


def _counters(device: torch.device, n: int, width: int, pool: dict[tuple, list[torch.Tensor]] = _SYNC) -> torch.Tensor:
    """``n`` int64 counters for launches whose row groups add ``width`` columns each (fc1's N): the ticket counter
    and the row blocks' counters (the module doc). One buffer per (device, width) in ``pool`` (token_gemm_ws keeps
    its own): a row block's counter is a multiple of its launches' width between launches, so launches of
    another width must not share it. Grown when needed; a grown-out buffer is kept, never freed: a CUDA graph
    captured with it still uses it. int64: at 4608 columns a launch, int32 would wrap within a million."""
    bufs = pool.setdefault((device, width), [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, 4096), device=device, dtype=torch.int64))
    return bufs[-1]


def row_group_fits(n: int, device: torch.device) -> bool:
    """Whether one row group of an fc1 with ``n`` outputs (its N tiles at the narrowest candidate's BLOCK_N) is
    on ``device`` at once with one program per SM: what keeps every launch from waiting forever (module doc).
    Any device but CUDA runs Triton's interpreter, which runs the two phases one after the other."""
    if device.type != "cuda":
        return True
    return triton.cdiv(n, _MIN_BLOCK_N) <= torch.cuda.get_device_properties(device).multi_processor_count


def mm8_gelu_token_codes(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None, mul: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16,
                         config: dict | None = None, exact: bool = True,
                         _wait: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 of a DiT MLP whose fc2 takes per-token INT8 input, writing fc2's codes and row scales: the numbers of
    ``quant_rows_int8(int8_mm(a, w, a_scale, w_scale, bias, out_dtype), mul, gelu=True)`` without fc1's output in
    HBM. ``a``, ``w``: int8 ``[M, K]`` / ``[N, K]``; ``a_scale``: static ``[]`` or per row ``[M]``; ``w_scale``
    ``[N]``; ``mul``: fc2's balancing Mul ``[N]``; ``out_dtype``: bf16 or fp16, the type fc1's output and the
    GELU are rounded to. -> (int8 codes ``[M, N]``, float32 scales ``[M]``). ``config``: a pinned candidate
    (``BLOCK_M/N/K``, ``num_stages``, ``num_warps``, ``maxnreg``) instead of the autotuned one. On a Hopper GPU
    an exact call with 16-bit activations, no pinned config and ``WS_MIN_ROWS`` rows or more runs
    ``token_gemm_ws``'s warp-specialized kernel (the same codes) unless ``ws_enabled`` says no. CUDA (or
    Triton's interpreter) only; the TMA loads need 16-byte aligned rows. ``exact=False``: fc1's output and the
    GELU stay in float32 (no rounding to ``out_dtype``; the static engine's fused fc1 does the same), so codes
    can differ by a step where a rounding moved a value across a rounding boundary of the codes. ``_wait=False``
    (benchmarks only: the barrier's cost) skips the wait for the row group, so the codes are *wrong*."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N, K2 = w.shape
    assert K == K2 and a.dtype == w.dtype == torch.int8, (a.shape, a.dtype, w.shape, w.dtype)
    assert out_dtype in (torch.bfloat16, torch.float16), out_dtype
    assert tma_eligible(a, w), "TMA loads need unit inner strides and 16-byte aligned rows"
    if not row_group_fits(N, a.device):
        raise ValueError(f"fc1's {triton.cdiv(N, _MIN_BLOCK_N)} N tiles of a row block cannot all be on this GPU "
                         f"at once (one per SM): its programs could wait forever; use token_quant='pass-fused'")
    warp_specialized = WARP_SPECIALIZED and exact and _wait and config is None and M >= WS_MIN_ROWS
    if warp_specialized and _ws_usable(a, w, out_dtype):
        from . import token_gemm_ws

        return token_gemm_ws.mm8_gelu_token_codes_ws(a, w, a_scale, w_scale, bias, mul, out_dtype)
    q = torch.empty((M, N), device=a.device, dtype=torch.int8)
    s = torch.empty((M,), device=a.device, dtype=torch.float32)
    if M == 0:
        return q, s
    a_desc = TensorDescriptor(a, [M, K], list(a.stride()), [1, 1])  # block shapes: _tma_blocks
    w_desc = TensorDescriptor(w, [N, K], list(w.stride()), [1, 1])
    min_block_n = config["BLOCK_N"] if config is not None else _MIN_BLOCK_N
    parts = torch.empty((triton.cdiv(N, min_block_n), M), device=a.device, dtype=torch.float32)
    sync = _counters(a.device, 1 + triton.cdiv(M, 16), N)
    args = dict(ROW_SCALE=a_scale.dim() == 1, HAS_BIAS=bias is not None, HAS_MUL=mul is not None,
                BF16=out_dtype == torch.bfloat16, ROUND=exact)
    kernel = _mm8_token_codes_kernel
    if config is not None:
        kernel = _mm8_token_codes_kernel.fn
        _tma_blocks({"a_desc": a_desc, "w_desc": w_desc, **config})
        args.update(config)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    launch = lambda publish, quantize: kernel[grid](  # noqa: E731
        a_desc, w_desc, q, s, parts, sync, a_scale, w_scale, bias if bias is not None else w_scale,
        mul if mul is not None else w_scale, M, N, K, _m_bucket(M), q.stride(0), PUBLISH=publish, QUANTIZE=quantize,
        WAIT=_wait, **args)
    if _INTERPRET:  # nothing may wait: publish every part, then quantize
        launch(True, False)
        launch(False, True)
    else:
        launch(True, True)
    return q, s
