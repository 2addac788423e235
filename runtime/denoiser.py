"""The one interface every backend implements for the sampler.

A denoiser is any callable ``(x, t, y) -> output`` on torch tensors: ``x`` the noisy input
``[B, C, H, W]``, ``t`` the original (0..999) timesteps ``[B]`` (int64), ``y`` class labels
``[B]`` (int64, the null class included). The output has C or 2C channels (eps[, variance]).
PyTorch, ONNX Runtime and TensorRT backends all satisfy it, so the sampler never changes.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class TorchDenoiser:
    """Runs an ``nn.Module`` in a chosen dtype/device; returns float32 outputs on the input's device.

    ``dtype`` fp16/bf16 casts the weights; ``autocast=True`` keeps fp32 weights and runs matmuls
    under autocast (how the reference samples were made)."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 autocast: bool = False):
        self.device = torch.device(device)
        self.dtype = dtype
        self.autocast = autocast and dtype != torch.float32
        self.model = model.to(self.device, torch.float32 if self.autocast else dtype).eval()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_in = x.to(self.device, torch.float32 if self.autocast else self.dtype)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            out = self.model(x_in, t.to(self.device), y.to(self.device))
        return out.float().to(x.device)
