"""Capture real denoiser inputs ``(x_t, t, y)`` from the FP sampler at chosen steps.

The sampler's ``on_step`` callback sees every denoiser call; we keep copies of the inputs (and
the FP output, for reference) of the calls whose step we want. With guidance the captured batch
is ``[cond; uncond]`` (2x the images), exactly what a deployed denoiser sees.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from ..runtime.denoiser import Denoiser
from ..runtime.diffusion import GaussianDiffusion
from ..runtime.sampler import StepInfo, sample


@dataclass
class CapturedStep:
    index: int  # sampling-order step index (0 = noisiest)
    timestep: int  # original 0..999 timestep
    x: np.ndarray  # float32 [B, C, H, W]
    t: np.ndarray  # int64 [B] (the timesteps the denoiser got: respaced-to-original)
    y: np.ndarray  # int64 [B]
    output: np.ndarray  # the capturing denoiser's output (float32)

    def feed(self) -> "OrderedDict[str, np.ndarray]":
        """A polygraphy feed dict (input names of dtq's ONNX export: x, t, y)."""
        return OrderedDict(x=self.x, t=self.t, y=self.y)


def default_step_indices(steps: int) -> list[int]:
    """Early, middle and late: the first, middle and last sampling step."""
    return sorted({0, steps // 2, steps - 1})


def step_indices_for_timesteps(diffusion: GaussianDiffusion, timesteps: list[int]) -> list[int]:
    """The sampling-order index of the respaced step nearest to each original timestep (0..999)."""
    tmap = list(diffusion.timestep_map)[::-1]  # sampling order: largest timestep first
    out = []
    for ts in timesteps:
        if not 0 <= ts <= 999:
            raise ValueError(f"timestep {ts} is outside 0..999")
        out.append(int(np.argmin([abs(int(v) - ts) for v in tmap])))
    return sorted(set(out))


def capture_inputs(denoiser: Denoiser, diffusion: GaussianDiffusion, noise: torch.Tensor, labels: torch.Tensor,
                   step_indices: list[int], *, cfg_scale: float = 1.5, null_class: int | None = None,
                   seed: int = 0, clip_denoised: bool = True) -> list[CapturedStep]:
    """Run the DDPM sampler with ``denoiser`` and return copies of the inputs at ``step_indices``."""
    wanted = set(step_indices)
    bad = [i for i in wanted if not 0 <= i < diffusion.num_timesteps]
    if bad:
        raise ValueError(f"step indices {bad} are outside 0..{diffusion.num_timesteps - 1}")
    captured: list[CapturedStep] = []

    def on_step(info: StepInfo) -> None:
        if info.index in wanted:
            captured.append(CapturedStep(
                info.index, int(info.timestep), info.x.detach().float().cpu().numpy().copy(),
                info.t.detach().cpu().numpy().astype(np.int64), info.y.detach().cpu().numpy().astype(np.int64),
                info.output.detach().float().cpu().numpy().copy()))

    gen = torch.Generator().manual_seed(seed)
    sample(denoiser, diffusion, noise, labels, sampler="ddpm", cfg_scale=cfg_scale, null_class=null_class,
           clip_denoised=clip_denoised, generator=gen, on_step=on_step)
    return sorted(captured, key=lambda c: c.index)
