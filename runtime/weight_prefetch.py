"""Staged W4A16 weights dequantized one block ahead, on a side CUDA stream.

A staged W4A16 layer (``qengine.Int4Linear`` at ``staged_min_rows`` input rows or more) dequantizes its
INT4 weight to the activation type and runs cuBLAS on it. Done inside the layer, that puts one unpack
kernel on the critical path of every layer: at batch 1-8 on an H200 the 140 unpacks of a DiT-XL/2
forward (about 6 us each) were the gap to bf16 (docs/engines.md, session 13). :class:`WeightPrefetcher`
takes them off it: while block ``i`` computes on the current stream, a side stream unpacks block
``i + 1``'s layers into the other of two slots, and block ``i + 1`` waits for that event only. The
slots hold two blocks' weights in the activation type (2 x 32 MB for DiT-XL/2's qkv, proj, fc1 and fc2
in bf16, 2 x 48 MB with adaLN), not every block's: the engine keeps 4-bit weights.

Scheduling only: the unpack kernel and the GEMM are the layer's own, so the output is bit-identical to
the engine without prefetching in eager mode (the interpreter tests). Under a block's ``torch.compile`` the
per-sample layers' input, SiLU(c), is computed here by eager torch rather than by Inductor inside the block,
which may round differently (an H200 run differed from the detached engine by at most 0.0078 on outputs of
mean magnitude 0.51; the weights-only prefetch was bit-identical there). CUDA graphs capture the two streams as parallel branches. Off CUDA
(the Triton interpreter of the tests) the block's slot is filled in order, on the one stream.

Layers whose input is the same in every block (a DiT's adaLN, on the conditioning ``c``: ``per_sample``) get
more: their whole output is computed on the side stream a block ahead too (INT4 kernel or slot + GEMM, as
the layer would), so the small GEMV of each block leaves the critical path as well.

The layers use their slot (and output) only while their block has armed them (``Int4Linear.prefetch_armed``,
between :meth:`WeightPrefetcher.begin_block` and :meth:`~WeightPrefetcher.end_block`); called on
their own they unpack their weight themselves. Both methods run eagerly (``torch.compiler.disable``):
under a block's ``torch.compile`` they are graph breaks at the block's start and end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightPrefetcher:
    """Two slots of dequantized weights for ``blocks[i]``'s layers (``Int4Linear``, W4A16 path), filled
    one block ahead on a side stream. ``blocks``: per block it serves, in the order the model runs them,
    the layers to prefetch; block ``i`` calls :meth:`begin_block` with ``i``. ``per_sample``: the layers
    among them whose input has one row per sample (a DiT's adaLN, on the conditioning), not one per token:
    a layer is filled only when it stages its weight at its row count (``Int4Linear.staged``)."""

    def __init__(self, blocks: list[list[nn.Module]], per_sample: tuple[nn.Module, ...] = ()):
        if not blocks or not all(blocks):
            raise ValueError("WeightPrefetcher needs at least one layer in every block it serves")
        self.blocks = blocks
        self._per_sample = {id(lin) for lin in per_sample}
        self._per_sample_layers = [lin for layers in blocks for lin in layers if id(lin) in self._per_sample]
        self._rows = (0, 0)  # (samples, tokens) of the forward running: which layers stage
        # per-sample layers' outputs, per (samples, dtype, device): kept for the prefetcher's life, as a CUDA
        # graph captured at one batch size writes and reads the buffers it was captured with
        self._outputs: dict[tuple, list[torch.Tensor]] = {}
        self._cond: torch.Tensor | None = None  # SiLU of the forward's conditioning (per-sample layers' input)
        self._pool: torch.Tensor | None = None
        self._side: torch.cuda.Stream | None = None
        self._ready: list[torch.cuda.Event] = []
        self._free: torch.cuda.Event | None = None

    def slot_elements(self) -> int:
        """Weights in one slot: the largest block's."""
        return max(sum(lin.out_features * lin.in_features for lin in layers) for layers in self.blocks)

    def scratch_bytes(self) -> int:
        """Memory of the two slots (0 before the first forward allocates them)."""
        return 0 if self._pool is None else self._pool.numel() * self._pool.element_size()

    def _slots_in_place(self, device: torch.device, dtype: torch.dtype) -> bool:
        pool, first = self._pool, self.blocks[0][0].prefetched_weight
        return (pool is not None and pool.device == device and pool.dtype == dtype and first is not None
                and first.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr())

    def _make_slots(self, device: torch.device, dtype: torch.dtype) -> None:
        """One ``[2, slot]`` buffer; each layer's ``prefetched_weight`` a ``[N, K]`` view into its block's
        slot (block ``i``: slot ``i % 2``), and its bias in the activation type (``bias_cast``). Redone when
        the activation's device or type changes, or a move of the engine replaced the views
        (``Int4Linear._apply`` drops them)."""
        self._pool = torch.empty((2, self.slot_elements()), device=device, dtype=dtype)
        for i, layers in enumerate(self.blocks):
            offset = 0
            for lin in layers:
                n = lin.out_features * lin.in_features
                view = self._pool[i % 2, offset:offset + n].view(lin.out_features, lin.in_features)
                lin.register_buffer("prefetched_weight", view, persistent=False)
                lin.register_buffer("bias_cast", None if lin.bias is None else lin.bias.to(dtype), persistent=False)
                offset += n
        if device.type == "cuda":
            self._side = torch.cuda.Stream(device)
            self._ready = [torch.cuda.Event(), torch.cuda.Event()]
            self._free = torch.cuda.Event()

    def _fill(self, i: int) -> None:
        """Block ``i``'s staged weights into its slot, and its per-sample layers' outputs (from the SiLU of
        the conditioning: a DiT block's ``adaLN_modulation`` is ``Sequential(SiLU, Linear)`` on ``c``)."""
        from . import kernels

        samples, tokens = self._rows
        for lin in self.blocks[i]:
            per_sample = id(lin) in self._per_sample
            staged = lin.staged(samples if per_sample else tokens)
            if staged:
                kernels.unpack_int4_dequant(lin.weight_packed, lin.w_scale_groups, lin.group,
                                            lin.prefetched_weight.dtype, out=lin.prefetched_weight)
            if per_sample:
                lin.output_into(self._cond, lin.prefetched_output, lin.prefetched_weight if staged else None)

    def _use_outputs(self, c: torch.Tensor) -> None:
        """Each per-sample layer's output buffer for this batch size (made once per size)."""
        key = (c.shape[0], c.dtype, c.device)
        layers = self._per_sample_layers
        if key not in self._outputs:
            self._outputs[key] = [torch.empty((c.shape[0], lin.out_features), device=c.device, dtype=c.dtype)
                                  for lin in layers]
        for lin, buf in zip(layers, self._outputs[key]):
            if lin.prefetched_output is not buf:
                lin.register_buffer("prefetched_output", buf, persistent=False)

    @torch.compiler.disable
    def begin_block(self, i: int, x: torch.Tensor, c: torch.Tensor | None = None) -> None:
        """Before block ``i`` (on the stream that runs it; ``x`` its input, ``c`` the conditioning every block
        takes, needed with per-sample layers): its weights and per-sample outputs ready, block ``i + 1``'s
        started. Slot ``(i + 1) % 2`` was block ``i - 1``'s: the side stream waits for the work enqueued
        before block ``i`` (block ``i - 1`` included) before overwriting it. The forward's buffers and row
        counts are settled once, at block 0: every block of a forward takes the same shapes."""
        if i == 0:
            if not self._slots_in_place(x.device, x.dtype):
                self._make_slots(x.device, x.dtype)
            if self._per_sample_layers:
                if c is None:
                    raise ValueError("a prefetcher with per-sample layers needs the conditioning c")
                self._use_outputs(c)
            self._rows = (x.shape[0], x.numel() // x.shape[-1])
        for lin in self.blocks[i]:
            lin.prefetch_armed = True
        if x.device.type != "cuda":
            if i == 0:
                self._cond = F.silu(c) if self._per_sample_layers else None
            self._fill(i)
            return
        main, side = torch.cuda.current_stream(x.device), self._side
        if i == 0:  # fork: the side stream sees everything before this forward (a CUDA graph's branch)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                self._cond = F.silu(c) if self._per_sample_layers else None
                self._fill(0)
            self._ready[0].record(side)
        main.wait_event(self._ready[i % 2])  # the join of every fill: the last one is block n-1's
        if i + 1 < len(self.blocks):
            self._free.record(main)
            side.wait_event(self._free)
            with torch.cuda.stream(side):
                self._fill(i + 1)
            self._ready[(i + 1) % 2].record(side)

    @torch.compiler.disable
    def end_block(self, i: int) -> None:
        for lin in self.blocks[i]:
            lin.prefetch_armed = False
