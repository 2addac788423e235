"""Fashion-MNIST in the form the reference model was trained on: 32x32 (28x28 zero-padded),
one channel, values in [-1, 1]. Reads the original IDX files (``*-idx3-ubyte[.gz]``).

Used by the tiny model's training script and by evaluation; the sampler never needs it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# where the data may be: an explicit environment variable, the project's shared data, Debian's package
_SEARCH = (
    os.environ.get("DTQ_FMNIST_DIR", ""),
    str(Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"),
    "/usr/share/datasets/fashion-mnist",  # Debian: dataset-fashion-mnist
)


def find_fmnist(directory: str | os.PathLike | None = None, split: str = "train") -> Path:
    """The first directory holding the split's IDX files (``train-*`` or ``t10k-*``: a copy of the
    test set alone is enough to score FID); FileNotFoundError naming where it looked."""
    candidates = [str(directory)] if directory else [c for c in _SEARCH if c]
    prefix = "train" if split == "train" else "t10k"
    for cand in candidates:
        if cand and any(Path(cand).glob(f"{prefix}-images-idx3-ubyte*")):
            return Path(cand)
    raise FileNotFoundError(
        f"Fashion-MNIST {prefix}-* IDX files not found in " + ", ".join(candidates)
        + " (set DTQ_FMNIST_DIR or install Debian's dataset-fashion-mnist)"
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _file(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{stem}[.gz] not in {directory}")


def load_fmnist(split: str = "train", directory: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 ``[N, 32, 32]`` (zero-padded) and labels as int64 ``[N]``."""
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    root = find_fmnist(directory, split)
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_file(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_file(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    return np.pad(images, ((0, 0), (2, 2), (2, 2))), labels


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 ``[N, H, W]`` -> float32 ``[N, 1, H, W]`` in [-1, 1]."""
    return (images_uint8.astype(np.float32) / 127.5 - 1.0)[:, None]
