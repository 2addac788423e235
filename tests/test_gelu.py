"""runtime.gelu: the tanh GELU as x * sigmoid(2z) is the same function (float64-checked), is swapped in
from outside, and leaves the CPU engine bit-identical to the simulation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtq.runtime.gelu import SigmoidGELU, gelu_tanh_via_sigmoid, use_gelu


def test_sigmoid_form_is_the_tanh_gelu():
    x = torch.cat([torch.linspace(-12, 12, 20001), torch.tensor([-1e4, -88.0, 0.0, 88.0, 1e4])]).double()
    exact = F.gelu(x, approximate="tanh")
    got = gelu_tanh_via_sigmoid(x.float()).double()
    assert torch.isfinite(got).all()  # the sigmoid saturates: no inf / NaN at either end
    assert (got - exact).abs().max().item() < 2e-6 * max(1.0, exact.abs().max().item())
    # float32 vs float32: as close as the tanh form's own float32 rounding
    assert (got - F.gelu(x.float(), approximate="tanh").double()).abs().max().item() < 1e-5 * 1e4
    # a wrong constant (z instead of 2z: the exact-erf-like slope) is far off: the check can fail
    wrong = (x * torch.sigmoid(0.5 * 1.5957691216057308 * (x + 0.044715 * x ** 3)))
    assert (wrong - exact).abs().max().item() > 1e-2
    # bf16 in, bf16 out, within bf16 rounding of the exact value
    xb = torch.linspace(-6, 6, 4001).bfloat16()
    gb = gelu_tanh_via_sigmoid(xb)
    assert gb.dtype == torch.bfloat16
    ref = F.gelu(xb.double(), approximate="tanh")
    assert ((gb.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6).all()


def test_module_keeps_nn_gelu_on_the_cpu_and_swaps_both_ways():
    x = torch.randn(4, 64) * 3
    g = SigmoidGELU()
    assert isinstance(g, nn.GELU) and g.approximate == "tanh"  # what FusedMlp.fusable checks
    assert torch.equal(g(x), F.gelu(x, approximate="tanh"))  # CPU: nn.GELU's formula, bit for bit
    assert torch.equal(SigmoidGELU(always=True)(x), gelu_tanh_via_sigmoid(x))
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(approximate="tanh"), nn.Sequential(nn.GELU()))
    use_gelu(model, "sigmoid")
    assert type(model[1]) is SigmoidGELU and type(model[2][0]) is nn.GELU  # the exact GELU is not touched
    use_gelu(model, "tanh")
    assert type(model[1]) is nn.GELU and model[1].approximate == "tanh"
    with pytest.raises(ValueError, match="gelu form"):
        use_gelu(model, "erf")


def test_engine_with_sigmoid_gelu_stays_the_simulation_on_the_cpu_and_close_on_its_gpu_path():
    from dtq.runtime.model import DiT, DiTConfig
    from dtq.runtime.qengine import build_qengine
    from dtq.runtime.recipe import apply_recipe
    from dtq.tools.quick_recipe import minmax_recipe, random_inputs

    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    torch.manual_seed(0)
    model = DiT(cfg).randomize_(seed=3, std=0.05).eval()
    x, t, y = random_inputs(model, 4, seed=1)
    recipe = minmax_recipe(model, "fp8", balance=True)
    with torch.no_grad():
        sim = apply_recipe(model, recipe)(x, t, y)
        eng = build_qengine(model, recipe, gelu="sigmoid")
        gelus = [m for m in eng.modules() if isinstance(m, SigmoidGELU)]
        assert len(gelus) == cfg.depth
        seen = []
        hooks = [g.register_forward_hook(lambda m, i, o: seen.append(o.clone())) for g in gelus]
        assert torch.equal(eng(x, t, y), sim)  # CPU path: nn.GELU's own formula
        for g in gelus:  # the GPU form on the CPU: the same function up to float32 rounding
            g.always = True
        got = eng(x, t, y)
        for h in hooks:
            h.remove()
    tanh_out, sig_out = seen[:cfg.depth], seen[cfg.depth:]
    diffs = [(a - b).abs().max().item() / a.abs().max().item() for a, b in zip(tanh_out, sig_out)]
    assert max(diffs) > 0 and max(diffs) < 1e-6, diffs  # the other formula ran, float32-close
    err = (got - sim).pow(2).mean() / sim.pow(2).mean()
    assert err.item() < 1e-6  # FP8 codes of fc2's input absorb most of it
    with pytest.raises(ValueError, match="gelu form"):
        build_qengine(model, recipe, gelu="fast")
