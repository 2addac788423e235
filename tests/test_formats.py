"""The precision table (dtq.formats) end to end: every precision x granularity that ``CalibConfig``
accepts calibrates, exports, passes the TensorRT rule check, runs in ONNX Runtime as the
simulation does, and builds with TensorRT-RTX (w4a8: refused up front by dtq-build-engine with the
table's note, and its documented fallback w4a16 builds); every combination it refuses names the
valid choices; a mixed recipe goes through simulation, export, ORT and the quantized engine."""

import json
import typing

import onnxruntime as ort
import pytest
import torch

from dtq import artifacts, formats
from dtq.calibrate.api import calibrate, statistics
from dtq.calibrate.config import CalibConfig, CalibDataConfig, PrecisionName, WeightGranularity
from dtq.calibrate.data import collect_calibration_set
from dtq.export import rules
from dtq.export.api import ExportConfig, ExportUsageError, build_graph, export_model
from dtq.export.onnx_export import export_torch
from dtq.runtime.model import DiT, DiTConfig
from dtq.runtime.qengine import ENGINE_LAYERS, build_qengine, engine_layers
from dtq.runtime.quant import sqnr_db
from dtq.runtime.recipe import apply_recipe

from conftest import dit_inputs, module_threads

_threads = module_threads(2)

PRECISIONS = typing.get_args(PrecisionName)
GRANULARITIES = typing.get_args(WeightGranularity)
COMBOS = [(p, g) for p in PRECISIONS for g in GRANULARITIES]
ACCEPTED = [(p, g) for p, g in COMBOS if g in formats.PRECISIONS[p].granularities]
REFUSED = [(p, g) for p, g in COMBOS if (p, g) not in ACCEPTED]


def test_table_is_the_one_source():
    """CalibConfig's choices, the engine layers and the quick recipes are the table's."""
    from dtq.tools.quick_recipe import FORMATS

    assert PRECISIONS == formats.QUANTIZED_PRECISIONS
    assert set(GRANULARITIES) == set(formats.GRANULARITIES)
    assert set(ENGINE_LAYERS) == set(formats.QUANTIZED_PRECISIONS) == set(FORMATS)
    assert typing.get_args(typing.get_type_hints(ExportConfig)["precision"].__args__[0]) == tuple(formats.PRECISIONS)
    for p in formats.QUANTIZED_PRECISIONS:
        pr = formats.PRECISIONS[p]
        assert formats.precision_of(pr.weight_format, pr.act_format) == p
    assert formats.precision_of("none", "none") == "fp16"


def test_pair_without_precision_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"no precision has int8 weights with fp8_e4m3 activations; valid: int8 .*w4a8"):
        formats.precision_of("int8", "fp8_e4m3")


@pytest.mark.parametrize("precision,granularity", REFUSED)
def test_refused_combinations_name_the_choices(precision, granularity):
    allowed = formats.PRECISIONS[precision].granularities
    with pytest.raises(ValueError, match=f"precision {precision} takes weight granularity {', '.join(allowed)}"):
        CalibConfig(precision=precision, weight_granularity=granularity)


@pytest.mark.parametrize("kwargs,match", [
    (dict(precision="fp16"), "precision must be one of int8, fp8, w8a16, w4a16, w4a8"),
    (dict(overrides=["blocks.0.*"]), "expected PATTERN=PRECISION"),
    (dict(overrides=["*.fc2=int3"]), "unknown precision 'int3'; choices: fp16, int8, fp8, w8a16, w4a16, w4a8"),
    (dict(overrides=["*.fc2=w4a16:channel"]), "precision w4a16 takes weight granularity group128 / group64 / group32"),
])
def test_refused_configs_name_the_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CalibConfig(**kwargs)


# -- the pipeline on a one-block DiT (C_in 128 / 512: every group size divides) ----------------------------
@pytest.fixture(scope="module")
def dit():
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=1, num_heads=4,
                    num_classes=5, space="pixel")
    torch.manual_seed(0)
    return DiT(cfg).randomize_(seed=1, std=0.1).eval()


@pytest.fixture(scope="module")
def stats(dit):
    data = collect_calibration_set(dit, CalibDataConfig(cali_n=2, cali_steps=2, steps=4), progress=False)
    return statistics(dit, data, CalibConfig(progress=False))


OPSET = 21  # every precision is valid at 21: one FP export per dtype serves all (torch's export is the slow part)


@pytest.fixture(scope="module")
def fp_exports(dit):
    """One FP export per dtype: the Q/DQ graphs are built on copies."""
    cache = {}

    def get(dtype):
        if dtype not in cache:
            cache[dtype] = export_torch(dit, dtype=torch.float32 if dtype == "fp32" else torch.float16,
                                        opset=OPSET, max_batch=4)
        return cache[dtype]

    return get


def _graph(dit, recipe, fp_exports, dtype):
    cfg = ExportConfig(out="x.onnx", model="m", dtype=dtype, max_batch=4, opset=OPSET).resolved(recipe)
    return build_graph(dit, cfg, recipe, fp_exports(dtype))


def _ort(proto, x, t, y):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # as test_export_qdq explains
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0])


# graph vs simulation: weight-only graphs have no activation rounding ties, so they agree to fp32 level
MIN_DB = {"int8": 30.0, "fp8": 30.0, "w8a16": 90.0, "w4a16": 90.0, "w4a8": 30.0}


def _check_graph_is_simulation(dit, recipe, proto, precision):
    sim = apply_recipe(dit, recipe)
    x, t, y = dit_inputs(dit, 4, seed=5)
    with torch.no_grad():
        ref, fp = sim(x, t, y), dit(x, t, y)
    out = _ort(proto, x, t, y)
    s, s_fp = sqnr_db(ref, out), sqnr_db(fp, ref)
    assert s >= MIN_DB[precision], f"{precision}: graph vs simulation {s:.1f} dB"
    assert s > s_fp + 5, f"{precision}: graph vs simulation {s:.1f} dB, simulation vs FP {s_fp:.1f} dB"


@pytest.mark.parametrize("precision,granularity", ACCEPTED)
def test_accepted_combination_calibrates_exports_and_matches(dit, stats, fp_exports, precision, granularity):
    recipe = calibrate(dit, stats, CalibConfig(precision=precision, weight_granularity=granularity, progress=False))
    assert recipe.precision == precision and set(recipe.layer_precisions.values()) == {precision}
    assert recipe.options["weight_granularity"] == granularity
    cfg = ExportConfig(out="x.onnx", model="m").resolved(recipe)  # precision and opset from the recipe
    assert cfg.precision == precision and cfg.opset == max(18, formats.PRECISIONS[precision].min_opset)
    proto = _graph(dit, recipe, fp_exports, "fp32")
    report = rules.check_model(proto)
    assert report.ok, report.format()
    assert report.checked_nodes == 4 * (1 if formats.PRECISIONS[precision].weight_only else 3)
    _check_graph_is_simulation(dit, recipe, proto, precision)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_precision_builds_with_tensorrt_rtx_or_is_refused_up_front(dit, stats, fp_exports, precision, tmp_path):
    """The fp16 graph of each precision builds; one TensorRT refuses (w4a8) is stopped by
    dtq-build-engine's validation with the table's note, and its documented fallback builds."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx not importable: pip install tensorrt-rtx==1.7.1.116")
    from dtq.engines.build import BuildConfig, BuildUsageError, validate
    from dtq.engines.trt_rtx import build_rtx_engine

    recipe = calibrate(dit, stats, CalibConfig(precision=precision, progress=False))
    res = export_model(ExportConfig(out=str(tmp_path / f"{precision}.onnx"), model="m", max_batch=4, opset=OPSET),
                       model=dit, recipe=recipe, fp_proto=fp_exports("fp16"))
    meta = artifacts.read_onnx_metadata(res.path)
    assert meta[artifacts.META_PRECISION] == precision
    assert set(json.loads(meta[artifacts.META_LAYER_PRECISIONS]).values()) == {precision}
    pr = formats.PRECISIONS[precision]
    if pr.tensorrt == formats.TRT_REFUSED:
        assert res.notes and pr.tensorrt_fallback in res.notes[0]  # dtq-export says so
        with pytest.raises(BuildUsageError, match=f"--precision {pr.tensorrt_fallback}"):
            validate(BuildConfig(onnx=res.path, out=tmp_path / "engine"))
        res = export_model(ExportConfig(out=str(tmp_path / "fallback.onnx"), model="m", max_batch=4,
                                        opset=OPSET, precision=pr.tensorrt_fallback), model=dit, recipe=recipe,
                           fp_proto=fp_exports("fp16"))
        assert res.report.checked_nodes == 4  # weight DQ only: the activation Q/DQ is dropped
        assert res.metadata[artifacts.META_PRECISION] == pr.tensorrt_fallback
    else:
        assert not res.notes
    validate(BuildConfig(onnx=res.path, out=tmp_path / "engine"))
    result = build_rtx_engine(res.path, min_batch=1, opt_batch=2, max_batch=4)
    assert result.parsed and result.built, result.errors
    assert len(result.plan) > 100_000


# -- mixed recipes -------------------------------------------------------------------------------------------
MIXED = CalibConfig(precision="w4a16", weight_granularity="group64", progress=False,
                    overrides=["*.attn.qkv=int8", "blocks.0.mlp.fc1=fp16", "*.fc2=w8a16:tensor"])


def test_mixed_recipe_per_layer(dit, stats, fp_exports):
    recipe = calibrate(dit, stats, MIXED)
    assert recipe.precision == "w4a16" and recipe.mixed
    assert recipe.layer_precisions == {"blocks.0.attn.qkv": "int8", "blocks.0.attn.proj": "w4a16",
                                       "blocks.0.mlp.fc2": "w8a16"}  # fc1 left unquantized
    layers = recipe.layers
    assert (layers["blocks.0.attn.qkv"].weight_granularity, layers["blocks.0.attn.proj"].weight_group_size,
            layers["blocks.0.mlp.fc2"].weight_granularity) == ("channel", 64, "tensor")
    assert recipe.options["kept"] == ["blocks.0.mlp.fc1"]
    assert ExportConfig(out="x.onnx", model="m").resolved(recipe).opset == 21  # max of int8 19, w8a16 19, w4a16 21
    proto = _graph(dit, recipe, fp_exports, "fp32")
    report = rules.check_model(proto)
    assert report.ok and report.checked_nodes == 3 + 1 + 1, report.format()
    qtypes = {n.name.split("/")[0]: n.op_type for n in proto.graph.node if n.op_type == "QuantizeLinear"}
    assert qtypes == {"blocks.0.attn.qkv": "QuantizeLinear"}  # only the W8A8 layer quantizes its input
    # ORT vs simulation: the one activation quantizer allows rounding ties, so the W8A8 bar
    _check_graph_is_simulation(dit, recipe, proto, "int8")
    # the quantized PyTorch engine picks each layer's engine layer and is the simulation on the CPU
    eng = build_qengine(dit, recipe)
    kinds = {n: type(m).__name__ for n, m in engine_layers(eng).items()}
    assert kinds == {"blocks.0.attn.qkv": "Int8Linear", "blocks.0.attn.proj": "Int4Linear",
                     "blocks.0.mlp.fc2": "Int8WeightOnlyLinear"}
    x, t, y = dit_inputs(dit, 3, seed=7)
    with torch.no_grad():
        assert torch.equal(apply_recipe(dit, recipe)(x, t, y), eng(x, t, y))


def test_override_matching_nothing_is_refused(dit, stats):
    with pytest.raises(ValueError, match=r"'blocks\.7\.\*' matches no quantizable layer"):
        calibrate(dit, stats, CalibConfig(overrides=["blocks.7.*=fp16"], progress=False))


def test_export_precision_must_match_the_recipe(dit, stats, tmp_path):
    recipe = calibrate(dit, stats, CalibConfig(precision="w8a16", progress=False))
    with pytest.raises(ExportUsageError, match="the recipe is precision w8a16.*--precision int8"):
        export_model(ExportConfig(out=str(tmp_path / "x.onnx"), model="m", precision="int8"), model=dit, recipe=recipe)
    assert not (tmp_path / "x.onnx").exists()


def test_export_cli_precision_mismatch_exits_2(dit, stats, tmp_path, capsys, monkeypatch):
    from dtq.export import cli as export_cli

    recipe = calibrate(dit, stats, CalibConfig(precision="int8", progress=False))
    rdir = recipe.save(tmp_path / "r")
    assert json.loads((rdir / artifacts.RECIPE_JSON).read_text())["precision"] == "int8"
    monkeypatch.setattr("dtq.runtime.zoo.load_builtin", lambda name, dtype=None: dit)
    out = tmp_path / "x.onnx"
    assert export_cli.main(["--model", "m", "--recipe", str(rdir), "--precision", "fp8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the recipe is precision int8" in err and "Traceback" not in err and not out.exists()
    assert export_cli.main(["--model", "m", "--precision", "w4a16", "--out", str(out)]) == 2
    assert "precision w4a16 needs a recipe" in capsys.readouterr().err


def test_graph_check_fails_a_wrong_graph(dit, stats, fp_exports):
    """The ORT-vs-simulation check has teeth: one layer's weight scale 1% off fails it."""
    recipe = calibrate(dit, stats, CalibConfig(precision="w8a16", progress=False))
    proto = _graph(dit, recipe, fp_exports, "fp32")
    key = recipe.layers["blocks.0.attn.proj"].weight_scale
    recipe.tensors[key] = recipe.tensors[key] * 1.01
    with pytest.raises(AssertionError, match="graph vs simulation"):
        _check_graph_is_simulation(dit, recipe, proto, "w8a16")


def test_artifacts_helpers(tmp_path):
    import hashlib

    import onnx

    f = tmp_path / "blob"
    f.write_bytes(b"x" * 3_000_000)  # more than one read chunk
    assert artifacts.file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    model = onnx.ModelProto()
    for k, v in {"dtq.precision": "int8", "other": "1", "dtq.opset": "19"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    assert artifacts.read_onnx_metadata(model) == {"precision": "int8", "opset": "19"}
    onnx.save(model, str(tmp_path / "m.onnx"))
    assert artifacts.read_onnx_metadata(tmp_path / "m.onnx") == {"precision": "int8", "opset": "19"}
    assert artifacts.metadata_json({"layer_precisions": '{"a": "w8a16"}'}, artifacts.META_LAYER_PRECISIONS) == {"a": "w8a16"}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / artifacts.RECIPE_JSON).write_text("{}")
    assert artifacts.is_recipe_dir(tmp_path / "r") and not artifacts.is_engine_dir(tmp_path / "r")


def test_table_modules_import_without_torch():
    """engines/ and the CLIs import them: no torch, numpy or onnx at import time."""
    import subprocess
    import sys

    code = ("import sys\nfor m in ('torch', 'numpy', 'onnx'):\n    sys.modules[m] = None\n"
            "import dtq.formats, dtq.artifacts\nprint(len(dtq.formats.PRECISIONS))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "7", out.stderr
