"""Clipping-range (scale) search: min-max, percentile, MSE/Lp, for weights and activations.

Weights are searched on the tensor itself, per quantization block (channel or group).
Activations (per tensor) are searched on the |x| histogram of the layer input, or, for balanced
inputs ``X / b`` whose histogram was not recorded, on the stored token samples.
"""

from __future__ import annotations

import torch

from ..runtime import quant
from .stats import AbsHistogram

_RATIOS = torch.linspace(1.0, 0.2, 81)  # clip = ratio * amax candidates for MSE search


def _blocks(w: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """``w`` as ``[n_blocks, block_len]`` in the order of the scale tensor's elements."""
    if granularity == "tensor":
        return w.reshape(1, -1)
    if granularity == "channel":
        return w.reshape(w.shape[0], -1)
    return w.reshape(w.shape[0], w.shape[1] // group_size, group_size).reshape(-1, group_size)


def search_weight_scale(w: torch.Tensor, fmt: str, granularity: str, group_size: int | None = None,
                        method: str = "minmax", percentile: float = 99.99, p: float = 2.0) -> torch.Tensor:
    """Scale of ``w`` (shape as ``quant.weight_amax``) by the chosen search."""
    w = w.detach().float()
    amax = quant.weight_amax(w, granularity, group_size)
    if method == "minmax":
        return quant.scale_from_amax(amax, fmt)
    blocks = _blocks(w, granularity, group_size)
    if method == "percentile":
        clip = torch.quantile(blocks.abs(), percentile / 100.0, dim=1)
        return quant.scale_from_amax(clip.reshape(amax.shape), fmt)
    if method != "mse":
        raise ValueError(f"unknown scale search {method!r}")
    flat_amax = amax.reshape(-1, 1)
    best_err = torch.full((blocks.shape[0],), float("inf"), device=w.device)
    best = flat_amax.squeeze(1).clone()
    for r in _RATIOS.tolist():
        scale = quant.scale_from_amax(flat_amax * r, fmt)
        err = (quant.fake_quant(blocks, scale, fmt) - blocks).abs().pow(p).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, flat_amax.squeeze(1) * r, best)
    return quant.scale_from_amax(best.reshape(amax.shape), fmt)


def _lp_error_hist(hist: AbsHistogram, clip: float, fmt: str, p: float) -> float:
    """Expected Lp error of quantizing the histogrammed |x| with clip range ``clip``: clipped
    values lose (v - clip), the others the rounding error, uniform over a step (int) or the
    exact FP8 rounding of the bin centre."""
    counts = hist.counts.cpu()
    centers = (hist.edges[:-1] + hist.edges[1:]).float() / 2
    scale = quant.scale_from_amax(clip, fmt)
    if fmt in quant.INT_RANGE:
        inside = torch.full_like(centers, float((scale / 2) ** p / (p + 1)))
    else:
        inside = (quant.fake_quant(centers, scale, fmt) - centers).abs().pow(p)
    err = torch.where(centers > clip, (centers - clip).abs().pow(p), inside)
    return float((err.double() * counts).sum())


def search_act_amax(hist: AbsHistogram, fmt: str, method: str = "minmax", percentile: float = 99.99,
                    p: float = 2.0) -> float:
    """Per-tensor clip range of an activation from its |x| histogram."""
    if hist is None or hist.counts is None:
        return 0.0
    if method == "minmax":
        return hist.amax
    if method == "percentile":
        return hist.percentile(percentile)
    if method != "mse":
        raise ValueError(f"unknown scale search {method!r}")
    errs = [(_lp_error_hist(hist, hist.amax * r, fmt, p), hist.amax * r) for r in _RATIOS.tolist()]
    return min(errs)[1]


def search_act_amax_samples(x: torch.Tensor, fmt: str, method: str = "minmax", percentile: float = 99.99,
                            p: float = 2.0, amax: float | None = None) -> float:
    """Per-tensor clip range from token samples; ``amax`` (the exact maximum over all calibration
    data, known from the per-channel statistics) replaces the sample maximum."""
    a = x.detach().float().abs().flatten()
    top = float(a.max()) if amax is None else float(amax)
    if method == "minmax":
        return top
    if method == "percentile":
        return min(top, float(torch.quantile(a[:16_000_000], percentile / 100.0)))
    best = (float("inf"), top)
    for r in _RATIOS.tolist():
        s = quant.scale_from_amax(top * r, fmt)
        err = float((quant.fake_quant(a, s, fmt) - a).abs().pow(p).sum())
        best = min(best, (err, top * r))
    return best[1]
