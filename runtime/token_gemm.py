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

from .kernels import (_GPU_MATH, _INTERPRET, _dequantize, _gelu_tanh_x2, _m_bucket, _num_sms, _round_to_half,
                      tma_eligible)

# Candidates (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, maxnreg), timed at the first call per shape
# (``_choose``). DiT-XL/2's fc1 is N 4608, K 1152. A program waits at the barrier and does its epilogue
# with nothing overlapping it unless another program shares its SM, so register caps (``maxnreg``) that let
# 2-3 programs of ``BLOCK_N`` 128 share an SM are candidates next to one 128 x 256 program per SM.
_CANDIDATES = [(128, 256, 128, 3, 8, None), (128, 256, 64, 4, 8, None),
               (128, 128, 128, 3, 8, 128), (128, 128, 64, 4, 8, 128), (128, 128, 64, 3, 8, 128),
               (64, 128, 128, 3, 4, 168), (64, 128, 64, 4, 4, 168), (64, 256, 64, 3, 4, None)]


def _config(bm, bn, bk, stages, warps, maxnreg) -> dict:
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_stages=stages, num_warps=warps, maxnreg=maxnreg)


def programs_per_sm(kernel, device: torch.device) -> int:
    """How many programs of the compiled ``kernel`` an SM holds at once, from its registers, shared memory and
    warps (the CUDA occupancy rules: registers in 256-register units per warp, four sub-partitions of a quarter
    of the register file each, 1 KB of shared memory reserved per program)."""
    kernel._init_handles()  # loads the binary: n_regs
    props = torch.cuda.get_device_properties(device)
    warps = kernel.metadata.num_warps
    regs_per_warp = -(-max(kernel.n_regs, 1) * 32 // 256) * 256
    by_regs = 4 * ((props.regs_per_multiprocessor // 4) // regs_per_warp) // warps
    by_smem = props.shared_memory_per_multiprocessor // (kernel.metadata.shared + 1024)
    by_threads = props.max_threads_per_multi_processor // (32 * warps)
    return min(by_regs, by_smem, by_threads, 32)


def row_groups(M: int, N: int, block_m: int, block_n: int, slots: int) -> int:
    """How many row groups run at once: as many whole groups of ``cdiv(N, block_n)`` programs as there are
    program slots (SMs x programs per SM) for, no more than there are row blocks; 0 where one group does not fit."""
    return min(slots // triton.cdiv(N, block_n), triton.cdiv(M, block_m))


@triton.jit
def _mm8_token_codes_kernel(a_desc, w_desc, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
                            mul_ptr, M, N: tl.constexpr, K: tl.constexpr, stride_qm,
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
    x = _round_tile_to_half(_gelu_tanh_x2(_round_tile_to_half(c, BF16)), BF16)
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


_SYNC: dict[torch.device, torch.Tensor] = {}


def _row_counters(device: torch.device, row_blocks: int) -> torch.Tensor:
    """The per-row-block counters (zeros between launches), one buffer per device, grown when needed."""
    buf = _SYNC.get(device)
    if buf is None or buf.numel() < row_blocks:
        buf = _SYNC[device] = torch.zeros(max(row_blocks, 4096), device=device, dtype=torch.int32)
    return buf


# the chosen (config, programs per SM) per (device, M bucket, N, K, flags): timed once, as Triton's autotuner would
_CHOICE: dict[tuple, tuple[dict, int]] = {}


def mm8_gelu_token_codes(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None, mul: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16,
                         config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 of a DiT MLP whose fc2 takes per-token INT8 input, writing fc2's codes and row scales: the numbers of
    ``quant_rows_int8(int8_mm(a, w, a_scale, w_scale, bias, out_dtype), mul, gelu=True)`` without fc1's output in
    HBM. ``a``, ``w``: int8 ``[M, K]`` / ``[N, K]``; ``a_scale``: static ``[]`` or per row ``[M]``; ``w_scale``
    ``[N]``; ``mul``: fc2's balancing Mul ``[N]``; ``out_dtype``: bf16 or fp16, the type fc1's output and the
    GELU are rounded to. -> (int8 codes ``[M, N]``, float32 scales ``[M]``). ``config``: a pinned candidate
    (``BLOCK_M/N/K``, ``num_stages``, ``num_warps``, ``maxnreg``) instead of the fastest, timed at the first
    call per shape. CUDA (or Triton's interpreter) only; the TMA loads need 16-byte aligned rows."""
    M, K = a.shape
    N, K2 = w.shape
    assert K == K2 and a.dtype == w.dtype == torch.int8, (a.shape, a.dtype, w.shape, w.dtype)
    assert out_dtype in (torch.bfloat16, torch.float16), out_dtype
    assert tma_eligible(a, w), "TMA loads need unit inner strides and 16-byte aligned rows"
    q = torch.empty((M, N), device=a.device, dtype=torch.int8)
    s = torch.empty((M,), device=a.device, dtype=torch.float32)
    if M == 0:
        return q, s
    flags = dict(ROW_SCALE=a_scale.dim() == 1, HAS_BIAS=bias is not None, HAS_MUL=mul is not None,
                 BF16=out_dtype == torch.bfloat16)
    tensors = (q, s, a_scale, w_scale, bias if bias is not None else w_scale, mul if mul is not None else w_scale)
    if _INTERPRET:  # nothing may wait: publish every part, then quantize (one row block per program each time)
        cfg = config or dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
        parts = _parts(M, N, cfg)
        _launch(a, w, tensors, flags, cfg, grid, parts, publish=True, quantize=False)
        _launch(a, w, tensors, flags, cfg, grid, parts, publish=False, quantize=True)
        return q, s
    if config is None:
        key = (a.device, _m_bucket(M), N, K, *flags.values())
        if key not in _CHOICE:
            _CHOICE[key] = _choose(a, w, tensors, flags)
        config, per_sm = _CHOICE[key]
    else:
        per_sm = _programs_per_sm(a, w, tensors, flags, config)
    _launch(a, w, tensors, flags, config, _grid(M, N, config, per_sm * _num_sms(a.device)))
    return q, s


def _grid(M: int, N: int, config: dict, slots: int) -> tuple[int]:
    groups = row_groups(M, N, config["BLOCK_M"], config["BLOCK_N"], slots)
    if groups < 1:
        raise ValueError(f"a row of {N} columns in {config['BLOCK_N']}-column tiles needs more programs at once "
                         f"than the GPU holds ({slots})")
    return (groups * triton.cdiv(N, config["BLOCK_N"]),)


def _programs_per_sm(a, w, tensors, flags, config) -> int:
    """Compile ``config`` by running it as one row group (always resident: it waits for nobody else), and read
    its occupancy."""
    kernel = _launch(a, w, tensors, flags, config, (triton.cdiv(w.shape[0], config["BLOCK_N"]),))
    return programs_per_sm(kernel, a.device)


def _choose(a, w, tensors, flags) -> tuple[dict, int]:
    """The fastest candidate for this shape (median of ``do_bench``), with its programs per SM."""
    import triton.testing

    M, N, sms = a.shape[0], w.shape[0], _num_sms(a.device)
    best = None
    for cand in _CANDIDATES:
        config = _config(*cand)
        if a.shape[1] % config["BLOCK_K"] or triton.cdiv(N, config["BLOCK_N"]) > sms:
            continue
        per_sm = _programs_per_sm(a, w, tensors, flags, config)
        grid = _grid(M, N, config, per_sm * sms)
        ms = triton.testing.do_bench(lambda: _launch(a, w, tensors, flags, config, grid), warmup=5, rep=25,  # noqa: B023
                                     return_mode="median")
        if best is None or ms < best[0]:
            best = (ms, config, per_sm)
    if best is None:
        raise ValueError(f"no candidate tile fits fc1's shape (N {N}, K {a.shape[1]}) on this GPU")
    return best[1], best[2]


def _parts(M: int, N: int, config: dict) -> torch.Tensor:
    """Each N tile's part of each row's amax, ``[n_tiles, M]`` float32."""
    return torch.empty((triton.cdiv(N, config["BLOCK_N"]), M), device="cpu" if _INTERPRET else "cuda", dtype=torch.float32)


def _launch(a, w, tensors, flags, config: dict, grid: tuple, parts: torch.Tensor | None = None, publish: bool = True,
            quantize: bool = True):
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = w.shape[0]
    q, s, a_scale, w_scale, bias, mul = tensors
    a_desc = TensorDescriptor(a, [M, K], list(a.stride()), [config["BLOCK_M"], config["BLOCK_K"]])
    w_desc = TensorDescriptor(w, [N, K], list(w.stride()), [config["BLOCK_N"], config["BLOCK_K"]])
    parts = parts if parts is not None else torch.empty((triton.cdiv(N, config["BLOCK_N"]), M), device=a.device,
                                                        dtype=torch.float32)
    sync = _row_counters(a.device, triton.cdiv(M, config["BLOCK_M"]))
    return _mm8_token_codes_kernel[grid](a_desc, w_desc, q, s, parts, sync, a_scale, w_scale, bias, mul, M, N, K,
                                         q.stride(0), PUBLISH=publish, QUANTIZE=quantize, **flags, **config)
