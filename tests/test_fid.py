"""FID: the Frechet distance against closed forms, precision/recall on synthetic features, and the
Inception pipeline on a few dozen Fashion-MNIST images: a set against itself is ~0 and FID grows
with added noise. (Inception-v3 at 299px runs ~0.1-0.3 s/image on a CPU core: sets stay small, and
every test gets an empty statistics cache so no cost hides behind ~/.cache.)"""

import json
from pathlib import Path

import numpy as np
import pytest

from dtq.tools import fid, fid_cli, fmnist

N = 20  # images per Inception-featured set in these tests (>= 18: the precision/recall test takes 18)


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch) -> Path:
    """A private, empty DTQ_CACHE_DIR: a test that needed the 10k-image fmnist-test statistics would
    compute them (minutes) instead of silently reading a cache left by an earlier run."""
    cache = tmp_path / "dtq-cache"
    monkeypatch.setenv("DTQ_CACHE_DIR", str(cache))
    return cache


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DTQ_CACHE_DIR", str(tmp_path / "c"))
    assert fid.builtin_stats_path("fmnist-test").parent == tmp_path / "c" / "fid"
    monkeypatch.delenv("DTQ_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fid.cache_dir() == tmp_path / "home" / ".cache" / "dtq" / "fid"


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    a_var, b_var = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    a, b = fid.Stats(mu_a, np.diag(a_var), 10), fid.Stats(mu_b, np.diag(b_var), 10)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(a_var) - np.sqrt(b_var)) ** 2).sum()
    assert fid.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # a full (non-diagonal) covariance against itself: 0; rotated: invariant
    m = rng.standard_normal((d, d))
    s = m @ m.T + np.eye(d)
    assert abs(fid.frechet_distance(fid.Stats(mu_a, s, 10), fid.Stats(mu_a, s, 10))) < 1e-8
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    d1 = fid.frechet_distance(fid.Stats(mu_a, s, 10), fid.Stats(mu_b, 2 * s, 10))
    d2 = fid.frechet_distance(fid.Stats(q @ mu_a, q @ s @ q.T, 10), fid.Stats(q @ mu_b, 2 * q @ s @ q.T, 10))
    assert d1 == pytest.approx(d2, rel=1e-7)
    # scalar case: (sqrt(2) - 1)^2 * trace(s) when only the scale of the covariance differs
    assert fid.frechet_distance(fid.Stats(mu_a, s, 10), fid.Stats(mu_a, 2 * s, 10)) == pytest.approx(
        (np.sqrt(2) - 1) ** 2 * np.trace(s), rel=1e-7)


def test_low_rank_trace_equals_sqrtm():
    """Fewer images than features: the n x n eigenvalue form of Tr sqrt(S_a S_b) is the sqrtm one
    (both sides small, one small, and against a stats file's full covariance)."""
    rng = np.random.default_rng(3)
    d = 48
    mix = rng.standard_normal((d, d))
    fa, fb = rng.standard_normal((20, d)) @ mix, rng.standard_normal((300, d)) @ (0.7 * mix) + 0.3
    fc = rng.standard_normal((12, d)) @ mix + 1
    a, b, c = fid.Stats.of(fa), fid.Stats.of(fb), fid.Stats.of(fc)
    assert a.factor is not None and c.factor is not None and b.factor is None
    full = lambda st: fid.Stats(st.mu, st.sigma, st.n)  # noqa: E731  (what a saved stats file gives)
    for x, y in ((a, b), (b, a), (a, c), (c, full(b))):
        fast, slow = fid.frechet_distance(x, y), fid.frechet_distance(full(x), full(y))
        assert fast == pytest.approx(slow, rel=1e-6, abs=1e-6) and fast > 1


def test_precision_recall_synthetic():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((300, 8))
    same = rng.standard_normal((300, 8))
    far = rng.standard_normal((300, 8)) + 20
    p, r = fid.precision_recall(real, same)
    assert p > 0.85 and r > 0.85
    assert fid.precision_recall(real, far) == (0.0, 0.0)
    # a collapsed generator (all samples near one real point): precise, but no recall
    collapsed = real[:1] + 0.01 * rng.standard_normal((300, 8))
    p, r = fid.precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.05


def test_stats_roundtrip_and_reference_kinds(tmp_path):
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((50, 2048))
    st = fid.Stats.of(feats)
    path = st.save(tmp_path / "s.npz")
    back, feats_back = fid.reference_stats(path)
    assert feats_back is None and back.n == 50
    assert np.allclose(back.mu, st.mu, atol=1e-6) and np.allclose(back.sigma, st.sigma, atol=1e-5)
    # images: ADM .npz (arr_0 NHWC uint8) and a folder of PNGs load to the same array
    imgs = rng.integers(0, 256, (5, 32, 32, 1)).astype(np.uint8)
    np.savez(tmp_path / "batch.npz", imgs, np.arange(5))
    assert np.array_equal(fid.load_images(tmp_path / "batch.npz"), imgs)
    from PIL import Image

    (tmp_path / "folder").mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im[..., 0]).save(tmp_path / "folder" / f"{i:03d}.png")
    assert np.array_equal(fid.load_images(tmp_path / "folder"), imgs)
    with pytest.raises(ValueError):
        fid.as_nhwc_uint8(imgs.astype(np.float32))
    with pytest.raises(FileNotFoundError):
        fid.load_images(tmp_path / "nope")


@pytest.fixture(scope="module")
def fmnist_sets():
    from dtq.tools.fmnist import load_fmnist

    try:
        images, _ = load_fmnist("test")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    clean = images[:N]
    rng = np.random.default_rng(0)

    def noisy(sigma):
        return np.clip(clean.astype(np.float64) + rng.normal(0, sigma, clean.shape), 0, 255).round().astype(np.uint8)

    ex = fid.FeatureExtractor(batch_size=32)
    return {"clean": ex(clean), "noise8": ex(noisy(8)), "noise32": ex(noisy(32)), "extractor": ex, "images": clean}


def test_fid_self_is_zero_and_grows_with_noise(fmnist_sets):
    s = {k: fid.Stats.of(v) for k, v in fmnist_sets.items() if k.startswith(("clean", "noise"))}
    self_fid = fid.frechet_distance(s["clean"], s["clean"])
    f8 = fid.frechet_distance(s["clean"], s["noise8"])
    f32 = fid.frechet_distance(s["clean"], s["noise32"])
    assert abs(self_fid) < 1e-2, self_fid
    assert 1.0 < f8 < f32, (f8, f32)
    assert f32 > 1.5 * f8


def test_feature_protocol(fmnist_sets):
    ex, imgs, feats = fmnist_sets["extractor"], fmnist_sets["images"][:4], fmnist_sets["clean"][:4]
    # grayscale is repeated to 3 channels: [N,H,W], [N,H,W,1] and [N,H,W,3] give the same features
    rgb = np.repeat(imgs[..., None], 3, axis=-1)
    assert np.allclose(ex(imgs), feats, atol=1e-4) and np.allclose(ex(rgb), feats, atol=1e-4)
    assert feats.shape == (4, 2048) and (feats >= 0).all()  # pooled post-ReLU features
    # and they are what fid-helper's own stat path computes (pixels to [0,1], nv_bilinear, TF range)
    helper = ex.helper
    helper.begin_eval_stat()
    import torch

    helper.update_eval_stat(torch.from_numpy(rgb).permute(0, 3, 1, 2), data_range=(0, 255))
    theirs = np.stack(helper.eval_feats_list)
    helper.finish_eval_stat()
    assert np.allclose(theirs, feats, atol=1e-4)


def test_dtq_fid_cli_against_a_small_builtin_reference(fmnist_sets, tmp_path, empty_cache):
    """The CLI end to end on real images: the first N fmnist-test images scored against the
    built-in reference limited to its first N images (the same images: FID ~0, nothing cached),
    then a prefix of them against the noisy set's statistics (the library's number, exit 1)."""
    imgs = fmnist_sets["images"]
    np.savez(tmp_path / "a.npz", imgs[:, :, :, None], np.zeros(N))
    rc = fid_cli.main(["--samples", str(tmp_path / "a.npz"), "--reference", "fmnist-test", "--reference-limit", str(N),
                       "--out", str(tmp_path / "r.json"), "--no-progress", "--max-fid", "0.01"])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())["results"][0]
    assert res["n_samples"] == N and res["n_reference"] == N and abs(res["fid"]) < 0.01
    assert not empty_cache.exists()  # a limited reference is never cached
    # against other images' statistics: the FID the library computes, and --max-fid turns it into exit code 1
    fid.Stats.of(fmnist_sets["noise32"]).save(tmp_path / "noisy.npz")
    expected = fid.frechet_distance(fid.Stats.of(fmnist_sets["clean"][:16]), fid.Stats.load(tmp_path / "noisy.npz"))
    assert expected > 10
    assert fid_cli.main(["--samples", str(tmp_path / "a.npz"), "--limit", "16", "--reference", str(tmp_path / "noisy.npz"),
                         "--out", str(tmp_path / "r2.json"), "--no-progress", "--max-fid", "1"]) == 1
    res = json.loads((tmp_path / "r2.json").read_text())["results"][0]
    assert res["n_samples"] == 16 and res["fid"] == pytest.approx(expected, rel=1e-3)


class _NoFeatures:
    def __init__(self, *args, **kwargs):
        raise AssertionError("Inception features computed before the arguments were checked")


def test_dtq_fid_cli_checks_every_argument_before_any_features(tmp_path, monkeypatch, capsys, empty_cache):
    """Bad input is exit 2 with a one-line message, found before the (minutes-long) reference
    statistics: a missing sample file used to cost the 10k-image fmnist-test statistics first."""
    monkeypatch.setattr(fid, "FeatureExtractor", _NoFeatures)
    monkeypatch.setattr(fmnist, "_SEARCH", (str(tmp_path / "no-data"),))
    good = tmp_path / "a.npz"
    np.savez(good, np.zeros((4, 32, 32, 1), np.uint8), np.zeros(4))
    stats = str(fid.Stats.of(np.random.default_rng(0).standard_normal((5, 8))).save(tmp_path / "stats.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    (tmp_path / "empty").mkdir()
    cases = {
        "no samples": ["--reference", "fmnist-test"],
        "missing samples": ["--samples", str(tmp_path / "missing.npz")],
        "one of several missing": ["--samples", f"{good},{tmp_path / 'missing'}", "--reference", stats],
        "samples are statistics": ["--samples", stats, "--reference", stats],
        "samples not an npz": ["--samples", str(tmp_path / "junk.npz"), "--reference", stats],
        "folder without images": ["--samples", str(tmp_path / "empty"), "--reference", stats],
        "unknown reference": ["--samples", str(good), "--reference", "fmnist-tset"],
        "built-in reference without its data": ["--samples", str(good), "--reference", "fmnist-train"],
        "precision/recall need reference images": ["--samples", str(good), "--reference", stats, "--precision-recall"],
        "a limit on statistics": ["--samples", str(good), "--reference", stats, "--reference-limit", "8"],
        "--out under a file": ["--samples", str(good), "--reference", stats, "--out", str(good / "r.json")],
        "--save-stats is a folder": ["--samples", str(good), "--reference", stats, "--save-stats", str(tmp_path)],
        "--limit 0": ["--samples", str(good), "--reference", stats, "--limit", "0"],
    }
    for name, argv in cases.items():
        assert fid_cli.main(argv + ["--no-progress"]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (name, err)
    assert not empty_cache.exists() and not (tmp_path / "r.json").exists()


def test_dtq_fid_cli_several_sets_with_precision_recall_on_a_cached_builtin(fmnist_sets, tmp_path, monkeypatch):
    """Precision/recall need the reference's features: scoring several sets against a built-in
    reference whose statistics are already cached must still compute them (once)."""
    imgs = fmnist_sets["images"]
    monkeypatch.setattr(fid, "builtin_images", lambda name: imgs[:12])
    fid.reference_stats("fmnist-test", fmnist_sets["extractor"])  # caches the statistics
    assert fid.builtin_stats_path("fmnist-test").is_file()
    np.savez(tmp_path / "a.npz", imgs[12:18, :, :, None], np.zeros(6))
    np.savez(tmp_path / "b.npz", imgs[:6, :, :, None], np.zeros(6))
    rc = fid_cli.main(["--samples", f"{tmp_path / 'a.npz'},{tmp_path / 'b.npz'}", "--reference", "fmnist-test",
                       "--precision-recall", "--no-progress", "--out", str(tmp_path / "r.json")])
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["n_reference"] for r in res] == [12, 12]
    assert all(r["precision"] is not None and 0 <= r["recall"] <= 1 for r in res)
    assert res[1]["precision"] == 1.0  # b's images are reference images: all inside the manifold


def test_fmnist_test_split_alone_is_enough(tmp_path):
    """A folder with only the t10k-* files (what an FID run needs) loads the test split and names
    the missing train-* files for the train split."""
    from dtq.tools import fmnist

    try:
        src = fmnist.find_fmnist(split="test")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    import shutil

    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.copy(fmnist._file(src, stem), tmp_path)
    images, labels = fmnist.load_fmnist("test", tmp_path)
    assert images.shape == (10000, 32, 32) and labels.shape == (10000,) and set(labels.tolist()) == set(range(10))
    with pytest.raises(FileNotFoundError, match="train-"):
        fmnist.load_fmnist("train", tmp_path)
