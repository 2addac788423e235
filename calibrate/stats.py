"""Activation statistics of the quantizable Linears, collected by forward hooks.

Per layer and per timestep: per-input-channel max |x| and tensor min/max. Per layer (all
timesteps): a histogram of |x| (percentile and MSE searches) and a bounded random sample of
input tokens per timestep (DiTAS' alpha search, MSE searches on balanced inputs). Nothing grows
with the number of calibration rows, so DiT-XL/2 calibration fits one GPU: the histogram and
running maxima stay on the device, token samples go to host memory.

Every statistic is a function of the *set* of batches, not of the order they ran in or of which
process ran them, so ranks that each see a share of the batches merge (``merge_statistics``)
into exactly what one process computes: maxima and minima reduce exactly, histograms live on a
power-of-two range where re-binning is exact and their counts are integer sums, and the token
sample of batch ``b`` at timestep ``t`` is drawn with a generator seeded by ``(seed, layer, b,
t)``; the kept sample is the first ``sample_tokens`` of those in batch order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..runtime.distributed import SINGLE, DistContext, all_gather_objects
from ..runtime.rotation import rotated_input
from .data import ForwardLoop


class AbsHistogram:
    """Histogram of |x| over [0, hi] with a fixed bin count. ``hi`` is the smallest power of two
    above the largest value: when a larger value arrives the range doubles and bins merge
    pairwise. Scaling by powers of two is exact in floating point, so a value's bin is the same
    whether it was binned on the final range or merged up from a smaller one: one pass suffices,
    and histograms of shares of the data merge (``merge``) into the histogram of all of it."""

    def __init__(self, bins: int = 2048):
        if bins < 2 or bins & (bins - 1):
            raise ValueError("bins must be a power of two")  # the bin width is then a power of two too
        self.bins = bins
        self.hi = 0.0
        self.amax = 0.0
        self.counts: torch.Tensor | None = None

    def add(self, x: torch.Tensor, amax: float | None = None) -> None:
        """Add |x| values; pass ``x`` already absolute (and its max) to save passes over it."""
        a = x.detach().float().abs().flatten() if amax is None else x.flatten()
        if amax is None:
            amax = float(a.max()) if a.numel() else 0.0
        if amax == 0.0 and self.counts is None:
            return
        if self.counts is None:
            self.counts = torch.zeros(self.bins, dtype=torch.float64, device=a.device)
            self.hi = _pow2_above(amax)
        self._grow(_pow2_above(amax))
        self.amax = max(self.amax, amax)
        self.counts += torch.histc(a, bins=self.bins, min=0.0, max=self.hi).double()

    def _grow(self, hi: float) -> None:
        while self.hi < hi:
            merged = self.counts.view(-1, 2).sum(dim=1)
            self.counts = torch.cat([merged, torch.zeros_like(merged)])
            self.hi *= 2

    def merge(self, other: "AbsHistogram") -> None:
        """Add ``other``'s counts (same bin count): exact, as the two ranges are powers of two."""
        if other.counts is None:
            return
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        theirs = other.counts.to(self.counts.device if self.counts is not None else other.counts.device)
        if self.counts is None:
            self.counts, self.hi, self.amax = theirs.clone(), other.hi, other.amax
            return
        self._grow(other.hi)
        factor = int(self.hi / other.hi)  # a power of two >= 1
        self.counts[: self.bins // factor] += theirs.view(-1, factor).sum(dim=1)
        self.amax = max(self.amax, other.amax)

    def cpu(self) -> "AbsHistogram":
        if self.counts is not None:
            self.counts = self.counts.cpu()
        return self

    @property
    def edges(self) -> torch.Tensor:
        return torch.linspace(0, self.hi, self.bins + 1, dtype=torch.float64)

    def percentile(self, q: float) -> float:
        """|x| below which ``q`` percent of the values lie (linear inside a bin)."""
        if self.counts is None:
            return 0.0
        counts = self.counts.cpu()
        cdf = torch.cumsum(counts, 0)
        target = q / 100.0 * float(cdf[-1])
        i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64)).clamp(max=self.bins - 1))
        before = float(cdf[i - 1]) if i > 0 else 0.0
        frac = (target - before) / max(float(counts[i]), 1e-12)
        width = self.hi / self.bins
        return min(self.amax, (i + min(max(frac, 0.0), 1.0)) * width)


def _pow2_above(v: float) -> float:
    """The smallest power of two strictly above ``v`` > 0 (so no value sits on the top edge)."""
    return math.ldexp(1.0, math.frexp(v)[1])


@dataclass
class LayerStats:
    """Statistics of one Linear's input. Timestep keys are the denoiser's 0..999 timesteps."""

    name: str
    in_features: int
    channel_amax: dict[int, torch.Tensor] = field(default_factory=dict)  # t -> [C_in]
    tensor_min: dict[int, float] = field(default_factory=dict)
    tensor_max: dict[int, float] = field(default_factory=dict)
    samples: dict[int, torch.Tensor] = field(default_factory=dict)  # t -> [<=k, C_in] (CPU)
    hist: AbsHistogram | None = None
    # while collecting: t -> [(batch index, its candidate tokens)]; merge_statistics keeps the first k
    sample_parts: dict[int, list[tuple[int, torch.Tensor]]] = field(default_factory=dict, repr=False)

    @property
    def timesteps(self) -> list[int]:
        return sorted(self.channel_amax)

    def channel_amax_per_t(self) -> torch.Tensor:
        """``[T, C_in]``: s_t(X_j), rows in increasing timestep order."""
        return torch.stack([self.channel_amax[t].float().cpu() for t in self.timesteps])

    def channel_amax_all(self) -> torch.Tensor:
        """max over timesteps: the temporal aggregation of DiTAS (and SmoothQuant's s(X))."""
        return self.channel_amax_per_t().amax(dim=0)

    def amax(self) -> float:
        return float(self.channel_amax_all().max())

    def token_samples(self) -> torch.Tensor:
        return torch.cat([self.samples[t] for t in sorted(self.samples)]).float()


@dataclass
class Statistics:
    layers: dict[str, LayerStats]
    rows: int = 0
    rotations: dict[str, int] = field(default_factory=dict)  # layers whose inputs were recorded rotated (block)

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]


class StatsCollector:
    """Context manager: hooks on ``layer_names`` of ``model`` that fill a partial ``Statistics``
    (``merge_statistics`` finishes it).

    A forward pre-hook on the model reads ``t`` so that each layer's input rows are grouped by
    their timestep (mixed-timestep batches are fine), and counts the model calls: call ``j`` of
    this process is batch ``j * world_size + rank`` of the forward loop (``CalibrationSet``'s
    sharded loops deal batch ``i`` to rank ``i % world_size``), which seeds its token sample."""

    def __init__(self, model: nn.Module, layer_names: list[str], *, sample_tokens: int = 64,
                 hist_bins: int = 2048, seed: int = 0, shard: DistContext = SINGLE):
        self.model = model
        self.names = list(layer_names)
        self.sample_tokens = sample_tokens
        self.hist_bins = hist_bins
        self.seed = seed
        self.shard = shard
        self.stats = Statistics({n: LayerStats(n, model.get_submodule(n).in_features) for n in self.names})
        self._t: torch.Tensor | None = None
        self._calls = 0
        self._batch = 0
        self._handles: list = []

    def __enter__(self) -> "StatsCollector":
        def read_t(module, args, kwargs):
            t = args[1] if len(args) > 1 else kwargs["t"]
            self._t = t.detach().long().cpu()
            self.stats.rows += int(t.shape[0])
            self._batch = self._calls * self.shard.world_size + self.shard.rank
            self._calls += 1

        self._handles.append(self.model.register_forward_pre_hook(read_t, with_kwargs=True))
        for i, name in enumerate(self.names):
            mod = self.model.get_submodule(name)
            # a layer with an online input rotation is observed as its quantizer sees it: rotated
            self._handles.append(mod.register_forward_hook(
                lambda m, inp, o, n=name, i=i: self._observe(n, i, rotated_input(m, inp[0]))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def _observe(self, name: str, layer_index: int, x: torch.Tensor) -> None:
        st = self.stats.layers[name]
        x = x.detach()
        if x.ndim == 2:
            x = x[:, None]
        x = x.reshape(x.shape[0], -1, x.shape[-1]).float()  # [B, tokens, C]
        a = x.abs()  # one pass each: |x|, histogram, channel maxima, signed min/max
        per_row_amax = a.amax(dim=1)  # [B, C]
        if st.hist is None:
            st.hist = AbsHistogram(self.hist_bins)
        st.hist.add(a, amax=float(per_row_amax.max()))
        del a
        row_min, row_max = torch.aminmax(x.reshape(x.shape[0], -1), dim=1)
        for t in torch.unique(self._t).tolist():
            rows = (self._t == t).nonzero().flatten().to(x.device)
            amax = per_row_amax[rows].amax(dim=0)
            prev = st.channel_amax.get(t)
            st.channel_amax[t] = amax if prev is None else torch.maximum(prev, amax)
            st.tensor_min[t] = min(st.tensor_min.get(t, float("inf")), float(row_min[rows].min()))
            st.tensor_max[t] = max(st.tensor_max.get(t, float("-inf")), float(row_max[rows].max()))
            parts = st.sample_parts.setdefault(t, [])
            if sum(len(p) for _, p in parts) < self.sample_tokens:  # later batches of this rank cannot be kept
                gen = torch.Generator().manual_seed(_sample_seed(self.seed, layer_index, self._batch, t))
                n_tok = rows.numel() * x.shape[1]
                flat = torch.randperm(n_tok, generator=gen)[:self.sample_tokens].to(x.device)
                parts.append((self._batch, x[rows[flat // x.shape[1]], flat % x.shape[1]].cpu()))  # no copy of the batch


def _sample_seed(seed: int, layer_index: int, batch: int, t: int) -> int:
    return (((seed * 1_000_003 + layer_index) * 1_000_033 + batch) * 1009 + t) % (1 << 63)


def merge_statistics(parts: list[Statistics], sample_tokens: int) -> Statistics:
    """One ``Statistics`` from partial ones over disjoint shares of the batches (one part: a
    single process), on the CPU: maxima, minima, histogram counts and row counts reduce exactly,
    and each timestep's token sample is the first ``sample_tokens`` candidates in batch order.
    The result does not depend on how the batches were shared."""
    out = Statistics({}, rows=sum(p.rows for p in parts))
    for name, first in parts[0].layers.items():
        st = out.layers[name] = LayerStats(name, first.in_features)
        candidates: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for part in (p.layers[name] for p in parts):
            for t, amax in part.channel_amax.items():
                prev = st.channel_amax.get(t)
                st.channel_amax[t] = amax.cpu() if prev is None else torch.maximum(prev, amax.cpu())
                st.tensor_min[t] = min(st.tensor_min.get(t, float("inf")), part.tensor_min[t])
                st.tensor_max[t] = max(st.tensor_max.get(t, float("-inf")), part.tensor_max[t])
            if part.hist is not None:
                st.hist = st.hist or AbsHistogram(part.hist.bins)
                st.hist.merge(part.hist)
            for t, cands in part.sample_parts.items():
                candidates.setdefault(t, []).extend(cands)
        if st.hist is not None:
            st.hist.cpu()
        for t in sorted(candidates):
            ordered = [tokens for _, tokens in sorted(candidates[t], key=lambda c: c[0])]
            if ordered:  # a rank's share may have been dropped (_drop_unkept_samples), not all of them
                st.samples[t] = torch.cat(ordered)[:sample_tokens]
        st.channel_amax = dict(sorted(st.channel_amax.items()))
    return out


def collect_stats(model: nn.Module, forward_loop: ForwardLoop, layer_names: list[str], *,
                  sample_tokens: int = 64, hist_bins: int = 2048, seed: int = 0,
                  shard: DistContext = SINGLE) -> Statistics:
    """Run ``forward_loop(model)`` with hooks on ``layer_names``; returns their statistics.

    ``shard``: the loop runs this rank's share of the batches (batch ``i`` on rank ``i %
    world_size``); every rank then gets the statistics of all of them, equal to one process's."""
    with StatsCollector(model, layer_names, sample_tokens=sample_tokens, hist_bins=hist_bins, seed=seed,
                        shard=shard) as c:
        forward_loop(model)
    if shard.active:
        _drop_unkept_samples(c.stats, shard, sample_tokens)
    return merge_statistics(all_gather_objects(_to_cpu(c.stats), shard), sample_tokens)


def _drop_unkept_samples(stats: Statistics, shard: DistContext, sample_tokens: int) -> None:
    """Before the gather, drop the candidate tokens that ``merge_statistics`` would not keep (those
    after the first ``sample_tokens`` in batch order over all ranks), so that what travels is about
    one process's sample, not one per rank (DiT-XL/2: ~1.6 GB each). One small gather of
    ``(layer, t) -> [(batch, count)]`` tells each rank which of its batches make the cut."""
    mine = {(n, t): [(b, len(tok)) for b, tok in parts]
            for n, st in stats.layers.items() for t, parts in st.sample_parts.items()}
    counts: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for theirs in all_gather_objects(mine, shard):
        for key, entries in theirs.items():
            counts.setdefault(key, []).extend(entries)
    for (n, t), entries in counts.items():
        kept, total = set(), 0
        for b, count in sorted(entries):
            if total >= sample_tokens:
                break
            kept.add(b)
            total += count
        parts = stats.layers[n].sample_parts.get(t)
        if parts is not None:
            stats.layers[n].sample_parts[t] = [(b, tok) for b, tok in parts if b in kept]


def _to_cpu(stats: Statistics) -> Statistics:
    """Tensors that object collectives can send (a CUDA tensor would unpickle on the sender's GPU)."""
    for st in stats.layers.values():
        st.channel_amax = {t: v.cpu() for t, v in st.channel_amax.items()}
        if st.hist is not None:
            st.hist.cpu()
    return stats
