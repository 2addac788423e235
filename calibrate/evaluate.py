"""Measurements of a simulated model against FP: noise-prediction SQNR per trajectory phase and
PSNR of final samples from the same noise."""

from __future__ import annotations

import torch
from torch import nn

from ..runtime import quant
from ..runtime.denoiser import TorchDenoiser
from ..runtime.diffusion import GaussianDiffusion
from ..runtime.sampler import sample
from .data import CalibrationSet

PHASES = ("early", "middle", "late")


@torch.no_grad()
def predict(model: nn.Module, data: CalibrationSet, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    outs = []
    for i in range(0, len(data), batch_size):
        x, t, y = (v[i:i + batch_size].to(device) for v in (data.x, data.t, data.y))
        if data.prompts is None:
            outs.append(model(x, t, y).float().cpu())
        else:  # a text-conditioned model: y indexes the set's prompt embeddings
            context, mask = data.prompts.lookup(y)
            outs.append(model(x, t, context.to(device), mask.to(device)).float().cpu())
    return torch.cat(outs)


def noise_sqnr(fp_model: nn.Module, q_model: nn.Module, data: CalibrationSet, *, batch_size: int = 256,
               device: str = "cpu", fp_out: torch.Tensor | None = None) -> dict[str, float]:
    """SQNR (dB) of the noise channels (eps, not the variance) per phase and over all rows."""
    c = data.x.shape[1]
    ref = predict(fp_model, data, batch_size, device)[:, :c] if fp_out is None else fp_out[:, :c]
    out = predict(q_model, data, batch_size, device)[:, :c]
    result = {"all": quant.sqnr_db(ref, out)}
    for phase in PHASES:
        k = PHASES.index(phase)
        mask = (data.step >= k * data.steps / 3) & (data.step < (k + 1) * data.steps / 3)
        if mask.any():
            result[phase] = quant.sqnr_db(ref[mask], out[mask])
    return result


def record_heldout_sqnr(model: nn.Module, recipe, held_out: CalibrationSet, *, batch_size: int = 256,
                        device: str = "cpu") -> dict[str, float]:
    """``noise_sqnr`` of the recipe's simulation on ``held_out``, rounded to 0.01 dB and recorded as
    ``recipe.info["heldout_noise_sqnr_db"]`` (the report dtq-calibrate and dtq-sensitivity print)."""
    from ..runtime.recipe import apply_recipe

    sqnr = noise_sqnr(model, apply_recipe(model, recipe), held_out, batch_size=batch_size, device=device)
    recipe.info["heldout_noise_sqnr_db"] = {k: round(v, 2) for k, v in sqnr.items()}
    return recipe.info["heldout_noise_sqnr_db"]


def psnr(reference: torch.Tensor, test: torch.Tensor, data_range: float = 2.0) -> float:
    """PSNR (dB) over images in [-1, 1] (range 2), pooled MSE over the whole batch."""
    mse = float((reference.double() - test.double()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(data_range**2 / mse)).item()


@torch.no_grad()
def generate(model: nn.Module, *, num_images: int, steps: int, cfg_scale: float = 1.5, seed: int = 0,
             device: str = "cpu", batch_size: int = 64, sampler: str = "ddpm") -> torch.Tensor:
    """Images from fixed noise, labels and sampler noise (same seed -> same inputs for every model)."""
    cfg = model.config
    diffusion = GaussianDiffusion.dit(steps)
    images = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        gen = torch.Generator().manual_seed(seed * 100003 + start)
        noise = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
        labels = torch.arange(start, start + n) % cfg.num_classes
        images.append(sample(TorchDenoiser(model, device), diffusion, noise.to(device), labels, sampler=sampler,
                             cfg_scale=cfg_scale, null_class=cfg.null_class, clip_denoised=cfg.space == "pixel",
                             generator=gen).cpu())
    return torch.cat(images)
