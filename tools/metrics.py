"""Error metrics between a reference and a candidate: tensors (max/mean abs error, cosine, SQNR)
and images (PSNR, SSIM). NumPy in, Python floats out; float64 throughout.

- SQNR (dB) = 10 log10(sum(ref^2) / sum((ref - cand)^2)); identical tensors give +inf.
- PSNR (dB) = 10 log10(data_range^2 / MSE), with ``data_range`` stated by the caller (255 for
  uint8 images, 2 for [-1, 1] images); identical images give +inf.
- SSIM: Wang et al. 2004, Gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03, weighted moments
  (no N-1 correction, as Wang's reference code), averaged over the "valid" window positions (no
  padding). This equals scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=L)``, which filters with padding and then crops the
  border the padding touched.
"""

from __future__ import annotations

import math

import numpy as np


def _f64(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def max_abs_error(ref, cand) -> float:
    return float(np.max(np.abs(_f64(ref) - _f64(cand)))) if np.size(ref) else 0.0


def mean_abs_error(ref, cand) -> float:
    return float(np.mean(np.abs(_f64(ref) - _f64(cand)))) if np.size(ref) else 0.0


def cosine(ref, cand) -> float:
    """Cosine similarity of the flattened tensors (1.0 when both are zero)."""
    a, b = _f64(ref).ravel(), _f64(cand).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a.dot(b) / (na * nb))


def sqnr_db(ref, cand) -> float:
    """Signal-to-quantization-noise ratio of ``cand`` w.r.t. ``ref`` in dB (+inf when equal)."""
    r, c = _f64(ref), _f64(cand)
    noise = float(np.sum((r - c) ** 2))
    signal = float(np.sum(r ** 2))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def tensor_report(ref, cand) -> dict[str, float]:
    """All four tensor metrics of one output."""
    r, c = _f64(ref), _f64(cand)
    if r.shape != c.shape:
        raise ValueError(f"shape mismatch: reference {r.shape}, candidate {c.shape}")
    return {"max_abs": max_abs_error(r, c), "mean_abs": mean_abs_error(r, c), "cosine": cosine(r, c),
            "sqnr_db": sqnr_db(r, c)}


def psnr(ref, cand, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB for images with values spanning ``data_range``."""
    if data_range <= 0:
        raise ValueError("data_range must be positive")
    mse = float(np.mean((_f64(ref) - _f64(cand)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    return np.outer(g, g)


def _filter_valid(img: np.ndarray, win: np.ndarray) -> np.ndarray:
    """2-D correlation of ``img`` [H, W] with ``win`` at the valid positions only."""
    from numpy.lib.stride_tricks import sliding_window_view

    return np.einsum("ijkl,kl->ij", sliding_window_view(img, win.shape), win)


def ssim(ref, cand, data_range: float, *, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean SSIM (Wang et al. 2004) of two images ``[H, W]`` or ``[H, W, C]`` (channels averaged).

    Gaussian-weighted local means, variances and covariance (weights sum to 1, as Wang's MATLAB
    ``ssim_index``), C1 = (K1 L)^2, C2 = (K2 L)^2, averaged over the valid window positions.
    Images smaller than the window raise ValueError."""
    a, b = _f64(ref), _f64(cand)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    if a.ndim == 3:
        return float(np.mean([ssim(a[..., c], b[..., c], data_range, win_size=win_size, sigma=sigma, k1=k1, k2=k2)
                              for c in range(a.shape[-1])]))
    if a.ndim != 2:
        raise ValueError(f"ssim takes [H, W] or [H, W, C] images, got shape {a.shape}")
    if min(a.shape) < win_size:
        raise ValueError(f"image {a.shape} is smaller than the {win_size}x{win_size} window")
    w = gaussian_window(win_size, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
    var_a = _filter_valid(a * a, w) - mu_a ** 2
    var_b = _filter_valid(b * b, w) - mu_b ** 2
    cov = _filter_valid(a * b, w) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


def image_pair_report(ref_uint8: np.ndarray, cand_uint8: np.ndarray) -> dict:
    """PSNR and SSIM (data range 255) per image and their means, for uint8 NHWC batches."""
    if ref_uint8.shape != cand_uint8.shape:
        raise ValueError(f"shape mismatch: {ref_uint8.shape} vs {cand_uint8.shape}")
    ps = [psnr(r, c, 255.0) for r, c in zip(ref_uint8, cand_uint8)]
    ss = [ssim(r, c, 255.0) for r, c in zip(ref_uint8, cand_uint8)]
    finite = [p for p in ps if math.isfinite(p)]
    return {"data_range": 255, "psnr_db": ps, "ssim": ss,
            "mean_psnr_db": float(np.mean(finite)) if finite else math.inf,
            "n_identical": len(ps) - len(finite), "mean_ssim": float(np.mean(ss))}
