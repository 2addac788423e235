"""Activation statistics of the quantizable Linears, collected by forward hooks.

Per layer and per timestep: per-input-channel max |x| and tensor min/max. Per layer (all
timesteps): a histogram of |x| (percentile and MSE searches) and a bounded random sample of
input tokens per timestep (DiTAS' alpha search, MSE searches on balanced inputs). Nothing grows
with the number of calibration rows, so DiT-XL/2 calibration fits one GPU: the histogram and
running maxima stay on the device, token samples go to host memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..runtime.rotation import rotated_input
from .data import ForwardLoop


class AbsHistogram:
    """Histogram of |x| over [0, hi] with a fixed bin count. When a larger value arrives the range
    doubles and bins merge pairwise, which is exact, so one pass suffices."""

    def __init__(self, bins: int = 2048):
        if bins % 2:
            raise ValueError("bins must be even")
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
            self.hi = amax
            self.counts = torch.zeros(self.bins, dtype=torch.float64, device=a.device)
        while amax > self.hi:
            merged = self.counts.view(-1, 2).sum(dim=1)
            self.counts = torch.cat([merged, torch.zeros_like(merged)])
            self.hi *= 2
        self.amax = max(self.amax, amax)
        self.counts += torch.histc(a, bins=self.bins, min=0.0, max=self.hi).double()

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
    """Context manager: hooks on ``layer_names`` of ``model`` that fill a ``Statistics``.

    A forward pre-hook on the model reads ``t`` so that each layer's input rows are grouped by
    their timestep (mixed-timestep batches are fine)."""

    def __init__(self, model: nn.Module, layer_names: list[str], *, sample_tokens: int = 64,
                 hist_bins: int = 2048, seed: int = 0):
        self.model = model
        self.names = list(layer_names)
        self.sample_tokens = sample_tokens
        self.hist_bins = hist_bins
        self.gen = torch.Generator().manual_seed(seed)
        self.stats = Statistics({n: LayerStats(n, model.get_submodule(n).in_features) for n in self.names})
        self._t: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> "StatsCollector":
        def read_t(module, args, kwargs):
            t = args[1] if len(args) > 1 else kwargs["t"]
            self._t = t.detach().long().cpu()
            self.stats.rows += int(t.shape[0])

        self._handles.append(self.model.register_forward_pre_hook(read_t, with_kwargs=True))
        for name in self.names:
            mod = self.model.get_submodule(name)
            # a layer with an online input rotation is observed as its quantizer sees it: rotated
            self._handles.append(mod.register_forward_hook(
                lambda m, i, o, n=name: self._observe(n, rotated_input(m, i[0]))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def _observe(self, name: str, x: torch.Tensor) -> None:
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
            have = 0 if t not in st.samples else st.samples[t].shape[0]
            want = self.sample_tokens - have
            if want > 0:
                n_tok = rows.numel() * x.shape[1]
                flat = torch.randperm(n_tok, generator=self.gen)[:want].to(x.device)
                new = x[rows[flat // x.shape[1]], flat % x.shape[1]].cpu()  # no copy of the batch
                st.samples[t] = new if have == 0 else torch.cat([st.samples[t], new])


def collect_stats(model: nn.Module, forward_loop: ForwardLoop, layer_names: list[str], *,
                  sample_tokens: int = 64, hist_bins: int = 2048, seed: int = 0) -> Statistics:
    """Run ``forward_loop(model)`` with hooks on ``layer_names``; returns their statistics."""
    with StatsCollector(model, layer_names, sample_tokens=sample_tokens, hist_bins=hist_bins, seed=seed) as c:
        forward_loop(model)
    return c.stats
