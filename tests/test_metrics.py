"""PSNR / SSIM / SQNR / cosine against values known in closed form and against scikit-image."""

import math

import numpy as np
import pytest

from dtq.tools import metrics


def test_psnr_known_values():
    a = np.zeros((8, 8))
    b = np.full((8, 8), 1.0)  # MSE 1
    assert metrics.psnr(a, b, 255) == pytest.approx(20 * math.log10(255), abs=1e-9)  # 48.1308...
    assert metrics.psnr(a, b * 10, 255) == pytest.approx(20 * math.log10(25.5), abs=1e-9)
    assert metrics.psnr(a, b, 2.0) == pytest.approx(10 * math.log10(4), abs=1e-9)
    assert metrics.psnr(a, a, 255) == math.inf


def test_sqnr_cosine_errors_known_values():
    ref = np.array([3.0, 4.0])  # energy 25
    cand = np.array([3.0, 3.0])  # noise energy 1
    assert metrics.sqnr_db(ref, cand) == pytest.approx(10 * math.log10(25))
    assert metrics.sqnr_db(ref, ref) == math.inf
    assert metrics.cosine(ref, 2 * ref) == pytest.approx(1.0)
    assert metrics.cosine(np.array([1.0, 0]), np.array([0, 1.0])) == pytest.approx(0.0)
    assert metrics.cosine(ref, -ref) == pytest.approx(-1.0)
    r = metrics.tensor_report(ref, cand)
    assert r["max_abs"] == 1.0 and r["mean_abs"] == 0.5
    # white noise at 1/10 of the signal's amplitude: 20 dB
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000)
    assert metrics.sqnr_db(x, x + 0.1 * rng.standard_normal(x.shape)) == pytest.approx(20.0, abs=0.1)


def test_ssim_analytic_cases():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (32, 32)).astype(np.float64)
    assert metrics.ssim(img, img, 255) == pytest.approx(1.0, abs=1e-12)
    # constant images c and d: SSIM = (2cd + C1) / (c^2 + d^2 + C1) everywhere (variances 0)
    c, d, c1 = 100.0, 150.0, (0.01 * 255) ** 2
    expected = (2 * c * d + c1) / (c * c + d * d + c1)
    assert metrics.ssim(np.full((20, 20), c), np.full((20, 20), d), 255) == pytest.approx(expected, rel=1e-9)
    # negated structure around the same mean: strongly negative
    assert metrics.ssim(img, 255 - img, 255) < -0.9 + 0.2
    # contrast halved, same mean: luminance 1, structure 1, contrast 2*s*(s/2)/(s^2+s^2/4) = 0.8 (C2 -> 0)
    big = rng.standard_normal((64, 64)) * 60 + 128
    half = (big - 128) / 2 + 128
    assert 0.75 < metrics.ssim(big, half, 255) < 0.82


def test_ssim_matches_scikit_image():
    skm = pytest.importorskip("skimage.metrics", reason="scikit-image not installed (pip install scikit-image)")
    rng = np.random.default_rng(2)
    for _ in range(3):
        a = rng.integers(0, 256, (32, 32)).astype(np.uint8)
        b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
        ours = metrics.ssim(a, b, 255)
        ref = skm.structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False)
        assert ours == pytest.approx(ref, abs=1e-6)
        assert metrics.psnr(a, b, 255) == pytest.approx(skm.peak_signal_noise_ratio(a, b, data_range=255), abs=1e-9)
    # channels averaged as skimage's channel_axis
    a = rng.integers(0, 256, (24, 24, 3)).astype(np.uint8)
    b = np.clip(a.astype(int) + 20, 0, 255).astype(np.uint8)
    ref = skm.structural_similarity(a, b, data_range=255, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, channel_axis=-1)
    assert metrics.ssim(a, b, 255) == pytest.approx(ref, abs=1e-6)


def test_image_pair_report():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (4, 16, 16, 1)).astype(np.uint8)
    b = a.copy()
    b[1] = np.clip(b[1].astype(int) + 1, 0, 255)
    rep = metrics.image_pair_report(a, b)
    assert rep["n_identical"] == 3 and rep["ssim"][0] == pytest.approx(1.0)
    assert rep["psnr_db"][1] > 45 and rep["mean_psnr_db"] == rep["psnr_db"][1]
    with pytest.raises(ValueError):
        metrics.ssim(np.zeros((8, 8)), np.zeros((8, 8)), 255)  # smaller than the window
