"""Per-token dynamic activation quantization (ViDiT-Q; issue #12 item 4a): the precision table and
overrides, calibration, the simulation, the ONNX graph in ONNX Runtime, the TensorRT rule check,
and the quantized engine (reference path and the Triton kernels in the interpreter)."""

import textwrap

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch

from dtq import formats
from dtq.calibrate.config import CalibConfig, LayerPrecision
from dtq.export import rules
from dtq.export.api import ExportConfig, build_graph
from dtq.export.qdq import _token_qdq
from dtq.runtime import quant
from dtq.runtime.qengine import build_qengine, engine_layers
from dtq.runtime.recipe import LayerRecipe, RecipeError, apply_recipe, load_recipe
from dtq.runtime.zoo import load_builtin
from dtq.tools.quick_recipe import minmax_recipe, random_inputs
from conftest import fp_export_for, module_threads, run_in_triton_interpreter, triton_available

_threads = module_threads(2)


@pytest.fixture(scope="module")
def tiny():
    return load_builtin("dit-tiny-fmnist", dtype=torch.float32).eval()


# -- the precision table ------------------------------------------------------------------------------
def test_table_overrides_and_refusals():
    assert formats.get_precision("int8").act_granularities == ("tensor", "token")
    for p in ("int8", "fp8", "w4a8"):
        formats.check_act_granularity(p, "token")
    for p in ("w8a16", "w4a16", "fp16"):  # weight-only / unquantized: no activation to scale per token
        with pytest.raises(ValueError, match="no quantized activations"):
            formats.check_act_granularity(p, "token")
        with pytest.raises(ValueError, match="no quantized activations"):
            formats.parse_override(f"*.mlp.fc2={p}/token")
    for p in ("w8a16", "w4a16"):
        with pytest.raises(ValueError, match="no quantized activations"):
            CalibConfig(precision=p, act_granularity="token")
    with pytest.raises(ValueError, match="unknown activation granularity"):
        formats.check_act_granularity("int8", "channel")
    # the override grammar: PATTERN=PRECISION[:WEIGHT_GRAN][/ACT_GRAN]
    assert formats.parse_override("*.mlp.fc2=w4a8:group64/token") == ("*.mlp.fc2", "w4a8", "group64")
    for bad in ("*.fc2=w4a16/token", "*.fc2=int8/", "*.fc2=int8/group32"):
        with pytest.raises(ValueError):
            formats.parse_override(bad)
    names = formats.layer_names(2)
    cfg = CalibConfig(precision="w4a8", act_granularity="token",
                      overrides=["blocks.1.*=int8:channel/tensor", "*.attn.proj=w4a16", "blocks.0.mlp.fc2=int8"])
    lp = cfg.layer_precisions(names)
    assert lp["blocks.0.attn.qkv"].act_granularity == "token"
    assert lp["blocks.0.mlp.fc2"] == LayerPrecision("int8", "channel", "token")  # no suffix: keeps the default
    assert lp["blocks.1.mlp.fc1"].act_granularity == "tensor"  # /tensor suffix
    assert lp["blocks.0.attn.proj"].act_granularity == "tensor"  # weight-only: nothing to scale
    assert CalibConfig().act_granularity == "tensor"  # the default stays static


def test_recipe_records_and_validates_it(tiny, tmp_path):
    r = minmax_recipe(tiny, "w4a8", group=32, balance=True, act_granularity="token")
    layer = r.layers["blocks.0.mlp.fc2"]
    assert layer.act_granularity == "token" and layer.act_scale is None and layer.act_format == "int8"
    r.save(tmp_path / "r")
    back = load_recipe(tmp_path / "r", tiny)
    assert back.layers["blocks.0.mlp.fc2"].act_granularity == "token"
    for bad in (LayerRecipe(weight_format="int8", act_format="int8", act_scale=0.1, act_granularity="token"),
                LayerRecipe(weight_format="int8", act_format="none", act_granularity="token"),
                LayerRecipe(weight_format="int8", act_format="int8", act_granularity="tensor")):
        with pytest.raises(RecipeError):
            bad.validate("blocks.0.attn.qkv")


def test_simulation_scales_each_token(tiny):
    """The simulated layer's input codes use amax over each token's channels: a token 1000x larger
    than the others does not flatten their codes (it would with one per-tensor scale)."""
    x = torch.randn(2, 5, 64)
    x[0, 0] *= 1000
    for fmt in ("int8", "fp8_e4m3"):
        y = quant.fake_quant_act(x, None, fmt, "token")
        s = x.abs().amax(-1, keepdim=True) / quant.QMAX[fmt]
        assert torch.equal(y, quant.fake_quant(x, s, fmt))
        per_row = [quant.sqnr_db(x[0, i], y[0, i]) for i in range(1, 5)]
        assert min(per_row) > (35 if fmt == "int8" else 25), per_row
    static = quant.fake_quant(x, x.abs().amax() / 127, "int8")
    assert quant.sqnr_db(x[0, 1:], static[0, 1:]) < 10  # the static scale loses the small tokens


# -- calibration: tests/test_calibrate.py::test_dynamic_w4a8_smoothquant_beats_static_on_held_out_timesteps
# (it shares that module's calibration set and statistics)


# -- ONNX -----------------------------------------------------------------------------------------------
def _session(proto):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3"])
def test_token_qdq_subgraph_is_the_simulation_in_ort(fmt):
    """The per-token Q/DQ subgraph alone, in ONNX Runtime, gives the simulation's numbers: the same
    scale bit for bit and the same codes except rounding ties of fp32 division."""
    x = gs.Variable("x", dtype=np.float32, shape=[3, 17, 96])
    graph = gs.Graph(inputs=[x], opset=21)
    out = _token_qdq(graph, "L", x, fmt, np.float32)
    scale = [t for t in graph.tensors().values() if t.name == "L/input_scale"][0]
    scale.dtype, out.dtype, scale.shape, out.shape = np.float32, np.float32, [3, 17, 1], [3, 17, 96]
    graph.outputs = [out, scale]
    proto = gs.export_onnx(graph.cleanup().toposort())
    onnx.checker.check_model(proto)
    torch.manual_seed(0)
    xv = torch.randn(3, 17, 96) * torch.logspace(-2, 2, 17)[None, :, None]  # tokens over four decades
    xv[1, 3] = 0  # an all-zero token: the floor keeps its scale finite
    got, got_s = (torch.from_numpy(a) for a in _session(proto).run(None, {"x": xv.numpy()}))
    assert torch.equal(got_s, quant.token_scale(xv, fmt))
    ref = quant.fake_quant_act(xv, None, fmt, "token")
    assert torch.equal(got[1, 3], torch.zeros(96))
    assert (got != ref).float().mean() < 1e-3 and quant.sqnr_db(ref, got) > 80


@pytest.mark.parametrize("precision", ["int8", "w4a8", "fp8"])
def test_graph_vs_simulation_in_ort_and_rule_check(tiny, precision):
    """End to end on the tiny model (balancing at every fold place): ONNX Runtime vs the simulation.
    Measured: int8 44.6 dB, w4a8 43.9, fp8 39.4 (the simulation vs FP: 40.7 / 25.6 / 32.9)."""
    recipe = minmax_recipe(tiny, precision, balance=True, act_granularity="token", group=32)
    cfg = ExportConfig(out="unused.onnx", model="dit-tiny-fmnist", precision=precision, dtype="fp32",
                       max_batch=8).resolved(recipe)
    assert cfg.opset == formats.TOKEN_MIN_OPSET
    proto = build_graph(tiny, cfg, recipe, fp_export_for(tiny, cfg, recipe))
    x, t, y = random_inputs(tiny, 4, seed=3)
    out = torch.from_numpy(_session(proto).run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0])
    with torch.no_grad():
        ref, fp = apply_recipe(tiny, recipe)(x, t, y), tiny(x, t, y)
    s = quant.sqnr_db(ref, out)
    assert s >= 35 and s > quant.sqnr_db(fp, ref) + 2, (s, quant.sqnr_db(fp, ref))
    # the rule check flags every dynamic quantizer (one warning per layer) and nothing else new
    report = rules.check_model(proto)
    dyn = [f for f in report.findings if f.rule == "act-dynamic-scale"]
    assert report.ok and len(dyn) == len(recipe.layers), report.format()[:2000]
    assert all(f.severity == "warning" and "constant scales" in f.message for f in dyn)
    assert not report.rules() & {"scale-constant", "act-per-tensor", "block-shape"}


def test_rule_check_still_catches_a_non_constant_scale_that_is_an_input():
    """Only a *computed* scale counts as dynamic: a scale fed from a graph input stays an error."""
    x = gs.Variable("x", dtype=np.float32, shape=[2, 8])
    s = gs.Variable("s", dtype=np.float32, shape=[])
    q = gs.Variable("q", dtype=np.int8, shape=[2, 8])
    y = gs.Variable("y", dtype=np.float32, shape=[2, 8])
    zp = gs.Constant("zp", np.zeros((), np.int8))
    graph = gs.Graph(nodes=[gs.Node("QuantizeLinear", "q", inputs=[x, s, zp], outputs=[q]),
                            gs.Node("DequantizeLinear", "dq", inputs=[q, s, zp], outputs=[y])],
                     inputs=[x, s], outputs=[y], opset=21)
    report = rules.check_model(gs.export_onnx(graph))
    assert "scale-constant" in {f.rule for f in report.errors} and "act-dynamic-scale" not in report.rules()


# -- the quantized engine ----------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["int8", "w4a8", "fp8"])
def test_cpu_engine_is_the_dynamic_simulation(tiny, precision):
    recipe = minmax_recipe(tiny, precision, group=32, balance=True, act_granularity="token")
    sim, eng = apply_recipe(tiny, recipe), build_qengine(tiny, recipe)
    assert all(m.act_granularity == "token" for m in engine_layers(eng).values())
    x, t, y = random_inputs(tiny, 3, seed=7)
    with torch.no_grad():
        ref, got = sim(x, t, y), eng(x, t, y)
        static = apply_recipe(tiny, minmax_recipe(tiny, precision, group=32, balance=True))(x, t, y)
    assert torch.equal(ref, got)
    assert not torch.equal(ref, static)  # the engine did not fall back to a static scale


@pytest.mark.skipif(not triton_available(), reason="triton is not installed: kernels unchecked")
def test_dynamic_kernels_in_interpreter():
    """quant_rows_int8 (one pass: balance, row amax, codes + row scale) is the simulation's quantizer
    (same scales, codes equal but for fp32 rounding ties); int8_mm / w4a8_mm with per-row scales and
    each dynamic engine layer's GPU path match their references; with token_quant "pass" an MLP with a
    dynamic fc2 stays unfused."""
    code = textwrap.dedent('''
        import torch
        from dtq.runtime import kernels, kernel_ops, quant
        from dtq.runtime.model import DiT, DiTConfig
        from dtq.runtime.qengine import FusedMlp, build_qengine, engine_layers
        from dtq.tools.quick_recipe import minmax_recipe
        torch.manual_seed(0)
        x = torch.randn(37, 192) * torch.logspace(-2, 2, 37)[:, None]
        x[5] = 0
        mul = torch.rand(192) + 0.5
        q, s = kernels.quant_rows_int8(x, mul)
        xb = x * mul
        assert torch.equal(s, quant.token_scale(xb, "int8").reshape(-1)), (s[:4], quant.token_scale(xb, "int8")[:4])
        ref = quant.fake_quant_act(xb, None, "int8", "token")
        assert (q.float() * s[:, None] != ref).float().mean() < 1e-3
        w = torch.randint(-127, 128, (48, 192), dtype=torch.int8)
        ws = torch.rand(48) * 0.01
        b = torch.randn(48)
        got = kernels.int8_mm(q, w, s, ws, b, torch.float32)
        want = (q.float() @ w.float().T) * (s[:, None] * ws[None, :]) + b
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4), (got - want).abs().max()
        static = kernels.int8_mm(q, w, s[7], ws, b, torch.float32)  # the scalar path still works
        assert torch.allclose(static, (q.float() @ w.float().T) * (s[7] * ws) + b, rtol=1e-5, atol=1e-4)
        m = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                          num_classes=10)).randomize_(seed=1, std=0.1).eval()
        for p in ["int8", "w4a8", "fp8"]:
            r = minmax_recipe(m, p, group=64, balance=True, act_granularity="token")
            eng = build_qengine(m, r, fuse_mlp=("int8", "fp8"), int8_kernel="triton", token_quant="pass")
            assert not [mod for mod in eng.modules() if isinstance(mod, FusedMlp)]
            for name, lin in engine_layers(eng).items():
                if p == "w4a8":
                    assert lin.kernel_name() == "Int4Linear[w4a8 int8-MMA]", lin.kernel_name()
                xin = torch.randn(20, lin.in_features, dtype=torch.float16 if p == "w4a8" else torch.float32)
                xin[3] *= 100  # one loud token
                ref = lin.reference(xin)
                got = lin.kernel_forward(xin)
                sq = quant.sqnr_db(ref.float(), got.float())
                assert got.shape == ref.shape and sq > 40, (p, name, sq)
                quiet = [quant.sqnr_db(ref[i].float(), got[i].float()) for i in (0, 1, 2)]
                assert min(quiet) > 35, (p, name, quiet)  # rows scaled by their own scale, not row 3's
        print("ok")
    ''')
    run_in_triton_interpreter(code)


def test_export_cli_warns_and_build_engine_refuses(tiny, tmp_path, capsys, shared_fp_exports):
    """dtq-export writes the per-token graph and says what TensorRT will do with it; dtq-build-engine
    exits 2 with that note before calling TensorRT (TensorRT-RTX 1.7.1's builder fails on it)."""
    from dtq.export.cli import main as export_main
    from dtq.tools.build_engine import main as build_main

    minmax_recipe(tiny, "int8", balance=True, act_granularity="token").save(tmp_path / "recipe")
    onnx_path = tmp_path / "g.onnx"
    assert export_main(["--model", "dit-tiny-fmnist", "--recipe", str(tmp_path / "recipe"), "--out", str(onnx_path),
                        "--dtype", "fp32", "--max-batch", "2"]) == 0
    err = capsys.readouterr().err
    assert "TensorRT cannot build this graph" in err and "per-token dynamic activations" in err, err
    engine = tmp_path / "engine"
    assert build_main([str(onnx_path), "--out", str(engine)]) == 2
    err = capsys.readouterr().err
    assert "activation quantizers with computed scales" in err and "CHECK(is_constant())" in err, err
    assert not engine.exists()


@pytest.mark.skipif(not triton_available(), reason="triton is not installed: kernels unchecked")
def test_compiled_per_token_quantizer_is_plain_torch_ops():
    """token_quant="inductor": under torch.compile the per-token quantizer is plain torch ops (quant.token_codes_int8), which
    Inductor fuses into the kernel that computes the activation (LayerNorm + modulate, GELU; see
    benchmarks/token_fusion_cpu.py for the kernels); eager, the one-pass Triton kernel. Both give the
    same codes and scales (random rows over four decades, an all-zero row, with and without the
    balancing Mul, fp32 and fp16 inputs): a compiled per-token block (INT8 with gated-residual
    epilogues, W4A8) has no dtq::quant_rows_int8 call in its graph and is bit-identical to the eager
    GPU path, which calls it once per layer."""
    code = textwrap.dedent('''
        import torch
        from torch.profiler import profile
        from dtq.runtime import kernels, kernel_ops, quant
        from dtq.runtime.model import DiT, DiTConfig
        from dtq.runtime.qengine import FusedResidualBlock, build_qengine
        from dtq.tools.quick_recipe import minmax_recipe
        torch.manual_seed(0)
        x = torch.randn(37, 192) * torch.logspace(-3, 3, 37)[:, None]
        x[5] = 0
        x[9, :3] = torch.tensor([1.0, -1.0, 0.5]) * 127 * 2.0 ** -20  # exact ties at the row's scale
        mul = torch.rand(192) + 0.5
        for xin in (x, x.half()):
            for m in (mul, None):
                q, s = quant.token_codes_int8(xin, m)
                qk, sk = kernels.quant_rows_int8(xin, m)
                assert torch.equal(q, qk) and torch.equal(s, sk), (xin.dtype, m is None, (q != qk).sum(), (s - sk).abs().max())
                xb = xin.float() * (1 if m is None else m)
                assert torch.equal(s, quant.token_scale(xb, "int8").reshape(-1))  # the simulation's scale
                assert torch.equal(q.float() * s[:, None], quant.fake_quant_act(xb, None, "int8", "token"))
        assert float(s[5]) == float(torch.tensor(1e-12)), s[5]  # the all-zero row's guard
        assert not q[5].any() and q.dtype == torch.int8 and int(q.abs().max()) == 127
        # an engine block on the GPU path (kernel="gpu": the Triton interpreter), compiled with a backend
        # that records the graph dynamo hands over (what Inductor would compile)
        m = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                          num_classes=10)).randomize_(seed=1, std=0.1).eval()
        h, c = torch.randn(2, 4, 64), torch.randn(2, 64)
        for p, gemms in (("int8", {"dtq.int8_mm": 2, "dtq.mm8_gate_residual": 2}), ("w4a8", {"dtq.w4a8_mm": 2, "dtq.w4a8_gate_residual": 2})):
            r = minmax_recipe(m, p, group=64, balance=True, act_granularity="token")
            blk = build_qengine(m, r, kernel="gpu", int8_kernel="triton", token_quant="inductor",
                                fuse_residual=("int8", "w4a8", "w4a8-group")).blocks[0]
            assert isinstance(blk, FusedResidualBlock) and blk.fuse_proj and blk.fuse_fc2  # proj / fc2 epilogues
            graphs = []
            def record(gm, example_inputs):
                graphs.append(gm)
                return gm.forward
            torch._dynamo.reset()
            with torch.no_grad():
                with profile() as prof:
                    eager = blk(h, c)
                names = [e.name for e in prof.events()]
                assert names.count("dtq::quant_rows_int8") == 4, (p, sorted(set(n for n in names if "dtq" in n)))
                got = torch.compile(blk, backend=record, fullgraph=True)(h, c)
                ref = build_qengine(m, r).blocks[0](h, c)  # the CPU path: the simulation's operations
            called = [str(n.target) for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]
            assert not [t for t in called if "quant_rows_int8" in t], (p, called)
            assert {k: called.count(k) for k in gemms} == gemms, (p, sorted(set(t for t in called if "dtq" in t)))
            assert [t for t in called if "amax" in t], p  # the row amax is in the graph, for Inductor to fuse
            assert torch.equal(got, eager), (p, (got - eager).abs().max())
            assert quant.sqnr_db(ref, got) > 40, (p, quant.sqnr_db(ref, got))
        print("ok")
    ''')
    run_in_triton_interpreter(code)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed: kernels unchecked")
def test_per_token_gated_residual_epilogue_in_interpreter():
    """Per-token proj / fc2 keep the gated-residual epilogue: the 8-bit GEMM (INT8 and FP8 codes) and
    the W4A8 int8-MMA GEMM (group-scaled INT4 weights) with per-row activation scales ``[M]`` and the
    gate + residual add (a strided gate view, ragged M and N) against a float64 reference; per-token
    INT8 and W4A8 blocks on the GPU path call the fused kernel for proj and fc2 and match the block's
    reference (the simulation's operations)."""
    code = textwrap.dedent('''
        import torch
        from torch.profiler import profile
        from dtq.runtime import kernels, kernel_ops, quant
        from dtq.runtime.kernels_ref import pack_int4
        from dtq.runtime.model import DiT, DiTConfig
        from dtq.runtime.qengine import FusedMlp, FusedResidualBlock, build_qengine
        from dtq.tools.quick_recipe import minmax_recipe
        torch.manual_seed(0)
        B, T, N, K = 3, 13, 48, 96
        M = B * T
        gate = torch.randn(B, 6 * N).chunk(6, dim=1)[2]
        res, bias = torch.randn(M, N), torch.randn(N)
        sa = torch.rand(M) * 0.05 + 1e-3  # one scale per row, over a decade and a half
        sw = torch.rand(N) * 0.01 + 1e-3
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
        af = (torch.randn(M, K) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        wf = (torch.randn(N, K) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        for name, (x, wt) in {"int8": (a, w), "fp8": (af, wf)}.items():
            acc = x.double() @ wt.double().T
            out = acc * sa.double()[:, None] * sw.double() + bias.double()
            want = res.double() + gate.double().repeat_interleave(T, 0) * out
            for got in (kernels.mm8_gate_residual(x, wt, sa, sw, bias, gate, res),
                        torch.ops.dtq.mm8_gate_residual(x, wt, sa, sw, bias, gate, res)):
                err = float((got.double() - want).abs().max() / want.abs().max())
                assert got.shape == (M, N) and err < 1e-6, (name, err)
            static = kernels.mm8_gate_residual(x, wt, sa[4], sw, bias, gate, res)  # [] still the static path
            want4 = res.double() + gate.double().repeat_interleave(T, 0) * (acc * float(sa[4]) * sw.double() + bias.double())
            assert float((static.double() - want4).abs().max() / want4.abs().max()) < 1e-6, name
        for K2, g in ((128, 64), (256, 128)):  # the W4A8 int8-MMA kernel (group scales), same epilogue
            a = torch.randint(-128, 128, (M, K2), dtype=torch.int8)
            q = torch.randint(-8, 8, (N, K2), dtype=torch.int8)
            gs_ = torch.rand(N, K2 // g) * 0.01 + 1e-3
            acc = (a.double() @ (q.double() * gs_.double().repeat_interleave(g, 1)).T)
            want = res.double() + gate.double().repeat_interleave(T, 0) * (acc * sa.double()[:, None] + bias.double())
            for rr in (res, res.half()):
                got = torch.ops.dtq.w4a8_gate_residual(a, pack_int4(q), gs_, g, sa, bias, gate, rr)
                err = float((got.double() - (want - res.double() + rr.double())).abs().max() / want.abs().max())
                assert got.dtype == rr.dtype and got.shape == (M, N) and err < (1e-6 if rr.dtype == torch.float32 else 1e-3), (K2, g, err)
            plain = kernels.w4a8_mm(a, pack_int4(q), gs_, g, sa, bias, torch.float32)  # the plain epilogue unchanged
            assert float((plain.double() - (acc * sa.double()[:, None] + bias.double())).abs().max()) < 1e-4
        m = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                          num_classes=10)).randomize_(seed=1, std=0.1).eval()
        hb, cb = torch.randn(3, 4, 64), torch.randn(3, 64)
        for gran in ("token", "tensor"):  # W4A8: the group kernel's gated residual in the block (static too), named
            r = minmax_recipe(m, "w4a8", group=64, balance=True, act_granularity=gran)
            blk = build_qengine(m, r, kernel="gpu", token_quant="inductor",
                                fuse_residual=("int8", "w4a8", "w4a8-group")).blocks[0]
            assert isinstance(blk, FusedResidualBlock) and blk.fuse_proj and blk.fuse_fc2, blk
            with profile() as prof, torch.no_grad():
                got = blk(hb, cb)
            names = [e.name for e in prof.events()]
            assert [names.count(f"dtq::{k}") for k in ("w4a8_gate_residual", "w4a8_mm", "quant_rows_int8")] == \\
                [2, 2, 4 if gran == "token" else 0], sorted(set(n for n in names if n.startswith("dtq::")))
            with torch.no_grad():
                ref = build_qengine(m, r).blocks[0](hb, cb)
            assert quant.sqnr_db(ref, got) > 40, (gran, quant.sqnr_db(ref, got))
        r = minmax_recipe(m, "int8", balance=True, act_granularity="token")
        blk = build_qengine(m, r, int8_kernel="triton", kernel="gpu", token_quant="inductor").blocks[0]  # GPU path on the CPU
        assert isinstance(blk, FusedResidualBlock) and blk.fuse_proj and blk.fuse_fc2, blk
        assert not isinstance(blk.mlp, FusedMlp)  # fc2's per-token input cannot be made in fc1's N tiles
        assert blk.mlp.fc2.input_mul is not None  # the run-time balancing Mul before the per-token quantizer
        h, c = torch.randn(3, 4, 64), torch.randn(3, 64)
        with torch.no_grad():
            ref = build_qengine(m, r).blocks[0](h, c)  # CPU, kernel "auto": the simulation's operations
            with profile() as prof:
                got = blk(h, c)
            ref_static = build_qengine(m, minmax_recipe(m, "int8", balance=True)).blocks[0](h, c)
        names = [e.name for e in prof.events()]
        assert [names.count(f"dtq::{k}") for k in ("mm8_gate_residual", "int8_mm", "quant_rows_int8")] == [2, 2, 4], \\
            sorted(set(n for n in names if n.startswith("dtq::")))
        s = quant.sqnr_db(ref, got)
        assert got.shape == ref.shape and s > 40, s
        assert quant.sqnr_db(ref, ref_static) < s - 10  # the per-token numbers, not a static scale's
        print("ok", round(s, 1), round(quant.sqnr_db(ref, ref_static), 1))
    ''')
    print(run_in_triton_interpreter(code).strip().splitlines()[-1])


def test_per_token_models_compile_with_the_recompute_option(tiny):
    """compile_blocks gives an engine with token_quant="inductor" per-token layers Inductor's
    realize_reads_threshold=8 (recompute the modulated row in the fused LN + quantize kernel instead of
    storing it), merged with the compile mode's options; the default per-token engine ("pass": an
    opaque Triton pass, as measured faster), the simulation, static engines (whatever their
    token_quant) and the FP model get the mode's alone."""
    from dtq.runtime.regional_compile import TOKEN_INDUCTOR_OPTIONS, block_compile_kwargs, compile_kwargs

    static = minmax_recipe(tiny, "int8", balance=True)
    assert block_compile_kwargs(build_qengine(tiny, static)) == {} and block_compile_kwargs(tiny) == {}
    assert block_compile_kwargs(build_qengine(tiny, static, token_quant="inductor")) == {}
    recipe = minmax_recipe(tiny, "w4a8", group=32, balance=True, act_granularity="token")
    for model in (build_qengine(tiny, recipe), apply_recipe(tiny, recipe)):
        assert block_compile_kwargs(model) == {}
    fused = build_qengine(tiny, recipe, token_quant="inductor")
    assert block_compile_kwargs(fused) == {"options": TOKEN_INDUCTOR_OPTIONS}
    assert TOKEN_INDUCTOR_OPTIONS == {"realize_reads_threshold": 8}
    maxat = block_compile_kwargs(fused, "max-autotune")["options"]
    assert maxat == {**compile_kwargs("max-autotune")["options"], **TOKEN_INDUCTOR_OPTIONS}
    assert block_compile_kwargs(build_qengine(tiny, recipe), "max-autotune") == compile_kwargs("max-autotune")


def test_token_quant_default_takes_the_fused_epilogues(tiny):
    """build_qengine's token_quant: "epilogue" by default (measured fastest on the H200 in session 22;
    "pass-fused" in sessions 16-21): per-token proj / fc2 take the gated-residual epilogue with per-row
    scales; "pass" keeps them unfused, "inductor" fuses them too; static layers do not depend on it. The
    group-scale W4A8 kernel's gated residual ("w4a8-group") is not in the default fuse_residual: static W4A8
    blocks fuse only when it is named. Unknown modes are refused."""
    from dtq.runtime.model import DiTBlock
    from dtq.runtime.qengine import DEFAULT_TOKEN_QUANT, FusedResidualBlock

    assert DEFAULT_TOKEN_QUANT == "epilogue"
    for p in ("int8", "w4a8"):
        recipe = minmax_recipe(tiny, p, group=64, balance=True, act_granularity="token")  # W4A8 kernel: group % 64
        families = ("int8", "w4a8", "w4a8-group")
        default = build_qengine(tiny, recipe, kernel="gpu", fuse_residual=families)
        unfused = build_qengine(tiny, recipe, kernel="gpu", fuse_residual=families, token_quant="pass")
        fused = build_qengine(tiny, recipe, kernel="gpu", fuse_residual=families, token_quant="inductor")
        assert {m.token_quant for m in engine_layers(default).values()} == {"epilogue"}
        assert {m.token_quant for m in engine_layers(unfused).values()} == {"pass"}
        assert {m.token_quant for m in engine_layers(fused).values()} == {"inductor"}
        gated = lambda e: [e.get_submodule(n) for n in ("blocks.0.attn.proj", "blocks.0.mlp.fc2")]  # noqa: E731
        assert [m.fuses_epilogue() for m in gated(unfused)] == [False, False], p
        assert [m.fuses_epilogue() for m in gated(default)] == [True, True], p
        assert [m.fuses_epilogue() for m in gated(fused)] == [True, True], p
        blk = unfused.blocks[0]  # "pass": no gated-residual epilogue; INT8 qkv / fc1 codes from the norm pass
        if p == "int8":
            assert isinstance(blk, FusedResidualBlock) and not (blk.fuse_proj or blk.fuse_fc2) and blk.fuse_norm
        else:  # the group-scale W4A8 kernel takes no given codes (no codes_forward)
            assert type(blk) is DiTBlock
        for engine in (default, fused):
            assert isinstance(engine.blocks[0], FusedResidualBlock) and engine.blocks[0].fuse_proj, p
    static_w4a8 = minmax_recipe(tiny, "w4a8", group=64, balance=True)
    assert type(build_qengine(tiny, static_w4a8, kernel="gpu").blocks[0]) is DiTBlock  # the pre-cf3ff34 default
    named = build_qengine(tiny, static_w4a8, kernel="gpu", fuse_residual=("int8", "w4a8", "w4a8-group"))
    assert isinstance(named.blocks[0], FusedResidualBlock) and named.blocks[0].fuse_fc2
    static_int8 = build_qengine(tiny, minmax_recipe(tiny, "int8", balance=True), kernel="gpu", int8_kernel="triton")
    assert isinstance(static_int8.blocks[0], FusedResidualBlock)  # static INT8: unchanged, fused by default
    with pytest.raises(ValueError, match="token_quant must be one of pass, inductor"):
        build_qengine(tiny, recipe, token_quant="fused")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed: kernels unchecked")
def test_compiled_per_token_block_calls_the_triton_pass_by_default():
    """token_quant "pass" keeps the opaque dtq::quant_rows_int8 op under torch.compile (proj and fc2; qkv's
    and fc1's codes come from the LayerNorm pass) and no row amax in the graph; "pass-fused" the same op for
    proj and its GELU form for fc2; the default ("epilogue") the op for proj and fc1 writing fc2's codes
    (dtq::mm8_gelu_token_codes); "inductor" none of them and the amax instead. All match the eager GPU path
    exactly."""
    code = textwrap.dedent('''
        import torch
        from dtq.runtime import kernel_ops  # noqa: F401
        from dtq.runtime.model import DiT, DiTConfig
        from dtq.runtime.qengine import build_qengine
        from dtq.tools.quick_recipe import minmax_recipe
        torch.manual_seed(0)
        m = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                          num_classes=10)).randomize_(seed=1, std=0.1).eval()
        h, c = torch.randn(2, 4, 64), torch.randn(2, 64)
        r = minmax_recipe(m, "int8", balance=True, act_granularity="token")
        # "pass": proj and fc2 (qkv / fc1: the norm pass); "pass-fused": proj, and fc2's with GELU; the default
        # ("epilogue"): proj, and fc1 writing fc2's codes (16-bit activations; float32 runs as "pass-fused")
        f32, f16 = torch.float32, torch.float16
        for mode, dt, want_pass, want_gelu, want_codes in (("pass", f32, 2, 0, 0), ("pass-fused", f32, 1, 1, 0),
                                                          (None, f16, 1, 0, 1), (None, f32, 1, 1, 0),
                                                          ("inductor", f32, 0, 0, 0)):
            kw = {} if mode is None else {"token_quant": mode}
            blk = build_qengine(m, r, kernel="gpu", int8_kernel="triton", dtype=dt, **kw).blocks[0]
            h, c = h.to(dt), c.to(dt)
            graphs = []
            def record(gm, example_inputs):
                graphs.append(gm)
                return gm.forward
            torch._dynamo.reset()
            with torch.no_grad():
                eager = blk(h, c)
                got = torch.compile(blk, backend=record, fullgraph=True)(h, c)
            called = [str(n.target) for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]
            assert called.count("dtq.quant_rows_int8") == want_pass, (mode, sorted(set(t for t in called if "dtq" in t)))
            assert called.count("dtq.gelu_quant_rows_int8") == want_gelu, mode
            assert called.count("dtq.mm8_gelu_token_codes") == want_codes, (mode, dt)
            assert bool([t for t in called if "amax" in t]) == (mode == "inductor"), mode
            assert torch.equal(got, eager), (mode, (got - eager).abs().max())
        print("ok")
    ''')
    run_in_triton_interpreter(code)


def test_bench_summary_reports_the_per_token_cost():
    """dtq-bench's summary: each X-token and X-token-tokfused point against X at the same batch (issue
    #13: <= 3% slower)."""
    from dtq.tools.bench_engines import summarize

    pts = lambda **b: {"batches": {k[1:]: {"images_per_s": v} for k, v in b.items()}}  # noqa: E731
    res = {"batches": [64, 8], "end_to_end": {"backends": {
        "int8": pts(b64=20.0, b8=10.0), "int8-token": pts(b64=19.5, b8=9.0), "int8-token-tokfused": pts(b64=15.0),
        "w4a8": pts(b64=12.0), "w4a8-token": pts(b64=12.0), "int8-unfused": pts(b64=18.0)}}}
    got = summarize(res)["per_token_cost"]
    assert set(got) == {"int8-token@64", "int8-token@8", "w4a8-token@64", "int8-token-tokfused@64"}
    assert got["int8-token-tokfused@64"]["cost"] == 0.25 and got["int8-token-tokfused@64"]["static_images_per_s"] == 20.0
    assert got["int8-token@64"]["cost"] == 0.025 and got["int8-token@64"]["met"]
    assert got["int8-token@8"]["cost"] == 0.1 and not got["int8-token@8"]["met"]
    assert got["w4a8-token@64"]["cost"] == 0 and got["w4a8-token@64"]["met"]
