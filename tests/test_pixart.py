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
from conftest import run_in_triton_interpreter

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

    from dtq.runtime.backends import ort_session_options

    x, t, ctx, mask, ref = held
    # the backend's options: Q/DQ run as written (ORT's integer fusion saturates on AVX2-only CPUs)
    sess = ort.InferenceSession(str(exported[0]), ort_session_options(), providers=["CPUExecutionProvider"])
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


# -- the quantized PyTorch engine (recipe:DIR) ------------------------------------------------------
BLOCK = "transformer.transformer_blocks."
PIXART64 = dict(attention_head_dim=32, cross_attention_dim=64, num_layers=1)


@pytest.fixture(scope="module")
def pixart64() -> PixArtDenoiser:
    """The tiny PixArt at hidden 64 (2 heads x 32, one block): INT4 groups of 32 / 64 fit its Linears."""
    return small_pixart(seed=0, **PIXART64)


def _engine_recipe(model, prompts, precision, act_granularity, group=32):
    cali = collect_calibration_set(model, CalibDataConfig(cali_steps=3, cali_n=2, steps=6, cfg_scale=2.0),
                                   prompts=prompts)
    extra = {"weight_granularity": f"group{group}"} if precision == "w4a8" else {}
    return calibrate(model, cali, CalibConfig(method="smoothquant", precision=precision,
                                              act_granularity=act_granularity, progress=False, **extra))


@pytest.mark.parametrize("precision, act_granularity, hidden", [
    ("int8", "tensor", 16), ("int8", "token", 16), ("w4a8", "tensor", 64), ("w4a8", "token", 64), ("fp8", "tensor", 16)])
def test_cpu_engine_is_the_simulation(pixart, pixart64, prompts, precision, act_granularity, hidden):
    """build_qengine on PixArt: every recipe layer (self-/cross-attention, MLP) an engine layer of
    the recipe's precision holding its codes, the run-time balancing Mul kept; on the CPU the engine
    computes the simulation bit for bit (int8 / w4a8 / fp8; static and per-token activations, ViDiT-Q's)."""
    from dtq.runtime.qengine import (FP8Linear, FusedMlp, FusedResidualBlock, Int4Linear, Int8Linear, build_qengine,
                                     engine_layers)
    from dtq.runtime.qlinear import QuantLinear

    model = pixart if hidden == 16 else pixart64
    recipe = _engine_recipe(model, prompts, precision, act_granularity)
    eng = build_qengine(model, recipe)
    layers = engine_layers(eng)
    assert sorted(layers) == sorted(recipe.layers) and len(layers) == 10 * len(model.transformer.transformer_blocks)
    assert {type(m) for m in layers.values()} == {{"int8": Int8Linear, "w4a8": Int4Linear, "fp8": FP8Linear}[precision]}
    assert {m.act_granularity for m in layers.values()} == {act_granularity}
    assert not [n for n, m in eng.named_modules() if isinstance(m, (QuantLinear, FusedMlp, FusedResidualBlock))]
    fc1 = layers[f"{BLOCK}0.ff.net.0.proj"]
    assert fc1.input_mul is not None  # smoothquant's balance: a run-time Mul
    if precision == "int8":
        assert fc1.weight_int8.dtype == torch.int8 and fc1.weight_int8.abs().max() == 127
    elif precision == "fp8":
        assert fc1.weight_fp8.dtype == torch.float8_e4m3fn and fc1.weight_fp8.float().abs().max() == 448
    else:
        assert fc1.weight_packed.dtype == torch.uint8 and fc1.weight_codes().abs().max() <= 8
    x, t, _, _ = model.example_inputs(4, TOKENS)
    ctx, mask = prompts.lookup(torch.tensor([0, 1, 2, prompts.null_index]))
    with torch.no_grad():
        sim, got, fp = apply_recipe(model, recipe)(x, t, ctx, mask), eng(x, t, ctx, mask), model(x, t, ctx, mask)
    assert torch.equal(sim, got)
    assert 25 < sqnr_db(fp, got) < 80  # and it is quantized: close to FP, not FP


def test_engine_runs_pixart_unfused(pixart, recipes):
    """The DiT-only rewrites leave a PixArt engine alone (it runs unfused), and a DiT attention
    backend is refused rather than silently not applied."""
    from dtq.runtime.qengine import FusedMlp, FusedResidualBlock, build_qengine

    eng = build_qengine(pixart, recipes["smoothquant"], fuse_mlp=("int8", "w4a8", "fp8"),
                        fuse_residual=("int8", "w4a8", "fp8"), int8_kernel="triton")
    assert not [m for m in eng.modules() if isinstance(m, (FusedMlp, FusedResidualBlock))]
    assert type(eng.transformer.transformer_blocks[0]) is type(pixart.transformer.transformer_blocks[0])
    with pytest.raises(ValueError, match="own attention"):
        build_qengine(pixart, recipes["smoothquant"], attention="sage")


def test_gpu_layer_paths_through_pixart_in_interpreter(pixart64, prompts, tmp_path):
    """The engine's GPU path on PixArt's real call shapes (image tokens, text tokens, the 4x MLP):
    every engine layer's output replaced by its ``kernel_forward`` (Triton kernels in the
    interpreter: int8_mm with a static scale; quant_rows_int8 + the W4A8 int8-MMA kernel per token),
    the whole model against the simulation. bf16 GEMM outputs bound the agreement."""
    pytest.importorskip("triton")
    import textwrap

    _engine_recipe(pixart64, prompts, "int8", "tensor").save(tmp_path / "int8-tensor")
    # group 64: the W4A8 int8-MMA kernel's K tile (groups of 32 run the w4a16 kernel on fake-quantized input)
    _engine_recipe(pixart64, prompts, "w4a8", "token", group=64).save(tmp_path / "w4a8-token")
    code = textwrap.dedent(f"""
        import torch
        from dtq.runtime import kernel_ops, quant
        from dtq.runtime.pixart import small_pixart
        from dtq.runtime.qengine import build_qengine, engine_layers
        from dtq.runtime.recipe import apply_recipe, load_recipe
        m = small_pixart(seed=0, **{PIXART64!r})
        x, t, ctx, mask = m.example_inputs(1, {TOKENS})
        for name, kernel in (("int8-tensor", "Int8Linear[triton]"), ("w4a8-token", "Int4Linear[w4a8 int8-MMA]")):
            recipe = load_recipe(r"{tmp_path}/" + name, m)
            sim, eng = apply_recipe(m, recipe), build_qengine(m, recipe, int8_kernel="triton")
            layers = engine_layers(eng)
            assert {{l.kernel_name() for l in layers.values()}} == {{kernel}}, name
            for lin in layers.values():
                lin.register_forward_hook(lambda mod, inp, out: mod.kernel_forward(
                    inp[0].reshape(-1, mod.in_features)).reshape(out.shape))
            with torch.no_grad():
                ref, got = sim(x, t, ctx, mask), eng(x, t, ctx, mask)
            s = quant.sqnr_db(ref, got)
            assert 50 < s < 100, (name, s)  # the kernels ran (not bit-identical) and agree
            print(name, round(s, 1))
        print("ok")
    """)
    run_in_triton_interpreter(code)


def test_dtq_sample_recipe_backend(pixart_folder, recipes, tmp_path):
    """dtq-sample --ckpt <PixArt folder> --prompt-embeddings FILE --backend recipe:DIR: the quantized
    engine samples (on the CPU exactly what sim:DIR samples); TensorRT and the DiT-only options
    are refused for a text model (exit 2)."""
    from dtq.tools.sample import main

    folder, emb = pixart_folder
    rdir = recipes["smoothquant"].save(tmp_path / "recipe")
    args = ["--ckpt", str(folder), "--prompt-embeddings", str(emb), "--steps", "3", "--sampler", "ddim",
            "--cfg-scale", "2", "--classes", "0,2", "--per-class", "1", "--device", "cpu", "--no-progress"]
    latents = {}
    for kind in ("sim", "recipe"):
        out = tmp_path / f"samples-{kind}"
        assert main([*args, "--backend", f"{kind}:{rdir}", "--out", str(out)]) == 0
        assert sorted(p.name for p in out.iterdir()) == ["latents.npz", "sample_config.json"]
        latents[kind] = np.load(out / "latents.npz")["arr_0"]
    assert latents["recipe"].shape == (2, 4, 8, 8) and np.isfinite(latents["recipe"]).all()
    assert np.array_equal(latents["recipe"], latents["sim"])
    for bad in (["--backend", f"trt:{tmp_path}"], ["--backend", f"recipe:{rdir}", "--attention", "sage"]):
        assert main([*args, *bad, "--out", str(tmp_path / "bad")]) == 2
        assert not (tmp_path / "bad").exists()


def test_open_denoiser_takes_prompts_for_text_models_only(pixart, prompts, recipes, small_dit, tmp_path):
    """open_denoiser(spec, model, prompts=...): (x, t, y) over the recipe engine, y a prompt index;
    prompts are required for a text model and refused for a class model."""
    from dtq.runtime.open import open_denoiser
    from dtq.runtime.recipe import model_fingerprint

    rdir = recipes["smoothquant"].save(tmp_path / "r")
    den = open_denoiser(f"recipe:{rdir}", pixart, prompts=prompts)
    x, t, _, _ = pixart.example_inputs(2, TOKENS)
    y = torch.tensor([2, prompts.null_index])
    ctx, mask = prompts.lookup(y)
    with torch.no_grad():
        want = apply_recipe(pixart, recipes["smoothquant"])(x, t, ctx, mask)
    assert torch.equal(den(x, t, y), want)
    with pytest.raises(ValueError, match="text-conditioned"):
        open_denoiser("torch", pixart)
    with pytest.raises(ValueError, match="class labels"):
        open_denoiser("torch", small_dit, prompts=prompts)
    with pytest.raises(ValueError, match="compile"):
        open_denoiser(f"recipe:{rdir}", pixart, prompts=prompts, compile=True)
    assert model_fingerprint(pixart) == recipes["smoothquant"].model_fingerprint  # the fixture is unchanged


def test_vidit_q_rotation_and_gptq_go_through_the_adapter(pixart, cali, held):
    """--rotate-fc2 and --gptq find PixArt's fc2 (ff.net.2) and Linears through the adapter, not by
    DiT names: the rotation lands on exactly the fc2 layers, folding it keeps the FP function, and the
    quantized simulation still tracks FP (the same floor as the unrotated smoothquant recipe)."""
    from dtq.runtime.recipe import balanced_model as folded

    recipe = calibrate(pixart, cali, CalibConfig(method="smoothquant", precision="int8", act_granularity="token",
                                                 rotate_fc2=True, gptq=True, progress=False))
    rotated = {n for n, layer in recipe.layers.items() if layer.input_rotation}
    fc2 = {n for n in recipe.layers if n.endswith("ff.net.2")}
    assert fc2 and rotated == fc2
    assert all(recipe.layers[n].weight is not None for n in recipe.layers)  # GPTQ wrote every weight
    x, t, ctx, mask, ref = held
    with torch.no_grad():
        assert (folded(pixart, recipe)(x, t, ctx, mask) - ref).abs().max() < 1e-4
        db = sqnr_db(ref, apply_recipe(pixart, recipe)(x, t, ctx, mask))
    assert 35.0 < db < 80, db
