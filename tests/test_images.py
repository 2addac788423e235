"""uint8 conversion: ADM truncation by default (how the shared/reference samples were converted)."""

import numpy as np
import pytest
import torch

from dtq.runtime.images import to_uint8


def _levels(y: list[float]) -> torch.Tensor:
    """Images whose pixels sit at ``y`` on the 0..255 scale, i.e. x = y / 127.5 - 1."""
    return (torch.tensor(y, dtype=torch.float64) / 127.5 - 1).float().view(1, 1, 1, -1)


def test_to_uint8_truncates_like_adm():
    y = [-3.0, 0.0, 0.3, 0.7, 0.999, 1.05, 1.6, 127.5, 200.2, 200.8, 254.6, 255.0, 300.0]
    got = to_uint8(_levels(y))[0, 0, :, 0].tolist()
    # ADM (guided-diffusion scripts/image_sample.py): ((x + 1) * 127.5).clamp(0, 255).to(uint8)
    assert got == [0, 0, 0, 0, 0, 1, 1, 127, 200, 200, 254, 255, 255]
    # a background pixel a hair above -1 (model noise at the last step) stays black; rounding makes it 1
    assert to_uint8(_levels([0.7]), mode="round")[0, 0, 0, 0] == 1


def test_to_uint8_round_mode_and_layout():
    y = [0.0, 0.4, 0.6, 1.6, 200.8, 254.6, 255.0]
    assert to_uint8(_levels(y), mode="round")[0, 0, :, 0].tolist() == [0, 0, 1, 2, 201, 255, 255]
    x = torch.rand(2, 3, 4, 5) * 2 - 1
    out = to_uint8(x)
    assert out.shape == (2, 4, 5, 3) and out.dtype == np.uint8
    assert np.array_equal(out, ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    with pytest.raises(ValueError):
        to_uint8(x, mode="floor")
