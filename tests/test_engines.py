"""dtq-build-engine: real TensorRT-RTX engines from the tiny model's exports (fp16, int8, fp8, w4a16),
engine.json, atomic writes, timing cache; the TensorRT path's errors without TensorRT; engine.json
compatibility checks against a GPU and TensorRT version (hand-written engine.json)."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from dtq.engines.build import BuildConfig, BuildUsageError, build_engine, inspect_onnx
from dtq.engines.engine_dir import (META, PLAN, EngineDirError, EngineMismatch, EngineMeta, check_compatible,
                                    read_meta, write_engine_dir)
from dtq.engines.trt import TensorRTUnavailable, load_backend
from dtq.tools.build_engine import main as build_main

try:
    import tensorrt_rtx  # noqa: F401

    HAVE_RTX = True
except ImportError:
    HAVE_RTX = False
needs_rtx = pytest.mark.skipif(not HAVE_RTX, reason="tensorrt_rtx is not importable (pip install tensorrt-rtx==1.7.1.116)")

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False

PRECISIONS = ("fp16", "int8", "fp8", "w4a16")


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """The built-in tiny DiT exported at each precision (recipes: min-max, balancing folded); the FP
    export under each graph is made once per dtype and opset (conftest.fp_export: int8 and fp8 share
    theirs, w4a16 shares test_export_qdq's)."""
    api = pytest.importorskip("dtq.export.api", reason="Q/DQ export (dtq.export.api) is not on this branch yet")
    from dtq.runtime.zoo import load_builtin
    from dtq.tools.quick_recipe import minmax_recipe

    from conftest import fp_export

    model = load_builtin("dit-tiny-fmnist")
    d = tmp_path_factory.mktemp("exports")
    paths = {}
    for prec in PRECISIONS:
        recipe = None if prec == "fp16" else minmax_recipe(model, prec, group=32, balance=True)
        # opset 21 for all four: the FP export under them is then test_export_qdq's / test_export_trt's (fp16,
        # 21); fp16's own minimum, 18, would be one more of torch's slow exports for this file alone
        cfg = api.ExportConfig(out=str(d / f"tiny-{prec}.onnx"), model="dit-tiny-fmnist", precision=prec,
                               min_batch=1, max_batch=8, opset=21)
        r = cfg.resolved(recipe)  # the dtype and opset export_model exports at
        fp = fp_export(model, dtype=api.DTYPES[r.dtype], opset=r.opset, min_batch=1, max_batch=8)
        paths[prec] = api.export_model(cfg, model=model, recipe=recipe, fp_proto=fp).path
    return paths


@needs_rtx
@pytest.mark.parametrize("precision", PRECISIONS)
def test_rtx_builds_every_precision(tiny_exports, tmp_path, precision):
    onnx_path = tiny_exports[precision]
    out = tmp_path / f"engine-{precision}"
    report = build_engine(BuildConfig(onnx=onnx_path, out=out, backend="tensorrt-rtx", max_batch=4, opt_batch=2,
                                      opt_level=0), log=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == [META, PLAN]
    plan = (out / PLAN).read_bytes()
    assert len(plan) > 100_000 and report.plan_bytes == len(plan)
    meta = read_meta(out)
    assert meta.backend == "tensorrt-rtx" and meta.trt_version == "1.7.1.116"
    assert meta.precision == precision
    assert meta.target["compute_capabilities"] == ["8.9"]
    assert meta.inputs["x"] == {"min": [1, 1, 32, 32], "opt": [2, 1, 32, 32], "max": [4, 1, 32, 32], "dtype": "FLOAT"}
    assert meta.inputs["t"]["max"] == [4] and meta.inputs["t"]["dtype"] == "INT64"
    assert meta.outputs["out"]["shape"][1:] == [2, 32, 32]
    assert meta.onnx["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert meta.plan_sha256 == hashlib.sha256(plan).hexdigest()
    assert meta.batch_range == (1, 4)
    assert meta.onnx["metadata"]["precision"] == precision


@needs_rtx
def test_rtx_cli_targets_and_atomic_rebuild(tiny_exports, tmp_path, capsys):
    cache = tmp_path / "cache" / "trt.cache"
    args = [str(tiny_exports["int8"]), "--out", str(tmp_path / "e"), "--backend", "tensorrt-rtx", "--max-batch", "2",
            "--opt-level", "0", "--timing-cache", str(cache), "--compute-capability", "SM86,SM89"]
    assert build_main(args) == 0
    log = capsys.readouterr().out
    assert "building" in log and "targets SM86,SM89" in log and "wrote" in log
    # TensorRT-RTX's timing cache calls are no-ops (deprecated since RTX 1.2): said, not faked
    assert "timing cache" in log and "ignored" in log and not cache.exists()
    assert read_meta(tmp_path / "e").target["compute_capabilities"] == ["8.6", "8.9"]
    first = (tmp_path / "e" / PLAN).stat().st_ino
    assert build_main(args) == 0  # rebuild replaces the directory atomically
    capsys.readouterr()
    assert (tmp_path / "e" / PLAN).stat().st_ino != first
    assert not list(tmp_path.glob(".e.*"))  # no temporary directories left behind


def test_bad_inputs_are_reported_before_tensorrt(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    for backend in ("tensorrt", "tensorrt-rtx", "auto"):
        assert build_main([str(bad), "--out", str(tmp_path / "o"), "--backend", backend]) == 2
        assert "not a valid ONNX model" in capsys.readouterr().err
    assert build_main([str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "o")]) == 2
    assert "no such ONNX file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    """A small fp32 export (no Q/DQ: needs only the committed exporter)."""
    from dtq.export.onnx_export import export_torch
    from dtq.export.writer import write_model
    from dtq.runtime.model import DiT, DiTConfig

    torch.manual_seed(0)
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=1, num_heads=2,
                          num_classes=3, space="pixel")).randomize_(seed=2, std=0.1).eval()
    path = tmp_path_factory.mktemp("fp32") / "small.onnx"
    write_model(export_torch(model, opset=18, min_batch=1, max_batch=8), path,
                metadata={"precision": "fp32", "batch_range": [1, 8], "model_config": model.config.to_dict()})
    return model, path


def test_batch_range_and_out_dir_checks(fp32_onnx, tmp_path):
    _, path = fp32_onnx
    facts = inspect_onnx(path)
    assert facts.inputs["x"][0] == [-1, 2, 8, 8] and facts.metadata["precision"] == "fp32"
    with pytest.raises(BuildUsageError, match="outside the ONNX's exported range 1..8"):
        build_engine(BuildConfig(onnx=path, out=tmp_path / "e", max_batch=16), log=lambda s: None)
    with pytest.raises(BuildUsageError, match="min_batch <= opt_batch <= max_batch"):
        build_engine(BuildConfig(onnx=path, out=tmp_path / "e", min_batch=4, max_batch=2), log=lambda s: None)
    (tmp_path / "notengine").mkdir()
    (tmp_path / "notengine" / "precious.txt").write_text("keep")
    with pytest.raises(BuildUsageError, match="not an engine directory"):
        build_engine(BuildConfig(onnx=path, out=tmp_path / "notengine"), log=lambda s: None)
    assert (tmp_path / "notengine" / "precious.txt").read_text() == "keep"


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here; its absence cannot be tested")
def test_tensorrt_path_without_tensorrt(fp32_onnx, tmp_path, capsys):
    _, path = fp32_onnx
    with pytest.raises(TensorRTUnavailable, match=r"pip install 'tensorrt>=10'"):
        load_backend("tensorrt")
    assert build_main([str(path), "--out", str(tmp_path / "e"), "--backend", "tensorrt"]) == 2
    err = capsys.readouterr().err
    assert "tensorrt is not installed" in err and "pip install 'tensorrt>=10'" in err
    assert not (tmp_path / "e").exists()


def test_neither_flavour_installed(fp32_onnx, tmp_path):
    with pytest.raises(TensorRTUnavailable) as exc:
        load_backend("auto", modules={"tensorrt": "dtq_no_such_trt", "tensorrt-rtx": "dtq_no_such_trt_rtx"})
    assert "tensorrt-rtx==1.7.1.116" in str(exc.value) and "tensorrt>=10" in str(exc.value)
    # the CLI in a process where neither module can be imported: exit 2, both packages named
    _, path = fp32_onnx
    code = ("import sys; sys.modules['tensorrt'] = None; sys.modules['tensorrt_rtx'] = None\n"
            "from dtq.tools.build_engine import main\n"
            f"sys.exit(main([{str(path)!r}, '--out', {str(tmp_path / 'e')!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "pip install tensorrt-rtx==1.7.1.116" in out.stderr and "pip install 'tensorrt>=10'" in out.stderr
    assert not (tmp_path / "e").exists()


def _meta(**kw) -> EngineMeta:
    base = dict(backend="tensorrt", trt_version="10.13.0.35", precision="int8",
                target={"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capabilities": ["9.0"]},
                inputs={"x": {"min": [1, 4, 32, 32], "opt": [64, 4, 32, 32], "max": [128, 4, 32, 32]}})
    return EngineMeta(**{**base, **kw})


def test_engine_json_compatibility(tmp_path):
    d = write_engine_dir(tmp_path / "eng", b"plan-bytes", _meta())
    meta = read_meta(d)
    assert meta.batch_range == (1, 128)
    here = dict(backend="tensorrt", trt_version="10.13.0.35", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0")
    check_compatible(meta, **here)  # same GPU and version: accepted
    with pytest.raises(EngineMismatch, match="installed version is 10.14"):
        check_compatible(meta, **{**here, "trt_version": "10.14.1.48"})
    with pytest.raises(EngineMismatch, match="compute capability 9.0, this GPU .* is 8.9"):
        check_compatible(meta, **{**here, "gpu_name": "NVIDIA L40S", "compute_capability": "8.9"})
    with pytest.raises(EngineMismatch, match="built on NVIDIA H100 80GB HBM3, this GPU is NVIDIA H200"):
        check_compatible(meta, **{**here, "gpu_name": "NVIDIA H200"})
    check_compatible(meta, **{**here, "gpu_name": "NVIDIA H200"}, strict_gpu_name=False)
    with pytest.raises(EngineMismatch, match="built with tensorrt, this runtime is tensorrt-rtx"):
        check_compatible(meta, **{**here, "backend": "tensorrt-rtx"})
    with pytest.raises(EngineMismatch, match="no CUDA GPU"):
        check_compatible(meta, **{**here, "compute_capability": None})
    # RTX engines: any GPU with a targeted compute capability
    rtx = _meta(backend="tensorrt-rtx", trt_version="1.7.1.116", target={"gpu_name": None, "compute_capabilities": ["8.9", "12.0"]})
    check_compatible(rtx, backend="tensorrt-rtx", trt_version="1.7.1.116", gpu_name="NVIDIA GeForce RTX 5090",
                     compute_capability="12.0")
    with pytest.raises(EngineMismatch, match="targets compute capability 8.9, 12.0"):
        check_compatible(rtx, backend="tensorrt-rtx", trt_version="1.7.1.116", gpu_name="NVIDIA H200",
                         compute_capability="9.0")


def test_engine_json_must_be_valid(tmp_path):
    with pytest.raises(EngineDirError, match="not an engine directory"):
        read_meta(tmp_path)
    (tmp_path / META).write_text("{broken")
    with pytest.raises(EngineDirError, match="invalid JSON"):
        read_meta(tmp_path)
    (tmp_path / META).write_text(json.dumps({**_meta().to_json(), "schema_version": 99}))
    with pytest.raises(EngineDirError, match="schema version 99"):
        read_meta(tmp_path)


def test_loading_an_engine_on_this_machine_is_refused_clearly(tmp_path, capsys):
    """No GPU here: the TensorRT backend refuses before touching the plan; dtq-sample exits 2."""
    from dtq.runtime.backends import TensorRTDenoiser
    from dtq.tools.sample import main as sample_main

    rtx = _meta(backend="tensorrt-rtx", trt_version="1.7.1.116", target={"gpu_name": None, "compute_capabilities": ["8.9"]})
    d = write_engine_dir(tmp_path / "eng", b"x", rtx)
    if not torch.cuda.is_available():
        with pytest.raises((ValueError, TensorRTUnavailable), match="CUDA GPU|not installed"):
            TensorRTDenoiser(d, device="cuda")
        assert sample_main(["--backend", f"trt:{d}", "--steps", "2", "--out", str(tmp_path / "s"), "--no-progress",
                            "--device", "cpu"]) == 2
        assert "error:" in capsys.readouterr().err
    assert sample_main(["--backend", f"trt:{tmp_path / 'nothing'}", "--steps", "2", "--out", str(tmp_path / "s2"),
                        "--no-progress"]) == 2
    assert "not an engine directory" in capsys.readouterr().err
