"""Models that ship with dtq, loadable by name without any download."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .model import DiT

ASSETS = Path(__file__).resolve().parent / "assets"

BUILTIN_MODELS = {
    # 1.9M-parameter class-conditional DiT (hidden 128, depth 6, patch 2, 256 tokens) trained on
    # Fashion-MNIST in pixel space; see assets/dit-tiny-fmnist/README.md
    "dit-tiny-fmnist": ASSETS / "dit-tiny-fmnist" / "model.safetensors",
}
DEFAULT_MODEL = "dit-tiny-fmnist"


def builtin_checkpoint(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {name!r}; built-in: {', '.join(BUILTIN_MODELS)}")
    path = BUILTIN_MODELS[name]
    if not path.is_file():
        raise FileNotFoundError(f"built-in model {name!r} is missing its weights at {path} (broken install?)")
    return path


def load_builtin(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> DiT:
    """A built-in trained model, e.g. ``load_builtin("dit-tiny-fmnist")``."""
    return load_checkpoint(builtin_checkpoint(name), dtype=dtype)
