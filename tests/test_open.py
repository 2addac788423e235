"""One way to open a denoiser: the spec grammar (``runtime.denoiser_spec``) and ``open_denoiser``
on the tiny model with numbers (the recipe engine on the CPU is the simulation bit for bit, the
Q/DQ ONNX in ONNX Runtime is close to it); engine directories refused with clear messages."""

import importlib.util
from pathlib import Path

import pytest
import torch

from dtq.engines.engine_dir import EngineMeta, EngineMismatch, write_engine_dir
from dtq.runtime import quant
from dtq.runtime.denoiser import TorchDenoiser
from dtq.runtime.denoiser_spec import DenoiserSpec, parse_denoiser_spec
from dtq.runtime.open import open_denoiser, open_module
from dtq.runtime.recipe import RecipeError, apply_recipe, load_recipe
from dtq.runtime.zoo import load_builtin
from dtq.tools.quick_recipe import minmax_recipe, random_inputs

from conftest import fp_export_for

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


# -- the grammar ---------------------------------------------------------------------------------
@pytest.fixture
def artifacts(tmp_path):
    """Empty stand-ins: parsing only looks at names."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "recipe.json").write_text("{}")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "engine.plan").write_bytes(b"x")
    (tmp_path / "m.onnx").write_bytes(b"x")
    (tmp_path / "od").mkdir()
    (tmp_path / "od" / "model.onnx").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    return tmp_path


def test_explicit_forms(artifacts):
    d = artifacts
    assert parse_denoiser_spec("torch") == DenoiserSpec("torch")
    assert parse_denoiser_spec("torch:bf16") == DenoiserSpec("torch", dtype="bf16")
    assert parse_denoiser_spec(f"sim:{d / 'r'}") == DenoiserSpec("sim", d / "r")
    assert parse_denoiser_spec(f"recipe:{d / 'r'}") == DenoiserSpec("recipe", d / "r")
    assert parse_denoiser_spec(f"onnx:{d / 'm.onnx'}") == DenoiserSpec("onnx", d / "m.onnx")
    assert parse_denoiser_spec(f"onnx:{d / 'od'}") == DenoiserSpec("onnx", d / "od" / "model.onnx")
    assert parse_denoiser_spec(f"trt:{d / 'e'}") == DenoiserSpec("trt", d / "e")
    # explicit kinds are not looked up: opening says what is missing
    assert parse_denoiser_spec("recipe:nowhere") == DenoiserSpec("recipe", Path("nowhere"))
    for text in ("torch", "torch:fp16", f"sim:{d / 'r'}", f"trt:{d / 'e'}"):
        assert str(parse_denoiser_spec(text)) == text  # canonical form round-trips
    spec = DenoiserSpec("onnx", d / "m.onnx")
    assert parse_denoiser_spec(spec) is spec


def test_bare_paths_resolve_by_what_they_are(artifacts):
    d = artifacts
    assert parse_denoiser_spec(str(d / "m.onnx")) == DenoiserSpec("onnx", d / "m.onnx")
    assert parse_denoiser_spec(str(d / "od")) == DenoiserSpec("onnx", d / "od" / "model.onnx")
    assert parse_denoiser_spec(str(d / "e")) == DenoiserSpec("trt", d / "e")
    assert parse_denoiser_spec(str(d / "r")) == DenoiserSpec("recipe", d / "r")  # the engine, in every tool


@pytest.mark.parametrize("text,message", [
    ("torch:fp64", "torch:DTYPE with DTYPE one of fp32, fp16, bf16"),
    ("", "empty denoiser spec"),
    ("sim:", "needs a path"),
    ("{d}/missing", "no such file or directory"),
    ("{d}/empty", "without engine.plan, recipe.json or model.onnx"),
    ("{d}/notes.txt", "not an .onnx file"),
    ("engine:{d}/e", "no such file or directory"),  # not a kind: a path that does not exist
])
def test_bad_specs_name_the_accepted_forms(artifacts, text, message):
    with pytest.raises(ValueError, match=message) as exc:
        parse_denoiser_spec(text.format(d=artifacts))
    if not text.startswith("torch:"):
        assert "sim:DIR" in str(exc.value) and "trt:DIR" in str(exc.value)


# -- opening, with numbers -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return load_builtin("dit-tiny-fmnist")


@pytest.fixture(scope="module")
def recipe_dir(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("recipe") / "w8a8"
    minmax_recipe(tiny, "int8", group=32, balance=True).save(d)
    return d


def _out(den, inputs):
    with torch.no_grad():
        return den(*inputs)


def test_torch_sim_and_recipe(tiny, recipe_dir):
    inputs = random_inputs(tiny, 4, seed=2)
    fp = _out(TorchDenoiser(tiny), inputs)
    assert torch.equal(_out(open_denoiser("torch", tiny), inputs), fp)
    bf16 = _out(open_denoiser("torch:bf16", load_builtin("dit-tiny-fmnist")), inputs)
    assert 15 < quant.sqnr_db(fp, bf16) < 60  # bf16 rounding: close, not exact
    sim = _out(open_denoiser(f"sim:{recipe_dir}", tiny), inputs)
    eng = _out(open_denoiser(f"recipe:{recipe_dir}", tiny), inputs)
    bare = _out(open_denoiser(str(recipe_dir), tiny), inputs)
    # the engine's CPU path computes the simulation's operations from its stored codes
    assert torch.equal(sim, eng) and torch.equal(eng, bare)
    assert 20 < quant.sqnr_db(fp, sim) < 60  # INT8 noise: quantized, and not broken
    # open_module: the engine's layers are real engine layers, the simulation's QuantLinears
    from dtq.runtime.qengine import engine_layers
    from dtq.runtime.recipe import quant_layers

    assert len(engine_layers(open_module(f"recipe:{recipe_dir}", tiny))) == len(quant_layers(apply_recipe(
        tiny, minmax_recipe(tiny, "int8", group=32, balance=True)))) > 0
    assert len(engine_layers(open_module(f"sim:{recipe_dir}", tiny))) == 0


def test_autocast_keeps_fp32_weights_for_torch_sim_and_the_engine(tiny, recipe_dir):
    """--autocast (the reference protocol: fp32 weights and residual stream, bf16 matmuls) for every
    PyTorch backend, also with CUDA graphs asked for: the engine under autocast computes what the
    simulation under autocast computes, and autocast really changes the numbers."""
    inputs = random_inputs(tiny, 4, seed=3)
    bf = dict(dtype="bf16", autocast=True)
    sim_amp = _out(open_denoiser(f"sim:{recipe_dir}", tiny, **bf), inputs)
    eng_amp = _out(open_denoiser(f"recipe:{recipe_dir}", tiny, cuda_graphs=True, **bf), inputs)
    sim_fp32 = _out(open_denoiser(f"sim:{recipe_dir}", tiny), inputs)
    assert torch.equal(sim_amp, eng_amp)
    assert 20 < quant.sqnr_db(sim_fp32, sim_amp) < 80  # bf16 matmuls: close to fp32, not equal
    assert next(tiny.parameters()).dtype == torch.float32
    fp_amp = _out(open_denoiser("torch", tiny, cuda_graphs=True, **bf), inputs)
    assert torch.equal(fp_amp, _out(TorchDenoiser(tiny, dtype=torch.bfloat16, autocast=True), inputs))


def test_onnx_is_close_to_the_simulation(tiny, recipe_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from dtq.export.api import ExportConfig, export_model

    cfg = ExportConfig(out=str(tmp_path / "w8.onnx"), model="dit-tiny-fmnist", precision="int8", dtype="fp32",
                       recipe=str(recipe_dir))
    path = export_model(cfg, model=tiny, fp_proto=fp_export_for(tiny, cfg, load_recipe(recipe_dir, tiny))).path
    inputs = random_inputs(tiny, 4, seed=2)
    sim = _out(open_denoiser(f"sim:{recipe_dir}", tiny), inputs)
    fp = _out(open_denoiser("torch", tiny), inputs)
    got_bare = _out(open_denoiser(str(path), tiny, threads=1), inputs)
    got = _out(open_denoiser(f"onnx:{path}", tiny, threads=1), inputs)
    assert torch.equal(got, got_bare)
    # same codes and folds; ORT's summation order flips a few roundings (test_backends: >= 35 dB)
    assert quant.sqnr_db(sim, got) > 35, quant.sqnr_db(sim, got)
    assert quant.sqnr_db(sim, got) > quant.sqnr_db(fp, got) + 2  # nearer the simulation than FP
    with pytest.raises(ValueError, match="compile does not apply to the onnx backend"):
        open_denoiser(f"onnx:{path}", tiny, compile=True)
    from dtq.runtime.model import DiT

    other = DiT(tiny.config.replace(depth=2)).randomize_(seed=1)
    with pytest.raises(ValueError, match="exported from another DiT config"):
        open_denoiser(str(path), other)


def test_recipe_of_another_checkpoint_is_refused(tiny, recipe_dir):
    other = load_builtin("dit-tiny-fmnist")
    with torch.no_grad():
        other.final_layer.linear.bias.add_(0.01)
    for kind in ("sim", "recipe"):
        with pytest.raises(RecipeError, match="calibrated for a different checkpoint"):
            open_denoiser(f"{kind}:{recipe_dir}", other)


def test_truncated_onnx_is_bad_input(tiny, tmp_path):
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(b"\x08\x07\x12\x03abc\x1a")
    with pytest.raises(ValueError, match="is not a valid ONNX model"):
        open_denoiser(str(bad), tiny)


# -- engine directories (no GPU needed: faked engine.json) ---------------------------------------
def _engine(tmp_path, **kw) -> Path:
    base = dict(backend="tensorrt-rtx", trt_version="1.7.1.116", precision="int8",
                target={"gpu_name": None, "compute_capabilities": ["8.9"]},
                inputs={"x": {"min": [1, 1, 32, 32], "opt": [8, 1, 32, 32], "max": [16, 1, 32, 32]}})
    return write_engine_dir(tmp_path / "eng", b"not-a-plan", EngineMeta(**{**base, **kw}))


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here: the missing-package path cannot be seen")
def test_engine_without_its_package_exits_2_naming_the_install(tmp_path, capsys):
    from dtq.tools.sample import main as sample_main

    d = _engine(tmp_path, backend="tensorrt", trt_version="10.13.0.35")
    out = tmp_path / "s"
    assert sample_main(["--backend", f"trt:{d}", "--steps", "2", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "pip install 'tensorrt>=10'" in err and "\n" not in err, err
    assert not out.exists()
    assert sample_main(["--backend", str(d), "--steps", "2", "--no-progress",
                        "--out", str(out)]) == 2  # a bare engine directory is the same backend
    assert "pip install 'tensorrt>=10'" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_RTX, reason="needs the tensorrt_rtx package (the runtime whose version is compared)")
def test_engine_for_another_version_or_gpu_is_refused(tmp_path, capsys):
    from dtq.runtime.backends import open_engine_dir
    from dtq.tools import compare
    from dtq.tools.sample import main as sample_main

    old = _engine(tmp_path, trt_version="1.0.0.1")
    with pytest.raises(EngineMismatch, match="built with tensorrt-rtx 1.0.0.1, the installed version is"):
        open_denoiser(f"trt:{old}", load_builtin("dit-tiny-fmnist"), device="cuda")
    if not torch.cuda.is_available():  # dtq-sample: no CUDA device is the first thing it says
        assert sample_main(["--backend", f"trt:{old}", "--steps", "2", "--no-progress",
                            "--out", str(tmp_path / "s")]) == 2
        assert "run on a CUDA device, not cpu" in capsys.readouterr().err
        assert not (tmp_path / "s").exists()
    # dtq-compare's engine runner goes through the same check, before it samples anything
    assert compare.main(["--candidate", f"trt:{old}", "--steps", "2", "--out", str(tmp_path / "c")]) == 2
    assert "the installed version is" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    import tensorrt_rtx

    here = _engine(tmp_path, trt_version=tensorrt_rtx.__version__)
    with pytest.raises(EngineMismatch, match=r"targets compute capability 8.9, this GPU \(NVIDIA H200\) is 9.0"):
        open_engine_dir(here, "cuda", gpu=("NVIDIA H200", "9.0"))
    meta, backend = open_engine_dir(here, "cuda", gpu=("NVIDIA GeForce RTX 4090", "8.9"))  # accepted
    assert backend.name == "tensorrt-rtx" and meta.precision == "int8"
    with pytest.raises(ValueError, match="run on a CUDA device, not cpu"):
        open_engine_dir(here, "cpu")


def test_compile_mode_and_w4a8_kernel_are_refused_where_they_do_not_apply(tiny, recipe_dir):
    """The API refuses what dtq-sample's config refuses: a compile mode without compile, the two-level
    W4A8 kernel for anything but a recipe engine (here: the simulation, and an INT8 recipe, which has
    no layer for it), and unknown values."""
    for kwargs, message in ((dict(compile_mode="max-autotune"), "add compile"),
                            (dict(compile_mode="reduce-overhead", compile=True), "compile mode must be one of"),
                            (dict(w4a8_kernel="bogus"), "w4a8 kernel must be one of"),
                            (dict(token_quant="fused"), "token_quant must be one of pass, inductor"),
                            (dict(token_quant="inductor"), "token_quant=inductor does not apply to the torch backend")):
        with pytest.raises(ValueError, match=message):
            open_denoiser("torch", tiny, **kwargs)
    with pytest.raises(ValueError, match="w4a8_kernel=progressive does not apply to the sim backend"):
        open_denoiser(f"sim:{recipe_dir}", tiny, w4a8_kernel="progressive")
    with pytest.raises(ValueError, match="no layer of .* takes it"):
        open_denoiser(f"recipe:{recipe_dir}", tiny, w4a8_kernel="progressive")
