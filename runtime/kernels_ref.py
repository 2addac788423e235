"""Torch-only helpers of the quantized engine's kernels (no triton needed): the INT4 packing, the paired
per-token pass's column layout."""

from __future__ import annotations

import torch


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] ``[N, K]`` -> uint8 ``[N, K/2]``: stored ``+8``, element ``2j`` in the
    low nibble and ``2j+1`` in the high one (what ``kernels.w4a16_mm`` unpacks)."""
    if q.shape[-1] % 2:
        raise ValueError("INT4 packing needs an even number of columns")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("INT4 codes must lie in [-8, 7]")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    lo = (p & 0xF).to(torch.int8) - 8
    hi = (p >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(p.shape[0], p.shape[1] * 2)


def pair_columns(v: torch.Tensor) -> torch.Tensor:
    """A per-column vector ``[K]`` (K even) -> float32 ``[2, K/2]``: the even columns' values, then the odd
    ones' (how ``kernels.quant_rows_int8``'s paired pass reads a balancing Mul)."""
    if v.shape[-1] % 2:
        raise ValueError("pair_columns needs an even number of columns")
    return v.detach().float().reshape(-1, 2).t().contiguous()
