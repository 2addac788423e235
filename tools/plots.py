"""PNG figures drawn with Pillow only (no matplotlib dependency): a horizontal bar chart of
per-layer SQNR and a side-by-side image grid."""

from __future__ import annotations

import math
import os

import numpy as np


def bar_chart_png(labels: list[str], values: list[float], path: str | os.PathLike, *, title: str = "",
                  unit: str = "dB", highlight: set[str] | None = None, threshold: float | None = None) -> None:
    """One horizontal bar per label (top to bottom in the given order); highlighted labels are red,
    the others blue; a vertical grey line marks ``threshold``; infinite values are drawn at the
    largest finite value and annotated 'inf'."""
    from PIL import Image, ImageDraw, ImageFont

    highlight = highlight or set()
    font = ImageFont.load_default()
    finite = [v for v in values if math.isfinite(v)] or [0.0]
    vmax = max(max(finite), threshold or 0.0, 1e-9)
    vmin = min(min(finite), 0.0)
    label_w = 8 + 7 * max((len(s) for s in labels), default=4)
    bar_w, row_h, top = 480, 16, 30 if title else 8
    width, height = label_w + bar_w + 90, top + row_h * len(labels) + 24
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((8, 8), title, fill="black", font=font)

    def xpos(v):
        return label_w + (v - vmin) / (vmax - vmin) * bar_w

    for i, (lab, v) in enumerate(zip(labels, values)):
        y = top + i * row_h
        shown = v if math.isfinite(v) else (max(finite) if v > 0 else vmin)
        color = (200, 40, 40) if lab in highlight else (60, 100, 190)
        x0, x1 = sorted((xpos(0), xpos(shown)))
        d.rectangle([x0, y + 2, x1, y + row_h - 3], fill=color)
        d.text((4, y + 2), lab, fill="black", font=font)
        d.text((xpos(max(shown, 0)) + 4, y + 2), "inf" if not math.isfinite(v) else f"{v:.1f} {unit}", fill="black",
               font=font)
    if threshold is not None:
        x = xpos(threshold)
        d.line([x, top, x, height - 20], fill=(120, 120, 120), width=1)
        d.text((x + 2, height - 18), f"min {threshold:g} {unit}", fill=(90, 90, 90), font=font)
    img.save(path)


def side_by_side_png(rows: list[np.ndarray], path: str | os.PathLike, scale: int = 2) -> None:
    """Stack uint8 NHWC batches (e.g. reference, candidate, |difference|) as rows of one grid."""
    from ..runtime.images import make_grid, save_png

    n = max(len(r) for r in rows)
    tiles = np.concatenate([np.pad(r, ((0, n - len(r)), (0, 0), (0, 0), (0, 0))) for r in rows])
    grid = make_grid(tiles, n, pad=2, pad_value=128)
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    save_png(grid, path)
