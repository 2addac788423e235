"""Calibration: data collection through sampler callbacks, statistics, scale search, methods."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from dtq.calibrate.api import calibrate, statistics
from dtq.calibrate.config import CalibConfig
from dtq.calibrate.data import CalibrationSet, recorded_indices
from dtq.calibrate.evaluate import noise_sqnr, predict
from dtq.calibrate.methods import METHODS
from dtq.calibrate.methods.ditas import alpha_grid, tas_alpha_search
from dtq.calibrate.methods.ptq4dit import csb_balance, rankdata, spearman, ssc_weights
from dtq.calibrate.search import search_act_amax, search_weight_scale
from dtq.calibrate.stats import AbsHistogram, collect_stats
from dtq.runtime import quant
from dtq.runtime.recipe import apply_recipe, balanced_model, load_recipe
from dtq.runtime.zoo import load_builtin

from conftest import dit_inputs, fp_export_for, module_threads

_threads = module_threads(2)


# -- statistics ------------------------------------------------------------------------------------
def test_histogram_doubling_is_exact_and_percentile():
    torch.manual_seed(0)
    chunks = [torch.randn(10000) * s for s in (0.1, 1.0, 7.0)]  # the range grows twice
    h = AbsHistogram(1024)
    for c in chunks:
        h.add(c)
    allv = torch.cat(chunks).abs()
    assert h.amax == pytest.approx(float(allv.max()))
    assert float(h.counts.sum()) == allv.numel()
    ref = torch.histc(allv, bins=1024, min=0, max=h.hi).double()
    # merged bins equal a direct histogram on the final (power-of-two) range exactly
    assert torch.equal(h.counts, ref) and h.hi / 2 <= float(allv.max()) < h.hi
    for q in (50.0, 99.0, 99.9):
        assert h.percentile(q) == pytest.approx(float(torch.quantile(allv, q / 100)), rel=0.02, abs=h.hi / 1024)


def test_stats_per_timestep_match_direct_computation(small_dit):
    names = ["blocks.0.attn.qkv", "blocks.1.mlp.fc2"]
    x, t, y = dit_inputs(small_dit, batch=6)
    t = torch.tensor([10, 500, 10, 999, 500, 10])  # mixed timesteps in one batch
    seen = {}
    hooks = [small_dit.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0]))
             for n in names]
    stats = collect_stats(small_dit, lambda m: (m(x[:3], t[:3], y[:3]), m(x[3:], t[3:], y[3:])), names,
                          sample_tokens=5)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        hooks = [small_dit.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0]))
                 for n in names]
        small_dit(x, t, y)
        for h in hooks:
            h.remove()
    for n in names:
        st = stats[n]
        assert st.timesteps == [10, 500, 999]
        for tv in (10, 500, 999):
            xin = seen[n][t == tv]
            assert torch.allclose(st.channel_amax[tv], xin.abs().amax(dim=(0, 1)), rtol=1e-5)
            assert st.tensor_min[tv] == pytest.approx(float(xin.min()), rel=1e-5)
            assert st.tensor_max[tv] == pytest.approx(float(xin.max()), rel=1e-5)
            assert st.samples[tv].shape == (5, xin.shape[-1])
            # every sampled token is a real row of the input at that timestep
            flat = xin.reshape(-1, xin.shape[-1])
            d = torch.cdist(st.samples[tv], flat, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1)
            assert d.max() < 1e-4
        assert stats.rows == 6


# -- scale search ------------------------------------------------------------------------------------
def test_mse_weight_search_beats_minmax_on_heavy_tails():
    """Measured error ratios mse/minmax on t(2) weights: int4 group64 0.87, int4 channel 0.81,
    int8 channel 0.987 (8 bits: rounding error already small)."""
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((64, 256))
    for fmt, gran, g, bound in (("int4", "group", 64, 0.92), ("int4", "channel", None, 0.86),
                                ("int8", "channel", None, 0.999)):
        s_mm = search_weight_scale(w, fmt, gran, g, "minmax")
        s_mse = search_weight_scale(w, fmt, gran, g, "mse")
        e_mm = (quant.fake_quant_weight(w, s_mm, fmt, gran, g) - w).pow(2)
        e_mse = (quant.fake_quant_weight(w, s_mse, fmt, gran, g) - w).pow(2)
        assert (s_mse <= s_mm + 1e-9).all()
        # never worse on any block (the search includes the min-max clip), better in total
        blocks = (lambda e: e.reshape(64, -1, g).sum(-1)) if g else (lambda e: e.sum(1))
        assert (blocks(e_mse) <= blocks(e_mm) * (1 + 1e-5)).all()
        assert e_mse.sum() < bound * e_mm.sum(), (fmt, gran, float(e_mse.sum() / e_mm.sum()))


def test_mse_act_search_on_histogram_close_to_brute_force():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((50000,))
    h = AbsHistogram(2048)
    h.add(x)
    clip = search_act_amax(h, "int8", "mse")
    candidates = torch.linspace(0.2, 1.0, 81) * x.abs().max()
    errs = torch.stack([(quant.fake_quant(x, quant.scale_from_amax(c, "int8"), "int8") - x).pow(2).mean()
                        for c in candidates])
    best = float(candidates[errs.argmin()])
    e_clip = (quant.fake_quant(x, quant.scale_from_amax(clip, "int8"), "int8") - x).pow(2).mean()
    assert clip < 0.9 * float(x.abs().max())  # a Laplace tail is worth clipping
    assert float(e_clip) <= 1.05 * float(errs.min()), (clip, best)
    assert search_act_amax(h, "int8", "percentile", percentile=99.0) == pytest.approx(
        float(torch.quantile(x.abs(), 0.99)), rel=0.01)


# -- PTQ4DiT ---------------------------------------------------------------------------------------
def test_spearman_matches_scipy_including_ties():
    g = np.random.default_rng(0)
    for _ in range(20):
        a = g.normal(size=64)
        b = a * g.uniform(-1, 1) + g.normal(size=64)
        a[:10] = a[0]  # ties
        b = np.round(b, 1)
        assert spearman(torch.tensor(a), torch.tensor(b)) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    x = g.normal(size=50)
    assert np.allclose(rankdata(np.r_[x, x]), __import__("scipy.stats", fromlist=["rankdata"]).rankdata(np.r_[x, x]))


def test_ssc_weights_softmax_of_negative_rho():
    g = torch.Generator().manual_seed(0)
    sw = torch.rand(32, generator=g) + 0.1
    per_t = torch.stack([sw * 2, torch.rand(32, generator=g), sw.flip(0), -sw + 5])  # rho: 1, ~0, ?, -1
    eta, rho = ssc_weights(per_t, sw)
    ref = np.array([spearmanr(r.numpy(), sw.numpy()).statistic for r in per_t])
    assert np.allclose(rho.numpy(), ref, atol=1e-12)
    assert np.allclose(eta.numpy(), np.exp(-ref) / np.exp(-ref).sum(), atol=1e-12)
    assert eta.argmax() == 3 and eta.argmin() == 0  # anti-correlated timestep weighs most
    # CSB evens the saliences: both become sqrt(s(X) s(W))
    sx = torch.rand(32, generator=g) * 10 + 0.1
    b = csb_balance(sx, sw)
    assert torch.allclose(sx / b, sw * b, rtol=1e-5)
    assert torch.allclose(sx / b, (sx * sw).sqrt(), rtol=1e-5)


# -- DiTAS -----------------------------------------------------------------------------------------
def _constructed_layer(seed=0):
    """X with a few strong outlier channels, W with one mild outlier column."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=g)
    x[:, [3, 17, 40]] *= torch.tensor([60.0, 25.0, 40.0])
    w = torch.randn(96, 64, generator=g) * 0.05
    w[:, 9] *= 8
    return x, w


def _independent_layer_mse(x, w, alpha):
    """Plain re-implementation (numpy) of the per-alpha objective, as the paper states it."""
    x, w = x.double().numpy(), w.double().numpy()
    sx, sw = np.abs(x).max(0), np.abs(w).max(0)
    s = np.maximum(sx, 1e-5) ** alpha / np.maximum(sw, 1e-5) ** (1 - alpha)
    xs, ws = x / s, w * s
    sa = np.abs(xs).max() / 127
    xq = np.clip(np.round(xs / sa), -128, 127) * sa
    sc = np.abs(ws).max(1, keepdims=True) / 127
    wq = np.clip(np.round(ws / sc), -128, 127) * sc
    return float(((xq @ wq.T - x @ w.T) ** 2).mean())


def test_tas_alpha_search_picks_the_best_alpha():
    x, w = _constructed_layer()
    alphas = alpha_grid(0.05)
    assert len(alphas) == 21 and alphas[0] == 0 and alphas[-1] == 1
    best, errors = tas_alpha_search(x, x.abs().amax(0), w, alphas, wfmt="int8", afmt="int8",
                                    granularity="channel", group_size=None)
    ref = [_independent_layer_mse(x, w, a) for a in alphas]
    assert np.allclose(errors, ref, rtol=1e-3)
    assert best == alphas[int(np.argmin(ref))]
    # the constructed layer needs smoothing: neither extreme is best, and the choice is much
    # better than no smoothing (alpha = 0 keeps the activation outliers)
    assert 0 < best < 1
    assert min(errors) < 0.2 * errors[0]


# -- end to end on the built-in model ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_setup(tiny_calibration_set):
    model = load_builtin("dit-tiny-fmnist")
    cali = tiny_calibration_set(cali_steps=5, cali_n=4, steps=20, seed=0)  # shared with test_recon, test_rotation
    held = tiny_calibration_set(cali_steps=6, cali_n=4, steps=20, seed=10)
    stats = statistics(model, cali, CalibConfig(progress=False))
    return model, cali, held, stats, predict(model, held)


def test_calibration_set_records_through_sampler(tiny_setup, tmp_path):
    model, cali, _, _, _ = tiny_setup
    assert recorded_indices(20, 5) == [0, 5, 10, 14, 19]
    assert len(cali) == 5 * 8  # 4 samples x 2 (guidance: conditional + null halves)
    assert cali.recorded_steps() == [0, 5, 10, 14, 19]
    for s in cali.recorded_steps():
        rows = cali.select(cali.step == s)
        assert (rows.y[4:] == model.config.null_class).all() and (rows.y[:4] < 10).all()
        assert torch.equal(rows.x[:4], rows.x[4:])
        assert len(set(rows.t.tolist())) == 1
    assert cali.t.max() == 999 and cali.t.min() == 0
    # noisy at the start, image-like (bounded) at the end
    assert cali.select(cali.step == 0).x.std() > 0.9
    cali.save(tmp_path / "cali.safetensors")
    back = CalibrationSet.load(tmp_path / "cali.safetensors")
    assert torch.equal(back.x, cali.x) and torch.equal(back.t, cali.t) and back.steps == 20 and back.info == cali.info


@pytest.fixture(scope="module")
def default_recipe(tiny_setup):
    """``calibrate(tiny, stats, CalibConfig(method=m))`` and its held-out noise SQNR, once per method: the
    tests below evaluate the same default recipes (minmax, ptq4dit, ditas, smoothquant)."""
    model, _, held, stats, fp = tiny_setup
    cache = {}

    def get(method):
        if method not in cache:
            recipe = calibrate(model, stats, CalibConfig(method=method, progress=False))
            cache[method] = recipe, noise_sqnr(model, apply_recipe(model, recipe), held, fp_out=fp)
        return cache[method]

    return get


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_a_loadable_recipe(tiny_setup, default_recipe, tmp_path, method):
    model, _, held, _, fp = tiny_setup
    recipe = default_recipe(method)[0]
    assert len(recipe.layers) == 4 * model.config.depth
    recipe.save(tmp_path / method)
    back = load_recipe(tmp_path / method, model)
    sim = apply_recipe(model, back)
    s = noise_sqnr(model, sim, held, fp_out=fp)["all"]
    assert 15 < s < 60, s  # quantized, and not broken
    # the balanced FP model (no quantization) stays the original model
    bal = balanced_model(model, back)
    with torch.no_grad():
        x, t, y = held.x[:8], held.t[:8], held.y[:8]
        ref = model(x, t, y)
        assert ((bal(x, t, y) - ref).norm() / ref.norm()) < 1e-5


def test_balancing_methods_beat_minmax_w8a8(default_recipe):
    """Measured on this setup (20-step trajectory, 5 x 8 calibration rows, seeds 0 and 1):
    minmax 20.7 / 22.0 dB, ptq4dit 23.1 / 23.8 dB, ditas 27.3 / 27.3 dB (noise SQNR, all rows)."""
    sq = {m: default_recipe(m)[1] for m in ("minmax", "ptq4dit", "ditas")}
    assert sq["ptq4dit"]["all"] > sq["minmax"]["all"] + 1.0, sq
    assert sq["ditas"]["all"] > sq["minmax"]["all"] + 4.0, sq
    assert sq["ptq4dit"]["late"] > sq["minmax"]["late"] + 1.0, sq
    assert sq["ditas"]["late"] > sq["minmax"]["late"] + 4.0, sq


def test_w4_group_and_weight_only(tiny_setup):
    model, _, held, stats, fp = tiny_setup
    out = {}
    for gran, precision in (("group128", "w4a16"), ("group32", "w4a16"), ("group32", "w4a8")):
        cfg = CalibConfig(method="minmax", precision=precision, weight_granularity=gran, progress=False)
        r = calibrate(model, stats, cfg)
        layer = r.layers["blocks.0.mlp.fc2"]
        assert layer.weight_format == "int4" and (layer.act_format == "none") == (precision == "w4a16")
        assert r.precision == precision
        out[(gran, precision)] = noise_sqnr(model, apply_recipe(model, r), held, fp_out=fp)["all"]
    assert r.weight_scale("blocks.0.mlp.fc2").shape == (128, 512 // 32)
    assert out[("group32", "w4a16")] > out[("group128", "w4a16")] + 1.0, out  # smaller blocks, smaller error
    assert out[("group32", "w4a16")] > out[("group32", "w4a8")], out  # quantizing activations costs


def test_bad_method_name_is_refused(tiny_setup):
    model, _, _, stats, _ = tiny_setup
    with pytest.raises(KeyError, match="unknown method"):
        calibrate(model, stats, CalibConfig(method="nope", progress=False))


def test_smoothquant_defaults_smooth_fc2_with_alpha_1(tiny_setup, default_recipe):
    """Measured on this setup (noise SQNR, all rows): smoothquant alpha 0.5 without fc2 (the old
    default) 23.6 dB, alpha 0.5 + fc2 24.6, alpha 1.0 without fc2 25.5, alpha 1.0 + fc2 (the default
    now: fc2 smoothed by a run-time Mul) 27.7; minmax 20.7, ditas 27.3."""
    model, _, held, stats, fp = tiny_setup

    def run(**kw):
        recipe = calibrate(model, stats, CalibConfig(method="smoothquant", progress=False, **kw))
        return recipe, noise_sqnr(model, apply_recipe(model, recipe), held, fp_out=fp)["all"]

    recipe, new = default_recipe("smoothquant")
    new = new["all"]
    assert recipe.options["alpha"] == 1.0 and "mlp.fc2" in recipe.options["smoothed"]
    assert recipe.layers["blocks.0.mlp.fc2"].balance_fold == "runtime"
    _, old = run(alpha=0.5, smooth_fc2=False)
    _, no_fc2 = run(smooth_fc2=False)
    assert new > old + 3.0, (new, old)
    assert new > no_fc2 + 1.5, (new, no_fc2)  # fc2 smoothing helps at alpha 1.0


def test_fp16_overrides_leave_layers_unquantized(tiny_setup, default_recipe, tmp_path):
    """``PATTERN=fp16`` overrides (dtq-compare's suggestions) drop layers from the recipe: they stay FP in the
    simulation and the export, and the error they caused goes with them. Measured on this setup
    (noise SQNR, all rows): ditas 27.3 dB, keeping every fc1 (this model's worst inputs) and one
    proj 35.2 dB."""
    from torch import nn

    from dtq.export.api import ExportConfig, export_model

    model, _, held, stats, fp = tiny_setup
    base, s_base = default_recipe("ditas")
    kept = calibrate(model, stats, CalibConfig(method="ditas", overrides=["blocks.*.mlp.fc1=fp16",
                                                                          "blocks.0.attn.proj=fp16"], progress=False))
    gone = {f"blocks.{i}.mlp.fc1" for i in range(model.config.depth)} | {"blocks.0.attn.proj"}
    assert set(base.layers) - set(kept.layers) == gone and kept.options["kept"] == sorted(gone)
    sim = apply_recipe(model, kept)
    assert all(type(sim.get_submodule(n)) is nn.Linear for n in gone)
    s_base = s_base["all"]
    s_kept = noise_sqnr(model, sim, held, fp_out=fp)["all"]
    assert s_kept > s_base + 3.0, (s_base, s_kept)
    kept.save(tmp_path / "kept")
    cfg = ExportConfig(out=str(tmp_path / "kept.onnx"), model="dit-tiny-fmnist", precision="int8",
                       recipe=str(tmp_path / "kept"), max_batch=8)
    res = export_model(cfg, model=model, fp_proto=fp_export_for(model, cfg, kept))  # test_engines' FP export
    assert res.report.ok and res.metadata["precision"] == "int8"
    assert json.loads(json.dumps(res.metadata["layer_precisions"])) == kept.layer_precisions
    with pytest.raises(ValueError, match="matches no quantizable layer"):
        calibrate(model, stats, CalibConfig(method="ditas", overrides=["blocks.*.mlp.fc3=fp16"], progress=False))


def test_dynamic_w4a8_smoothquant_beats_static_on_held_out_timesteps(tiny_setup):
    """Per-token dynamic activations (ViDiT-Q, CalibConfig.act_granularity="token") vs static
    per-tensor, on held-out rows. Measured on this setup, smoothquant alpha 0.5, W4A8 group32, noise
    SQNR vs FP: static 20.86 dB all / 15.71 late, per-token 22.41 / 17.29 (+1.55 / +1.58). (alpha 1.0
    moves the activation range into the INT4 weights, which then dominate: +0.16 dB; minmax: +4.2.)"""
    model, _, held, stats, fp = tiny_setup
    out = {}
    for act in ("tensor", "token"):
        cfg = CalibConfig(method="smoothquant", alpha=0.5, precision="w4a8", weight_granularity="group32",
                          act_granularity=act, progress=False)
        recipe = calibrate(model, stats, cfg)
        assert {layer.act_granularity for layer in recipe.layers.values()} == {act}
        assert recipe.options["act_granularity"] == act
        assert all((layer.act_scale is None) == (act == "token") for layer in recipe.layers.values())
        out[act] = noise_sqnr(model, apply_recipe(model, recipe), held, fp_out=fp)
    assert out["token"]["all"] > out["tensor"]["all"] + 1.0, out
    assert out["token"]["late"] > out["tensor"]["late"] + 1.0, out
