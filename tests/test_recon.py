"""Block reconstruction (calibrate/recon.py: BRECQ + AdaRound + LSQ activation steps) on the tiny
model: better held-out SQNR, hard on-grid rounding, and the recipe runs unchanged through the
simulation, the CPU engine and ONNX Runtime."""

import numpy as np
import pytest
import torch

from dtq.calibrate.api import calibrate, statistics
from dtq.calibrate.config import CalibConfig
from dtq.calibrate.evaluate import noise_sqnr, predict
from dtq.calibrate.recon import AdaRoundLinear, _beta, reconstruct_blocks
from dtq.runtime import quant
from dtq.runtime.qlinear import QuantLinear
from dtq.runtime.recipe import apply_recipe, balanced_model
from dtq.runtime.zoo import load_builtin

from conftest import fp_export_for, module_threads

_threads = module_threads(2)  # the only pytest on an idle 2-core box: 1 thread cost 15 s

W4A8 = dict(method="minmax", precision="w4a8", weight_granularity="group128", progress=False)
# tiny counts for the CPU (defaults: 1000 iterations of 32 rows), so a larger step than the default
RECON_ITERS = 40
RECON = dict(reconstruct=True, recon_iters=RECON_ITERS, recon_batch=1, recon_lr=5e-2)
# the LSQ activation steps too: a few iterations, for the plumbing (recipe, engine, ONNX)
RECON_ACT = dict(reconstruct=True, recon_iters=8, recon_batch=1, recon_lr=5e-2, recon_act_steps=True, recon_act_lr=1e-2)


@pytest.fixture(scope="module")
def setup(tiny_calibration_set):
    model = load_builtin("dit-tiny-fmnist")
    cali = tiny_calibration_set(cali_steps=5, cali_n=4, steps=20, seed=0)  # shared with test_calibrate, test_rotation
    held = tiny_calibration_set(cali_steps=8, cali_n=4, steps=20, seed=10)
    held = held.select(~torch.isin(held.step, torch.tensor(cali.recorded_steps())))  # held-out timesteps only
    assert len(held) and not set(held.recorded_steps()) & set(cali.recorded_steps())
    stats = statistics(model, cali, CalibConfig(**W4A8))
    plain = calibrate(model, stats, CalibConfig(**W4A8))
    recon = calibrate(model, stats, CalibConfig(**W4A8, **RECON), forward_loop=cali.forward_loop(64))
    recon_act = calibrate(model, stats, CalibConfig(**W4A8, **RECON_ACT), forward_loop=cali.forward_loop(64))
    return model, cali, held, plain, recon, recon_act


def test_reconstruction_beats_plain_on_heldout_timesteps(setup):
    """Held-out noise SQNR (dB) on timesteps not calibrated on. Measured: see MARGIN."""
    model, _, held, plain, recon, _ = setup
    fp = predict(model, held)
    sq = {k: noise_sqnr(model, apply_recipe(model, r), held, fp_out=fp)["all"] for k, r in
          {"plain": plain, "recon": recon}.items()}
    print(sq, recon.info["recon_blocks"])
    assert sq["recon"] > sq["plain"] + MARGIN, sq
    # no block's output error (hard rounding, its calibration rows) went up (a block whose fitted
    # rounding loses to its start keeps the start), and most went down
    blocks = recon.info["recon_blocks"]
    assert all(b["rel_mse_after"] <= b["rel_mse_before"] for b in blocks), blocks
    assert sum(b["rel_mse_after"] < 0.9 * b["rel_mse_before"] for b in blocks) >= 4, blocks
    assert recon.options["reconstruct"] and recon.options["recon_iters"] == RECON_ITERS


# measured (W4A8 group 128, 5 x 8 calibration rows of a 20-step trajectory, 4 held-out timesteps x 8
# rows; 40 iterations of 1 row per block, recon_reg 1): plain 30.95, reconstructed 31.73 (+0.78); blocks'
# relative output MSE e.g. 0.0040 -> 0.0028, 0.0071 -> 0.0055
MARGIN = 0.5


@pytest.mark.parametrize("which", ["weights", "weights+steps"])
def test_rounding_is_hard_and_on_the_int4_grid(setup, which):
    """Every code is floor(W diag(b) / s) or that + 1, inside [-8, 7]; the stored weight is on the grid
    of the unchanged weight scale; learned activation steps moved and stayed positive."""
    model, _, _, plain, recon, recon_act = setup
    recon = recon if which == "weights" else recon_act
    folded = balanced_model(model, recon, check=False)
    changed_codes = changed_steps = 0
    for name, layer in recon.layers.items():
        w, s = recon.weight(name), recon.weight_scale(name)
        assert torch.equal(s, plain.weight_scale(name))  # scales fixed
        assert torch.equal(quant.fake_quant_weight(w, s, "int4", "group", 128), w)  # on the grid
        full = quant.expand_weight_scale(s, w.shape, "group", 128)
        codes = quant.quantize_weight(w, s, "int4", "group", 128).float()
        assert torch.equal(codes * full, w) and codes.min() >= -8 and codes.max() <= 7  # exactly codes x scale
        ws = folded.get_submodule(name).weight.detach().float() / full
        # AdaRound's two choices (an integer W / s, e.g. a group's -amax, may also go up by one)
        assert bool(((codes == ws.floor()) | (codes == ws.floor() + 1)).all()), name
        changed_codes += int((codes != ws.round()).sum())  # AdaRound departs from round-to-nearest
        assert layer.act_scale > 0
        changed_steps += layer.act_scale != plain.layers[name].act_scale
    kept = sum(b["kept_start"] for b in recon.info["recon_blocks"])  # those hold their start steps
    assert changed_codes > 100, changed_codes
    if which == "weights":
        assert changed_steps == 0
    else:
        assert changed_steps == len(recon.layers) - 4 * kept and kept < 6, (changed_steps, kept)


def test_engine_and_onnx_run_the_reconstructed_recipe(setup):
    """No new code path: the CPU engine equals the simulation and ORT matches it (SQNR > 30 dB)
    with exactly the recipe's codes as initializers."""
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    from dtq.export.api import ExportConfig, build_graph
    from dtq.runtime.qengine import build_qengine

    model, _, held, _, _, r = setup  # the one with learned activation steps
    x, t, y = held.x[:4], held.t[:4], held.y[:4]
    sim = apply_recipe(model, r)
    with torch.no_grad():
        ref = sim(x, t, y)
        assert torch.equal(ref, build_qengine(model, r)(x, t, y))
    cfg = ExportConfig(out="unused.onnx", model="dit-tiny-fmnist", precision="w4a8", dtype="fp32", opset=21,
                       max_batch=8).resolved()
    proto = build_graph(model, cfg, r, fp_export_for(model, cfg, r))
    tensors = gs.import_onnx(proto).tensors()
    name = "blocks.3.mlp.fc1"
    codes = np.asarray(tensors[f"{name}.weight_quantized"].values).astype(np.int8).T  # stored W^T
    want = quant.quantize_weight(r.weight(name), r.weight_scale(name), "int4", "group", 128).numpy()
    np.testing.assert_array_equal(codes, want)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0])
    assert quant.sqnr_db(ref, out) > 30


def test_adaround_starts_from_gptq_codes_and_anneals():
    """After GPTQ the rounding starts at GPTQ's codes (where they are floor / ceil of W / s); beta
    is off during warm-up, then 20 -> 2."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 64, generator=g) * 0.1)
    s = quant.weight_scale(lin.weight, "int4", "group", 32)
    q = QuantLinear.from_linear(lin, weight_format="int4", weight_granularity="group", weight_group_size=32,
                                act_format="int8", weight_scale=s, act_scale=0.05)
    full = quant.expand_weight_scale(s, lin.weight.shape, "group", 32)
    ws = lin.weight.detach() / full
    codes = torch.where(torch.rand(ws.shape, generator=g) < 0.5, ws.floor(), ws.ceil())  # any choice,
    far = torch.rand(ws.shape, generator=g) < 0.1  # some 2 steps away (GPTQ's error feedback does that)
    codes = torch.where(far, codes + torch.where(codes > ws, 1.0, -1.0), codes).clamp(-8, 7)
    a = AdaRoundLinear(q, lin.weight.detach(), codes, learn_act=True)
    w_hard, act = a.hard()
    assert torch.equal(w_hard, codes * full) and float(act) == pytest.approx(0.05)
    rtn = AdaRoundLinear(q, lin.weight.detach(), None, learn_act=False)  # soft start: hard() = nearest
    assert torch.equal(rtn.hard()[0], ws.round().clamp(-8, 7) * full) and rtn.hard()[1] is None
    assert _beta(0, 100, 0.2) is None and _beta(19, 100, 0.2) is None
    assert _beta(20, 100, 0.2) == 20.0 and _beta(99, 100, 0.2) == pytest.approx(2.225)


def test_reconstruction_needs_data(setup):
    model, cali, _, plain, _, _ = setup
    with pytest.raises(ValueError, match="block reconstruction needs"):
        calibrate(model, statistics(model, lambda m: m(cali.x[:2], cali.t[:2], cali.y[:2]),
                                    CalibConfig(**W4A8)), CalibConfig(**W4A8, reconstruct=True))
    with pytest.raises(ValueError, match="needs calibration data"):
        reconstruct_blocks(model, plain, None, CalibConfig(**W4A8, reconstruct=True))


@pytest.mark.parametrize("bad", [["--recon-iters", "0"], ["--recon-batch", "0"], ["--recon-lr", "0"],
                                 ["--recon-reg", "-1"], ["--recon-warmup", "1"], ["--recon-act-lr", "nan"]])
def test_cli_flags_and_bad_values_exit_2(bad, tmp_path, capsys):
    from dtq.tools.calibrate import build_parser, main
    from dtq.tools.cli import dataclass_from_args

    args = build_parser().parse_args(["--reconstruct", "--recon-iters", "7", "--recon-batch", "3", "--recon-lr", "0.01",
                                      "--no-recon-act-steps", "--recon-reg", "0.1", "--recon-warmup", "0.1"])
    cfg = dataclass_from_args(CalibConfig, args)
    assert (cfg.reconstruct, cfg.recon_iters, cfg.recon_batch, cfg.recon_lr, cfg.recon_act_steps, cfg.recon_reg,
            cfg.recon_warmup) == (True, 7, 3, 0.01, False, 0.1, 0.1)
    out = tmp_path / "r"
    assert main(["--reconstruct", *bad, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and not out.exists()


def test_recon_time_benchmark_smoke():
    """benchmarks/recon_time.py (the H200 timing) runs end to end on the CPU at toy size."""
    from conftest import load_benchmark

    res = load_benchmark("recon_time").run(config="DiT-S/8", depth=1, rows=4, iters=2, batch=2, device="cpu")
    assert res["depth"] == 1 and res["full_depth"] == 12 and res["recon_seconds"] > 0
    assert res["full_depth_minutes_estimate"] == pytest.approx(res["seconds_per_block"] * 12 / 60, abs=0.01)


def test_after_gptq_the_rounding_starts_at_gptq(setup):
    """--gptq --reconstruct: AdaRound starts at GPTQ's codes exactly, also where GPTQ's error feedback
    moved a code 2+ steps from W diag(b) / s (here ~2.5% of them; projecting those onto floor / ceil
    cost 0.9 dB held-out at 100 iterations). So block 0 (same input either way) starts below
    round-to-nearest (measured: relative output MSE 0.00105 vs 0.00254), each code moves at most one
    step, and a barely trained reconstruction keeps GPTQ's held-out SQNR."""
    model, cali, held, _, recon, _ = setup
    gptq = calibrate(model, cali, CalibConfig(**W4A8, gptq=True))
    r = calibrate(model, cali, CalibConfig(**W4A8, gptq=True, reconstruct=True, recon_iters=2, recon_batch=1))
    start_gptq, start_rtn = r.info["recon_blocks"][0]["rel_mse_before"], recon.info["recon_blocks"][0]["rel_mse_before"]
    assert start_gptq < 0.9 * start_rtn, (start_gptq, start_rtn)
    folded = balanced_model(model, r, check=False)
    far = total = 0
    for name in r.layers:
        full = quant.expand_weight_scale(r.weight_scale(name), r.weight(name).shape, "group", 128)
        codes = quant.quantize_weight(r.weight(name), r.weight_scale(name), "int4", "group", 128).float()
        start = quant.quantize_weight(gptq.weight(name), gptq.weight_scale(name), "int4", "group", 128).float()
        assert float((codes - start).abs().max()) <= 1, name
        ws = folded.get_submodule(name).weight.detach().float() / full
        far += int(((start < ws.floor()) | (start > ws.floor() + 1)).sum())
        total += start.numel()
    assert far > 0.01 * total, (far, total)  # the case this test is about occurs
    fp = predict(model, held)
    sq = {k: noise_sqnr(model, apply_recipe(model, x), held, fp_out=fp)["all"] for k, x in {"gptq": gptq, "r": r}.items()}
    assert sq["r"] > sq["gptq"] - 0.1, sq


def test_cli_writes_a_reconstructed_recipe(tmp_path, capsys):
    """dtq-calibrate --reconstruct end to end (toy counts): exit 0 and a recipe that loads for the model."""
    from dtq.runtime.recipe import load_recipe
    from dtq.tools.calibrate import main

    out = tmp_path / "r"
    assert main(["--precision", "w4a8", "--weight-granularity", "group128", "--reconstruct", "--recon-iters", "2",
                 "--recon-batch", "1", "--cali-steps", "2", "--cali-n", "1", "--steps", "4", "--eval-n", "0",
                 "--no-progress", "--out", str(out)]) == 0
    r = load_recipe(out, load_builtin("dit-tiny-fmnist"))
    assert r.options["reconstruct"] and len(r.info["recon_blocks"]) == 6
    assert all(r.weight(n) is not None for n in r.layers)
