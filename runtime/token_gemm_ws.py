"""fc1 writing fc2's per-token INT8 codes as a warp-specialized Hopper kernel (Gluon); ``token_gemm`` runs it there
with DTQ_TOKEN_CODES_WS=1.

``token_gemm``'s Triton kernel computes each tile, publishes its part of the rows' amax, waits for the other
tiles of its row block (its *row group*) and writes the codes, with nothing overlapping that epilogue but the
other program on its SM. Here one persistent CTA per SM splits its warps by role, as CUTLASS's "ping-pong"
GEMMs do:

- a producer warp streams A and W tiles (128 x 128 x 128, int8) by TMA into a ring of ``STAGES`` slots;
- two consumer warpgroups take the CTA's tiles in turn (tile ``pid + i * programs``, consumer ``i % 2``); their
  main loops alternate, so while one runs its tile's MMAs the other runs its epilogue;
- a tile's part of its rows' amax is published as one 64-bit word, (launch tag, amax), by one relaxed store; a
  tile's codes wait until every part of its rows carries this launch's tag (``TAGGED``). No counter, no fence,
  no barrier: the load of the parts, which the codes need anyway, is the wait. The tag is in device memory
  (a CUDA graph's replays each get their own); the last consumer of a launch to leave moves it on. Session 23's
  counters (a release count per tile, an acquire poll, a departure count) remain as ``tagged=False``, measured
  against it;
- ``DEFER`` (an ablation, off by default): a tile's codes written after the consumer's next tile is published,
  its values kept in registers as 16-bit pairs meanwhile. Session 23 measured it no faster.

The numbers are ``token_gemm``'s: the same operations in the same order (checked code for code on the GPU by
``benchmarks/token_ws_bench.py``). Deadlock: a tile's publication waits only for its CTA's own earlier tiles'
codes (2 and 3 tiles back, 4 and 5 deferred: at least 2 x the grid's CTAs earlier), which lie in earlier row
groups when the grid has at least half a row group's tiles in CTAs. It has one CTA per SM and a row group fits
on the GPU (``row_group_fits``), so every row group completes as long as every CTA gets onto the GPU, which a
CTA not yet there does once whatever else runs on its SM finishes.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from . import kernels, token_gemm


@gluon.jit
def _producer(a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr,
              w_scale_ptr, bias_ptr, mul_ptr, M, N: gl.constexpr, K: gl.constexpr, stride_qm,
              ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_MUL: gl.constexpr, BF16: gl.constexpr,
              WAIT: gl.constexpr, DEFER: gl.constexpr, PLAIN: gl.constexpr, TAGGED: gl.constexpr,
              WHICH: gl.constexpr):
    """Per K step of each of the CTA's tiles, in order: A's 128 rows and W's 128 columns into the next slot."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    n_tiles: gl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    KSTEPS: gl.constexpr = K // BLOCK_K
    s = 0
    for tile in range(gl.program_id(0), gl.cdiv(M, BLOCK_M) * n_tiles, gl.num_programs(0)):
        off_m = (tile // n_tiles) * BLOCK_M
        off_n = (tile % n_tiles) * BLOCK_N
        for k in range(KSTEPS):
            stage = s % STAGES
            mbarrier.wait(empty.index(stage), ((s // STAGES) & 1) ^ 1)  # slots start empty (phase 1 complete)
            mbarrier.expect(ready.index(stage), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [off_m, k * BLOCK_K], ready.index(stage), a_bufs.index(stage))
            tma.async_copy_global_to_shared(w_desc, [off_n, k * BLOCK_K], ready.index(stage), w_bufs.index(stage))
            s += 1


@gluon.jit
def _consumer(a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, q_ptr, s_ptr, parts_ptr, sync_ptr, a_scale_ptr,
              w_scale_ptr, bias_ptr, mul_ptr, M, N: gl.constexpr, K: gl.constexpr, stride_qm,
              ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_MUL: gl.constexpr, BF16: gl.constexpr,
              WAIT: gl.constexpr, DEFER: gl.constexpr, PLAIN: gl.constexpr, TAGGED: gl.constexpr,
              WHICH: gl.constexpr):
    """Every other of the CTA's tiles (local index i = WHICH, WHICH + 2, ...): its MMAs when the other consumer's
    are issued, then its epilogue. DEFER: a tile's codes are written after the consumer's next tile is published
    (its row group has had that long to arrive), from its values kept as bf16 / fp16 pairs in registers."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    n_tiles: gl.constexpr = (N + BLOCK_N - 1) // BLOCK_N  # a row group
    KSTEPS: gl.constexpr = K // BLOCK_K
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32])
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    prev_m = -1
    prev_n = 0
    tag = 0
    if TAGGED:  # this launch's tag: every consumer reads it before any departs (_depart moves it on)
        tag = gl.load(sync_ptr, volatile=True) + 1
    if DEFER:
        y_prev = _pack_pairs(gl.zeros((BLOCK_M, BLOCK_N), gl.float32, mma), BF16)
    j = 0
    for i in range(WHICH, gl.cdiv(gl.cdiv(M, BLOCK_M) * n_tiles - pid, programs), 2):
        tile = pid + i * programs
        pid_m = tile // n_tiles
        pid_n = tile % n_tiles
        # the main loops take turns, so each consumer waits for the ring's slots in order (as parity waits
        # need) and one's epilogue runs under the other's MMAs; consumer 0 starts
        if WHICH == 0:
            mbarrier.wait(turn.index(0), (j + 1) & 1, pred=j > 0)
        else:
            mbarrier.wait(turn.index(1), j & 1)
        acc = gl.zeros((BLOCK_M, BLOCK_N), gl.int32, mma)
        s0 = i * KSTEPS
        for k in range(KSTEPS):
            s = s0 + k
            stage = s % STAGES
            mbarrier.wait(ready.index(stage), (s // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(stage), w_bufs.index(stage).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            # the MMA before this one is done: its slot goes back to the producer
            mbarrier.arrive(empty.index((s + STAGES - 1) % STAGES), count=1, pred=k > 0)
        mbarrier.arrive(turn.index(1 - WHICH), count=1)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index((s0 + KSTEPS - 1) % STAGES), count=1)
        j += 1
        if PLAIN:  # diagnosis: the accumulator's low byte stored, no epilogue (the pipeline's own speed)
            _store_plain(acc, pid_m, pid_n, q_ptr, M, N, stride_qm, mma, BLOCK_M, BLOCK_N)
        else:
            y = _publish(acc, pid_m, pid_n, n_tiles, parts_ptr, sync_ptr, tag, a_scale_ptr, w_scale_ptr, bias_ptr,
                         mul_ptr, M, N, ROW_SCALE, HAS_BIAS, HAS_MUL, BF16, WAIT, TAGGED, mma, BLOCK_M, BLOCK_N)
            if DEFER:
                y_new = _pack_pairs(y, BF16)  # exact: the values are rounded to 16 bits
                if prev_m >= 0:
                    _finish(y_prev, prev_m, prev_n, n_tiles, q_ptr, s_ptr, parts_ptr, sync_ptr, tag, mul_ptr, M, N,
                            stride_qm, HAS_MUL, WAIT, TAGGED, True, BF16, mma, BLOCK_M, BLOCK_N)
                y_prev = y_new
                prev_m = pid_m
                prev_n = pid_n
            else:
                _finish(_pack_pairs(y, BF16), pid_m, pid_n, n_tiles, q_ptr, s_ptr, parts_ptr, sync_ptr, tag, mul_ptr,
                        M, N, stride_qm, HAS_MUL, WAIT, TAGGED, True, BF16, mma, BLOCK_M, BLOCK_N)
    if DEFER:
        if prev_m >= 0:
            _finish(y_prev, prev_m, prev_n, n_tiles, q_ptr, s_ptr, parts_ptr, sync_ptr, tag, mul_ptr, M, N,
                    stride_qm, HAS_MUL, WAIT, TAGGED, True, BF16, mma, BLOCK_M, BLOCK_N)
    if TAGGED:
        _depart(sync_ptr + 1, 2 * programs - 1, sync_ptr)


@gluon.jit
def _store_plain(acc, pid_m, pid_n, q_ptr, M, N: gl.constexpr, stride_qm, mma: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr):
    _store_tile(acc.to(gl.int8), pid_m, pid_n, q_ptr, M, N, stride_qm, BLOCK_M, BLOCK_N)


@gluon.jit
def _publish(acc, pid_m, pid_n, n_tiles: gl.constexpr, parts_ptr, sync_ptr, tag, a_scale_ptr, w_scale_ptr,
             bias_ptr, mul_ptr, M, N: gl.constexpr, ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr,
             HAS_MUL: gl.constexpr, BF16: gl.constexpr, WAIT: gl.constexpr, TAGGED: gl.constexpr,
             mma: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """token_gemm's epilogue up to the wait: dequantize, + bias, round to the activation type, 2 x GELU(tanh)
    rounded; this tile's part of its rows' amax (of those x fc2's Mul) stored, then counted at the row block's
    counter. -> the rounded values (before the Mul)."""
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
    y = _round_to_half(_gelu_tanh_x2(_round_to_half(c, BF16)), BF16)
    x = _times_mul(y, offs_n, mul_ptr, N, HAS_MUL)
    part = gl.max(gl.where(gl.expand_dims(n_ok, 0), gl.abs(x), 0.0), axis=1)
    if TAGGED:  # [M, n_tiles] of (tag, amax) words: the part says itself that it is this launch's
        word = (tag.to(gl.int64) << 32) | (part.to(gl.int32, bitcast=True).to(gl.int64) & 0xFFFFFFFF)
        _store_relaxed(parts_ptr + offs_m * n_tiles + pid_n, word, m_ok)
    else:
        gl.store(parts_ptr + offs_m * _parts_width(n_tiles) + pid_n, part, mask=m_ok)  # [M, width]: a row's together
    if WAIT and not TAGGED:
        gl.thread_barrier()  # every thread's part stored before the count says so (release)
        _arrive(sync_ptr + pid_m)
    return y


@gluon.jit
def _finish(y, pid_m, pid_n, n_tiles: gl.constexpr, q_ptr, s_ptr, parts_ptr, sync_ptr, tag, mul_ptr, M,
            N: gl.constexpr, stride_qm, HAS_MUL: gl.constexpr, WAIT: gl.constexpr, TAGGED: gl.constexpr,
            PACKED: gl.constexpr, BF16: gl.constexpr, mma: gl.constexpr, BLOCK_M: gl.constexpr,
            BLOCK_N: gl.constexpr):
    """A published tile's codes: wait for its row group, its rows' scales from every part, the codes. ``y``:
    the tile's rounded values, float32 or (PACKED) as ``_pack_pairs`` keeps them, unpacked once the scales are
    known (fewer registers live while the parts load)."""
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    m_ok = offs_m < M
    if WAIT and not TAGGED:
        while _load_acquire(sync_ptr + pid_m) < n_tiles:
            pass
    if TAGGED:  # loaded again until every part is this launch's (the load is what _wait=False skips, too)
        amax = _tagged_amax(parts_ptr, pid_m * BLOCK_M, n_tiles, tag, M, WAIT, gl.SliceLayout(1, mma), BLOCK_M)
    else:  # every part of the tile's rows in one coalesced load (all in flight), the row max, to the tile's layout
        W: gl.constexpr = _parts_width(n_tiles)
        rows_l: gl.constexpr = gl.BlockedLayout([1, 4], [32 * 4 // W, W // 4], [4, 1], [1, 0])
        r = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, rows_l))
        t = gl.arange(0, W, layout=gl.SliceLayout(0, rows_l))
        parts = gl.load(parts_ptr + gl.expand_dims(r, 1) * W + gl.expand_dims(t, 0),
                        mask=gl.expand_dims(r < M, 1) & gl.expand_dims(t < n_tiles, 0), other=0.0,
                        cache_modifier=".cg")
        amax = gl.convert_layout(gl.max(parts, axis=1), gl.SliceLayout(1, mma))
    scale = gl.maximum(amax * 0.5 / 127.0, 1e-12)  # the values are 2x the GELU's
    if pid_n == 0:
        gl.store(s_ptr + offs_m, scale, mask=m_ok)
    inv = 0.5 / scale
    if PACKED:
        y = _unpack_pairs(y, BF16, mma)
    x = _times_mul(y, offs_n, mul_ptr, N, HAS_MUL)
    codes = ((x * gl.expand_dims(inv, 1) + 12582912.0).to(gl.int32, bitcast=True) - 0x4B400000).to(gl.int8)
    _store_tile(codes, pid_m, pid_n, q_ptr, M, N, stride_qm, BLOCK_M, BLOCK_N)
    if WAIT and not TAGGED:
        _leave(sync_ptr + pid_m, 2 * n_tiles - 1)


@gluon.jit
def _tagged_amax(parts_ptr, row0, n_tiles: gl.constexpr, tag, M, WAIT: gl.constexpr, out_l: gl.constexpr,
                 BLOCK_M: gl.constexpr):
    """The rows' amax from their tiles' (tag, amax) words, loaded again while any is another launch's (WAIT).
    The words of a row are loaded as a power-of-two head and a tail (36 = 32 + 4) rather than padded to 64:
    every padded word would hold two registers, which the deferred tile needs."""
    HEAD: gl.constexpr = _head(n_tiles)
    TAIL: gl.constexpr = _tail(n_tiles)
    head_l: gl.constexpr = _words_layout(HEAD)
    tail_l: gl.constexpr = _words_layout(max(TAIL, 1))
    head = _load_words(parts_ptr, row0, 0, HEAD, n_tiles, tag, M, head_l, BLOCK_M)
    if TAIL > 0:
        tail = _load_words(parts_ptr, row0, HEAD, TAIL, n_tiles, tag, M, tail_l, BLOCK_M)
    if WAIT:
        late = _count_late(head, tag)
        if TAIL > 0:
            late += _count_late(tail, tag)
        while late > 0:
            again = row0 + _opaque_zero()  # the addresses made again in the loop, not kept live across it
            head = _load_words(parts_ptr, again, 0, HEAD, n_tiles, tag, M, head_l, BLOCK_M)
            late = _count_late(head, tag)
            if TAIL > 0:
                tail = _load_words(parts_ptr, again, HEAD, TAIL, n_tiles, tag, M, tail_l, BLOCK_M)
                late += _count_late(tail, tag)
    amax = gl.convert_layout(_words_max(head), out_l)
    if TAIL > 0:
        amax = gl.maximum(amax, gl.convert_layout(_words_max(tail), out_l))
    return amax


@gluon.jit
def _load_words(parts_ptr, row0, t0: gl.constexpr, C: gl.constexpr, n_tiles: gl.constexpr, tag, M,
                layout: gl.constexpr, BLOCK_M: gl.constexpr):
    """Words ``[row0, row0 + BLOCK_M) x [t0, t0 + C)`` of the ``[M, n_tiles]`` parts; a word outside them reads
    as this launch's, amax 0."""
    r = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    t = t0 + gl.arange(0, C, layout=gl.SliceLayout(0, layout))
    ok = gl.expand_dims(r < M, 1) & gl.expand_dims(t < n_tiles, 0)
    return gl.load(parts_ptr + gl.expand_dims(r, 1) * n_tiles + gl.expand_dims(t, 0), mask=ok,
                   other=tag.to(gl.int64) << 32, volatile=True)


@gluon.jit
def _count_late(words, tag):
    """How many of the words another launch wrote (their tag is not ``tag``)."""
    return gl.sum(gl.sum(((words >> 32).to(gl.int32) != tag).to(gl.int32), axis=1), axis=0)


@gluon.jit
def _words_max(words):
    return gl.max((words & 0xFFFFFFFF).to(gl.int32).to(gl.float32, bitcast=True), axis=1)


@gluon.jit
def _opaque_zero():
    return gl.inline_asm_elementwise("mov.u32 $0, 0;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.constexpr_function
def _head(n):
    """The largest power of two not above ``n``."""
    return 1 << (n.bit_length() - 1)


@gluon.constexpr_function
def _tail(n):
    """What the head leaves of ``n``, rounded up to a power of two; 0 if nothing."""
    rest = n - _head(n)
    return triton.next_power_of_2(rest) if rest else 0


@gluon.constexpr_function
def _words_layout(c):
    """``[128, c]`` words over a consumer warpgroup: two adjacent words a thread (one 16-byte load), the
    threads of a warp along a row first."""
    v = min(c, 2)
    across = min(c // v, 32)
    return gl.BlockedLayout([1, v], [32 // across, across], [4, 1], [1, 0])


@gluon.constexpr_function
def _parts_width(n_tiles):
    """The row of the amax parts: ``n_tiles`` rounded up to a power of two, 4 to 128 (one coalesced load)."""
    return max(4, triton.next_power_of_2(n_tiles))


@gluon.jit
def _store_tile(codes, pid_m, pid_n, q_ptr, M, N: gl.constexpr, stride_qm, BLOCK_M: gl.constexpr,
                BLOCK_N: gl.constexpr):
    """16 bytes a thread per store (the accumulator's layout holds two adjacent columns a thread)."""
    store: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
    codes = gl.convert_layout(codes, store)
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, store))
    cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, store))
    gl.store(q_ptr + gl.expand_dims(rows, 1) * stride_qm + gl.expand_dims(cols, 0), codes,
             mask=gl.expand_dims(rows < M, 1) & gl.expand_dims(cols < N, 0))


@gluon.jit
def _times_mul(y, offs_n, mul_ptr, N: gl.constexpr, HAS_MUL: gl.constexpr):
    if HAS_MUL:
        return y * gl.expand_dims(gl.load(mul_ptr + offs_n, mask=offs_n < N, other=0.0), 0)
    return y


@gluon.jit
def _pack_pairs(y, BF16: gl.constexpr):
    """A tile of values rounded to 16 bits -> its column pairs, one 32-bit word each (half the registers)."""
    lo, hi = gl.split(gl.reshape(y, [y.shape[0], y.shape[1] // 2, 2]))
    if BF16:  # the high halves of the two float32 words
        return gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r",
                                         [lo.to(gl.int32, bitcast=True), hi.to(gl.int32, bitcast=True)],
                                         dtype=gl.int32, is_pure=True, pack=1)
    return gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=gl.int32,
                                     is_pure=True, pack=1)


@gluon.jit
def _unpack_pairs(p, BF16: gl.constexpr, layout: gl.constexpr):
    if BF16:
        lo = (p << 16).to(gl.float32, bitcast=True)
        hi = (p & -65536).to(gl.float32, bitcast=True)
    else:
        lo = (p & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
        hi = (p >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    y = gl.join(lo, hi)
    return gl.convert_layout(gl.reshape(y, [y.shape[0], y.shape[1] * 2]), layout)  # the same layout: no data moves


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
def _store_relaxed(ptr, word, ok):
    """A part's (tag, amax) word by one relaxed store (a single access: a reader sees all of it or none)."""
    gl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p st.relaxed.gpu.global.b64 [$1], $3; mov.u32 $0, 0; }",
        "=r,l,r,l", [ptr, ok.to(gl.int32), word], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _depart(done_ptr, last, tag_ptr):
    """A consumer is done with this launch's tag: the last of the grid's 2 x CTAs consumers to count itself
    (acquire-release, so after every consumer read the tag) resets the count and moves the tag on."""
    gl.inline_asm_elementwise(
        "{ .reg .pred p, q; .reg .b32 t, old, e; mov.u32 t, %tid.x; and.b32 t, t, 127; setp.eq.u32 p, t, 0;\n"
        "mov.u32 old, 0;\n"
        "@p atom.acq_rel.gpu.global.add.u32 old, [$1], 1;\n"
        "setp.eq.and.u32 q, old, $2, p;\n"
        "@q st.relaxed.gpu.global.b32 [$1], 0;\n"
        "@q ld.relaxed.gpu.global.b32 e, [$3];\n"
        "@q add.u32 e, e, 1;\n"
        "@q st.relaxed.gpu.global.b32 [$3], e; mov.u32 $0, 0; }",
        "=r,l,r,l", [done_ptr, last, tag_ptr], dtype=gl.int32, is_pure=False, pack=1)


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
                           DEFER: gl.constexpr, PLAIN: gl.constexpr, TAGGED: gl.constexpr, STAGES: gl.constexpr,
                           CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    gl.warp_specialize([
        (_consumer, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, q_ptr, s_ptr, parts_ptr, sync_ptr,
                     a_scale_ptr, w_scale_ptr, bias_ptr, mul_ptr, M, N, K, stride_qm, ROW_SCALE, HAS_BIAS, HAS_MUL,
                     BF16, WAIT, DEFER, PLAIN, TAGGED, 0)),
        (_consumer, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, q_ptr, s_ptr, parts_ptr, sync_ptr,
                     a_scale_ptr, w_scale_ptr, bias_ptr, mul_ptr, M, N, K, stride_qm, ROW_SCALE, HAS_BIAS, HAS_MUL,
                     BF16, WAIT, DEFER, PLAIN, TAGGED, 1)),
        (_producer, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, q_ptr, s_ptr, parts_ptr, sync_ptr,
                     a_scale_ptr, w_scale_ptr, bias_ptr, mul_ptr, M, N, K, stride_qm, ROW_SCALE, HAS_BIAS, HAS_MUL,
                     BF16, WAIT, DEFER, PLAIN, TAGGED, 1))],
        [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


_SYNC: dict[torch.device, list[torch.Tensor]] = {}  # the row blocks' counters (token_gemm._counters' pool)
_TAGGED: dict[torch.device, list[torch.Tensor]] = {}  # (tag, departures) + the tagged parts, one buffer each
BLOCK_M = BLOCK_N = BLOCK_K = 128


def _tagged_parts(device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The launch tag and departure count (int32 ``[2]``) and ``n`` parts' (tag, amax) words, zero when made,
    one int64 buffer per device grown when needed. The tag and the parts are zeroed together: a CUDA graph that
    captured the buffer's allocation zeroes both at each replay (tags start at 1, so no zero word is a launch's).
    A grown-out buffer is kept, never freed, as token_gemm._counters keeps its buffers."""
    bufs = _TAGGED.setdefault(device, [])
    if not bufs or bufs[-1].numel() - 1 < n:
        bufs.append(torch.zeros(1 + max(n, 1 << 20), device=device, dtype=torch.int64))
    return bufs[-1][:1].view(torch.int32), bufs[-1][1:]


def usable(a: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether this kernel runs the call: a Hopper GPU (warpgroup MMAs, TMA), 16-bit activations, K a multiple
    of 128 and N at most 128 tiles (the parts of a row in one load); TMA's aligned rows (kernels.tma_eligible)."""
    if a.device.type != "cuda" or torch.cuda.get_device_capability(a.device)[0] != 9:
        return False
    if out_dtype not in (torch.bfloat16, torch.float16) or a.shape[1] % BLOCK_K:
        return False
    if triton.cdiv(w.shape[0], BLOCK_N) > 128:
        return False
    return kernels.tma_eligible(a, w)


def mm8_gelu_token_codes_ws(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                            bias: torch.Tensor | None, mul: torch.Tensor | None,
                            out_dtype: torch.dtype = torch.bfloat16, stages: int = 4, defer: bool = False,
                            tagged: bool = True, _wait: bool = True,
                            _plain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_gemm.mm8_gelu_token_codes(..., exact=True)`` by the warp-specialized kernel (where ``usable``):
    the same codes and scales. ``defer=True``: each tile's codes after the consumer's next publication;
    ``tagged=False``: session 23's row-block counters instead of tagged parts (ablations, module doc).
    ``_wait=False`` (wrong codes) and ``_plain=True`` (no epilogue) are diagnoses for benchmarks."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    M, K = a.shape
    N = w.shape[0]
    assert usable(a, w, out_dtype), "token_gemm_ws.usable: Hopper, 16-bit activations, K % 128 == 0, TMA rows"
    q = torch.empty((M, N), device=a.device, dtype=torch.int8)
    s = torch.empty((M,), device=a.device, dtype=torch.float32)
    if M == 0:
        return q, s
    n_tiles = triton.cdiv(N, BLOCK_N)
    rows = triton.cdiv(M, BLOCK_M)
    if tagged:
        sync, parts = _tagged_parts(a.device, M * n_tiles)
    else:
        parts = torch.empty((M, _parts_width(n_tiles)), device=a.device, dtype=torch.float32)
        sync = token_gemm._counters(a.device, rows, _SYNC)
    a_desc = TensorDescriptor.from_tensor(a, [BLOCK_M, BLOCK_K], gl.NVMMASharedLayout.get_default_for(
        [BLOCK_M, BLOCK_K], gl.int8))
    w_desc = TensorDescriptor.from_tensor(w, [BLOCK_N, BLOCK_K], gl.NVMMASharedLayout.get_default_for(
        [BLOCK_N, BLOCK_K], gl.int8))
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    _ws_token_codes_kernel[(min(sms, rows * n_tiles),)](
        a_desc, w_desc, q, s, parts, sync, a_scale, w_scale, bias if bias is not None else w_scale,
        mul if mul is not None else w_scale, M, N, K, q.stride(0), ROW_SCALE=a_scale.dim() == 1,
        HAS_BIAS=bias is not None, HAS_MUL=mul is not None, BF16=out_dtype == torch.bfloat16,
        WAIT=_wait and not _plain, DEFER=defer and not _plain, PLAIN=_plain, TAGGED=tagged, STAGES=stages,
        CONSUMER_REGS=240, PRODUCER_REGS=24, num_warps=4, maxnreg=168)
    return q, s
