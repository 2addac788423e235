"""The built-in tiny model and the reference DiT-S/2 make garments, not noise."""

import numpy as np
import pytest
import torch

from dtq.runtime.checkpoint import load_checkpoint
from dtq.runtime.pipeline import SampleConfig, generate
from dtq.runtime.zoo import load_builtin

# Fashion-MNIST train in [-1, 1] (measured): mean fraction of pixels > 0 is 0.241 (5th-95th
# percentile of single images 0.04-0.45); the 2-pixel zero padding is exactly -1. Gaussian
# noise has a foreground fraction of 0.5 and a border mean of 0.


def _stats(images: torch.Tensor):
    x = images[:, 0].numpy()
    fg = (x > 0).mean(axis=(1, 2))
    border = np.concatenate([x[:, :2].reshape(len(x), -1), x[:, -2:].reshape(len(x), -1),
                             x[:, :, :2].reshape(len(x), -1), x[:, :, -2:].reshape(len(x), -1)], 1).mean()
    return fg, border


def _class_means():
    from dtq.tools.fmnist import load_fmnist, to_model_range

    try:
        x, y = load_fmnist("train")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    x = to_model_range(x)[:, 0]
    return np.stack([x[y == k].mean(0) for k in range(10)])


def _nearest_class(images: torch.Tensor, means: np.ndarray) -> np.ndarray:
    a = images[:, 0].numpy().reshape(len(images), -1)
    a = a - a.mean(1, keepdims=True)
    m = means.reshape(10, -1) - means.reshape(10, -1).mean(1, keepdims=True)
    corr = (a @ m.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(m, axis=1))
    return corr.argmax(1)


def test_builtin_tiny_model_samples_garments(tmp_path):
    result = generate(SampleConfig(steps=25, per_class=2, out=tmp_path / "s", progress=False))
    fg, border = _stats(result.images)
    assert 0.15 < fg.mean() < 0.35, fg.mean()
    assert (fg < 0.48).all()
    assert border < -0.95, border
    hits = (_nearest_class(result.images, _class_means()) == result.labels.numpy()).mean()
    assert hits >= 0.7, hits  # measured 17/20 at this seed; noise scores ~0.1


def test_builtin_model_loads_by_name():
    model = load_builtin("dit-tiny-fmnist")
    assert model.config.space == "pixel" and model.config.num_classes == 10 and model.config.null_class == 10
    with pytest.raises(KeyError, match="built-in"):
        load_builtin("dit-huge")


def test_reference_model_loads_and_samples(tmp_path, reference_ckpt):
    model = load_checkpoint(reference_ckpt)
    c = model.config
    assert (c.hidden_size, c.depth, c.num_heads, c.patch_size, c.in_channels, c.space) == (384, 12, 6, 2, 1, "pixel")
    result = generate(SampleConfig(ckpt=reference_ckpt, steps=10, classes=[1, 7, 9], per_class=1,
                                   out=tmp_path / "ref", progress=False), model=model)
    fg, border = _stats(result.images)
    assert border < -0.9 and 0.1 < fg.mean() < 0.4
    assert (tmp_path / "ref" / "grid.png").is_file()
