import pytest
import torch

from dtq.runtime.model import DIT_CONFIGS, DiT, count_parameters, named_config


def closed_form_params(c) -> int:
    """Parameter count of a DiT written out by hand (mlp ratio 4, 256-d frequency embedding)."""
    h, p, out = c.hidden_size, c.patch_size, c.out_channels
    x_embed = c.in_channels * p * p * h + h
    t_embed = 256 * h + h + h * h + h
    y_embed = (c.num_classes + 1) * h
    pos = c.num_tokens * h
    block = (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h) + (6 * h * h + 6 * h)
    final = h * p * p * out + p * p * out + 2 * h * h + 2 * h
    return x_embed + t_embed + y_embed + pos + c.depth * block + final


@pytest.mark.parametrize("name", sorted(DIT_CONFIGS))
def test_named_config_parameter_counts(name):
    with torch.device("meta"):
        model = DiT(DIT_CONFIGS[name])
    assert count_parameters(model) == closed_form_params(DIT_CONFIGS[name])


def test_dit_xl2_has_675m_parameters():
    with torch.device("meta"):
        model = DiT(named_config("DiT-XL/2"))
    assert count_parameters(model) == 675_129_632  # the DiT repository's printed count


def test_named_config_aliases_and_errors():
    assert named_config("DiT-XL-2") == named_config("DiT-XL/2")
    assert named_config("DiT-S/4", in_channels=1).in_channels == 1
    with pytest.raises(KeyError, match="unknown DiT config"):
        named_config("DiT-M/2")


def test_forward_shapes_and_zero_init():
    model = DiT(named_config("DiT-S/8", input_size=16, num_classes=5)).eval()
    x = torch.randn(3, 4, 16, 16)
    out = model(x, torch.tensor([0, 10, 999]), torch.tensor([0, 4, 5]))
    assert out.shape == (3, 8, 16, 16)
    assert out.abs().max() == 0  # adaLN-Zero: a fresh DiT predicts exactly zero


def test_pos_embed_matches_dit_table():
    # DiT's (MAE's) table: the first half of channels encodes the column, the second the row
    model = DiT(named_config("DiT-S/2", input_size=8))
    pe = model.pos_embed[0]
    assert pe.shape == (16, 384)
    # token 0 is position (0, 0): sin(0)=0 for the first quarter of each half, cos(0)=1 for the second
    assert torch.allclose(pe[0, :96], torch.zeros(96)) and torch.allclose(pe[0, 96:192], torch.ones(96))
    # moving one column changes only the first half; one row (4 tokens on) only the second
    assert torch.allclose(pe[0, 192:], pe[1, 192:]) and not torch.allclose(pe[0, :192], pe[1, :192])
    assert torch.allclose(pe[0, :192], pe[4, :192]) and not torch.allclose(pe[0, 192:], pe[4, 192:])
