"""dtq-compare on the built-in tiny DiT: an identical graph passes, a deliberately broken weight
scale fails with exit code 1 and the layerwise ranking names the broken layer; usage errors exit 2."""

import json
import math

import numpy as np
import onnx
import pytest
import torch

from dtq.runtime.zoo import load_builtin
from dtq.tools import compare
from dtq.tools.capture import capture_inputs, default_step_indices, step_indices_for_timesteps
from dtq.runtime.diffusion import GaussianDiffusion
from dtq.runtime.denoiser import TorchDenoiser

from _qdq import weight_qdq
from conftest import fp_export, fp_export_for

BROKEN = "blocks.2.mlp.fc1"
FAST = ["--steps", "4", "--num-images", "2", "--e2e-images", "2"]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("graphs")
    model = load_builtin("dit-tiny-fmnist")
    fp = fp_export(model, opset=18, min_batch=1, max_batch=64)  # test_backends' and test_bad_onnx's
    onnx.save(fp, d / "fp32.onnx")
    blocks = [n for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2") for _ in [0]]
    layers = [f"blocks.{i}.{r}" for i in range(model.config.depth) for r in blocks]
    onnx.save(weight_qdq(fp, layers), d / "w8.onnx")
    onnx.save(weight_qdq(fp, layers, broken={BROKEN: 4.0}), d / "w8_broken.onnx")
    return d


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_capture_steps_and_feeds():
    model = load_builtin("dit-tiny-fmnist")
    diffusion = GaussianDiffusion.dit(10)
    assert default_step_indices(10) == [0, 5, 9]
    assert step_indices_for_timesteps(diffusion, [999, 0]) == [0, 9]
    g = torch.Generator().manual_seed(0)
    steps = capture_inputs(TorchDenoiser(model), diffusion, torch.randn(2, 1, 32, 32, generator=g),
                           torch.tensor([1, 2]), [0, 9], cfg_scale=1.5, null_class=model.config.null_class)
    assert [s.index for s in steps] == [0, 9] and [s.timestep for s in steps] == [999, 0]
    feed = steps[0].feed()
    assert list(feed) == ["x", "t", "y"] and feed["x"].shape == (4, 1, 32, 32)  # guidance doubles the batch
    assert feed["y"].tolist() == [1, 2, 10, 10] and feed["t"].dtype == np.int64
    # the captured input at step 0 is the initial noise itself
    assert np.array_equal(feed["x"][:2], torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)).numpy())


def test_identical_graph_passes(graphs, tmp_path):
    out = tmp_path / "same"
    rc = compare.main(["--reference", str(graphs / "fp32.onnx"), "--candidate", str(graphs / "fp32.onnx"),
                       "--min-sqnr", "60", "--min-cosine", "0.999999", "--max-abs", "0", "--out", str(out), *FAST])
    assert rc == 0
    rep = _report(out)
    assert rep["passed"] and rep["step"]["polygraphy_passed"]
    assert len(rep["step"]["rows"]) == 3 and all(r["sqnr_db"] == "inf" and r["max_abs"] == 0 for r in rep["step"]["rows"])
    assert rep["e2e"]["n_identical"] == 2 and rep["e2e"]["mean_ssim"] == pytest.approx(1.0)
    assert rep["layerwise"]["keep_in_higher_precision"] == []
    for name in ("report.json", "report.md", "layer_sqnr.png", "e2e_grid.png", "e2e_samples.npz"):
        assert (out / name).is_file(), name


def test_broken_scale_fails_and_is_found(graphs, tmp_path):
    out = tmp_path / "broken"
    rc = compare.main(["--reference", "torch", "--candidate", str(graphs / "w8_broken.onnx"),
                       "--min-sqnr", "20", "--out", str(out), *FAST])
    assert rc == 1
    rep = _report(out)
    assert not rep["passed"] and not rep["step"]["passed"]
    assert min(r["sqnr_db"] for r in rep["step"]["rows"]) < 20
    lw = rep["layerwise"]
    # the ranking covers exactly the quantized Linears, and the broken one is first by far
    assert len(lw["layers"]) == 24 and lw["ranking"][0] == BROKEN
    by = {d["layer"]: d for d in lw["layers"]}
    assert by[BROKEN]["out_sqnr_db"] < 10  # 4x weight: out = 4 y, SQNR ~ -9.5 dB
    assert by[BROKEN]["added_sqnr_db"] < 0 and by[BROKEN]["added_sqnr_db"] < by[lw["ranking"][1]]["added_sqnr_db"] - 5
    # upstream of the broken layer everything is clean (int8 weights: > 25 dB)
    assert all(by[f"blocks.{i}.{r}"]["out_sqnr_db"] > 25 for i in (0, 1) for r in ("attn.qkv", "mlp.fc2"))
    assert by[BROKEN]["sqnr_drop_db"] > 20
    assert lw["keep_in_higher_precision"][0] == BROKEN
    assert "FAIL" in (out / "report.md").read_text().splitlines()[0]


def test_correct_int8_weights_pass(graphs, tmp_path):
    out = tmp_path / "w8"
    rc = compare.main(["--reference", str(graphs / "fp32.onnx"), "--candidate", str(graphs / "w8.onnx"),
                       "--min-sqnr", "20", "--no-layerwise", "--out", str(out), *FAST])
    rep = _report(out)
    assert rc == 0, rep["step"]["rows"]
    sq = [r["sqnr_db"] for r in rep["step"]["rows"]]
    assert all(25 < s < 80 for s in sq), sq  # quantization noise is there, but small
    assert 20 < rep["e2e"]["mean_psnr_db"] < 80 and rep["e2e"]["mean_ssim"] > 0.9
    # a tolerance the candidate cannot meet turns the same run into a failure
    assert compare.main(["--reference", str(graphs / "fp32.onnx"), "--candidate", str(graphs / "w8.onnx"),
                         "--min-sqnr", "90", "--no-layerwise", "--no-e2e", "--out", str(tmp_path / "strict"),
                         *FAST]) == 1


def test_usage_errors_exit_2(graphs, tmp_path, capsys):
    assert compare.main(["--out", str(tmp_path / "x")]) == 2  # no candidate
    assert compare.main(["--candidate", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "x")]) == 2
    assert compare.main(["--candidate", "torch", "--steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert compare.main(["--candidate", "torch", "--timesteps", "1200", *FAST, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--candidate is required" in err and "missing.onnx" in err
    with pytest.raises(SystemExit) as exc:
        compare.main(["--candidate", "torch", "--min-sqnr", "abc"])
    assert exc.value.code == 2


def test_torch_fp32_vs_bf16(tmp_path):
    """Two PyTorch endpoints of one model in different dtypes (no shared state between them)."""
    out = tmp_path / "bf16"
    rc = compare.main(["--reference", "torch", "--candidate", "torch:bf16", "--min-sqnr", "15", "--out", str(out),
                       "--steps", "4", "--num-images", "2", "--e2e-images", "2", "--top-k", "3"])
    rep = _report(out)
    assert rc == 0, rep["step"]["rows"]
    sq = [r["sqnr_db"] for r in rep["step"]["rows"]]
    assert all(15 < s < 60 for s in sq), sq  # bf16 rounding: clearly not FP32-exact
    # every Linear is probed when neither endpoint is quantized
    assert len(rep["layerwise"]["layers"]) == len([n for n in rep["layerwise"]["ranking"]]) > 24
    assert compare.main(["--candidate", "torch:int3", "--out", str(tmp_path / "x")]) == 2


def test_fold_rescaled_outputs_are_aligned(tmp_path):
    """proj's balancing folded into qkv's V rows rescales qkv's output per channel (the next layer
    undoes it): the layerwise diagnosis must not blame qkv for that gain, only for its noise."""
    from dtq.tools.quick_recipe import minmax_recipe

    model = load_builtin("dit-tiny-fmnist")
    recipe = minmax_recipe(model, "int8", balance=True)
    recipe.save(tmp_path / "recipe")
    qkv = [f"blocks.{i}.attn.qkv" for i in range(model.config.depth)]

    def qkv_out_sqnr(alignment):
        out = tmp_path / alignment
        compare.main(["--candidate", str(tmp_path / "recipe"), "--no-e2e", "--input-alignment", alignment,
                      "--out", str(out), *FAST])
        by = {d["layer"]: d for d in _report(out)["layerwise"]["layers"]}
        return [by[n]["out_sqnr_db"] for n in qkv], [by[n]["output_aligned"] for n in qkv]

    aligned, flags = qkv_out_sqnr("auto")
    raw, raw_flags = qkv_out_sqnr("none")
    assert all(flags) and not any(raw_flags)
    # blocks.0's input is exact: INT8 noise alone (measured 38 dB) vs the V-row gain counted as
    # error (18 dB); later blocks inherit upstream noise, yet the gain still costs several dB
    assert aligned[0] > 30 and raw[0] < 20, (aligned, raw)
    assert all(a > r + 5 for a, r in zip(aligned, raw)), (aligned, raw)

    # the Q/DQ ONNX export of the recipe carries the same knowledge in its metadata
    from dtq.export.api import ExportConfig, export_model

    onnx_path = tmp_path / "w8.onnx"
    cfg = ExportConfig(out=str(onnx_path), model="dit-tiny-fmnist", precision="int8", dtype="fp32",
                       recipe=str(tmp_path / "recipe"))
    export_model(cfg, model=model, fp_proto=fp_export_for(model, cfg, recipe))  # fp32, opset 19: test_open's FP export
    out = tmp_path / "onnx"
    compare.main(["--candidate", str(onnx_path), "--no-e2e", "--out", str(out), *FAST])
    by = {d["layer"]: d for d in _report(out)["layerwise"]["layers"]}
    assert all(by[n]["output_aligned"] for n in qkv) and by[qkv[0]]["out_sqnr_db"] > 30


def test_sim_and_recipe_endpoints_are_distinct_kinds_and_agree_on_cpu(tmp_path):
    """The shared spec grammar: sim:DIR is the simulation, recipe:DIR (and the bare DIR) the
    quantized engine; on the CPU the engine computes the simulation bit for bit, and both hook the
    same quantized layers."""
    from dtq.tools.quick_recipe import minmax_recipe

    model = load_builtin("dit-tiny-fmnist")
    minmax_recipe(model, "int8", balance=True).save(tmp_path / "r")
    out = tmp_path / "cmp"
    assert compare.main(["--reference", f"sim:{tmp_path / 'r'}", "--candidate", str(tmp_path / "r"), "--no-e2e",
                         "--out", str(out), *FAST]) == 0
    rep = _report(out)
    assert rep["reference"]["kind"] == "sim" and rep["candidate"]["kind"] == "recipe"
    assert all(r["sqnr_db"] == "inf" and r["max_abs"] == 0 for r in rep["step"]["rows"]), rep["step"]["rows"]
    layers = rep["layerwise"]["layers"]
    assert len(layers) == 4 * model.config.depth and all(d["out_sqnr_db"] == "inf" for d in layers)


def test_bad_out_and_non_finite_tolerances_exit_2_before_capture(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare, "capture", lambda *a, **k: pytest.fail("captured before the input was checked"))
    (tmp_path / "f").write_text("x")
    assert compare.main(["--candidate", "torch:bf16", *FAST, "--out", str(tmp_path / "f")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert compare.main(["--candidate", "torch:bf16", *FAST, "--out", str(tmp_path / "f" / "cmp")]) == 2
    assert "is a file" in capsys.readouterr().err
    for flag in ("--min-sqnr", "--cfg-scale", "--max-abs"):
        assert compare.main(["--candidate", "torch:bf16", *FAST, f"{flag}=nan", "--out", str(tmp_path / "x")]) == 2
        assert f"{flag} must be a finite number" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_failure_after_capture_leaves_no_output_directory(tmp_path, monkeypatch):
    """dtq-compare used to leave an empty --out behind when a comparison failed after the capture."""
    def broken(*a, **k):
        raise ValueError("comparison failed")

    monkeypatch.setattr(compare, "step_comparison", broken)
    assert compare.main(["--candidate", "torch:bf16", *FAST, "--no-e2e", "--out", str(tmp_path / "cmp")]) == 2
    assert list(tmp_path.iterdir()) == []
