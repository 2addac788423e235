"""fc1 writing fc2's per-token INT8 codes as a warp-specialized Hopper kernel (Gluon): experiment.

``token_gemm`` computes the same codes with a Triton kernel whose epilogue (GELU, the row group's amax
exchange and wait, the codes) runs with nothing overlapping it but the other program on its SM. Here one
persistent CTA per SM splits its warps by role, as CUTLASS's "ping-pong" GEMMs do:

- a producer warp streams A and W tiles by TMA into a ring of ``STAGES`` shared-memory slots;
- two consumer warpgroups take the CTA's tiles in turn (tile ``pid + i * programs``, consumer ``i % 2``):
  while one runs its tile's MMAs, the other runs its epilogue, waits for its row group and writes its codes.

The numbers are ``token_gemm``'s (the same operations in the same order). A CTA waits only for tiles
that come before its own in every other CTA's order, and a consumer's next tile starts only after its
epilogue, so every row group completes as long as every CTA gets onto the GPU: the grid is at most one CTA
per SM, and a CTA not yet on the GPU gets an SM once whatever else runs there finishes.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def _producer(a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr,
              w_scale_ptr, bias_ptr, mul_ptr, M, N: gl.constexpr, K: gl.constexpr, stride_qm,
              ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_MUL: gl.constexpr, BF16: gl.constexpr,
              WAIT: gl.constexpr, PLAIN: gl.constexpr, PP: gl.constexpr, WHICH: gl.constexpr):
    """Per K step of each of the CTA's tiles, into the next slot: A's 128 rows and W's 128 columns (PP: the
    consumers' own 128 x 128 tiles) or W's two 128-column halves (a 128 x 256 tile the consumers share)."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    HALF_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    WIDTH: gl.constexpr = 1 if PP else 2  # W halves a tile
    n_cols: gl.constexpr = (N + WIDTH * HALF_N - 1) // (WIDTH * HALF_N)
    KSTEPS: gl.constexpr = K // BLOCK_K
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    total = gl.cdiv(M, BLOCK_M) * n_cols
    s = 0
    for tile in range(pid, total, programs):
        off_m = (tile // n_cols) * BLOCK_M
        off_n = (tile % n_cols) * WIDTH * HALF_N
        for k in range(KSTEPS):
            stage = s % STAGES
            mbarrier.wait(empty.index(stage), ((s // STAGES) & 1) ^ 1)  # slots start empty (phase 1 complete)
            mbarrier.expect(ready.index(stage), a_desc.block_type.nbytes + WIDTH * w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [off_m, k * BLOCK_K], ready.index(stage), a_bufs.index(stage))
            for h in gl.static_range(WIDTH):
                tma.async_copy_global_to_shared(w_desc, [off_n + h * HALF_N, k * BLOCK_K], ready.index(stage),
                                                w_bufs.index(WIDTH * stage + h))
            s += 1


@gluon.jit
def _consumer(a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr,
              w_scale_ptr, bias_ptr, mul_ptr, M, N: gl.constexpr, K: gl.constexpr, stride_qm,
              ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_MUL: gl.constexpr, BF16: gl.constexpr,
              WAIT: gl.constexpr, PLAIN: gl.constexpr, PP: gl.constexpr, WHICH: gl.constexpr):
    """PP: every other of the CTA's 128 x 128 tiles (the consumers' main loops take turns, so one's epilogue
    runs under the other's MMAs); else columns ``[WHICH * 128, WHICH * 128 + 128)`` of each 128 x 256 tile."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    HALF_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    WIDTH: gl.constexpr = 1 if PP else 2
    n_tiles: gl.constexpr = (N + HALF_N - 1) // HALF_N  # the row group: 128-column tiles
    n_cols: gl.constexpr = (N + WIDTH * HALF_N - 1) // (WIDTH * HALF_N)
    KSTEPS: gl.constexpr = K // BLOCK_K
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                  instr_shape=[16, HALF_N, 32])
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    total = gl.cdiv(M, BLOCK_M) * n_cols
    local = gl.cdiv(total - pid, programs)
    j = 0
    for i in range(WHICH if PP else 0, local, 2 if PP else 1):
        tile = pid + i * programs
        pid_m = tile // n_cols
        pid_n = (tile % n_cols) * WIDTH + (0 if PP else WHICH)
        if PP:  # each waits for the ring's slots in order, as parity waits need; consumer 0 starts
            if WHICH == 0:
                mbarrier.wait(turn.index(0), (j + 1) & 1, pred=j > 0)
            else:
                mbarrier.wait(turn.index(1), j & 1)
        acc = gl.zeros((BLOCK_M, HALF_N), gl.int32, mma)
        s0 = i * KSTEPS
        for k in range(KSTEPS):
            s = s0 + k
            stage = s % STAGES
            mbarrier.wait(ready.index(stage), (s // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(stage), w_bufs.index(WIDTH * stage + (0 if PP else WHICH)).permute((1, 0)),
                                acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            # the MMA before this one is done: its slot goes back to the producer (in the shared tile, once both
            # consumers say so)
            mbarrier.arrive(empty.index((s + STAGES - 1) % STAGES), count=1, pred=k > 0)
        if PP:
            mbarrier.arrive(turn.index(1 - WHICH), count=1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index((s0 + KSTEPS - 1) % STAGES), count=1)
        j += 1
        if PLAIN:  # diagnosis: the accumulator's low byte stored, no epilogue (the pipeline's own speed)
            _store_plain(acc, pid_m, pid_n, q_ptr, M, N, stride_qm, mma, BLOCK_M, HALF_N)
        elif pid_n < n_tiles:  # (N not a multiple of 256: the last pair's second half is all padding)
            _epilogue(acc, pid_m, pid_n, n_tiles, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr, w_scale_ptr,
                      bias_ptr, mul_ptr, M, N, stride_qm, ROW_SCALE, HAS_BIAS, HAS_MUL, BF16, WAIT, mma, BLOCK_M,
                      HALF_N)


@gluon.jit
def _store_plain(acc, pid_m, pid_n, q_ptr, M, N: gl.constexpr, stride_qm, mma: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr):
    store: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
    codes = gl.convert_layout(acc.to(gl.int8), store)
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store))
    cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, store))
    gl.store(q_ptr + gl.expand_dims(rows, 1) * stride_qm + gl.expand_dims(cols, 0), codes,
             mask=gl.expand_dims(rows < M, 1) & gl.expand_dims(cols < N, 0))


@gluon.jit
def _epilogue(acc, pid_m, pid_n, n_tiles: gl.constexpr, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr, w_scale_ptr,
              bias_ptr, mul_ptr, M, N: gl.constexpr, stride_qm, ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr,
              HAS_MUL: gl.constexpr, BF16: gl.constexpr, WAIT: gl.constexpr, mma: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """token_gemm's epilogue: dequantize, + bias, round to the activation type, 2 x GELU(tanh) rounded, x Mul;
    publish the rows' amax part; wait for the row group; the row scales and the codes."""
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    m_ok = offs_m < M
    n_ok = offs_n < N
    w_scale = gl.load(w_scale_ptr + offs_n, mask=n_ok, other=0.0)
    if ROW_SCALE:
        a_scale = gl.load(a_scale_ptr + offs_m, mask=m_ok, other=0.0)
        c = acc.to(gl.float32) * (gl.expand_dims(a_scale, 1) * gl.expand_dims(w_scale, 0))
    else:
        c = acc.to(gl.float32) * gl.expand_dims(gl.load(a_scale_ptr) * w_scale, 0)
    if HAS_BIAS:
        c += gl.expand_dims(gl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(gl.float32), 0)
    x = _round_to_half(_gelu_tanh_x2(_round_to_half(c, BF16)), BF16)
    if HAS_MUL:
        x = x * gl.expand_dims(gl.load(mul_ptr + offs_n, mask=n_ok, other=0.0), 0)
    part = gl.max(gl.where(gl.expand_dims(n_ok, 0), gl.abs(x), 0.0), axis=1)
    NT_PAD: gl.constexpr = triton.next_power_of_2(n_tiles)
    gl.store(parts_ptr + offs_m * NT_PAD + pid_n, part, mask=m_ok)  # parts [M, NT_PAD]: a row's parts together
    if WAIT:
        gl.thread_barrier()  # every thread's part stored before the count says so (release)
        _arrive(sync_ptr + pid_m)
        while _load_acquire(sync_ptr + pid_m) < n_tiles:
            pass
    # every part of the tile's rows in one coalesced load (all in flight), the row max, to the tile's layout
    rows_l: gl.constexpr = gl.BlockedLayout([1, 4], [32 * 4 // NT_PAD, NT_PAD // 4], [4, 1], [1, 0])
    r = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, rows_l))
    t = gl.arange(0, NT_PAD, layout=gl.SliceLayout(0, rows_l))
    parts = gl.load(parts_ptr + gl.expand_dims(r, 1) * NT_PAD + gl.expand_dims(t, 0),
                    mask=gl.expand_dims(r < M, 1) & gl.expand_dims(t < n_tiles, 0), other=0.0, cache_modifier=".cg")
    amax = gl.convert_layout(gl.max(parts, axis=1), gl.SliceLayout(1, mma))
    scale = gl.maximum(amax * 0.5 / 127.0, 1e-12)  # the values are 2x the GELU's
    if pid_n == 0:
        gl.store(s_ptr + offs_m, scale, mask=m_ok)
    inv = 0.5 / scale
    codes = ((x * gl.expand_dims(inv, 1) + 12582912.0).to(gl.int32, bitcast=True) - 0x4B400000).to(gl.int8)
    # 16 bytes a thread per store (the accumulator's layout holds two adjacent columns a thread)
    store: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
    codes = gl.convert_layout(codes, store)
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store))
    cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, store))
    gl.store(q_ptr + gl.expand_dims(rows, 1) * stride_qm + gl.expand_dims(cols, 0), codes,
             mask=gl.expand_dims(rows < M, 1) & gl.expand_dims(cols < N, 0))
    if WAIT:
        _leave(sync_ptr + pid_m, 2 * n_tiles - 1)


# The row block's counter, by one thread of the consumer warpgroup (128-thread aligned) or all of them: Triton
# runs scalar atomics from thread 0 of the CTA, which is in another partition.
@gluon.jit
def _arrive(ptr):
    gl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; and.b32 t, t, 127; setp.eq.u32 p, t, 0;\n"
        "@p red.release.gpu.global.add.s32 [$1], 1; mov.u32 $0, 0; }",
        "=r,l", [ptr], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _load_acquire(ptr):
    return gl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _leave(ptr, last):
    """Count a departure; the last of arrivals + departures resets the counter for the next launch."""
    gl.inline_asm_elementwise(
        "{ .reg .pred p, q; .reg .b32 t, old; mov.u32 t, %tid.x; and.b32 t, t, 127; setp.eq.u32 p, t, 0;\n"
        "mov.u32 old, 0;\n"
        "@p atom.relaxed.gpu.global.add.s32 old, [$1], 1;\n"
        "setp.eq.and.s32 q, old, $2, p;\n"
        "@q st.relaxed.gpu.global.b32 [$1], 0; mov.u32 $0, 0; }",
        "=r,l,r", [ptr, last], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _round_to_half(x, BF16: gl.constexpr):
    """kernels._round_to_half on the GPU: float32 rounded to bf16 (BF16) or fp16, nearest even, as float32."""
    if BF16:  # one packed convert per two elements (token_gemm._round_tile_to_half)
        u = gl.inline_asm_elementwise(
            "{ .reg .b32 p; cvt.rn.bf16x2.f32 p, $3, $2; shl.b32 $0, p, 16; and.b32 $1, p, 0xffff0000; }",
            "=r,=r,f,f", [x], dtype=gl.int32, is_pure=True, pack=2)
        return u.to(gl.float32, bitcast=True)
    return x.to(gl.float16).to(gl.float32)


@gluon.jit
def _gelu_tanh_x2(x):
    """kernels._gelu_tanh_x2 on the GPU: x + x tanh(sqrt(2/pi) (x + 0.044715 x^3)) by ``tanh.approx.f32``."""
    z = x * (0.7978845608028654 + 0.035677408136300125 * x * x)
    t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [z], dtype=gl.float32, is_pure=True, pack=1)
    return x + x * t


@gluon.jit
def _ws_token_codes_kernel(a_desc, w_desc, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
                           mul_ptr, M, N: gl.constexpr, K: gl.constexpr, stride_qm, ROW_SCALE: gl.constexpr,
                           HAS_BIAS: gl.constexpr, HAS_MUL: gl.constexpr, BF16: gl.constexpr, WAIT: gl.constexpr,
                           PLAIN: gl.constexpr, PP: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    W_SLOTS: gl.constexpr = STAGES * (2 - PP)
    w_bufs = gl.allocate_shared_memory(gl.int8, [W_SLOTS] + w_desc.block_type.shape, w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        if PP:
            mbarrier.init(empty.index(i), count=1)
        else:  # a shared tile's slot: both consumers release it
            mbarrier.init(empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    gl.warp_specialize([
        (_consumer, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr,
                     w_scale_ptr, bias_ptr, mul_ptr, M, N, K, stride_qm, ROW_SCALE, HAS_BIAS, HAS_MUL, BF16, WAIT, PLAIN, PP, 0)),
        (_consumer, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr,
                     w_scale_ptr, bias_ptr, mul_ptr, M, N, K, stride_qm, ROW_SCALE, HAS_BIAS, HAS_MUL, BF16, WAIT, PLAIN, PP, 1)),
        (_producer, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr,
                     w_scale_ptr, bias_ptr, mul_ptr, M, N, K, stride_qm, ROW_SCALE, HAS_BIAS, HAS_MUL, BF16, WAIT, PLAIN, PP, 1))],
        [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


_SYNC: dict[torch.device, torch.Tensor] = {}


def mm8_gelu_token_codes_ws(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                            bias: torch.Tensor | None, mul: torch.Tensor | None,
                            out_dtype: torch.dtype = torch.bfloat16, block_n: int = 128, stages: int = 4,
                            programs: int | None = None, pingpong: bool = False,
                            _wait: bool = True, _plain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_gemm.mm8_gelu_token_codes`` (exact, 16-bit activations) by the warp-specialized kernel. Hopper only."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    M, K = a.shape
    N = w.shape[0]
    block_m, block_k = 128, 128
    assert K % block_k == 0 and out_dtype in (torch.bfloat16, torch.float16)
    q = torch.empty((M, N), device=a.device, dtype=torch.int8)
    s = torch.empty((M,), device=a.device, dtype=torch.float32)
    n_tiles = triton.cdiv(N, block_n)
    parts = torch.empty((M, triton.next_power_of_2(n_tiles)), device=a.device, dtype=torch.float32)
    rows = triton.cdiv(M, block_m)
    sync = _SYNC.get(a.device)
    if sync is None or sync.numel() < rows:
        sync = _SYNC[a.device] = torch.zeros(max(rows, 4096), device=a.device, dtype=torch.int32)
    a_layout = gl.NVMMASharedLayout.get_default_for([block_m, block_k], gl.int8)
    w_layout = gl.NVMMASharedLayout.get_default_for([block_n, block_k], gl.int8)
    a_desc = TensorDescriptor.from_tensor(a, [block_m, block_k], a_layout)
    w_desc = TensorDescriptor.from_tensor(w, [block_n, block_k], w_layout)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    grid = (min(programs or sms, sms, rows * triton.cdiv(N, (1 if pingpong else 2) * block_n)),)
    _ws_token_codes_kernel[grid](
        a_desc, w_desc, q, s, parts, sync, a_scale, w_scale, bias if bias is not None else w_scale,
        mul if mul is not None else w_scale, M, N, K, q.stride(0), ROW_SCALE=a_scale.dim() == 1,
        HAS_BIAS=bias is not None, HAS_MUL=mul is not None, BF16=out_dtype == torch.bfloat16, WAIT=_wait and not _plain, PLAIN=_plain, PP=pingpong,
        STAGES=stages, CONSUMER_REGS=232, PRODUCER_REGS=40, num_warps=4, maxnreg=168)
    return q, s
