"""fc1 writing fc2's per-token INT8 codes as a warp-specialized Hopper kernel (Gluon); ``token_gemm`` runs it there
from 4096 rows unless ``token_gemm.ws_enabled`` says no (DTQ_TOKEN_CODES_WS=0, MPS with a partial thread share).

``token_gemm``'s Triton kernel computes each tile, publishes its part of the rows' amax, waits for the other
tiles of its row block (its *row group*) and writes the codes, with nothing overlapping that epilogue but the
other program on its SM. Here one persistent CTA per SM splits its warps by role, as CUTLASS's "ping-pong"
GEMMs do:

- a producer warp streams A and W tiles (128 x 128 x 128, int8) by TMA into a ring of ``STAGES`` slots;
- two consumer warpgroups take the CTA's tiles in turn (tile ``pid + i * programs``, consumer ``i % 2``); their
  main loops alternate, so while one runs its tile's MMAs the other runs its epilogue;
- a sync warp (``SYNC_WARP``) takes the row groups' synchronisation off the consumers' path: a consumer
  publishes its tile's part of its rows' amax and arrives at an mbarrier; the sync warp counts the tile at its
  row block's counter (release), polls the counter (acquire) until the row group is complete and arrives at the
  consumer's mbarrier. The consumer's own wait is then a shared-memory one. The counter is never reset (it
  grows by N a launch; ``_columns``), so nothing is counted on the way out (session 26; until then a departure
  count reset it, one more atomic round trip per tile). Session 23's consumers did all of it themselves
  (``sync_warp=False``, an ablation), and their fence, L2 round trips and atomics sat on the path of their
  warpgroup's next MMAs. Two sync warps (``SPLIT_SYNC``, sessions 25-27's default): one counts, one polls,
  so a tile is counted as soon as it is published, not once its CTA's previous row group is complete;
- ``DEFER`` (on from ``DEFER_ROWS`` rows): a tile's codes written after the consumer's next tile is published, so
  its row group has a main loop longer to complete; the tile is kept in registers as 16-bit pairs meanwhile (exact: its
  values are rounded to the activation type already);
- ``FLAGS`` (the default since session 28): per-tile flag words instead of the row blocks' counters, stored and
  polled by one sync warp, with no atomic (``_flag_width``'s comment). Session 27's diagnoses (``DIAG_*``) put
  most of the synchronisation's cost on the count's one atomic per tile; session 28 measured the flags exact
  (512 and 32768 rows, graph replays) and 0.016 ms faster than the split counters at 32768 rows (s28a).

The numbers are ``token_gemm``'s: the same operations in the same order (checked code for code on the GPU by
``benchmarks/token_ws_bench.py``). Deadlock: a tile's publication waits only for its CTA's own earlier tiles'
codes (2 and 3 tiles back, 4 and 5 deferred: at least 2 x the grid's CTAs earlier), which lie in earlier row
groups when the grid's CTAs are at least half a row group's tiles; a tile is counted once published (by a
counting warp that never waits for a row group, or by one sync warp that takes the CTA's tiles in order, so it
waits for a row group only after counting every earlier tile). The grid has one CTA per SM and a
row group fits on the GPU (``row_group_fits``), so every row group completes as long as every CTA gets onto
the GPU, which a CTA not yet there does once whatever else runs on its SM finishes.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from . import kernels, token_gemm


@gluon.jit
def _producer(a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, published, counted, grouped, q_ptr, s_ptr, parts_ptr,
              sync_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, mul_ptr, M, N: gl.constexpr, K: gl.constexpr, stride_qm,
              ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_MUL: gl.constexpr, BF16: gl.constexpr,
              WAIT: gl.constexpr, PLAIN: gl.constexpr, SYNC_WARP: gl.constexpr, DEFER: gl.constexpr,
              SPLIT_SYNC: gl.constexpr, WHICH: gl.constexpr):
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
def _consumer(a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, published, counted, grouped, q_ptr, s_ptr, parts_ptr,
              sync_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, mul_ptr, M, N: gl.constexpr, K: gl.constexpr, stride_qm,
              ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_MUL: gl.constexpr, BF16: gl.constexpr,
              WAIT: gl.constexpr, PLAIN: gl.constexpr, SYNC_WARP: gl.constexpr, DEFER: gl.constexpr,
              SPLIT_SYNC: gl.constexpr, WHICH: gl.constexpr, probe_ptr, PROBE: gl.constexpr, DIAG: gl.constexpr):
    """Every other of the CTA's tiles (local index i = WHICH, WHICH + 2, ...): its MMAs when the other consumer's
    are issued, then its epilogue: publish its part of its rows' amax, wait for its row group (counted here, or
    by the sync warp: SYNC_WARP), write its codes. PROBE (a diagnosis): each wait's SM clocks stored; DIAG:
    ``DIAG_*``."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.type.shape[0]
    n_tiles: gl.constexpr = (N + BLOCK_N - 1) // BLOCK_N  # a row group
    KSTEPS: gl.constexpr = K // BLOCK_K
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 32])
    CG: gl.constexpr = (DIAG & DIAG_CG_VECTORS) != 0
    DECOUPLED: gl.constexpr = (DIAG & DIAG_DECOUPLED) != 0
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    prev_m = 0
    prev_n = 0
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
        if PLAIN:  # diagnosis: the accumulator's low byte stored, no epilogue (the pipeline's own speed)
            _store_plain(acc, pid_m, pid_n, q_ptr, M, N, stride_qm, mma, BLOCK_M, BLOCK_N)
        else:
            y = _publish(acc, pid_m, pid_n, n_tiles, parts_ptr, sync_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
                         mul_ptr, M, N, ROW_SCALE, HAS_BIAS, HAS_MUL, BF16, WAIT, mma, BLOCK_M, BLOCK_N, CG)
            if WAIT:
                if SYNC_WARP:  # the sync warp counts this tile and says when its row group is complete
                    mbarrier.arrive(published.index(WHICH * 2 + j % 2), count=1)
                else:  # the warpgroup's count before any of its threads polls (module doc: the counters)
                    _arrive(sync_ptr + pid_m, _columns(pid_n, N, BLOCK_N), 127, "release")
                    gl.thread_barrier()
            if DEFER:
                y_new = _pack_pairs(y, BF16)  # exact: the values are rounded to 16 bits
                if j > 0:
                    _wait_group(grouped, WHICH, j - 1, sync_ptr, prev_m, N, WAIT, SYNC_WARP, probe_ptr, PROBE,
                                DECOUPLED)
                    _finish(y_prev, prev_m, prev_n, n_tiles, q_ptr, s_ptr, parts_ptr, mul_ptr, M, N, stride_qm, HAS_MUL,
                            True, BF16, mma, BLOCK_M, BLOCK_N, CG)
                y_prev = y_new
                prev_m = pid_m
                prev_n = pid_n
            else:
                _wait_group(grouped, WHICH, j, sync_ptr, pid_m, N, WAIT, SYNC_WARP, probe_ptr, PROBE, DECOUPLED)
                _finish(y, pid_m, pid_n, n_tiles, q_ptr, s_ptr, parts_ptr, mul_ptr, M, N, stride_qm, HAS_MUL, False,
                        BF16, mma, BLOCK_M, BLOCK_N, CG)
        j += 1
    if DEFER:
        if j > 0:
            _wait_group(grouped, WHICH, j - 1, sync_ptr, prev_m, N, WAIT, SYNC_WARP, probe_ptr, PROBE, DECOUPLED)
            _finish(y_prev, prev_m, prev_n, n_tiles, q_ptr, s_ptr, parts_ptr, mul_ptr, M, N, stride_qm, HAS_MUL, True,
                    BF16, mma, BLOCK_M, BLOCK_N, CG)


@gluon.jit
def _wait_group(grouped, WHICH: gl.constexpr, j, sync_ptr, pid_m, N: gl.constexpr, WAIT: gl.constexpr,
                SYNC_WARP: gl.constexpr, probe_ptr, PROBE: gl.constexpr, DECOUPLED: gl.constexpr = False):
    """Until the row group of the consumer's ``j``-th tile is complete: the sync warp's mbarrier, or the poll.
    PROBE: the wait's SM clocks at probe_ptr[(CTA * 2 + consumer) * PROBE_TILES + j] (j < PROBE_TILES).
    DECOUPLED (a diagnosis, ``DIAG_DECOUPLED``): no wait at all, the sync warps' work unchanged."""
    if PROBE:
        t0 = _clock(j)
    if WAIT and not DECOUPLED:
        if SYNC_WARP:
            mbarrier.wait(grouped.index(WHICH * 2 + j % 2), (j // 2) & 1)
        else:
            _wait_count(sync_ptr + pid_m, N)
    if PROBE:
        slot = (gl.program_id(0) * 2 + WHICH) * PROBE_TILES + j
        gl.store(probe_ptr + slot, _clock(j) - t0, mask=j < PROBE_TILES)


@gluon.jit
def _clock(dep):
    """The SM's clock (``dep``: an argument the asm needs; it keeps the read where it is written)."""
    return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [dep], dtype=gl.int64, is_pure=False, pack=1)


@gluon.jit
def _syncer(a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, published, counted, grouped, q_ptr, s_ptr, parts_ptr,
            sync_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, mul_ptr, M, N: gl.constexpr, K: gl.constexpr, stride_qm,
            ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_MUL: gl.constexpr, BF16: gl.constexpr,
            WAIT: gl.constexpr, PLAIN: gl.constexpr, SYNC_WARP: gl.constexpr, DEFER: gl.constexpr,
            SPLIT_SYNC: gl.constexpr, WHICH: gl.constexpr, DIAG: gl.constexpr, FLAGS: gl.constexpr):
    """SYNC_WARP: the row groups' synchronisation off the consumers' path, per tile of the CTA in order
    (consumer ``i % 2``). Counting: once the consumer has published the tile, count it at its row block's
    counter (release: the consumer's parts, ordered before by the consumer's barrier and the mbarrier, go with
    it). Polling: once the tile is counted, wait for the row group's count, tell the consumer. Sync warp 0 does
    both, or (SPLIT_SYNC) counts while sync warp 1 polls (the ``counted`` mbarrier between): then a tile is
    counted as soon as it is published, not after the CTA's previous row group is complete, so the waits of one
    CTA do not hold up the row groups of others. DIAG: ``DIAG_*``. FLAGS (one sync warp): per-tile flags instead of
    the row blocks' counters (the comment at ``_flag_width``)."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    n_tiles: gl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    COUNTS: gl.constexpr = WHICH == 0
    POLLS: gl.constexpr = (WHICH == 1) == SPLIT_SYNC
    LOCAL: gl.constexpr = (DIAG & DIAG_LOCAL) != 0
    EARLY: gl.constexpr = (DIAG & DIAG_EARLY) != 0
    CHAIN: gl.constexpr = (DIAG & DIAG_CHAIN) != 0
    NO_POLL: gl.constexpr = (DIAG & DIAG_NO_POLL) != 0
    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    if SYNC_WARP and WAIT and (COUNTS or POLLS):
        for i in range(0, gl.cdiv(gl.cdiv(M, BLOCK_M) * n_tiles - pid, programs)):
            tile = pid + i * programs
            pid_m = tile // n_tiles
            j = i // 2  # the consumer's j-th tile, on its barriers j % 2 (two outstanding with DEFER)
            slot = (i % 2) * 2 + j % 2
            if FLAGS and COUNTS:
                row = sync_ptr + pid_m * _flag_width(n_tiles)
                own = row + tile % n_tiles
                # only this tile writes its word: until it does, the word holds the last launch's number
                launch = _load_relaxed(own) + 1
                mbarrier.wait(published.index(slot), (j // 2) & 1)
                _store(own, launch, "release")
                _wait_flags(row, launch, n_tiles)
                mbarrier.arrive(grouped.index(slot), count=1)
            if COUNTS and LOCAL and CHAIN:  # the handshake through the counting warp, still no global memory
                mbarrier.wait(published.index(slot), (j // 2) & 1)
                mbarrier.arrive(counted.index(slot), count=1)
            if COUNTS and not LOCAL and not FLAGS:
                mbarrier.wait(published.index(slot), (j // 2) & 1)
                cols = _columns(tile % n_tiles, N, BLOCK_N)
                target = sync_ptr + pid_m
                if (DIAG & DIAG_SPREAD_COUNT) != 0:  # a word of the tile's own, after the row blocks' counters
                    target = sync_ptr + gl.cdiv(M, BLOCK_M) + tile
                if (DIAG & DIAG_STORE_COUNT) != 0:  # (with SPREAD_COUNT)
                    _store(target, cols, "relaxed")
                elif (DIAG & DIAG_RELAXED_COUNT) != 0:  # the parts not ordered before the count: wrong codes possible
                    _arrive(target, cols, 31, "relaxed")
                else:
                    _arrive(target, cols, 31, "release")
                gl.thread_barrier()  # the warp's count before its polls, or before the polling warp's (below)
                if SPLIT_SYNC:
                    mbarrier.arrive(counted.index(slot), count=1)
            if POLLS and not FLAGS:  # the count includes this CTA's own (module doc: the counters)
                if EARLY:  # the consumer goes on at once; the polls as shipped
                    mbarrier.arrive(grouped.index(slot), count=1)
                if LOCAL and not CHAIN:
                    mbarrier.wait(published.index(slot), (j // 2) & 1)
                else:
                    if SPLIT_SYNC:
                        mbarrier.wait(counted.index(slot), (j // 2) & 1)
                    if not LOCAL and not NO_POLL:
                        _wait_count(sync_ptr + pid_m, N, (DIAG & DIAG_BACKOFF) != 0,
                                    (DIAG & DIAG_NO_ACQUIRE) != 0)
                if not EARLY:
                    mbarrier.arrive(grouped.index(slot), count=1)


@gluon.jit
def _store_plain(acc, pid_m, pid_n, q_ptr, M, N: gl.constexpr, stride_qm, mma: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr):
    _store_tile(acc.to(gl.int8), pid_m, pid_n, q_ptr, M, N, stride_qm, BLOCK_M, BLOCK_N)


@gluon.jit
def _publish(acc, pid_m, pid_n, n_tiles: gl.constexpr, parts_ptr, sync_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
             mul_ptr, M, N: gl.constexpr, ROW_SCALE: gl.constexpr, HAS_BIAS: gl.constexpr, HAS_MUL: gl.constexpr,
             BF16: gl.constexpr, WAIT: gl.constexpr, mma: gl.constexpr, BLOCK_M: gl.constexpr,
             BLOCK_N: gl.constexpr, CG: gl.constexpr = False):
    """token_gemm's epilogue up to the wait: dequantize, + bias, round to the activation type, 2 x GELU(tanh)
    rounded; this tile's part of its rows' amax (of those x fc2's Mul) stored. -> the rounded values (before
    the Mul)."""
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    m_ok = offs_m < M
    n_ok = offs_n < N
    w_scale = _load_vector(w_scale_ptr + offs_n, n_ok, CG)
    if ROW_SCALE:
        a_scale = _load_vector(a_scale_ptr + offs_m, m_ok, CG)
        c = acc.to(gl.float32) * (gl.expand_dims(a_scale, 1) * gl.expand_dims(w_scale, 0))
    else:
        c = acc.to(gl.float32) * gl.expand_dims(gl.load(a_scale_ptr) * w_scale, 0)
    if HAS_BIAS:
        c += gl.expand_dims(_load_vector(bias_ptr + offs_n, n_ok, CG).to(gl.float32), 0)
    y = _round_to_half(_gelu_tanh_x2(_round_to_half(c, BF16)), BF16)
    x = _times_mul(y, offs_n, mul_ptr, N, HAS_MUL, CG)
    part = gl.max(gl.where(gl.expand_dims(n_ok, 0), gl.abs(x), 0.0), axis=1)
    gl.store(parts_ptr + offs_m * _parts_width(n_tiles) + pid_n, part, mask=m_ok)  # [M, width]: a row's together
    if WAIT:
        gl.thread_barrier()  # every thread's part stored before the count (here or the sync warp's) says so
    return y


@gluon.jit
def _finish(y, pid_m, pid_n, n_tiles: gl.constexpr, q_ptr, s_ptr, parts_ptr, mul_ptr, M, N: gl.constexpr, stride_qm,
            HAS_MUL: gl.constexpr, PACKED: gl.constexpr, BF16: gl.constexpr, mma: gl.constexpr, BLOCK_M: gl.constexpr,
            BLOCK_N: gl.constexpr, CG: gl.constexpr = False):
    """A published tile's codes once its row group is complete: its rows' scales from every part, the codes.
    ``y``: the tile's rounded values, float32 or (PACKED) as ``_pack_pairs`` keeps them, unpacked once the scales
    are known (fewer registers live while the parts load)."""
    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, mma))
    m_ok = offs_m < M
    # every part of the tile's rows in one coalesced load (all in flight), the row max, to the tile's layout
    W: gl.constexpr = _parts_width(n_tiles)
    rows_l: gl.constexpr = gl.BlockedLayout([1, 4], [32 * 4 // W, W // 4], [4, 1], [1, 0])
    r = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, rows_l))
    t = gl.arange(0, W, layout=gl.SliceLayout(0, rows_l))
    parts = gl.load(parts_ptr + gl.expand_dims(r, 1) * W + gl.expand_dims(t, 0),
                    mask=gl.expand_dims(r < M, 1) & gl.expand_dims(t < n_tiles, 0), other=0.0, cache_modifier=".cg")
    amax = gl.convert_layout(gl.max(parts, axis=1), gl.SliceLayout(1, mma))
    scale = gl.maximum(amax * 0.5 / 127.0, 1e-12)  # the values are 2x the GELU's
    if pid_n == 0:
        gl.store(s_ptr + offs_m, scale, mask=m_ok)
    inv = 0.5 / scale
    if PACKED:
        y = _unpack_pairs(y, BF16, mma)
    x = _times_mul(y, offs_n, mul_ptr, N, HAS_MUL, CG)
    codes = ((x * gl.expand_dims(inv, 1) + 12582912.0).to(gl.int32, bitcast=True) - 0x4B400000).to(gl.int8)
    _store_tile(codes, pid_m, pid_n, q_ptr, M, N, stride_qm, BLOCK_M, BLOCK_N)


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
def _times_mul(y, offs_n, mul_ptr, N: gl.constexpr, HAS_MUL: gl.constexpr, CG: gl.constexpr = False):
    if HAS_MUL:
        return y * gl.expand_dims(_load_vector(mul_ptr + offs_n, offs_n < N, CG), 0)
    return y


@gluon.jit
def _load_vector(ptrs, mask, CG: gl.constexpr):
    """A tile's scales, bias or Mul; CG (a diagnosis, ``DIAG_CG_VECTORS``): from L2, never from L1."""
    if CG:
        return gl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    return gl.load(ptrs, mask=mask, other=0.0)


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


# The row block's counter (int64, token_gemm._counters), by one thread of a warpgroup (``one`` 127) or a warp
# (31): Triton runs scalar atomics from thread 0 of the CTA, which is in another partition. It is never reset:
# each tile adds its columns, so every launch adds N and the counter is a multiple of N between launches. A
# waiter whose own CTA's count of the tile is in (ordered before its polls by a barrier or an mbarrier) sees
# the row group complete when the counter is a multiple of N again (token_gemm's counters do the same).
@gluon.jit
def _columns(pid_n, N: gl.constexpr, BLOCK_N: gl.constexpr):
    """The columns of N tile ``pid_n``: what its count adds."""
    return gl.minimum(N - pid_n * BLOCK_N, BLOCK_N).to(gl.int64)


@gluon.jit
def _arrive(ptr, cols, one: gl.constexpr, SEM: gl.constexpr):
    """Count a tile's columns; ``SEM`` "release" (the parts stored before go with it) or "relaxed" (a
    diagnosis)."""
    gl.inline_asm_elementwise(_red_add_asm(SEM), "=r,l,l,r", [ptr, cols, one], dtype=gl.int32, is_pure=False, pack=1)


@gluon.constexpr_function
def _red_add_asm(sem):
    return ("{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; and.b32 t, t, $3; setp.eq.u32 p, t, 0;\n"
            f"@p red.{sem}.gpu.global.add.u64 [$1], $2; mov.u32 $0, 0; }}")


@gluon.jit
def _store(ptr, value, SEM: gl.constexpr):
    """``value`` stored at ``ptr`` by one thread of the warp; ``SEM`` "release" (what the warp saw before goes
    with it: a flag) or "relaxed" (``DIAG_STORE_COUNT``)."""
    gl.inline_asm_elementwise(_store_asm(SEM), "=r,l,l", [ptr, value], dtype=gl.int32, is_pure=False, pack=1)


@gluon.constexpr_function
def _store_asm(sem):
    return ("{ .reg .pred p; .reg .b32 t; mov.u32 t, %tid.x; and.b32 t, t, 31; setp.eq.u32 p, t, 0;\n"
            f"@p st.{sem}.gpu.global.b64 [$1], $2; mov.u32 $0, 0; }}")


# Per-tile flags (``flags=True``): a row block's row of int64 words, one per N tile (``_flag_width`` apart), in a
# pool of their own. Every launch that covers a row block writes each of its words once, with the word's last
# value + 1 (the launch's number for that row block), so between launches the words of a row are equal, and during
# a launch each is n or n + 1. A tile's sync warp stores its word (release: the tile's parts go with it) and waits
# until the row's words all hold its number, then fences (acquire). No atomic, no counter shared by 36 tiles.
@gluon.constexpr_function
def _flag_width(n_tiles):
    """The words of a row block's flag row: at least a warp's lanes, a power of two (a warp loads it at once)."""
    return max(32, triton.next_power_of_2(n_tiles))


@gluon.jit
def _wait_flags(row, launch, n_tiles: gl.constexpr):
    """Until the row block's flags all hold ``launch``: volatile (relaxed) loads of the row by the warp's lanes,
    then one acquire fence, which synchronises with every release store the loads saw."""
    W: gl.constexpr = _flag_width(n_tiles)
    t = gl.arange(0, W, layout=gl.BlockedLayout([W // 32], [32], [1], [0]))
    ptrs = row + t
    while gl.min(gl.where(gl.load(ptrs, mask=t < n_tiles, other=launch, volatile=True) == launch, 1, 0),
                 axis=0) == 0:
        pass
    gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r,l", [row], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def _wait_count(ptr, n: gl.constexpr, BACKOFF: gl.constexpr = False, RELAXED: gl.constexpr = False):
    """Until the counter is a multiple of ``n`` again: polled by relaxed loads, then one acquire load (it
    synchronises with every count). An acquire load is an L2 load plus an invalidation of the SM's L1
    (``CCTL.IVALL`` in SASS), which in a polling loop cost the consumers' cached loads on the SM (session 25).
    BACKOFF (a diagnosis): half a microsecond's sleep between polls. RELAXED (a diagnosis): no acquire at all
    (no ``CCTL.IVALL``; wrong codes possible)."""
    while _load_relaxed(ptr) % n != 0:
        if BACKOFF:
            _sleep(ptr)
    if not RELAXED:
        while _load_acquire(ptr) % n != 0:  # once; a loop, so that no compiler drops the load as unused
            pass


@gluon.jit
def _sleep(dep):
    """``nanosleep`` (``dep``: an argument the asm needs; it keeps the sleep in the loop)."""
    gl.inline_asm_elementwise("nanosleep.u32 500; mov.u32 $0, 0;", "=r,l", [dep], dtype=gl.int32, is_pure=False,
                              pack=1)


@gluon.jit
def _load_relaxed(ptr):
    return gl.inline_asm_elementwise("ld.relaxed.gpu.global.b64 $0, [$1];", "=l,l", [ptr], dtype=gl.int64,
                                     is_pure=False, pack=1)


@gluon.jit
def _load_acquire(ptr):
    return gl.inline_asm_elementwise("ld.acquire.gpu.global.b64 $0, [$1];", "=l,l", [ptr], dtype=gl.int64,
                                     is_pure=False, pack=1)


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
                           PLAIN: gl.constexpr, SYNC_WARP: gl.constexpr, DEFER: gl.constexpr,
                           SPLIT_SYNC: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                           PRODUCER_REGS: gl.constexpr, probe_ptr, PROBE: gl.constexpr, DIAG: gl.constexpr,
                           FLAGS: gl.constexpr):
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    w_bufs = gl.allocate_shared_memory(gl.int8, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    # consumer -> sync warp and back, two per consumer (DEFER: a tile published before the last one's codes)
    published = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    counted = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())  # counting -> polling warp
    grouped = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(4):
        mbarrier.init(published.index(i), count=1)
        mbarrier.init(counted.index(i), count=1)
        mbarrier.init(grouped.index(i), count=1)
    # the argument tuples written out: constexprs in a tuple built by concatenation reach a partition as
    # tensors. The sync warps' partitions are always there; without SYNC_WARP (or WAIT) they leave at once,
    # and without SPLIT_SYNC the second does.
    gl.warp_specialize([
        (_consumer, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, published, counted, grouped, q_ptr, s_ptr,
                    parts_ptr, sync_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, mul_ptr, M, N, K, stride_qm, ROW_SCALE,
                    HAS_BIAS, HAS_MUL, BF16, WAIT, PLAIN, SYNC_WARP, DEFER, SPLIT_SYNC, 0, probe_ptr, PROBE, DIAG)),
        (_consumer, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, published, counted, grouped, q_ptr, s_ptr,
                    parts_ptr, sync_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, mul_ptr, M, N, K, stride_qm, ROW_SCALE,
                    HAS_BIAS, HAS_MUL, BF16, WAIT, PLAIN, SYNC_WARP, DEFER, SPLIT_SYNC, 1, probe_ptr, PROBE, DIAG)),
        (_producer, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, published, counted, grouped, q_ptr, s_ptr,
                    parts_ptr, sync_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, mul_ptr, M, N, K, stride_qm, ROW_SCALE,
                    HAS_BIAS, HAS_MUL, BF16, WAIT, PLAIN, SYNC_WARP, DEFER, SPLIT_SYNC, 1)),
        (_syncer, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, published, counted, grouped, q_ptr, s_ptr,
                   parts_ptr, sync_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, mul_ptr, M, N, K, stride_qm, ROW_SCALE,
                   HAS_BIAS, HAS_MUL, BF16, WAIT, PLAIN, SYNC_WARP, DEFER, SPLIT_SYNC, 0, DIAG, FLAGS)),
        (_syncer, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, turn, published, counted, grouped, q_ptr, s_ptr,
                   parts_ptr, sync_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, mul_ptr, M, N, K, stride_qm, ROW_SCALE,
                   HAS_BIAS, HAS_MUL, BF16, WAIT, PLAIN, SYNC_WARP, DEFER, SPLIT_SYNC, 1, DIAG, FLAGS))],
        [4, 1, 1, 1], [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS, PRODUCER_REGS])


PROBE_TILES = gl.constexpr(64)  # the waits a consumer records with PROBE (a diagnosis)
# DIAG bits (``_diag``): diagnoses for benchmarks of what the row-group synchronisation costs, part by part; the
# codes may be wrong. The sync warps as shipped, but:
# - RELAXED_COUNT: the count without its release (no MEMBAR.GPU before it in SASS);
# - LOCAL: no global memory at all (the polling warp hands each published tile straight back);
# - EARLY: the polling warp signals a tile's consumer before polling; as it takes the tiles in order, the consumer
#   still waits for the previous tile's row group (this does not separate waiting from traffic; DECOUPLED does);
# - BACKOFF: half a microsecond's sleep between polls;
# - NO_ACQUIRE: the polls' last load relaxed (no ``CCTL.IVALL``, the acquire's invalidation of the SM's L1);
# - CG_VECTORS: the consumers' scales, bias and Mul loaded from L2 (".cg"), never from L1;
# - DECOUPLED: the consumers never wait (the sync warps count and poll, their signals unread);
# - CHAIN (with LOCAL): each tile through the counting warp and the ``counted`` mbarrier, no global memory;
# - NO_POLL: the count as shipped, the consumer told once counted, no poll;
# - SPREAD_COUNT (with NO_POLL): the count at a word of the tile's own (no two atomics at one address);
# - STORE_COUNT (with SPREAD_COUNT): a relaxed store there instead (no atomic).
# Measured at 32768 rows (docs/engines.md, sessions 26-27): LOCAL and CHAIN run as fast as no wait at all (0.39
# ms against shipped 0.43); DECOUPLED, EARLY, BACKOFF, NO_ACQUIRE, RELAXED_COUNT and CG_VECTORS as slow as shipped;
# NO_POLL 0.42. So the count alone, one atomic add per tile, costs about 0.03 ms; the consumers' waiting, the
# polls, the release and the acquire hardly anything. Session 28 (s28a): SPREAD_COUNT 0.427 and STORE_COUNT 0.443
# against NO_POLL's 0.427, so neither the shared address nor the atomic as such; the per-tile flags ran at 0.414.
DIAG_RELAXED_COUNT = gl.constexpr(1)
DIAG_LOCAL = gl.constexpr(2)
DIAG_EARLY = gl.constexpr(4)
DIAG_BACKOFF = gl.constexpr(8)
DIAG_NO_ACQUIRE = gl.constexpr(16)
DIAG_CG_VECTORS = gl.constexpr(32)
DIAG_DECOUPLED = gl.constexpr(64)
DIAG_CHAIN = gl.constexpr(128)
DIAG_NO_POLL = gl.constexpr(256)
DIAG_SPREAD_COUNT = gl.constexpr(512)
DIAG_STORE_COUNT = gl.constexpr(1024)
_SYNC: dict[tuple, list[torch.Tensor]] = {}  # the row blocks' counters (token_gemm._counters' pool)
_FLAGS: dict[tuple, list[torch.Tensor]] = {}  # the per-tile flag rows (``flags=True``), the same allocator
BLOCK_M = BLOCK_N = BLOCK_K = 128
# Deferral measured faster at 32768 rows (DiT-XL/2's fc1 at batch 64 with guidance: 0.447 against 0.457 ms)
# and slower at 4096 (0.063 against 0.060) on the H200 (session 24, token_ws_h200_s24c); between, unmeasured
DEFER_ROWS = 16384


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


def _sync_words(device: torch.device, rows: int, n: int, flags: bool, diag: int) -> torch.Tensor:
    """The launch's synchronisation words for ``rows`` row blocks of an fc1 with ``n`` outputs: the per-tile flag
    rows (``flags``), the row blocks' counters, or (SPREAD_COUNT) a zeroed buffer of the diagnosis's own."""
    n_tiles = triton.cdiv(n, BLOCK_N)
    if diag & (DIAG_SPREAD_COUNT.value | DIAG_STORE_COUNT.value):  # .value: the bits are gluon constexprs
        assert diag & DIAG_NO_POLL.value and diag & DIAG_SPREAD_COUNT.value, \
            "STORE_COUNT: with SPREAD_COUNT, both with NO_POLL"
        # a buffer of its own: words of the tiles' own after the row blocks' counters, which no longer grow by N
        return torch.zeros(rows + rows * n_tiles, device=device, dtype=torch.int64)
    if flags:  # the flag rows' pool: every word of a row equal between launches (the comment at ``_flag_width``)
        return token_gemm._counters(device, rows * _flag_width(n_tiles), n, _FLAGS)
    return token_gemm._counters(device, rows, n, _SYNC)


def mm8_gelu_token_codes_ws(a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
                            bias: torch.Tensor | None, mul: torch.Tensor | None,
                            out_dtype: torch.dtype = torch.bfloat16, stages: int = 4, sync_warp: bool = True,
                            defer: bool | None = None, split_sync: bool = False, _wait: bool = True,
                            _plain: bool = False, _probe: torch.Tensor | None = None, _diag: int = 0,
                            flags: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``token_gemm.mm8_gelu_token_codes(..., exact=True)`` by the warp-specialized kernel (where ``usable``):
    the same codes and scales. ``sync_warp=False``: the consumers synchronise the row groups themselves (an
    ablation); ``defer``: a tile's codes a tile late (module doc), ``None``: from ``DEFER_ROWS`` rows on;
    ``flags`` (the default): per-tile flags instead of the row blocks' counters, one sync warp storing and
    polling them. ``flags=False`` (ablations): the counters, ``split_sync=True`` one sync warp counting the
    tiles and another waiting for the row groups (``_syncer``; sessions 25-27's default), False one doing both.
    ``sync_warp=False`` and ``_diag`` need ``flags=False``.
    ``_wait=False`` (wrong codes) and ``_plain=True`` (no epilogue) are diagnoses for benchmarks, as is
    ``_probe``: int64 [CTAs, 2, PROBE_TILES], zeroed, gets the SM clocks each consumer's j-th row-group wait took
    (``probe_shape``), and ``_diag`` (``DIAG_*`` bits, with the sync warps; wrong codes possible)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    M, K = a.shape
    N = w.shape[0]
    assert usable(a, w, out_dtype), "token_gemm_ws.usable: Hopper, 16-bit activations, K % 128 == 0, TMA rows"
    assert 0 <= _diag < 2048 and (_diag == 0 or (sync_warp and _wait)), "_diag: DIAG_* bits, with the sync warps"
    assert not flags or (sync_warp and not split_sync and not _diag), "flags: one sync warp (split_sync=False)"
    q = torch.empty((M, N), device=a.device, dtype=torch.int8)
    s = torch.empty((M,), device=a.device, dtype=torch.float32)
    if M == 0:
        return q, s
    n_tiles = triton.cdiv(N, BLOCK_N)
    if defer is None:
        defer = M >= DEFER_ROWS
    parts = torch.empty((M, _parts_width(n_tiles)), device=a.device, dtype=torch.float32)
    rows = triton.cdiv(M, BLOCK_M)
    sync = _sync_words(a.device, rows, N, flags, _diag)
    a_desc = TensorDescriptor.from_tensor(a, [BLOCK_M, BLOCK_K], gl.NVMMASharedLayout.get_default_for(
        [BLOCK_M, BLOCK_K], gl.int8))
    w_desc = TensorDescriptor.from_tensor(w, [BLOCK_N, BLOCK_K], gl.NVMMASharedLayout.get_default_for(
        [BLOCK_N, BLOCK_K], gl.int8))
    assert _probe is None or (_probe.shape == probe_shape(a, w) and _probe.dtype == torch.int64)
    _ws_token_codes_kernel[(_grid(a, w),)](
        a_desc, w_desc, q, s, parts, sync, a_scale, w_scale, bias if bias is not None else w_scale,
        mul if mul is not None else w_scale, M, N, K, q.stride(0), ROW_SCALE=a_scale.dim() == 1,
        HAS_BIAS=bias is not None, HAS_MUL=mul is not None, BF16=out_dtype == torch.bfloat16,
        WAIT=_wait and not _plain, PLAIN=_plain, SYNC_WARP=sync_warp, DEFER=defer and not _plain,
        SPLIT_SYNC=split_sync, STAGES=stages, CONSUMER_REGS=240, PRODUCER_REGS=24,
        probe_ptr=_probe if _probe is not None else sync, PROBE=_probe is not None, DIAG=_diag, FLAGS=flags,
        num_warps=4, maxnreg=168)
    return q, s


def _grid(a: torch.Tensor, w: torch.Tensor) -> int:
    """One CTA per SM, at most one per tile."""
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    return min(sms, triton.cdiv(a.shape[0], BLOCK_M) * triton.cdiv(w.shape[0], BLOCK_N))


def probe_shape(a: torch.Tensor, w: torch.Tensor) -> tuple[int, int, int]:
    """``_probe``'s shape: the grid's CTAs, their 2 consumers, PROBE_TILES."""
    return (_grid(a, w), 2, PROBE_TILES.value)
