import pytest
import torch

from dtq.runtime.model import DiT, DiTConfig


@pytest.fixture
def small_dit():
    """A 2-block DiT with non-zero random weights (a fresh DiT outputs zeros: adaLN-Zero)."""
    torch.manual_seed(0)
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=2, hidden_size=64, depth=2, num_heads=4,
                    num_classes=5, space="pixel")
    return DiT(cfg).randomize_(seed=1, std=0.1).eval()


def dit_inputs(model, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(batch, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, c.num_classes + 1, (batch,), generator=g)
    return x, t, y
