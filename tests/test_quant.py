"""Quantizer primitives: round trips, saturation, zero points, granularities, FP8."""

import pytest
import torch

from dtq.runtime import quant


def test_int8_round_trip_is_exact_on_grid_and_zero_maps_to_zero():
    scale = torch.tensor(0.05)
    codes = torch.arange(-127, 128, dtype=torch.float32)
    x = codes * scale
    q = quant.quantize(x, scale, "int8")
    assert q.dtype == torch.int8
    assert torch.equal(q.float(), codes)
    assert torch.equal(quant.dequantize(q, scale), x)
    # symmetric, zero point 0: zero is exact and the grid is odd-symmetric
    assert quant.quantize(torch.zeros(3), scale, "int8").abs().sum() == 0
    y = torch.randn(1000)
    s = quant.scale_from_amax(y.abs().max(), "int8")
    assert torch.equal(quant.fake_quant(-y, s, "int8"), -quant.fake_quant(y, s, "int8"))


def test_int8_error_bounded_by_half_step_and_saturates():
    torch.manual_seed(0)
    x = torch.randn(10000) * 3
    s = quant.scale_from_amax(x.abs().max(), "int8")
    err = (quant.fake_quant(x, s, "int8") - x).abs().max()
    assert err <= s / 2 + 1e-7
    assert err > s / 4  # a real rounding, not a pass-through
    # out-of-range values saturate to the ONNX int8 range [-128, 127]
    q = quant.quantize(torch.tensor([1e6, -1e6]), torch.tensor(1.0), "int8")
    assert q.tolist() == [127, -128]
    # round half to even, as ONNX QuantizeLinear
    assert quant.quantize(torch.tensor([0.5, 1.5, 2.5, -0.5]), torch.tensor(1.0), "int8").tolist() == [0, 2, 2, 0]


def test_int4_group_scales_and_codes():
    torch.manual_seed(0)
    w = torch.randn(8, 256)
    w[3, 200] = 40.0  # one outlier must only spoil its own group
    s = quant.weight_scale(w, "int4", "group", 128)
    assert s.shape == (8, 2)
    q = quant.quantize_weight(w, s, "int4", "group", 128)
    assert q.min() >= -8 and q.max() <= 7
    assert q[3, 200] == 7
    deq = quant.fake_quant_weight(w, s, "int4", "group", 128)
    # error of each group bounded by its own half-step
    err = (deq - w).abs().reshape(8, 2, 128).amax(dim=2)
    assert (err <= s / 2 + 1e-6).all()
    # the untouched group of row 3 is as good as the other rows; per-channel would not be
    per_ch = quant.fake_quant_weight(w, quant.weight_scale(w, "int4", "channel"), "int4", "channel")
    assert quant.sqnr_db(w[3, :128], deq[3, :128]) > quant.sqnr_db(w[3, :128], per_ch[3, :128]) + 10
    with pytest.raises(ValueError):
        quant.weight_scale(torch.randn(4, 100), "int4", "group", 64)


def test_int8_per_channel_weight_sqnr():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different ranges
    ch = quant.fake_quant_weight(w, quant.weight_scale(w, "int8", "channel"), "int8", "channel")
    ten = quant.fake_quant_weight(w, quant.weight_scale(w, "int8", "tensor"), "int8", "tensor")
    assert quant.sqnr_db(w, ch) > 38  # ~6 dB/bit minus the Gaussian crest factor
    assert quant.sqnr_db(w[:8], ch[:8]) > quant.sqnr_db(w[:8], ten[:8]) + 20


def test_fp8_e4m3_matches_torch_cast_and_saturates():
    torch.manual_seed(0)
    x = torch.randn(5000) * 10
    s = quant.scale_from_amax(x.abs().max(), "fp8_e4m3")
    q = quant.quantize(x, s, "fp8_e4m3")
    assert q.dtype == torch.float8_e4m3fn
    ref = (x / s).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(quant.fake_quant(x, s, "fp8_e4m3"), ref)
    # relative error of E4M3 (3 mantissa bits) is at most 2^-4 for normal numbers
    normal = (x / s).abs() > 2 ** -6
    rel = ((ref - x).abs() / x.abs())[normal]
    assert rel.max() <= 2 ** -4 + 1e-6
    assert quant.quantize(torch.tensor([1e9]), torch.tensor(1.0), "fp8_e4m3").float().item() == 448.0
    assert 25 < quant.sqnr_db(x, ref) < 40


def test_sqnr_known_value():
    x = torch.ones(100)
    assert abs(quant.sqnr_db(x, x * 1.1) - 20.0) < 1e-4
