"""The sampling loop: respaced DDPM or DDIM with classifier-free guidance, over any denoiser.

The loop knows nothing of models or backends (see ``denoiser.py``). Guidance concatenates the
conditional and null-label halves into one denoiser call, mixes the noise channels and keeps the
conditional variance channels. ``on_step`` sees every denoiser call (its inputs and outputs),
which is how calibration records ``(x_t, t, y)`` without a copy of this loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .denoiser import Denoiser
from .diffusion import GaussianDiffusion

SamplerName = Literal["ddpm", "ddim"]
GuidanceChannels = Literal["all", "dit"]


@dataclass
class StepInfo:
    """What one denoiser call saw and returned; passed to ``on_step`` callbacks."""

    index: int  # 0 .. steps-1 in sampling order (0 = noisiest)
    timestep: int  # original 0..999 timestep given to the denoiser
    x: torch.Tensor  # denoiser input (guidance doubles the batch)
    t: torch.Tensor
    y: torch.Tensor
    output: torch.Tensor  # raw denoiser output, before guidance mixing


StepCallback = Callable[[StepInfo], None]


def guided_output(output: torch.Tensor, cfg_scale: float, in_channels: int,
                  guidance_channels: GuidanceChannels = "all") -> torch.Tensor:
    """Mix ``[cond; uncond]`` outputs: eps = uncond + s (cond - uncond), variance from cond.

    ``guidance_channels='dit'`` reproduces the original DiT code, which guides only the first
    three channels (on 4-channel latents the 4th noise channel stays conditional)."""
    cond, uncond = output.chunk(2, dim=0)
    n_guided = in_channels if guidance_channels == "all" else min(3, in_channels)
    mixed = cond.clone()
    mixed[:, :n_guided] = uncond[:, :n_guided] + cfg_scale * (cond[:, :n_guided] - uncond[:, :n_guided])
    return mixed


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    diffusion: GaussianDiffusion,
    noise: torch.Tensor,
    labels: torch.Tensor,
    *,
    sampler: SamplerName = "ddpm",
    cfg_scale: float = 1.0,
    null_class: int | None = None,
    guidance_channels: GuidanceChannels = "all",
    eta: float = 0.0,
    clip_denoised: bool = False,
    generator: torch.Generator | None = None,
    on_step: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Denoise ``noise`` (x_T) for ``labels`` and return x_0 (float32, same device as noise).

    Per-step noise comes from ``generator``, so the same seed gives the same images."""
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}: use 'ddpm' or 'ddim'")
    guided = cfg_scale != 1.0
    if guided and null_class is None:
        raise ValueError("classifier-free guidance needs a model with a null class")
    x = noise.float()
    labels = labels.to(x.device)
    y_in = torch.cat([labels, torch.full_like(labels, null_class)]) if guided else labels
    indices = list(range(diffusion.num_timesteps))[::-1]
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"{sampler} {diffusion.num_timesteps} steps", unit="step", leave=False)
    for n, i in enumerate(indices):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x_in = torch.cat([x, x]) if guided else x
        t_model = diffusion.model_timesteps(t)
        t_in = torch.cat([t_model, t_model]) if guided else t_model
        out = denoiser(x_in, t_in, y_in)
        if on_step is not None:
            on_step(StepInfo(n, diffusion.timestep_map[i], x_in, t_in, y_in, out))
        if guided:
            out = guided_output(out, cfg_scale, x.shape[1], guidance_channels)
        step_noise = _step_noise(x, generator)
        if sampler == "ddpm":
            x = diffusion.ddpm_step(out, x, t, step_noise, clip_denoised=clip_denoised).sample
        else:
            x = diffusion.ddim_step(out, x, t, step_noise, eta=eta, clip_denoised=clip_denoised).sample
    return x


def _step_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A step's noise like ``x``, drawn on the generator's device (a CPU generator: the same images on any
    device). From a CPU generator to a GPU it travels through pinned memory without blocking: a plain copy
    would wait for the GPU to finish the step's forward before the host could enqueue anything more."""
    noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
    if noise.device.type == "cpu" and x.device.type == "cuda":
        return noise.pin_memory().to(x.device, non_blocking=True)
    return noise.to(x.device)
