"""DiTAS' training-free low-rank branch (METHODS.md): ``W ~ Q + L R`` with ``Q`` quantized and
``L R`` a rank-r FP16 side path.

``L, R = 0``; repeat: ``Q = quant(W - L R)`` (scale searched on ``W - L R``), ``(L, R)`` = rank-r
SVD of ``W - Q`` (``torch.svd_lowrank``). Given ``Q`` the SVD step cannot increase the error
(the old ``L R`` is a rank-r candidate) and given ``L R`` rounding to the grid is optimal for a
fixed scale; the scale search and the randomized SVD can still overshoot, so an iterate that
does not lower ``|W - Q - L R|`` ends the loop and the best one is kept.

``L`` and ``R`` are rounded to float16 (what the engine and an fp16 graph hold) before ``Q`` is
formed, so the quantized path compensates the branch the deployment actually runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # w -> (fake-quant w, scale)


@dataclass
class LowRank:
    up: torch.Tensor  # L [C_out, r]
    down: torch.Tensor  # R [r, C_in]
    residual: torch.Tensor  # W - L R: the weight the quantized path quantizes
    scale: torch.Tensor  # its weight scale
    errors: list[float] = field(default_factory=list)  # |W - Q - L R|_F per accepted iterate (0: RTN)


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).float()


@torch.no_grad()
def lowrank_decompose(w: torch.Tensor, quantizer: Quantizer, rank: int, iters: int = 10, *,
                      niter: int = 4, seed: int = 0) -> LowRank:
    """The branch for weight ``w`` (``[C_out, C_in]``): ``quantizer(w)`` fake-quantizes with a
    searched scale. ``errors[0]`` is plain rounding's error (no branch)."""
    if not 0 < rank <= min(w.shape):
        raise ValueError(f"rank must be in 1..{min(w.shape)}, got {rank}")
    w = w.detach().float()
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # svd_lowrank draws a random projection
        torch.manual_seed(seed)
        up = torch.zeros(w.shape[0], rank, device=w.device)
        down = torch.zeros(rank, w.shape[1], device=w.device)
        residual = w
        wq, scale = quantizer(residual)
        best = LowRank(up, down, residual, scale, [float((w - wq).norm())])
        for _ in range(iters):
            u, s, v = torch.svd_lowrank(w - wq, q=min(rank + 8, *w.shape), niter=niter)  # oversampled
            up, down = _fp16(u[:, :rank] * s[:rank]), _fp16(v[:, :rank].T)
            residual = w - up @ down
            wq, scale = quantizer(residual)
            err = float((residual - wq).norm())
            if not err < best.errors[-1]:
                break
            best = LowRank(up, down, residual, scale, best.errors + [err])
    return best
