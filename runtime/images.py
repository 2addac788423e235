"""Turning samples into files: uint8 conversion, PNG grids, per-image PNGs, ADM-style .npz."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


UINT8_MODES = ("trunc", "round")


def to_uint8(images: torch.Tensor, mode: str = "trunc") -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]`` (NHWC, as ADM's .npz).

    ``mode="trunc"`` (default) is ADM's ``((x + 1) * 127.5).clamp(0, 255).to(uint8)``: values are
    truncated, so a background pixel a hair above -1 stays 0. That is how the reference samples of
    ``shared/reference`` were converted (its grid has ~2% of pixels at 1 like truncation, not the ~9%
    that rounding the same samples gives), so FID numbers compare with the README's only in this
    mode. ``mode="round"`` rounds to the nearest level (DiT's ``sample_ddp.py``: ``127.5 x + 128``)."""
    if mode not in UINT8_MODES:
        raise ValueError(f"mode must be one of {UINT8_MODES}, got {mode!r}")
    x = (images.detach().float().clamp(-1, 1) + 1) * 127.5
    if mode == "round":
        x = x.round()
    x = x.clamp(0, 255).to(torch.uint8)  # the cast truncates toward zero (all values are >= 0 here)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, ncols: int, pad: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 NHWC images into one ``[H', W', C]`` array, row-major, ``ncols`` per row."""
    n, h, w, c = images.shape
    nrows = -(-n // ncols)
    grid = np.full((pad + nrows * (h + pad), pad + ncols * (w + pad), c), pad_value, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = img
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    from PIL import Image

    arr = array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array
    Image.fromarray(arr).save(path)


def save_npz(images: np.ndarray, labels: np.ndarray, path: str | os.PathLike) -> None:
    """ADM-style batch: ``arr_0`` uint8 NHWC images, ``arr_1`` int64 labels; written atomically."""
    path = Path(path)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, images, np.asarray(labels, dtype=np.int64))
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)
