"""From the model's output space to images: identity for pixel-space models, a diffusers
``AutoencoderKL`` (loaded from a local directory, never a hub) for latent models."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# DiT's latents are the Stable Diffusion VAE's, scaled by this factor during training.
LATENT_SCALE = 0.18215


class LatentDecoder:
    def __init__(self, vae_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        vae_dir = Path(vae_dir)
        if not (vae_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"no VAE at {vae_dir}: expected a diffusers AutoencoderKL directory (config.json + weights), "
                "e.g. a local copy of stabilityai/sd-vae-ft-ema"
            )
        try:
            from diffusers import AutoencoderKL
        except ImportError as exc:
            raise ImportError("decoding latents needs diffusers: pip install 'dtq[vae]'") from exc
        self.vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).to(device, dtype).eval()
        self.device, self.dtype = torch.device(device), dtype
        # the VAE's own latent scale when its config records one (diffusers pipelines do)
        self.scale = float(getattr(self.vae.config, "scaling_factor", None) or LATENT_SCALE)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        z = (latents / self.scale).to(self.device, self.dtype)
        return self.vae.decode(z).sample.float().clamp(-1, 1)
