import json

import numpy as np
import pytest

from dtq.tools.sample import build_parser, main


def test_cli_writes_grid_pngs_and_adm_npz(tmp_path):
    out = tmp_path / "run"
    assert main(["--steps", "4", "--classes", "3,5", "--per-class", "2", "--seed", "7", "--out", str(out), "--no-progress"]) == 0
    data = np.load(out / "samples.npz")
    assert data["arr_0"].shape == (4, 32, 32, 1) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [3, 3, 5, 5]
    assert sorted(p.name for p in (out / "images").iterdir())[0] == "000000_class3.png"
    assert (out / "grid.png").stat().st_size > 0
    assert json.loads((out / "sample_config.json").read_text())["seed"] == 7
    assert not list(tmp_path.glob(".run.partial-*"))  # no temporary directory left behind
    # same seed, same images
    main(["--steps", "4", "--classes", "3,5", "--per-class", "2", "--seed", "7", "--out", str(tmp_path / "again"), "--no-progress"])
    assert np.array_equal(np.load(tmp_path / "again" / "samples.npz")["arr_0"], data["arr_0"])


def test_cli_parses_into_the_api_config():
    from dtq.runtime.pipeline import SampleConfig
    from dtq.tools.cli import dataclass_from_args

    cfg = dataclass_from_args(SampleConfig, build_parser().parse_args(
        ["--classes", "1,2", "--sampler", "ddim", "--dtype", "bf16", "--no-progress", "--cfg-scale", "4"]))
    assert cfg == SampleConfig(classes=[1, 2], sampler="ddim", dtype="bf16", progress=False, cfg_scale=4.0)


@pytest.mark.parametrize("args,message", [
    (["--model", "DiT-XL/2"], "give --ckpt, or --random-weights"),
    (["--model", "DiT-Q/3", "--random-weights"], "unknown --model"),
    (["--classes", "12"], "outside 0..9"),
    (["--ckpt", "/nonexistent.pt"], "checkpoint not found"),
    (["--steps", "0"], "--steps must be in 1..1000"),
    (["--image-size", "64"], "does not match the model, which makes 32px"),
    (["--classes", "1", "--num-images", "3"], "either --classes or --num-images"),
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number, got nan"),
    (["--cfg-scale", "inf"], "--cfg-scale must be a finite number, got inf"),
    (["--cfg-scale=-inf"], "--cfg-scale must be a finite number, got -inf"),
    (["--sampler", "ddim", "--eta", "nan"], "--eta must be a finite number"),
    (["--sampler", "ddim", "--eta", "-1"], "--eta must be >= 0"),
    (["--ckpt", "."], ". is a directory, not a checkpoint file"),
])
def test_cli_bad_input_exits_2_with_message(tmp_path, capsys, args, message):
    assert main(args + ["--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_random_latent_model_writes_latents(tmp_path):
    out = tmp_path / "lat"
    assert main(["--model", "DiT-S/8", "--random-weights", "--image-size", "128", "--num-images", "2",
                 "--num-classes", "3", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    lat = np.load(out / "latents.npz")["arr_0"]
    assert lat.shape == (2, 4, 16, 16) and np.isfinite(lat).all()


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--cfg-scale" in text and "samples.npz" in text and "exit codes" in text


def test_api_refuses_non_finite_floats_alike():
    from dtq.runtime.pipeline import SampleConfig

    with pytest.raises(ValueError, match="--cfg-scale must be a finite number"):
        SampleConfig(cfg_scale=float("nan"))


@pytest.mark.parametrize("bad", ["file", "under-file"])
def test_unwritable_out_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, bad):
    """--out an existing regular file (or a path below one): exit 2 at once, not a traceback after sampling."""
    import dtq.runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline, "resolve_model", lambda cfg: pytest.fail("model loaded before --out was checked"))
    (tmp_path / "f").write_text("keep me")
    out = tmp_path / "f" if bad == "file" else tmp_path / "f" / "run"
    assert main(["--steps", "2", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert (tmp_path / "f").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_sample_config_json_is_strict_json(tmp_path):
    out = tmp_path / "run"
    assert main(["--steps", "2", "--classes", "1", "--per-class", "2", "--out", str(out), "--no-progress"]) == 0

    def no_constants(name):
        raise AssertionError(f"{name} in sample_config.json")

    json.loads((out / "sample_config.json").read_text(), parse_constant=no_constants)


def test_recipe_with_foreign_tensors_is_refused(tmp_path, capsys):
    """A recipe.json beside another recipe's tensors (an interrupted overwrite before recipes were
    staged) is refused, not sampled with."""
    from dtq.runtime.zoo import load_builtin
    from dtq.tools.quick_recipe import minmax_recipe

    model = load_builtin("dit-tiny-fmnist")
    a, b = (minmax_recipe(model, "int8", balance=True, seed=s) for s in (0, 1))
    a.save(tmp_path / "a"), b.save(tmp_path / "b")
    (tmp_path / "a" / "tensors.safetensors").write_bytes((tmp_path / "b" / "tensors.safetensors").read_bytes())
    assert main(["--backend", f"recipe:{tmp_path / 'a'}", "--device", "cpu", "--steps", "2", "--classes", "1",
                 "--per-class", "1", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "does not belong to recipe.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# -- --compile-mode and --w4a8-kernel ---------------------------------------------------------------
def test_compile_mode_and_w4a8_kernel_parse_into_the_config():
    from dtq.runtime.pipeline import SampleConfig
    from dtq.tools.cli import dataclass_from_args

    cfg = dataclass_from_args(SampleConfig, build_parser().parse_args(
        ["--backend", "recipe:r", "--compile", "--compile-mode", "max-autotune", "--w4a8-kernel", "progressive"]))
    assert cfg == SampleConfig(backend="recipe:r", compile=True, compile_mode="max-autotune", w4a8_kernel="progressive")
    assert (SampleConfig().compile_mode, SampleConfig().w4a8_kernel) == ("default", "group")  # defaults unchanged


def test_compile_mode_reaches_compile_blocks(monkeypatch):
    """SampleConfig.compile_mode -> open_denoiser -> runtime.regional_compile.compile_blocks(model, mode)."""
    import torch

    from dtq.runtime import regional_compile
    from dtq.runtime.pipeline import SampleConfig, build_denoiser
    from dtq.runtime.zoo import load_builtin

    modes = []
    monkeypatch.setattr(regional_compile, "compile_blocks", lambda model, mode="default", **kw: modes.append(mode) or model)
    model = load_builtin("dit-tiny-fmnist")
    for cfg in (SampleConfig(compile=True, compile_mode="max-autotune"), SampleConfig(compile=True), SampleConfig()):
        build_denoiser(cfg, model, torch.device("cpu"))
    assert modes == ["max-autotune", "default"]


def test_w4a8_kernel_progressive_builds_the_two_level_engine(tmp_path):
    """--w4a8-kernel progressive: the recipe engine's W4A8 layers are Int4ProgressiveLinear (INT4 weights
    requantized to two-level integer group scales at build time), close to the simulation but not
    equal to it; the default (group) stays bit-identical to the simulation on the CPU. dtq-sample runs
    with it and records it."""
    import torch

    from dtq.runtime import quant
    from dtq.runtime.open import open_denoiser
    from dtq.runtime.pipeline import SampleConfig, build_denoiser
    from dtq.runtime.qengine import Int4Linear, Int4ProgressiveLinear, engine_layers
    from dtq.runtime.zoo import load_builtin
    from dtq.tools.cli import dataclass_from_args
    from dtq.tools.quick_recipe import minmax_recipe, random_inputs

    model = load_builtin("dit-tiny-fmnist")
    minmax_recipe(model, "w4a8", group=64, balance=True).save(tmp_path / "r")
    args = ["--backend", f"recipe:{tmp_path / 'r'}", "--device", "cpu"]
    cpu = torch.device("cpu")
    cfg = dataclass_from_args(SampleConfig, build_parser().parse_args(args + ["--w4a8-kernel", "progressive"]))
    two_level = build_denoiser(cfg, model, cpu)
    group = build_denoiser(dataclass_from_args(SampleConfig, build_parser().parse_args(args)), model, cpu)
    layers = engine_layers(two_level.model)
    assert len(layers) == 4 * model.config.depth and all(type(m) is Int4ProgressiveLinear for m in layers.values())
    assert all(type(m) is Int4Linear for m in engine_layers(group.model).values())
    x, t, y = random_inputs(model, 4, seed=7)
    with torch.no_grad():
        fp, sim = model(x, t, y), open_denoiser(f"sim:{tmp_path / 'r'}", model)(x, t, y)
        got, grp = two_level(x, t, y), group(x, t, y)
    assert torch.equal(grp, sim)
    assert not torch.equal(got, sim) and quant.sqnr_db(sim, got) > 25, quant.sqnr_db(sim, got)
    assert abs(quant.sqnr_db(fp, got) - quant.sqnr_db(fp, sim)) < 0.5  # as far from the FP model as the simulation
    out = tmp_path / "s"
    assert main(args + ["--w4a8-kernel", "progressive", "--steps", "2", "--classes", "1", "--per-class", "1",
                        "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "sample_config.json").read_text())["w4a8_kernel"] == "progressive"


@pytest.mark.parametrize("args,message", [
    (["--compile-mode", "max-autotune"], "--compile-mode max-autotune applies to a compiled model: add --compile"),
    (["--w4a8-kernel", "progressive"], "--w4a8-kernel progressive chooses the recipe engine's kernel"),
    (["--w4a8-kernel", "progressive", "--backend", "int8-recipe"], "no layer of"),
    (["--token-quant", "inductor"], "--token-quant inductor chooses the recipe engine's per-token quantizer"),
    (["--token-quant", "inductor", "--backend", "sim:r"], "it needs --backend recipe:DIR, not sim:r"),
])
def test_compile_mode_and_w4a8_kernel_refusals_exit_2_in_one_line(tmp_path, capsys, args, message):
    from dtq.runtime.zoo import load_builtin
    from dtq.tools.quick_recipe import minmax_recipe

    if "int8-recipe" in args:  # an INT8 recipe has no INT4-weight layer for the two-level kernel
        minmax_recipe(load_builtin("dit-tiny-fmnist"), "int8").save(tmp_path / "r")
        args = [f"recipe:{tmp_path / 'r'}" if a == "int8-recipe" else a for a in args]
    assert main(args + ["--device", "cpu", "--steps", "2", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flag", ["--compile-mode", "--w4a8-kernel", "--token-quant"])
def test_unknown_choice_exits_2_naming_the_choices(capsys, flag):
    with pytest.raises(SystemExit) as exc:
        main([flag, "bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err and "invalid choice: 'bogus'" in err, err


# -- --token-quant ----------------------------------------------------------------------------------------
def test_token_quant_parses_into_the_config_and_reaches_the_engine_layers(tmp_path):
    """--token-quant pass|inductor|pass-fused|gemm|epilogue: a SampleConfig field (default epilogue: fc1
    writing fc2's per-token codes, the measured fastest) that open_denoiser hands to build_qengine, so every
    engine layer of the recipe carries it."""
    import torch

    from dtq.runtime.pipeline import SampleConfig, build_denoiser
    from dtq.runtime.qengine import engine_layers
    from dtq.runtime.zoo import load_builtin
    from dtq.tools.cli import dataclass_from_args
    from dtq.tools.quick_recipe import minmax_recipe

    cfg = dataclass_from_args(SampleConfig, build_parser().parse_args(["--backend", "recipe:r", "--token-quant", "inductor"]))
    assert cfg == SampleConfig(backend="recipe:r", token_quant="inductor")
    assert SampleConfig().token_quant == "epilogue"
    model = load_builtin("dit-tiny-fmnist")
    minmax_recipe(model, "int8", balance=True, act_granularity="token").save(tmp_path / "r")
    for mode in ("pass", "inductor", "pass-fused", "epilogue"):
        den = build_denoiser(SampleConfig(backend=f"recipe:{tmp_path / 'r'}", token_quant=mode), model, torch.device("cpu"))
        layers = engine_layers(den.model).values()
        assert len(layers) == 4 * model.config.depth and {m.token_quant for m in layers} == {mode}
        assert {m.dynamic for m in layers} == {True}


def test_help_says_what_the_two_options_do(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "two-level integer group scales" in text and "static and per token activation scales" in text
    assert "max-autotune" in text and "epilogues" in text
