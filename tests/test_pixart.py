"""PixArt (diffusers' PixArtTransformer2DModel, used as-is) through the model-adapter interface:
calibrate -> simulate -> ONNX with Q/DQ -> TensorRT rule check -> TensorRT-RTX build, and the
DiT adapter unchanged. A tiny random-weight PixArt (2 layers, 2 heads x 8, sample 8, 6 tokens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from dtq import formats  # noqa: E402
from dtq.calibrate.api import calibrate  # noqa: E402
from dtq.calibrate.config import CalibConfig, CalibDataConfig  # noqa: E402
from dtq.calibrate.data import CalibrationSet, collect_calibration_set  # noqa: E402
from dtq.runtime.adapters import DIT, adapter_for, quantizable_names  # noqa: E402
from dtq.runtime.pixart import PixArtDenoiser, small_pixart  # noqa: E402
from dtq.runtime.prompts import PromptDenoiser, PromptEmbeddings, PromptEmbeddingsError  # noqa: E402
from dtq.runtime.recipe import apply_recipe, balanced_model, load_recipe  # noqa: E402

TOKENS = 6


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


@pytest.fixture(scope="module")
def pixart() -> PixArtDenoiser:
    return small_pixart(seed=0)


@pytest.fixture(scope="module")
def prompts() -> PromptEmbeddings:
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, TOKENS)
    mask[0, 4:] = 0  # a short prompt: its padding must not matter
    null_mask = torch.zeros(TOKENS)
    null_mask[:2] = 1
    return PromptEmbeddings(torch.randn(3, TOKENS, 12, generator=g), mask,
                            0.1 * torch.randn(TOKENS, 12, generator=g), null_mask)


@pytest.fixture(scope="module")
def cali(pixart, prompts) -> CalibrationSet:
    return collect_calibration_set(pixart, CalibDataConfig(cali_steps=3, cali_n=2, steps=6, cfg_scale=2.0),
                                   prompts=prompts)


@pytest.fixture(scope="module")
def held(pixart, prompts):
    """Held-out rows (another seed) and the FP output on them."""
    rows = collect_calibration_set(pixart, CalibDataConfig(cali_steps=3, cali_n=2, steps=6, cfg_scale=2.0, seed=1),
                                   prompts=prompts)
    context, mask = prompts.lookup(rows.y)
    with torch.no_grad():
        ref = pixart(rows.x, rows.t, context, mask)
    return rows.x, rows.t, context, mask, ref


@pytest.fixture(scope="module")
def recipes(pixart, cali):
    return {m: calibrate(pixart, cali, CalibConfig(method=m, precision="int8", progress=False))
            for m in ("minmax", "smoothquant")}


# -- the adapter interface ------------------------------------------------------------------------
def test_dit_adapter_is_todays_naming_and_folds(small_dit):
    names = quantizable_names(small_dit, list(formats.ALL_ROLES))  # cross roles: a DiT has none
    assert names == formats.layer_names(len(small_dit.blocks), formats.ROLES)
    assert adapter_for(small_dit) is DIT
    assert {DIT.fold(n) for n in names if n.endswith("attn.qkv")} == {"adaLN"}
    assert {n: DIT.fold(n) for n in names} == {n: formats.FOLD_BY_ROLE[formats.layer_role(n)] for n in names}


def test_pixart_adapter_roles(pixart):
    sites = adapter_for(pixart).quantizable(pixart)
    assert len(sites) == 2 * 10
    by_role = {}
    for s in sites:
        by_role.setdefault(s.role, []).append(s.name.split(f"blocks.{s.block}.")[1])
        assert isinstance(pixart.get_submodule(s.name), torch.nn.Linear)
    assert by_role["attn.qkv"][:3] == ["attn1.to_q", "attn1.to_k", "attn1.to_v"]
    assert by_role["cross.kv"][:2] == ["attn2.to_k", "attn2.to_v"]
    assert by_role["cross.q"][0] == "attn2.to_q" and by_role["cross.proj"][0] == "attn2.to_out.0"
    assert by_role["mlp.fc1"][0] == "ff.net.0.proj" and by_role["mlp.fc2"][0] == "ff.net.2"
    # a role subset selects only those layers
    only = quantizable_names(pixart, ["cross.kv"])
    assert len(only) == 4 and all(".attn2.to_k" in n or ".attn2.to_v" in n for n in only)


# -- prompts ------------------------------------------------------------------------------------
def test_prompt_embeddings_round_trip_and_refusals(prompts, tmp_path):
    path = prompts.save(tmp_path / "p.safetensors")
    back = PromptEmbeddings.load(path)
    ctx, mask = back.lookup(torch.tensor([1, back.null_index]))
    assert torch.equal(ctx[0], prompts.embeddings[1]) and torch.equal(ctx[1], prompts.null_embedding)
    assert torch.equal(mask[1], prompts.null_mask)
    with pytest.raises(PromptEmbeddingsError, match="mask must be"):
        PromptEmbeddings(prompts.embeddings, prompts.mask[:, :2], prompts.null_embedding, prompts.null_mask)
    with pytest.raises(PromptEmbeddingsError, match="not found"):
        PromptEmbeddings.load(tmp_path / "missing.safetensors")


def test_padding_tokens_do_not_change_the_output(pixart, prompts):
    """The mask reaches diffusers' cross-attention: changing a padded token changes nothing."""
    x, t, _, _ = pixart.example_inputs(1, TOKENS)
    ctx, mask = prompts.lookup(torch.tensor([0]))
    ctx2 = ctx.clone()
    ctx2[:, 5] += 10.0  # token 5 of prompt 0 is padding
    ctx3 = ctx.clone()
    ctx3[:, 1] += 10.0  # token 1 is not
    with torch.no_grad():
        a, b, c = (pixart(x, t, cc, mask) for cc in (ctx, ctx2, ctx3))
    assert torch.allclose(a, b, atol=1e-6) and (a - c).abs().max() > 1e-3


def test_calibration_set_carries_its_prompts(cali, tmp_path):
    assert len(cali) == 3 * 2 * 2  # steps x samples x (cond, uncond)
    assert set(cali.y.tolist()) >= {cali.prompts.null_index}  # guidance's empty-prompt half
    back = CalibrationSet.load(cali.save(tmp_path / "c.safetensors"))
    assert torch.equal(back.prompts.embeddings, cali.prompts.embeddings) and torch.equal(back.y, cali.y)


# -- calibration and simulation -------------------------------------------------------------------
@pytest.mark.parametrize("method, min_db", [("minmax", 40.0), ("smoothquant", 35.0)])
def test_quantized_simulation_tracks_fp(pixart, recipes, held, method, min_db, tmp_path):
    recipe = recipes[method]
    assert len(recipe.layers) == 20 and recipe.model_config["family"] == "pixart"
    folds = {layer.balance_fold for layer in recipe.layers.values()}
    assert folds == ({None} if method == "minmax" else {"runtime", None})  # cross.* are not smoothed
    x, t, ctx, mask, ref = held
    # balancing folded in FP computes the same function
    with torch.no_grad():
        assert (balanced_model(pixart, recipe)(x, t, ctx, mask) - ref).abs().max() < 1e-4
        out = apply_recipe(pixart, load_recipe(recipe.save(tmp_path / "r"), pixart))(x, t, ctx, mask)
    db = sqnr_db(ref, out)
    assert min_db < db < 80, db  # quantized (not FP) and close to FP


def test_block_reconstruction_refuses_pixart(pixart, cali):
    with pytest.raises(ValueError, match="DiT blocks only"):
        calibrate(pixart, cali, CalibConfig(method="minmax", reconstruct=True, progress=False))


def test_wrong_activation_scales_fail_the_threshold(pixart, recipes, held):
    """The SQNR threshold is not vacuous: act scales 8x too small clip the activations."""
    import copy

    recipe = copy.deepcopy(recipes["minmax"])
    for layer in recipe.layers.values():
        layer.act_scale /= 8
    x, t, ctx, mask, ref = held
    with torch.no_grad():
        out = apply_recipe(pixart, recipe)(x, t, ctx, mask)
    assert sqnr_db(ref, out) < 35.0


# -- export, rule check, TensorRT-RTX ---------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(pixart_folder, recipes, tmp_path_factory):
    """dtq-export --ckpt <PixArt folder> --recipe DIR (the smoothquant recipe), fp32 graph: the
    one export of this file (torch.onnx of diffusers' model takes a while)."""
    from dtq import artifacts
    from dtq.export.cli import main as export_main

    root = tmp_path_factory.mktemp("pixart-export")
    rdir = recipes["smoothquant"].save(root / "recipe")
    out = root / "pixart-int8.onnx"
    assert export_main(["--ckpt", str(pixart_folder[0]), "--recipe", str(rdir), "--text-tokens", str(TOKENS),
                        "--dtype", "fp32", "--max-batch", "8", "--out", str(out)]) == 0
    return out, artifacts.read_onnx_metadata(out)


def test_export_has_qdq_and_passes_rules(exported):
    """The export CLI ran the TensorRT rule check (exit 0 means it passed) and wrote Q/DQ per layer."""
    import onnx

    from dtq.export import rules

    path, metadata = exported
    proto = onnx.load(str(path))
    assert rules.check_model(proto).ok
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 20 and ops.count("DequantizeLinear") == 40  # act Q/DQ + weight DQ
    assert [i.name for i in proto.graph.input] == ["x", "t", "context", "mask"]
    from dtq.artifacts import META_INPUTS, metadata_json

    assert metadata_json(metadata, META_INPUTS)["context"] == ["batch", TOKENS, 12]


def test_onnxruntime_matches_simulation(exported, pixart, recipes, held):
    import onnxruntime as ort

    x, t, ctx, mask, ref = held
    sess = ort.InferenceSession(str(exported[0]), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"x": x.numpy(), "t": t.numpy(), "context": ctx.numpy(), "mask": mask.numpy()})
    with torch.no_grad():
        sim = apply_recipe(pixart, recipes["smoothquant"])(x, t, ctx, mask).numpy()
    assert np.abs(out - sim).max() < 1e-3 * np.abs(sim).max()


def test_tensorrt_rtx_builds_the_pixart_graph(exported, tmp_path):
    pytest.importorskip("tensorrt_rtx")
    from dtq.engines.build import BuildConfig, build_engine
    from dtq.engines.engine_dir import read_meta

    out = tmp_path / "engine"
    report = build_engine(BuildConfig(onnx=exported[0], out=out, backend="tensorrt-rtx", max_batch=4, opt_batch=2,
                                      opt_level=0), log=lambda s: None)
    meta = read_meta(out)
    assert report.plan_bytes > 10_000 and meta.precision == "int8"
    assert meta.inputs["context"]["max"] == [4, TOKENS, 12] and meta.inputs["mask"]["min"] == [1, TOKENS]
    assert meta.outputs["out"]["shape"][1:] == [8, 8, 8]


# -- sampling ---------------------------------------------------------------------------------------
def test_guided_sampling_with_prompt_embeddings(pixart, prompts, recipes):
    """The sampler's (x, t, y) loop with y = prompt index; guidance's null is the empty prompt."""
    from dtq.runtime.diffusion import GaussianDiffusion
    from dtq.runtime.sampler import sample

    def run(model, y):
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        return sample(PromptDenoiser(model, prompts), GaussianDiffusion.dit(4), noise, y, sampler="ddim",
                      cfg_scale=3.0, null_class=prompts.null_index)

    fp = run(pixart, torch.tensor([0, 2]))
    q = run(apply_recipe(pixart, recipes["minmax"]), torch.tensor([0, 2]))
    other = run(pixart, torch.tensor([1, 1]))
    assert fp.shape == (2, 4, 8, 8) and torch.isfinite(fp).all()
    assert sqnr_db(fp, q) > 25 and (fp - other).abs().max() > 1e-2  # the prompt matters


@pytest.fixture(scope="module")
def pixart_folder(pixart, prompts, tmp_path_factory):
    """A diffusers transformer folder of the tiny PixArt and its prompt-embeddings file."""
    root = tmp_path_factory.mktemp("pixart-folder")
    pixart.transformer.save_pretrained(root / "transformer")
    return root / "transformer", prompts.save(root / "prompts.safetensors")


def test_pixart_folder_loads_as_the_same_model(pixart, pixart_folder):
    from dtq.runtime.checkpoint import load_checkpoint
    from dtq.runtime.recipe import model_fingerprint

    model = load_checkpoint(pixart_folder[0])
    assert isinstance(model, PixArtDenoiser) and model_fingerprint(model) == model_fingerprint(pixart)


def test_dtq_sample_cli_with_prompt_embeddings(pixart_folder, recipes, exported, tmp_path):
    """dtq-sample --ckpt <PixArt folder> --prompt-embeddings FILE, on torch, sim:DIR and onnx:FILE."""
    from dtq.tools.sample import main

    folder, emb = pixart_folder
    rdir = recipes["smoothquant"].save(tmp_path / "recipe")
    args = ["--ckpt", str(folder), "--prompt-embeddings", str(emb), "--steps", "3", "--sampler", "ddim",
            "--cfg-scale", "2", "--classes", "0,2", "--per-class", "1", "--device", "cpu", "--no-progress"]
    latents = {}
    for backend in ("torch", f"sim:{rdir}", f"onnx:{exported[0]}"):
        out = tmp_path / backend.split(":")[0]
        assert main([*args, "--backend", backend, "--out", str(out)]) == 0
        latents[backend.split(":")[0]] = np.load(out / "latents.npz")["arr_0"]  # no vae/: latents
    assert latents["torch"].shape == (2, 4, 8, 8)
    sim, ort_out = torch.from_numpy(latents["sim"]), torch.from_numpy(latents["onnx"])
    assert sqnr_db(torch.from_numpy(latents["torch"]), sim) > 25
    assert (sim - ort_out).abs().max() < 1e-3  # ONNX Runtime samples what the simulation samples
    # a text model without embeddings is bad usage (exit 2, one line)
    assert main(["--ckpt", str(folder), "--steps", "2", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2


def test_calibrate_cli_on_a_pixart_folder(pixart_folder, tmp_path):
    """dtq-calibrate --ckpt <PixArt folder> --prompt-embeddings FILE (the export CLI: ``exported``)."""
    from dtq.tools.calibrate import main as calibrate_main

    folder, emb = pixart_folder
    rdir = tmp_path / "recipe"
    assert calibrate_main(["--ckpt", str(folder), "--prompt-embeddings", str(emb), "--method", "smoothquant",
                           "--cali-steps", "2", "--cali-n", "2", "--steps", "4", "--eval-n", "1", "--out", str(rdir),
                           "--no-progress"]) == 0
    recipe = load_recipe(rdir)
    assert recipe.info["heldout_noise_sqnr_db"]["all"] > 30 and len(recipe.layers) == 20
    back = CalibrationSet.load(rdir / "calibration_set.safetensors")
    assert back.prompts is not None and back.prompts.num_prompts == 3
    # a text model without embeddings is bad usage (exit 2, nothing written)
    assert calibrate_main(["--ckpt", str(folder), "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert not (tmp_path / "bad").exists()
