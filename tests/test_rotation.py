"""Hadamard rotation of fc2's input (CalibConfig.rotate_fc2): the matrix, the fold, calibration,
the ONNX graph and the engine against the simulation, and the measured quality effect."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dtq.calibrate.api import calibrate, statistics
from dtq.calibrate.config import CalibConfig
from dtq.calibrate.evaluate import noise_sqnr, predict
from dtq.runtime import quant
from dtq.runtime.qengine import FusedMlp, build_qengine, engine_layers
from dtq.runtime.recipe import RecipeError, apply_recipe, balanced_model, load_recipe
from dtq.runtime.rotation import block_size, hadamard, rotate
from dtq.runtime.zoo import load_builtin

FC2 = "blocks.0.mlp.fc2"


# -- the matrix and the operation ------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 4, 8, 64, 128, 512])
def test_hadamard_is_orthonormal_and_sylvester(k):
    from scipy.linalg import hadamard as scipy_hadamard

    h = hadamard(k, torch.float64)
    assert torch.allclose(h @ h.T, torch.eye(k, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)  # Sylvester's H is symmetric: the rotation is its own inverse
    assert np.array_equal(h.numpy() * np.sqrt(k), scipy_hadamard(k))  # an independent construction
    h32 = hadamard(k)
    assert (h32 @ h32.T - torch.eye(k)).abs().max() < 1e-6


def test_block_size_is_the_largest_power_of_two_dividing_c_in():
    assert block_size(512) == 512  # dit-tiny-fmnist
    assert block_size(1536) == 512  # DiT-S/2: 3 x 512
    assert block_size(4608) == 512  # DiT-XL/2: 9 x 512
    assert block_size(1536, 256) == 256
    assert block_size(384) == 128
    with pytest.raises(ValueError, match="power-of-two"):
        block_size(7)
    with pytest.raises(ValueError, match="power of two"):
        block_size(512, 300)


def test_rotate_is_the_block_diagonal_matrix_and_folds_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 1536, generator=g, dtype=torch.float64)
    w = torch.randn(96, 1536, generator=g, dtype=torch.float64)
    k = block_size(1536)
    b = torch.block_diag(*[hadamard(k, torch.float64)] * 3)
    assert torch.allclose(rotate(x, k), x @ b.T, atol=1e-12)
    assert torch.allclose(rotate(x, k).norm(dim=-1), x.norm(dim=-1))  # orthonormal: lengths kept
    assert torch.allclose(rotate(rotate(x, k), k), x, atol=1e-12)
    # y = W x = (W B^T)(B x): the folded weight is rotate() of W's rows
    assert torch.allclose(F.linear(rotate(x, k), rotate(w, k)), F.linear(x, w), atol=1e-10)


def test_rotation_spreads_channel_outliers_for_a_per_tensor_scale():
    """A layer input with a few outlier channels: after the rotation the per-tensor INT8 activation
    clip is several times smaller and the quantized output error drops accordingly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, generator=g)
    x[:, [3, 100, 301]] *= 40.0
    w = torch.randn(128, 512, generator=g) * 0.05

    def out_mse(xx, ww):
        xq = quant.fake_quant(xx, quant.scale_from_amax(xx.abs().max(), "int8"), "int8")
        return float((F.linear(xq, ww) - F.linear(x, w)).pow(2).mean())

    plain, rotated = out_mse(x, w), out_mse(rotate(x, 512), rotate(w, 512))
    assert rotate(x, 512).abs().max() < 0.25 * x.abs().max()
    assert rotated < 0.1 * plain, (rotated, plain)


# -- on the built-in model ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_setup(tiny_calibration_set):
    model = load_builtin("dit-tiny-fmnist")
    cali = tiny_calibration_set(cali_steps=5, cali_n=4, steps=20, seed=0)  # shared with test_calibrate, test_recon
    held = tiny_calibration_set(cali_steps=6, cali_n=4, steps=20, seed=10)  # and with test_calibrate
    return model, cali, held, predict(model, held)


@pytest.fixture(scope="module")
def stats(tiny_setup):
    """Statistics of every layer, with fc2 inputs plain and rotated (one pass each, shared)."""
    model, cali, _, _ = tiny_setup
    return {rot: statistics(model, cali, CalibConfig(progress=False, rotate_fc2=rot)) for rot in (False, True)}


def _calibrate(model, stats, **kw):
    cfg = CalibConfig(progress=False, **kw)
    return calibrate(model, stats[cfg.rotate_fc2], cfg)


def test_recipe_records_the_rotation_and_fp_function_is_unchanged(tiny_setup, stats, tmp_path):
    model, cali, held, _ = tiny_setup
    recipe = _calibrate(model, stats, method="smoothquant", precision="int8", rotate_fc2=True)
    depth = model.config.depth
    rotated = {n for n, layer in recipe.layers.items() if layer.input_rotation}
    assert rotated == {f"blocks.{i}.mlp.fc2" for i in range(depth)}
    assert recipe.layers[FC2].input_rotation == 512 and recipe.layers[FC2].balance_fold == "runtime"
    assert recipe.options["rotate_fc2"] is True
    recipe.save(tmp_path / "r")
    back = load_recipe(tmp_path / "r", model)  # the original checkpoint's fingerprint
    assert back.layers[FC2].input_rotation == 512
    # folded weight W B^T diag(b) + online rotation and Mul: the FP function, unquantized
    bal = balanced_model(model, back)
    assert bal.get_submodule(FC2).input_rotation == 512
    with torch.no_grad():
        x, t, y = held.x[:8], held.t[:8], held.y[:8]
        ref, out = model(x, t, y), bal(x, t, y)
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99999
    assert (out - ref).norm() / ref.norm() < 1e-5
    # the fold is really there: fc2's weight is not the original's
    assert not torch.allclose(bal.get_submodule(FC2).weight, model.get_submodule(FC2).weight, atol=1e-3)


def test_statistics_must_match_the_rotation(tiny_setup, stats):
    model = tiny_setup[0]
    plain, rot = stats[False], stats[True]
    assert plain.rotations == {} and rot.rotations == {f"blocks.{i}.mlp.fc2": 512 for i in range(model.config.depth)}
    with pytest.raises(ValueError, match="rotation"):
        calibrate(model, plain, CalibConfig(progress=False, rotate_fc2=True))
    with pytest.raises(ValueError, match="rotation"):
        calibrate(model, rot, CalibConfig(progress=False))
    # blocks.0's fc2 input has channel outliers: the rotation roughly halves its clip range
    assert rot[FC2].amax() < 0.7 * plain[FC2].amax(), (rot[FC2].amax(), plain[FC2].amax())


def test_recipe_validation_refuses_bad_rotations(tiny_setup, stats):
    model, cali, _, _ = tiny_setup
    recipe = _calibrate(model, stats, method="minmax", precision="int8", rotate_fc2=True, layers=["mlp.fc2"])
    recipe.layers[FC2].input_rotation = 384
    with pytest.raises(RecipeError, match="power of two"):
        recipe.validate(model)
    recipe.layers[FC2].input_rotation = 1024
    with pytest.raises(RecipeError, match="does not divide"):
        recipe.validate(model)
    recipe.layers[FC2].input_rotation = 512
    recipe.layers[FC2].balance_fold, recipe.layers[FC2].balance = "adaLN", "x"
    with pytest.raises(RecipeError):
        recipe.validate(model)


# Measured (held-out noise SQNR, dB, all rows; tiny model, 20-step trajectory, 5 x 8 calibration rows):
#   only fc2 quantized        without / with rotation
#     int8 smoothquant        35.55 / 39.13
#     int8 minmax             28.66 / 28.87
#     w4a8 minmax             25.75 / 26.18
#     w4a8 smoothquant        24.71 / 23.91   (rotate + smooth, alpha 1: worse; see docs/calibration.md)
#     w4a8 smoothquant (fc2 smoothed, no rotation) / rotated with --no-smooth-fc2: 24.71 / 26.18
#   every layer quantized
#     int8 smoothquant        27.69 / 28.38
#     w4a8 minmax             18.52 / 18.61
#     w4a8 smoothquant        17.96 / 17.64 (rotated with --no-smooth-fc2): the whole-model effect is small
@pytest.mark.parametrize("precision,method,margin", [("int8", "smoothquant", 2.0), ("w4a8", "minmax", 0.2),
                                                     ("w4a8", "smoothquant_no_fc2", 0.3)])
def test_rotation_improves_fc2_on_heldout_timesteps(tiny_setup, stats, precision, method, margin):
    """fc2 alone quantized, so the comparison isolates the rotated layer. w4a8 smoothquant is run
    with smooth_fc2 off under the rotation ("rotate instead of smoothing fc2") against smoothquant's
    default (smoothing fc2 with a run-time Mul, no rotation)."""
    model, cali, held, fp = tiny_setup
    kw = dict(precision=precision, layers=["mlp.fc2"])
    if method == "smoothquant_no_fc2":
        base = _calibrate(model, stats, method="smoothquant", **kw)
        rot = _calibrate(model, stats, method="smoothquant", smooth_fc2=False, rotate_fc2=True, **kw)
    else:
        base = _calibrate(model, stats, method=method, **kw)
        rot = _calibrate(model, stats, method=method, rotate_fc2=True, **kw)
    s_base = noise_sqnr(model, apply_recipe(model, base), held, fp_out=fp)["all"]
    s_rot = noise_sqnr(model, apply_recipe(model, rot), held, fp_out=fp)["all"]
    assert s_rot > s_base + margin, (s_rot, s_base)


def test_gptq_runs_on_the_rotated_layer(tiny_setup, stats):
    """GPTQ's Hessian is of the rotated, balanced input (the hook rotates): with a wrong (unrotated)
    Hessian GPTQ would be worse than plain rounding; here it must help."""
    model, cali, held, fp = tiny_setup
    kw = dict(method="minmax", precision="w4a8", layers=["mlp.fc2"], rotate_fc2=True)
    plain = _calibrate(model, stats, **kw)
    cfg = CalibConfig(progress=False, gptq=True, **kw)
    gptq = calibrate(model, stats[True], cfg, forward_loop=cali.forward_loop(cfg.batch_size, "cpu", False))
    assert gptq.layers[FC2].input_rotation == 512 and gptq.weight(FC2) is not None
    s_plain = noise_sqnr(model, apply_recipe(model, plain), held, fp_out=fp)["all"]
    s_gptq = noise_sqnr(model, apply_recipe(model, gptq), held, fp_out=fp)["all"]
    assert s_gptq > s_plain + 0.5, (s_gptq, s_plain)


def test_engine_matches_simulation_on_cpu(tiny_setup, stats):
    model, cali, held, _ = tiny_setup
    for precision in ("int8", "w4a8"):
        recipe = _calibrate(model, stats, method="smoothquant", precision=precision, rotate_fc2=True)
        engine = build_qengine(model, recipe)
        assert engine_layers(engine)[FC2].input_rotation == 512
        # H is a buffer of the layer (moves with .to(device)): a host-side H was copied to the GPU
        # on every call, which CUDA-graph capture refuses (seen on the H200)
        assert "rotation_matrix" in dict(engine_layers(engine)[FC2].named_buffers())
        assert not any(isinstance(m, FusedMlp) for m in engine.modules())  # no fused epilogue rotates
        sim = apply_recipe(model, recipe)
        q = sim.get_submodule(FC2)  # the simulation's layer holds H the same way, outside its state dict
        assert "rotation_matrix" in dict(q.named_buffers()) and "rotation_matrix" not in q.state_dict()
        x, t, y = held.x[:8], held.t[:8], held.y[:8]
        with torch.no_grad():
            assert torch.equal(engine(x, t, y), sim(x, t, y)), precision


@pytest.fixture(scope="module")
def fp_export(tiny_setup):
    pytest.importorskip("onnxruntime")
    import conftest

    # the session's fp32 opset-21 export (test_recon's, test_weight_refine's): 10 s not spent again
    return conftest.fp_export(tiny_setup[0], dtype=torch.float32, opset=21, max_batch=8)


@pytest.mark.parametrize("precision", ["int8", "w4a8"])
def test_onnx_graph_matches_simulation(tiny_setup, stats, fp_export, precision):
    """The graph's Shape/Reshape -> MatMul(H) -> Reshape before fc2's balancing Mul and Q/DQ, and
    ``W B^T diag(b)`` quantized in the initializer: ONNX Runtime computes the simulation (every
    activation code equal up to rounding ties), and TensorRT's Q/DQ rules still pass."""
    pytest.importorskip("onnxruntime")
    import onnx_graphsurgeon as gs

    from _qdq import tie_aligned_comparison
    from dtq.export import rules
    from dtq.export.api import ExportConfig, build_graph

    model, cali, held, _ = tiny_setup
    recipe = _calibrate(model, stats, method="smoothquant", precision=precision, rotate_fc2=True)
    cfg = ExportConfig(out="unused.onnx", model="dit-tiny-fmnist", precision=precision, dtype="fp32", opset=21,
                       max_batch=8).resolved()
    proto = build_graph(model, cfg, recipe, fp_export)
    report = rules.check_model(proto)
    assert report.ok, report.format()
    graph = gs.import_onnx(proto)
    nodes = {n.name: n for n in graph.nodes}
    rot = nodes[f"{FC2}/rotate_matmul"]
    h = np.asarray(rot.inputs[1].values)
    assert h.shape == (512, 512) and np.allclose(h @ h.T, np.eye(512), atol=1e-6)
    # rotation -> balancing Mul -> Q/DQ -> fc2's MatMul
    assert nodes[f"{FC2}/input_mul"].inputs[0].name == f"{FC2}/rotate_output"
    # dtq-compare's layer probe is the unrotated input (the PyTorch model's fc2 input)
    from dtq.tools.runners import onnx_linear_probes

    assert onnx_linear_probes(proto)[FC2][0] == nodes[f"{FC2}/rotate_flat"].inputs[0].name
    sim = apply_recipe(model, recipe)
    x, t, y = held.x[:16], held.t[:16], held.y[:16]
    ref, out, ties, real, total = tie_aligned_comparison(sim, proto, x, t, y)
    assert real <= 1e-6 * total, f"{real} of {total} activation codes differ beyond a rounding tie"
    assert quant.sqnr_db(ref, out) > 70


def test_matched_high_recipe_keeps_the_rotation(tiny_setup, stats):
    """dtq-sensitivity's high-precision twin of a rotated recipe: same rotation, same folded weights."""
    from dtq.calibrate.sensitivity import config_for_precision, matched_high_recipe

    model = tiny_setup[0]
    cfg = CalibConfig(progress=False, method="smoothquant", precision="w4a8", rotate_fc2=True, layers=["mlp.fc2"])
    low = calibrate(model, stats[True], cfg)
    high = matched_high_recipe(model, stats[True], low, config_for_precision(cfg, "int8"))
    assert high.layers[FC2].input_rotation == 512 and high.layers[FC2].act_format == "int8"
    assert torch.equal(balanced_model(model, high).get_submodule(FC2).weight,
                       balanced_model(model, low).get_submodule(FC2).weight)
