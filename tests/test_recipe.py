"""Recipe: folding invariance, simulation, save/load round trip, refusal of a foreign recipe."""

import json

import pytest
import torch

from dtq.runtime import quant
from dtq.runtime.qlinear import QuantLinear
from dtq.runtime.recipe import (LayerRecipe, Recipe, RecipeError, apply_recipe, balanced_model, load_recipe,
                                model_fingerprint)

from conftest import dit_inputs

from dtq.tools.quick_recipe import FOLD, ROLES


def _random_balance_recipe(model, act_format="none", weight_format="none", seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    layers, tensors = {}, {}
    for i in range(model.config.depth):
        for role in ROLES:
            name = f"blocks.{i}.{role}"
            lin = model.get_submodule(name)
            b = torch.exp(torch.empty(lin.in_features).uniform_(-spread, spread, generator=g))
            tensors[f"{name}.balance"] = b
            layers[name] = LayerRecipe(weight_format=weight_format, act_format=act_format,
                                       act_scale=0.05 if act_format != "none" else None,
                                       balance=f"{name}.balance", balance_fold=FOLD[role])
    return Recipe("test", model_fingerprint(model), layers, tensors, model_config=model.config.to_dict())


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_folding_is_invariant_in_full_precision(small_dit):
    recipe = _random_balance_recipe(small_dit)
    bal = balanced_model(small_dit, recipe)
    x, t, y = dit_inputs(small_dit)
    with torch.no_grad():
        ref, out = small_dit(x, t, y), bal(x, t, y)
    assert _rel(out, ref) < 1e-5
    # the weights really changed: adaLN rows, V rows, qkv columns, and fc2 got a run-time Mul
    b0 = small_dit.blocks[0]
    assert not torch.allclose(bal.blocks[0].adaLN_modulation[1].weight, b0.adaLN_modulation[1].weight)
    c = small_dit.config.hidden_size
    assert not torch.allclose(bal.blocks[0].attn.qkv.weight[2 * c:], b0.attn.qkv.weight[2 * c:])
    assert torch.allclose(bal.blocks[0].adaLN_modulation[1].weight[2 * c:3 * c], b0.adaLN_modulation[1].weight[2 * c:3 * c])
    assert isinstance(bal.blocks[0].mlp.fc2, QuantLinear) and bal.blocks[0].mlp.fc2.input_mul is not None
    # the original is untouched
    assert model_fingerprint(small_dit) == recipe.model_fingerprint


def test_wrong_fold_breaks_invariance(small_dit):
    """The invariance test can fail: a fold with the scale bias not shifted by one must not match."""
    recipe = _random_balance_recipe(small_dit)
    bal = balanced_model(small_dit, recipe)
    c = small_dit.config.hidden_size
    b = recipe.balance("blocks.0.attn.qkv")
    with torch.no_grad():
        ada = bal.blocks[0].adaLN_modulation[1]
        # undo the +1 handling: bias/b instead of (bias+1)/b - 1
        ada.bias[c:2 * c] = (ada.bias[c:2 * c] + 1) * b - 1
        ada.bias[c:2 * c] /= b
        x, t, y = dit_inputs(small_dit)
        assert _rel(bal(x, t, y), small_dit(x, t, y)) > 1e-2


def test_fold_rejects_wrong_place(small_dit):
    recipe = _random_balance_recipe(small_dit)
    recipe.layers["blocks.0.mlp.fc2"].balance_fold = "adaLN"
    with pytest.raises(RecipeError, match="fc2"):
        balanced_model(small_dit, recipe)


def test_simulated_model_matches_manual_fake_quant(small_dit):
    recipe = _random_balance_recipe(small_dit, act_format="int8", weight_format="int8", spread=1.0)
    # weight scales of the balanced weights, act scales from the balanced model's inputs
    bal = balanced_model(small_dit, recipe)
    x, t, y = dit_inputs(small_dit)
    amax = {}
    hooks = [bal.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: amax.__setitem__(n, (i[0] * (m.input_mul if isinstance(m, QuantLinear) and m.input_mul is not None else 1)).abs().max()))
        for n in recipe.layers]
    with torch.no_grad():
        fp_out = bal(x, t, y)
    for h in hooks:
        h.remove()
    for n, layer in recipe.layers.items():
        layer.act_scale = float(quant.scale_from_amax(amax[n], "int8"))
        w = bal.get_submodule(n).weight
        recipe.tensors[f"{n}.weight_scale"] = quant.weight_scale(w, "int8", "channel")
        layer.weight_scale = f"{n}.weight_scale"
    sim = apply_recipe(small_dit, recipe)
    qls = [m for m in sim.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 4 * small_dit.config.depth
    with torch.no_grad():
        out = sim(x, t, y)
        # manual: one layer by hand
        ql = sim.blocks[1].mlp.fc2
        inp = torch.randn(3, 5, ql.in_features)
        xin = quant.fake_quant(inp * ql.input_mul, ql.act_scale, "int8")
        wq = quant.fake_quant(ql.weight, ql.weight_scale[:, None], "int8")
        assert torch.allclose(ql(inp), torch.nn.functional.linear(xin, wq, ql.bias), atol=1e-6)
    s = quant.sqnr_db(fp_out, out)
    assert 20 < s < 60, s  # quantized (not identical), but W8A8 with exact ranges is close
    # the integer codes export writes dequantize to the simulated weight
    assert torch.equal(quant.dequantize(ql.quantized_weight(), ql.weight_scale[:, None]), ql.fake_quant_weight())


def test_recipe_round_trip(tmp_path, small_dit):
    recipe = _random_balance_recipe(small_dit, act_format="int8", weight_format="int4")
    for n, layer in recipe.layers.items():
        layer.weight_granularity, layer.weight_group_size = "group", 32
        w = small_dit.get_submodule(n).weight * recipe.balance(n)
        recipe.tensors[f"{n}.weight_scale"] = quant.weight_scale(w, "int4", "group", 32)
        layer.weight_scale = f"{n}.weight_scale"
        layer.act_scale = 0.0123456789
    recipe.options = {"alpha": 0.5}
    recipe.save(tmp_path / "r")
    data = json.loads((tmp_path / "r" / "recipe.json").read_text())
    assert data["schema_version"] == 1 and data["model"]["fingerprint"].startswith("sha256:")
    back = load_recipe(tmp_path / "r", small_dit)
    assert back.layers == recipe.layers and back.options == recipe.options and back.method == "test"
    assert set(back.tensors) == set(recipe.tensors)
    for k in recipe.tensors:
        assert torch.equal(back.tensors[k], recipe.tensors[k].float())
    x, t, y = dit_inputs(small_dit)
    with torch.no_grad():
        assert torch.equal(apply_recipe(small_dit, back)(x, t, y), apply_recipe(small_dit, recipe)(x, t, y))


def test_foreign_recipe_is_refused(tmp_path, small_dit):
    recipe = _random_balance_recipe(small_dit)
    recipe.save(tmp_path / "r")
    other = type(small_dit)(small_dit.config).randomize_(seed=99, std=0.1)
    with pytest.raises(RecipeError, match="different checkpoint.*different weights"):
        load_recipe(tmp_path / "r", other)
    with pytest.raises(RecipeError, match="different checkpoint"):
        apply_recipe(other, recipe)
    # one changed weight is enough
    with torch.no_grad():
        tweaked = type(small_dit)(small_dit.config)
        tweaked.load_state_dict(small_dit.state_dict())
        tweaked.blocks[1].mlp.fc2.bias[0] += 1e-3
    with pytest.raises(RecipeError):
        load_recipe(tmp_path / "r", tweaked)
    # fp16 copy of the same weights is the same model only if the values survive: fp16 -> fp32 exact
    half = type(small_dit)(small_dit.config)
    half.load_state_dict({k: v.half().float() for k, v in small_dit.state_dict().items()})
    assert model_fingerprint(half) == model_fingerprint(half.half())


def test_bad_schema_is_refused(tmp_path, small_dit):
    recipe = _random_balance_recipe(small_dit)
    d = recipe.save(tmp_path / "r")
    data = json.loads((d / "recipe.json").read_text())
    data["schema_version"] = 99
    (d / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(RecipeError, match="schema version 99"):
        load_recipe(d)
    with pytest.raises(RecipeError, match="not a recipe directory"):
        load_recipe(tmp_path / "nothing")
    data["schema_version"] = 1
    data["layers"]["blocks.0.attn.qkv"]["act_format"] = "int8"  # none weights x int8 activations: no precision
    (d / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(RecipeError, match="blocks.0.attn.qkv: no precision has none weights with int8 activations; "
                                          "valid: int8 .*w8a16"):
        load_recipe(d)
    data["layers"]["blocks.0.attn.qkv"]["weight_format"] = "int8"  # W8A8, but no act_scale
    (d / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(RecipeError, match="act_scale"):
        load_recipe(d)
    data["layers"]["blocks.0.attn.qkv"].update(weight_format="int4", act_format="none")  # INT4 per channel
    (d / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(RecipeError, match="precision w4a16 takes weight granularity group128 / group64 / group32"):
        load_recipe(d)


def test_recipe_records_its_precision(tmp_path, small_dit):
    """recipe.json has "precision"; a recipe written before the field gets its layers' majority."""
    recipe = _random_balance_recipe(small_dit, act_format="int8", weight_format="int8")
    assert recipe.precision == "int8" and set(recipe.layer_precisions.values()) == {"int8"} and not recipe.mixed
    recipe.layers["blocks.0.attn.qkv"].act_format = "none"  # one W8A16 layer: mixed
    recipe.layers["blocks.0.attn.qkv"].act_scale = None
    assert recipe.mixed and recipe.layer_precisions["blocks.0.attn.qkv"] == "w8a16"
    d = recipe.save(tmp_path / "r")
    data = json.loads((d / "recipe.json").read_text())
    assert data["precision"] == "int8"
    del data["precision"]
    (d / "recipe.json").write_text(json.dumps(data))
    assert load_recipe(d, small_dit).precision == "int8"
    assert _random_balance_recipe(small_dit).precision == "fp16"  # balancing only: nothing quantized


def test_recipe_of_tiny_model_refused_for_reference_model(tmp_path, reference_ckpt):
    """Across architectures the message names the config difference (needs ../shared)."""
    from dtq.runtime.checkpoint import load_checkpoint
    from dtq.runtime.zoo import load_builtin

    tiny = load_builtin("dit-tiny-fmnist")
    recipe = Recipe("test", model_fingerprint(tiny), model_config=tiny.config.to_dict())
    recipe.save(tmp_path / "r")
    load_recipe(tmp_path / "r", tiny)  # its own model is accepted
    with pytest.raises(RecipeError, match="config differs.*hidden_size"):
        load_recipe(tmp_path / "r", load_checkpoint(reference_ckpt))


def _no_staging_leftovers(parent):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, OSError])
def test_interrupted_save_leaves_the_old_recipe_whole(tmp_path, small_dit, monkeypatch, interrupt):
    """SIGINT (or a full disk) while the new tensors are written: the old recipe is untouched and
    loads, and no temporary directory is left behind."""
    import safetensors.torch

    old = _random_balance_recipe(small_dit, seed=0)
    old.save(tmp_path / "r")
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    real_save = safetensors.torch.save_file

    def save_then_fail(tensors, path, *a, **kw):
        real_save(tensors, path, *a, **kw)  # the new tensors are on disk (in the staging directory)...
        raise interrupt("interrupted")  # ... and recipe.json is not yet written

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(interrupt):
        _random_balance_recipe(small_dit, seed=1).save(tmp_path / "r")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before
    back = load_recipe(tmp_path / "r", small_dit)
    assert all(torch.equal(back.tensors[k], old.tensors[k]) for k in old.tensors)
    assert _no_staging_leftovers(tmp_path) == []
    # a complete save replaces it
    new = _random_balance_recipe(small_dit, seed=1)
    new.save(tmp_path / "r")
    back = load_recipe(tmp_path / "r", small_dit)
    assert all(torch.equal(back.tensors[k], new.tensors[k]) for k in new.tensors)
    assert _no_staging_leftovers(tmp_path) == []


def test_recipe_json_with_foreign_tensors_is_refused(tmp_path, small_dit):
    """recipe.json records the sha256 of its tensors file: a mixed directory does not load."""
    a = _random_balance_recipe(small_dit, seed=0).save(tmp_path / "a")
    b = _random_balance_recipe(small_dit, seed=1).save(tmp_path / "b")
    assert json.loads((a / "recipe.json").read_text())["tensors_sha256"] != \
        json.loads((b / "recipe.json").read_text())["tensors_sha256"]
    (a / "tensors.safetensors").write_bytes((b / "tensors.safetensors").read_bytes())
    with pytest.raises(RecipeError, match="does not belong to recipe.json"):
        load_recipe(a, small_dit)
    (b / "tensors.safetensors").unlink()
    with pytest.raises(RecipeError, match="without its tensors.safetensors"):
        load_recipe(b)
    data = json.loads((a / "recipe.json").read_text())
    del data["tensors_sha256"]
    (a / "recipe.json").write_text(json.dumps(data))
    with pytest.raises(RecipeError, match="no tensors_sha256"):
        load_recipe(a)


def test_save_refuses_to_replace_what_is_not_a_recipe(tmp_path, small_dit):
    keep = tmp_path / "photos"
    keep.mkdir()
    (keep / "holiday.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="no recipe.json"):
        _random_balance_recipe(small_dit).save(keep)
    assert [p.name for p in keep.iterdir()] == ["holiday.png"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        _random_balance_recipe(small_dit).save(tmp_path / "file")


def test_non_finite_act_scale_is_refused(small_dit):
    recipe = _random_balance_recipe(small_dit, act_format="int8", weight_format="int8")  # W8A8
    next(iter(recipe.layers.values())).act_scale = float("inf")
    with pytest.raises(RecipeError, match="act_scale"):
        recipe.validate()
