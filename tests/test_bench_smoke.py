"""The GPU benchmark script runs end to end on the CPU (--smoke: tiny model, reference layers):
its JSON has the fields the results table and the targets are read from."""

import json

import pytest

from dtq.runtime.qengine import FUSED_FAMILIES
from dtq.tools.bench_engines import main
from conftest import run_in_triton_interpreter


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--smoke", "--out", str(out), "--skip", "correctness", "--batches", "1", "--steps", "1",
                 "--repeats", "1", "--backends", "bf16-eager,int8,w4a16,w4a8-progressive"]) == 0
    res = json.loads(out.read_text())
    assert {"date", "torch", "commit"} <= set(res["env"])
    backends = res["end_to_end"]["backends"]
    assert set(backends) == {"bf16-eager", "int8", "w4a16", "w4a8-progressive"}
    for name, entry in backends.items():
        assert "error" not in entry, entry.get("trace")
        assert entry["batches"]["1"]["images_per_s"] > 0
    assert backends["int8"]["quantized_layer_weights_vs_bf16"] < 0.55  # int8 codes + scales
    assert backends["w4a16"]["quantized_layer_weights_vs_bf16"] < 0.3
    assert backends["w4a8-progressive"]["quantized_layer_weights_vs_bf16"] < 0.3  # 4-bit codes + int8 s2
    targets = res["summary"]["targets"]
    assert {"w4a16_weight_memory_vs_bf16", "int8_speedup_at_64", "w4a8-progressive_speedup_at_64",
            "w4a16_speedup_at_1", "w4a16_speedup_at_8"} <= set(targets)
    assert main(["--smoke", "--out", str(out), "--correctness", "w4a9", "--skip", "e2e"]) == 2
    assert "| w4a16 |" in capsys.readouterr().out


def test_bench_opens_artifacts_through_open_denoiser(tmp_path, capsys):
    """--backends takes denoiser specs (made for --model's random weights): opened by
    runtime.open.open_denoiser with its checks; a recipe of other weights is a recorded failure."""
    import torch

    from dtq.tools import bench_engines
    from dtq.tools.quick_recipe import minmax_recipe

    bench_engines.DEV = torch.device("cpu")
    base = bench_engines.make_xl()  # the smoke run's model: the same seeded weights
    minmax_recipe(base, "int8", group=32).save(tmp_path / "r")
    minmax_recipe(bench_engines.make_xl(seed=1), "int8", group=32).save(tmp_path / "other")
    out = tmp_path / "bench.json"
    specs = [f"sim:{tmp_path / 'r'}", f"recipe:{tmp_path / 'r'}", f"recipe:{tmp_path / 'other'}"]
    assert main(["--smoke", "--out", str(out), "--skip", "correctness", "--batches", "1", "--steps", "1",
                 "--repeats", "1", "--backends", ",".join(specs)]) == 0
    backends = json.loads(out.read_text())["end_to_end"]["backends"]
    for spec in specs[:2]:
        assert "error" not in backends[spec], backends[spec].get("trace")
        assert backends[spec]["batches"]["1"]["images_per_s"] > 0
    assert backends[specs[1]]["quantized_layer_weights_vs_bf16"] < 0.55  # the engine's int8 codes
    assert "calibrated for a different checkpoint" in backends[specs[2]]["error"]


def test_bench_points_in_order_and_int8_dispatch(tmp_path, capsys, monkeypatch):
    """--points runs (batch, backend) pairs in the given order (the time budget cuts the tail) and
    records which GEMM int8_kernel="auto" picked at each point's rows; a malformed spec exits 2."""
    from dtq.runtime import qengine

    monkeypatch.setattr(qengine, "INT8_INT_MM_MAX_M", 4096)  # a window for _int_mm (the default has none)
    out = tmp_path / "bench.json"
    assert main(["--smoke", "--out", str(out), "--skip", "correctness", "--steps", "1", "--repeats", "1",
                 "--points", "2:int8;1:int8-triton,int8", "--gemm-kernels", "int8_triton",
                 "--gemm-timing", "cudagraph"]) == 0
    res = json.loads(out.read_text())
    e2e = res["end_to_end"]
    assert e2e["points"] == ["2:int8", "1:int8-triton", "1:int8"] and res["batches"] == [1, 2]
    assert set(e2e["backends"]) == {"int8", "int8-triton"}
    assert set(e2e["backends"]["int8-triton"]["batches"]) == {"1"}
    # 2 x 256 tokens x batch rows: auto takes torch._int_mm for all 8 INT8 layers; pinned Triton stays
    assert e2e["backends"]["int8"]["batches"]["1"]["int8_gemm_kernels"] == {"int_mm": 8}
    assert e2e["backends"]["int8"]["batches"]["2"]["int8_gemm_kernels"] == {"int_mm": 8}
    assert e2e["backends"]["int8-triton"]["batches"]["1"]["int8_gemm_kernels"] == {"triton": 8}
    for bad in ("64", "x:int8", "8:int8;8:int8", "0:int8"):
        assert main(["--smoke", "--out", str(out), "--points", bad]) == 2
    assert "--points" in capsys.readouterr().err


def test_gemm_table_columns_and_int8_check_in_interpreter():
    """The GEMM stage (run by main on the GPU only) driven on the CPU with Triton's interpreter at
    small shapes: --gemm-kernels keeps bf16 + the named columns (the fused-epilogue columns on fc1 /
    proj / fc2 only); the Triton INT8 result is checked against torch._int_mm's exact int32 (bf16
    output rounding only)."""
    import textwrap

    pytest = __import__("pytest")
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from dtq.tools import bench_engines as be
        be.DEV = torch.device("cpu")
        be.BLOCK_GEMMS = {"qkv": (96, 128), "fc1": (64, 128), "fc2": (48, 256)}
        epi = {"int8_triton_epilogue", "int4_w4a8_progressive_epilogue"}  # fc1: GELU+quantize, fc2: gated residual
        res = be.gemms(40, None, {"int8_triton", "int8_torch_int_mm"} | epi)
        for name in be.BLOCK_GEMMS:
            row = res[name]
            assert set(row) == {"N", "K", "bf16", "int8_triton", "int8_torch_int_mm"} | (epi if name != "qkv" else set()), row.keys()
            assert "error" not in row["int8_triton"] and 0 < row["int8_triton"]["max_rel_err"] < 2**-7, row
            assert all("error" not in row[k] for k in epi & set(row)), row
        print("ok")
    """)
    run_in_triton_interpreter(code)


def test_bench_attention_ablation_and_check(tmp_path):
    """``-sage`` backends run the blocks' attention with SageAttention (on the CPU: dtq's reference
    of it), the summary sets each against its SDPA twin, and the correctness stage's attention
    check measures it against fp32 attention at DiT-XL/2's head dim 72."""
    out = tmp_path / "bench.json"
    assert main(["--smoke", "--out", str(out), "--skip", "gemms", "--correctness", "attention-sage", "--batches", "1",
                 "--steps", "1", "--repeats", "1", "--backends", "int8,int8-sage"]) == 0
    res = json.loads(out.read_text())
    check = res["correctness"]["attention-sage"]
    assert check["ok"] and check["shape_bnhd"][1:] == [256, 16, 72]
    assert 33 < check["sage_vs_fp32_db"] < check["sdpa_bf16_vs_fp32_db"]  # INT8 QK: below bf16 SDPA, close
    backends = res["end_to_end"]["backends"]
    assert "error" not in backends["int8-sage"], backends["int8-sage"].get("trace")
    ablation = res["summary"]["attention_ablation"]["int8-sage@1"]
    assert ablation["images_per_s"] > 0 and ablation["sdpa_images_per_s"] > 0


def test_engine_backend_names_and_epilogue_ablation(tmp_path, capsys):
    """Backend names map to build_qengine options (the epilogue ablation among them); an unknown name
    exits 2 before anything runs; the summary's fused-vs-unfused ratio pairs X with X-unfused."""
    from dtq.tools.bench_engines import engine_options, summarize

    opts = engine_options("w4a8-progressive-unfused")
    assert opts == {"precision": "w4a8", "int8_kernel": "auto", "w4a8": "progressive", "fuse_mlp": (),
                    "fuse_residual": (), "fuse_norm": False, "token_quant": "epilogue"}
    assert engine_options("int8")["fuse_norm"] and not engine_options("int8-nonorm")["fuse_norm"]
    assert engine_options("int8-nonorm")["fuse_mlp"] == engine_options("int8")["fuse_mlp"]
    assert engine_options("int8")["fuse_residual"] == ("int8", "w4a8", "fp8", "w4a16") == engine_options("int8")["fuse_mlp"]
    assert engine_options("fp8")["fuse_mlp"] == FUSED_FAMILIES and engine_options("fp8-unfused")["fuse_mlp"] == ()
    assert engine_options("int8-triton-unfused")["int8_kernel"] == "triton"
    assert engine_options("fp8-fusedmlp")["fuse_mlp"] == ("fp8",)
    assert engine_options("fp8-fused")["fuse_residual"] == ("fp8",) == engine_options("fp8-fused")["fuse_mlp"]
    assert engine_options("w4a8-progressive-fused")["fuse_residual"] == ("w4a8",)
    assert engine_options("int8-unfused-sage")["fuse_mlp"] == ()  # -sage: build_backend's attention ablation
    assert engine_options("w4a8-fused")["fuse_residual"] == ("w4a8-group",)  # the group kernel's own family
    assert engine_options("int8-token-passfused")["token_quant"] == "pass-fused"
    assert engine_options("int8-token-passonly")["token_quant"] == "pass"  # the pre-session-16 default
    assert engine_options("w4a8-progressive-token-g32-staged")["w4a8_staged_rows"] == 0
    assert engine_options("w4a8-progressive-inreg")["w4a8_staged_rows"] is None
    assert "w4a8_staged_rows" not in engine_options("w4a8-progressive")  # build_qengine's default threshold
    assert engine_options("w4a16-g64-staged")["w4a16_staged_rows"] == 0
    assert engine_options("w4a16-noprefetch")["w4a16_prefetch"] is False and "w4a16_prefetch" not in engine_options("w4a16")
    assert "w4a16" in engine_options("w4a16")["fuse_mlp"] and engine_options("w4a16-unfused")["fuse_mlp"] == ()
    for bad in ("int9", "int8-progressive", "w4a8-intmm", "int8-unfused-fused", "int8-bogus", "int8-unfused-unfused",
                "int8-tokfused", "w4a16-token-tokfused", "int8-token-tokfused-tokfused", "int8-passfused",
                "int8-token-tokfused-passfused", "int8-passonly", "int8-token-passonly-passfused", "int8-staged", "w4a8-staged", "w4a8-progressive-staged-inreg",
                "int8-noprefetch", "w4a16-noprefetch-noprefetch"):
        try:
            engine_options(bad)
        except ValueError:
            continue
        raise AssertionError(bad)
    out = tmp_path / "bench.json"
    assert main(["--smoke", "--out", str(out), "--points", "1:int8-bogus"]) == 2
    assert main(["--smoke", "--out", str(out), "--backends", "int8,fp9"]) == 2
    assert "unknown backend" in capsys.readouterr().err and not out.exists()
    e2e = {"int8": {"batches": {"64": {"images_per_s": 30.0}, "8": {"images_per_s": 10.0}}},
           "int8-unfused": {"batches": {"64": {"images_per_s": 24.0}, "1": {"images_per_s": 3.0}}}}
    summary = summarize({"batches": [1, 8, 64], "end_to_end": {"backends": e2e}})
    assert summary["epilogue_fusion_speedup"] == {"int8@64": 1.25}


def test_tokfused_backend_names_choose_the_inductor_token_quant():
    """'-token' engines run build_qengine's default token_quant ("epilogue": fc1 writes an all-INT8 MLP's
    fc2 codes, otherwise the Triton quantize pass with fc2's GELU inside it, per-row-scale gated-residual
    epilogues); '-token-tokfused' runs "inductor" (the a542954 engine: for W4A8 with the group kernel's
    gated-residual family named); only after '-token'; modifiers and ablations still apply."""
    from dtq.tools.bench_engines import backend_act_granularity, engine_options

    for p in ("int8", "w4a8", "fp8"):
        plain, fused = engine_options(f"{p}-token"), engine_options(f"{p}-token-tokfused")
        assert plain["token_quant"] == "epilogue" and fused["token_quant"] == "inductor", p
        assert backend_act_granularity(f"{p}-token-tokfused") == "token"
        assert {k: v for k, v in fused.items() if k not in ("token_quant", "fuse_residual")} == \
            {k: v for k, v in plain.items() if k not in ("token_quant", "fuse_residual")}
    assert engine_options("int8-token")["fuse_residual"] == engine_options("int8-token-tokfused")["fuse_residual"] == FUSED_FAMILIES
    assert engine_options("w4a8-token")["fuse_residual"] == FUSED_FAMILIES
    assert engine_options("w4a8-token-tokfused")["fuse_residual"] == (*FUSED_FAMILIES, "w4a8-group")
    assert engine_options("w4a8")["fuse_residual"] == FUSED_FAMILIES  # static W4A8: group epilogue not by default
    assert engine_options("int8-token-tokfused-unfused")["fuse_residual"] == ()
    assert engine_options("int8-token-tokfused-maxat-sage")["token_quant"] == "inductor"
    assert engine_options("int8")["token_quant"] == "epilogue"


def test_maxat_backend_names_parse_into_the_compile_mode(tmp_path, capsys, monkeypatch):
    """'-maxat' (any compiled backend) sets compile_blocks' mode to max-autotune; with '-sage' it is a
    trailing modifier in either order, and build_qengine's options are those of the name without it
    (int8-intmm-maxat: INT8 on torch._int_mm, whose dequantize epilogue Inductor can fuse). Built
    backends get the mode (bf16-compile-maxat: the baseline beside the engines) and the attention
    (int8-sage: SageAttention inside the engine); the summary sets X-maxat against X; the smoke run
    takes the issue's point list; bad names exit 2."""
    import torch

    from dtq.runtime import regional_compile
    from dtq.runtime.attention import EngineAttention
    from dtq.tools import bench_engines as be

    maxat = {"attention": "sdpa", "compile_mode": "max-autotune", "autocast": False, "gelu": "tanh", "multi_kernel": False}
    assert be.backend_modifiers("int8-intmm-maxat") == ("int8-intmm", maxat)
    assert be.backend_modifiers("bf16-compile-maxat") == ("bf16-compile", maxat)
    assert be.backend_modifiers("fp8-maxat-sage") == be.backend_modifiers("fp8-sage-maxat") == \
        ("fp8", {"attention": "sage", "compile_mode": "max-autotune", "autocast": False, "gelu": "tanh", "multi_kernel": False})
    assert be.backend_modifiers("fp8-unfused") == ("fp8-unfused", {"attention": "sdpa", "compile_mode": "default",
                                                                   "autocast": False, "gelu": "tanh", "multi_kernel": False})
    assert be.engine_options("int8-intmm-maxat") == be.engine_options("int8-intmm")
    assert be.engine_options("int8-intmm-maxat")["int8_kernel"] == "int_mm"
    assert be.engine_options("fp8-maxat") == be.engine_options("fp8")
    assert be.backend_act_granularity("int8-token-maxat") == "token"
    for bad in ("bf16-eager-maxat", "int8-maxat-maxat", "fp8-maxat-unfused", "maxat", "int8-maxat-intmm"):
        with pytest.raises(ValueError):
            be.check_backend_name(bad)
    for good in ("bf16-compile-maxat", "fp8-maxat", "int8-maxat", "int8-intmm-maxat", "w4a8-progressive-maxat-sage"):
        be.check_backend_name(good)

    modes = []
    monkeypatch.setattr(regional_compile, "compile_blocks",
                        lambda m, mode="default", multi_kernel=False, **kw: modes.append(mode) or m)
    monkeypatch.setattr(be, "DEV", torch.device("cpu"))
    base = be.make_xl()
    engine = be.build_backend("int8-sage", base, "sha256:x")
    attns = [m for m in engine.modules() if isinstance(m, EngineAttention)]
    assert attns and all(a.backend == "sage" for a in attns)  # the engine's attention, not only bf16's
    monkeypatch.setattr(be, "DEV", torch.device("cuda"))  # the bf16 path only checks the device type
    for name in ("bf16-compile-maxat", "bf16-compile"):
        be.build_backend(name, base, "sha256:x")
    assert modes == ["max-autotune", "default"]

    out = tmp_path / "bench.json"
    assert main(["--smoke", "--out", str(out), "--skip", "correctness", "--steps", "1", "--repeats", "1",
                 "--points", "1:bf16-compile,bf16-compile-maxat,fp8,fp8-maxat,int8-intmm-maxat"]) == 0
    backends = json.loads(out.read_text())["end_to_end"]["backends"]
    for name, entry in backends.items():
        assert "error" not in entry and entry["batches"]["1"]["images_per_s"] > 0, entry.get("trace")
        assert entry["compile_mode"] == ("max-autotune" if name.endswith("-maxat") else "default"), name
    e2e = {"bf16-compile": {"batches": {"64": {"images_per_s": 20.0}}},
           "bf16-compile-maxat": {"batches": {"64": {"images_per_s": 22.0}}},
           "fp8": {"batches": {"64": {"images_per_s": 25.0}}},
           "fp8-maxat": {"batches": {"64": {"images_per_s": 33.0, "forward_ms": 40.0}}}}
    summary = be.summarize({"batches": [64], "end_to_end": {"backends": e2e}})
    assert summary["compile_mode_ablation"]["fp8-maxat@64"]["speedup_vs_default"] == 1.32
    assert summary["compile_mode_ablation"]["bf16-compile-maxat@64"]["speedup_vs_default"] == 1.1
    target = summary["targets"]["fp8-maxat_speedup_at_64"]  # against the faster baseline: 33 / 22
    assert target == {"target": 1.5, "measured": 1.5, "met": True, "baseline": "bf16-compile-maxat"}
    assert main(["--smoke", "--out", str(out), "--points", "1:bf16-eager-maxat"]) == 2
    assert main(["--smoke", "--out", str(out), "--skip", "e2e", "--correctness", "int8-sage"]) == 2
    assert "unknown backend 'bf16-eager-maxat'" in capsys.readouterr().err


def test_group_tag_sets_the_int4_group_of_the_benchmarked_recipe():
    """'-gN' (w4a8 / w4a16 only, once, N in 16/32/64/128): the INT4 group of the recipe dtq-bench
    builds (the quality recipes' group 32 on the two-level per-token kernel); default 128; the
    engine options are the untagged name's."""
    from dtq.tools.bench_engines import backend_group, check_backend_name, engine_options

    assert backend_group("w4a8-progressive-token-g32") == 32 and backend_group("w4a16-g64-maxat") == 64
    assert backend_group("w4a8-progressive-token") == 128 and backend_group("int8") == 128
    assert engine_options("w4a8-progressive-token-g32") == engine_options("w4a8-progressive-token")
    check_backend_name("w4a8-progressive-token-g32-sage")
    for bad in ("int8-g32", "fp8-g32", "w4a8-g33", "w4a8-g32-g64", "w4a8-g"):
        with pytest.raises(ValueError, match="unknown backend"):
            engine_options(bad)


def test_amp_backends_measure_what_autocast_costs(tmp_path):
    """'-amp' builds the backend as dtq-sample --autocast runs it (fp32 weights outside the quantized
    layers, the model under bf16 autocast) and the summary sets X-amp against X; its output is the
    autocast denoiser's, not the bf16 one's."""
    import torch

    from dtq.tools import bench_engines as be

    assert be.backend_modifiers("int8-token-amp-sage") == ("int8-token", {"attention": "sage", "compile_mode": "default",
                                                                          "autocast": True, "gelu": "tanh", "multi_kernel": False})
    be.check_backend_name("bf16-compile-amp")
    with pytest.raises(ValueError):
        be.check_backend_name("int8-amp-amp")
    out = tmp_path / "bench.json"
    assert main(["--smoke", "--out", str(out), "--skip", "correctness,gemms", "--batches", "1", "--steps", "1",
                 "--repeats", "1", "--backends", "bf16-compile,bf16-compile-amp,int8,int8-amp"]) == 0
    res = json.loads(out.read_text())
    backends = res["end_to_end"]["backends"]
    assert all("error" not in backends[k] for k in backends), {k: v.get("trace") for k, v in backends.items()}
    assert backends["int8-amp"]["autocast"] and not backends["int8"]["autocast"]
    assert backends["bf16-compile-amp"]["weights_vs_bf16"] == pytest.approx(2.0, rel=0.01)  # fp32 weights
    assert set(res["summary"]["autocast_ablation"]) == {"bf16-compile-amp@1", "int8-amp@1"}
    # the module built for -amp keeps float32 outside the engine layers
    base = be.make_xl()  # (off CUDA: a 2-block DiT)
    assert be.build_backend("int8-amp", base, "sha256:x").x_embedder.proj.weight.dtype == torch.float32
    assert be.build_backend("int8", base, "sha256:x").x_embedder.proj.weight.dtype == torch.bfloat16


def test_sgelu_backends_run_the_sigmoid_gelu_and_meet_targets_against_the_same_baseline(tmp_path, monkeypatch):
    """'-sgelu' computes every tanh GELU as x * sigmoid(2z) (runtime.gelu), in the engine and in the bf16
    baseline alike; the summary sets X-sgelu against X, and an engine's target is taken against the
    faster of bf16-compile and bf16-compile-sgelu (the trick is open to the baseline too)."""
    import torch

    from dtq.runtime.gelu import SigmoidGELU
    from dtq.tools import bench_engines as be

    assert be.backend_modifiers("fp8-sgelu-maxat") == ("fp8", {"attention": "sdpa", "compile_mode": "max-autotune",
                                                               "autocast": False, "gelu": "sigmoid",
                                                               "multi_kernel": False})
    assert be.open_baseline("fp8-sgelu-maxat") == "bf16-compile-sgelu-maxat" and be.open_baseline("fp8") is None
    with pytest.raises(ValueError):
        be.check_backend_name("fp8-sgelu-sgelu")
    monkeypatch.setattr(be, "DEV", torch.device("cpu"))
    base = be.make_xl()
    for name in ("fp8-sgelu", "bf16-compile-sgelu", "int8-sgelu"):
        m = be.build_backend(name, base, "sha256:x")
        gelus = [g for g in m.modules() if isinstance(g, torch.nn.GELU)]
        assert gelus and all(isinstance(g, SigmoidGELU) for g in gelus), name
    assert not any(isinstance(g, SigmoidGELU) for g in be.build_backend("fp8", base, "sha256:x").modules())
    e2e = {"bf16-compile": {"batches": {"64": {"images_per_s": 20.0}}},
           "bf16-compile-sgelu": {"batches": {"64": {"images_per_s": 21.0}}},
           "fp8": {"batches": {"64": {"images_per_s": 25.0}}},
           "fp8-sgelu": {"batches": {"64": {"images_per_s": 30.0, "forward_ms": 40.0}}}}
    summary = be.summarize({"batches": [64], "end_to_end": {"backends": e2e}})
    assert summary["gelu_ablation"]["fp8-sgelu@64"]["speedup_vs_tanh"] == 1.2
    assert summary["gelu_ablation"]["bf16-compile-sgelu@64"]["speedup_vs_tanh"] == 1.05
    target = summary["targets"]["fp8-sgelu_speedup_at_64"]  # 30 / 21: the faster baseline
    assert target == {"target": 1.5, "measured": round(30 / 21, 3), "met": False, "baseline": "bf16-compile-sgelu"}
    assert summary["targets"]["fp8_speedup_at_64"]["measured"] == 1.25


def test_mk_backends_compile_with_inductor_multi_kernel(monkeypatch):
    """'-mk' compiles the backend's blocks with Inductor's multi-kernel (triton.multi_kernel=1: persistent
    reductions over rows wider than 1024, timed against the looped ones), engine and bf16 baseline alike;
    bf16-eager-mk is refused; the summary sets X-mk against X."""
    import torch

    from dtq.runtime import regional_compile
    from dtq.tools import bench_engines as be

    assert be.backend_modifiers("int8-token-tokfused-mk")[1]["multi_kernel"] is True
    assert be.open_baseline("fp8-sgelu-mk") == "bf16-compile-sgelu-mk"
    with pytest.raises(ValueError, match="bf16-eager"):
        be.check_backend_name("bf16-eager-mk")
    calls = []
    monkeypatch.setattr(regional_compile, "compile_blocks",
                        lambda m, mode="default", multi_kernel=False, **kw: calls.append((mode, multi_kernel)) or m)
    monkeypatch.setattr(be, "DEV", torch.device("cpu"))
    base = be.make_xl()
    monkeypatch.setattr(be, "DEV", torch.device("cuda"))  # the bf16 path only checks the device type
    for name in ("bf16-compile-mk", "bf16-compile", "bf16-compile-maxat-mk"):
        be.build_backend(name, base, "sha256:x")
    assert calls == [("default", True), ("default", False), ("max-autotune", True)]
    kw = regional_compile.block_compile_kwargs(base, "default", multi_kernel=True)
    assert kw == {"options": {"triton.multi_kernel": 1}}
    assert regional_compile.block_compile_kwargs(base, "default") == {}
    e2e = {"bf16-compile": {"batches": {"64": {"images_per_s": 20.0}}},
           "bf16-compile-mk": {"batches": {"64": {"images_per_s": 22.0}}},
           "int8": {"batches": {"64": {"images_per_s": 23.0}}},
           "int8-mk": {"batches": {"64": {"images_per_s": 27.6}}}}
    summary = be.summarize({"batches": [64], "end_to_end": {"backends": e2e}})
    assert summary["multi_kernel_ablation"]["int8-mk@64"]["speedup_vs_single_kernel"] == 1.2
    assert summary["targets"]["int8-mk_speedup_at_64"]["baseline"] == "bf16-compile-mk"
    assert summary["targets"]["int8-mk_speedup_at_64"]["measured"] == round(27.6 / 22, 3)


def test_worktree_tree_names_the_commit_of_the_files_as_they_are(tmp_path):
    """The results' ``tree`` is the git tree of the checkout's files, uncommitted changes included, so a result
    from a copied checkout with a stale .git still names its commit: equal to ``HEAD^{tree}`` on a clean
    checkout, another tree once a file changes, the same again when the change is undone; ignored files do not
    count."""
    import shutil
    import subprocess

    from dtq.tools.bench_engines import worktree_tree

    if shutil.which("git") is None:
        pytest.skip("git is not installed: worktree_tree returns None without it")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / ".gitignore").write_text("out/\n")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    head_tree = subprocess.run([*git, "rev-parse", "HEAD^{tree}"], capture_output=True, text=True,
                               check=True).stdout.strip()
    assert worktree_tree(tmp_path) == head_tree
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "result.json").write_text("{}")  # ignored
    assert worktree_tree(tmp_path) == head_tree
    (tmp_path / "a.py").write_text("x = 2\n")
    changed = worktree_tree(tmp_path)
    assert changed is not None and changed != head_tree
    (tmp_path / "a.py").write_text("x = 1\n")
    assert worktree_tree(tmp_path) == head_tree
    status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True).stdout
    assert status == ""  # the real index is untouched


def test_bench_paired_rounds_run_in_turn_and_judge_the_per_token_cost(tmp_path, monkeypatch, capsys):
    """--paired N: after a batch's points, N rounds of one sampling run per engine in turn (a fake clock that
    counts the runs shows the order); summary.per_token_cost then judges the median of the rounds' costs. A
    batch with one engine gets no rounds; --paired below 0 exits 2."""
    import itertools

    from dtq.tools import bench_engines

    calls = itertools.count(1)
    monkeypatch.setattr(bench_engines, "sampling_seconds", lambda *a: float(next(calls)))
    out = tmp_path / "bench.json"
    assert main(["--smoke", "--out", str(out), "--skip", "correctness", "--steps", "1", "--repeats", "1",
                 "--points", "2:int8;1:int8,int8-token", "--paired", "3"]) == 0
    res = json.loads(out.read_text())
    b = res["end_to_end"]["backends"]
    assert "paired_s" not in b["int8"]["batches"]["2"]  # run 1, alone at its batch
    assert b["int8"]["batches"]["1"]["sample_s"] == 2 and b["int8-token"]["batches"]["1"]["sample_s"] == 3
    assert b["int8"]["batches"]["1"]["paired_s"] == [4, 6, 8]
    assert b["int8-token"]["batches"]["1"]["paired_s"] == [5, 7, 9]
    cost = res["summary"]["per_token_cost"]["int8-token@1"]
    assert cost["cost"] == pytest.approx(1 - 2 / 3, abs=0.01)  # the points' own runs (images/s rounded)
    assert cost["paired_costs"] == [round(1 - 8 / 9, 4), round(1 - 6 / 7, 4), round(1 - 4 / 5, 4)]
    assert cost["paired_cost"] == round(1 - 6 / 7, 4) and not cost["met"]
    assert "paired: median 14.3% of 3 rounds" in capsys.readouterr().out
    assert bench_engines.paired_costs([2.0, 2.1], [2.0]) == []  # rounds that do not pair up judge nothing
    assert main(["--smoke", "--out", str(out), "--paired", "-1"]) == 2
