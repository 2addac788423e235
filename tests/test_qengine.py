"""The quantized PyTorch engine: on the CPU it is bit-identical to the simulated model (codes,
scales and balancing folds verified); the Triton kernels are checked in triton's interpreter."""

import importlib.util
import textwrap

import pytest
import torch

from dtq.runtime import quant
from dtq.runtime.kernels_ref import pack_int4, unpack_int4
from dtq.runtime.qengine import (FP8Linear, Int4Linear, Int8Linear, Int8WeightOnlyLinear, build_qengine, engine_layers,
                                 weight_bytes)
from dtq.runtime.recipe import apply_recipe
from dtq.tools.quick_recipe import minmax_recipe, random_inputs
from conftest import run_in_triton_interpreter, triton_available

LAYER_TYPES = {"int8": Int8Linear, "fp8": FP8Linear, "w8a16": Int8WeightOnlyLinear, "w4a16": Int4Linear,
               "w4a8": Int4Linear}


@pytest.mark.parametrize("precision", list(LAYER_TYPES))
def test_cpu_engine_is_the_simulation(small_model, precision):
    recipe = minmax_recipe(small_model, precision, group=32, balance=True)
    sim = apply_recipe(small_model, recipe)
    eng = build_qengine(small_model, recipe)
    layers = engine_layers(eng)
    assert len(layers) == 4 * small_model.config.depth
    assert all(type(m) is LAYER_TYPES[precision] for m in layers.values())
    # every fold kind is present: adaLN (qkv, fc1), V rows (proj), run-time Mul (fc2)
    assert layers["blocks.0.mlp.fc2"].input_mul is not None and layers["blocks.0.attn.qkv"].input_mul is None
    x, t, y = random_inputs(small_model, 3, seed=7)
    with torch.no_grad():
        ref, got, fp = sim(x, t, y), eng(x, t, y), small_model(x, t, y)
    assert torch.equal(ref, got)
    # and it is quantized: not the FP model, but close to it
    assert not torch.equal(fp, got) and 12 < quant.sqnr_db(fp, got) < 120


def test_engine_layers_hold_real_codes(small_model):
    eng = build_qengine(small_model, minmax_recipe(small_model, "int8"))
    lin = engine_layers(eng)["blocks.1.mlp.fc1"]
    assert lin.weight_int8.dtype == torch.int8 and lin.weight_int8.abs().max() == 127
    eng8 = build_qengine(small_model, minmax_recipe(small_model, "fp8"))
    assert engine_layers(eng8)["blocks.0.attn.qkv"].weight_fp8.dtype == torch.float8_e4m3fn
    # .to(dtype) casts the unquantized layers but never the codes or scales
    eng8.to(torch.float16)
    l8 = engine_layers(eng8)["blocks.0.attn.qkv"]
    assert l8.weight_fp8.dtype == torch.float8_e4m3fn and l8.act_scale.dtype == torch.float32
    assert eng8.blocks[0].adaLN_modulation[1].weight.dtype == torch.float16
    # W8A16: int8 codes, no activation quantization, half the bf16 weight memory (plus per-channel scales)
    w8 = engine_layers(build_qengine(small_model, minmax_recipe(small_model, "w8a16")))["blocks.1.mlp.fc1"]
    assert w8.weight_int8.dtype == torch.int8 and w8.act_format == "none" and w8.act_scale is None
    assert w8.weight_bytes() - w8.bias.numel() * 4 <= 0.51 * w8.weight_int8.numel() * 2 + w8.out_features * 8


def test_int4_memory(small_model):
    """INT4 layers hold 4 bits a weight + group scales: <= 0.3x of their bf16 weights at group 64."""
    eng = build_qengine(small_model, minmax_recipe(small_model, "w4a16", group=64))
    bf16 = sum(small_model.get_submodule(n).weight.numel() * 2 for n in engine_layers(eng))
    q = sum(m.weight_bytes() - m.bias.numel() * 4 for m in engine_layers(eng).values())
    assert q / bf16 <= 0.3, q / bf16
    assert weight_bytes(eng)["quantized_layers"] < bf16 / 3


def test_int4_packing_roundtrip():
    q = torch.randint(-8, 8, (5, 12), dtype=torch.int8)
    p = pack_int4(q)
    assert p.shape == (5, 6) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p), q)
    assert int(p[0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)
    with pytest.raises(ValueError):
        pack_int4(torch.full((1, 2), 8, dtype=torch.int8))


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_triton_kernels_in_interpreter():
    """int8_mm and w4a16_mm in TRITON_INTERPRET=1 (CPU) against torch references, with ragged M/N."""
    code = textwrap.dedent("""
        import torch
        from dtq.runtime import kernels
        from dtq.runtime.kernels_ref import pack_int4
        torch.manual_seed(0)
        M, N = 37, 48
        sa, sw, b = torch.tensor(0.02), torch.rand(N) * 0.01 + 1e-3, torch.randn(N)
        for K in (96, 72):  # K a multiple of the tile / a masked tail
            a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
            w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
            c = kernels.int8_mm(a, w, sa, sw, b, out_dtype=torch.float32)
            ref = (a.int() @ w.int().T).float() * sa * sw + b
            assert (c - ref).abs().max() <= 1e-5 * ref.abs().max(), (K, (c - ref).abs().max())
        c2 = kernels.int8_mm(a, w, sa, sw, None, out_dtype=torch.float32)
        assert torch.allclose(c2, ref - b, rtol=1e-5, atol=1e-4)
        # fc1 with GELU + fc2's balancing Mul + INT8 quantization in the epilogue: the same codes as torch
        K = 96
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
        sw, qm, qs = torch.rand(N) * 0.002 + 1e-4, torch.rand(N) + 0.5, torch.tensor(0.01)
        h = (a.int() @ w.int().T).float() * sa * sw + b
        for mul in (qm, None):
            codes = kernels.mm8_gelu_quant(a, w, sa, sw, b, mul, qs)
            g = torch.nn.functional.gelu(h, approximate="tanh") * (1 if mul is None else mul)
            want = torch.round(g / qs).clamp(-128, 127).to(torch.int8)
            diff = (codes.int() - want.int()).abs()
            assert codes.dtype == torch.int8 and diff.max() <= 1 and (diff > 0).float().mean() < 0.01, diff.max()
            assert want.min() < -10 and want.max() == 127  # negative GELU tail and saturation both exercised
        # FP8 E4M3 operands: E4M3 codes out, equal to torch's conversion
        a = (torch.randn(M, K) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        w = (torch.randn(N, K) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        qs = torch.tensor(0.004)
        codes = kernels.mm8_gelu_quant(a, w, sa, sw, b, qm, qs)
        g = torch.nn.functional.gelu((a.float() @ w.float().T) * sa * sw + b, approximate="tanh") * qm / qs
        want = g.clamp(-448, 448).to(torch.float8_e4m3fn)
        assert codes.dtype == torch.float8_e4m3fn and torch.equal(codes.float(), want.float())
        assert want.float().max() == 448 and want.float().min() < -30
        # its rounding: half to even, like torch.round and QuantizeLinear
        import triton, triton.language as tl
        @triton.jit
        def rne(x_ptr, y_ptr, n: tl.constexpr):
            o = tl.arange(0, n)
            tl.store(y_ptr + o, kernels._round_half_even(tl.load(x_ptr + o)))
        x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5, 0.49999997, 3.2, -3.7, 7.0, 2.5000002,
                          -0.50000006, 101.5, -128.5])
        y = torch.empty_like(x)
        rne[(1,)](x, y, 16)
        assert torch.equal(y, torch.round(x)), (y, torch.round(x))
        @triton.jit
        def e4m3(x_ptr, y_ptr, n: tl.constexpr):
            o = tl.arange(0, n)
            tl.store(y_ptr + o, kernels._round_to_e4m3(tl.load(x_ptr + o)))
        grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        grid = grid[grid.isfinite()].unique()
        mids = (grid[1:] + grid[:-1]) / 2  # exact ties between neighbours: to the even code
        x = torch.cat([grid, mids, mids + 1e-6 * mids.abs().clamp_min(1e-3), torch.randn(64) * 100,
                       torch.rand(64) * 2 ** -6])
        x = x.clamp(-448, 448)
        x = torch.cat([x, torch.zeros(1024 - len(x))])
        y = torch.empty_like(x)
        e4m3[(1,)](x, y, 1024)
        assert torch.equal(y, x.to(torch.float8_e4m3fn).float()), (x[y != x.to(torch.float8_e4m3fn).float()])
        K = 96
        a8, sa8 = torch.randint(-128, 128, (M, K), dtype=torch.int8), torch.tensor(0.03)
        q = torch.randint(-8, 8, (N, K), dtype=torch.int8)
        s = torch.rand(N, K // 32) * 0.1
        c = kernels.w4a8_mm(a8, pack_int4(q), s, 32, sa8, b, out_dtype=torch.float32)
        ref = (a8.float() * sa8) @ (q.float() * s.repeat_interleave(32, 1)).T + b
        assert (c - ref).abs().max() < 1e-4 * ref.abs().max(), (c - ref).abs().max()
        for g in (32, 16):  # a tile inside one group / spanning groups
            q = torch.randint(-8, 8, (N, K), dtype=torch.int8)
            s = torch.rand(N, K // g) * 0.1
            x = torch.randn(M, K)
            c = kernels.w4a16_mm(x, pack_int4(q), s, g, b)
            ref = x @ (q.float() * s.repeat_interleave(g, 1)).T + b
            assert (c - ref).abs().max() < 1e-4, (g, (c - ref).abs().max())
        print("ok")
    """)
    run_in_triton_interpreter(code)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_gpu_layer_paths_in_interpreter():
    """Each engine layer's GPU path (activation quantization, code/scale layouts, bias, run-time
    balancing Mul, custom ops) against its reference, on the CPU: Triton kernels in the
    interpreter, FP8 through torch's CPU ``_scaled_mm``. INT4 layers get fp16 activations: the
    interpreter mis-handles bf16 dot operands (numpy has no bf16); bf16 is checked on the GPU."""
    code = textwrap.dedent("""
        import torch
        from dtq.runtime import kernel_ops, quant
        from dtq.runtime.model import DiT, DiTConfig
        from dtq.runtime.qengine import FusedMlp, build_qengine, engine_layers
        from dtq.tools.quick_recipe import minmax_recipe
        torch.manual_seed(0)
        m = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                          num_classes=10)).randomize_(seed=1, std=0.1).eval()
        for p in ["int8", "w8a16", "w4a16", "w4a8", "fp8"]:
            eng = build_qengine(m, minmax_recipe(m, p, group=64 if p == "w4a8" else 32, balance=True),
                                fuse_mlp=("int8", "fp8"), int8_kernel="triton")  # auto: _int_mm at 20 rows
            for name, lin in engine_layers(eng).items():
                if p == "w4a8":
                    assert lin.kernel_name() == "Int4Linear[w4a8 int8-MMA]", lin.kernel_name()
                x = torch.randn(20, lin.in_features, dtype=torch.float16 if p.startswith("w4") else torch.float32)
                ref = lin.reference(x)
                modes = ["tensorwise", "rowwise", "rowwise+bias"] if p == "fp8" else [None]
                for mode in modes:
                    if mode:
                        lin.scaling = mode
                    try:
                        got = lin.kernel_forward(x)
                    except (RuntimeError, NotImplementedError) as exc:
                        if mode.startswith("rowwise"):
                            print("rowwise unsupported on CPU:", str(exc)[:80])
                            continue
                        raise
                    s = quant.sqnr_db(ref.float(), got.float())
                    assert got.shape == ref.shape and got.dtype == x.dtype
                    assert s > 40, (p, name, mode, s)
            mlps = [mod for mod in eng.modules() if isinstance(mod, FusedMlp)]
            assert len(mlps) == (m.config.depth if p in ("int8", "fp8") else 0), (p, len(mlps))
            for mlp in mlps:  # fc1 + GELU + fc2-input quantization in one kernel vs fc2(act(fc1(x)))
                assert mlp.fc2.input_mul is not None  # balance=True: the run-time Mul is in the epilogue
                x = torch.randn(3, 7, mlp.fc1.in_features)
                ref, got = mlp(x), mlp.fused_forward(x)
                assert got.shape == ref.shape and quant.sqnr_db(ref, got) > 40, quant.sqnr_db(ref, got)
        print("ok")
    """)
    run_in_triton_interpreter(code)


def test_int8_auto_dispatch_by_rows(small_model, monkeypatch):
    """int8_kernel="auto": torch._int_mm up to INT8_INT_MM_MAX_M rows (more than 16: cuBLAS's limit),
    Triton above; the _int_mm path (run here through torch's CPU _int_mm) matches the reference, and
    a fused MLP runs unfused where fc1 would take _int_mm. Pinned kernels stay pinned."""
    from dtq.runtime import qengine
    from dtq.runtime.qengine import FusedMlp

    recipe = minmax_recipe(small_model, "int8", balance=True)
    lin0 = engine_layers(build_qengine(small_model, recipe))["blocks.0.mlp.fc2"]
    # the measured default: Triton at every row count (the graph-timed H200 table)
    assert [lin0.kernel_for_rows(m) for m in (17, 512, 4096, 32768)] == ["triton"] * 4
    monkeypatch.setattr(qengine, "INT8_INT_MM_MAX_M", 4096)  # the rule itself, with a window
    eng = build_qengine(small_model, recipe)
    lin = engine_layers(eng)["blocks.0.mlp.fc2"]
    assert lin.int8_kernel == "auto" and lin.input_mul is not None
    assert [lin.kernel_for_rows(m) for m in (16, 17, 4096, 4097)] == ["triton", "int_mm", "int_mm", "triton"]
    pinned = build_qengine(small_model, recipe, int8_kernel="triton")
    assert engine_layers(pinned)["blocks.0.mlp.fc2"].kernel_for_rows(512) == "triton"
    assert engine_layers(build_qengine(small_model, recipe, int8_kernel="int_mm"))["blocks.0.mlp.fc2"] \
        .kernel_for_rows(10**6) == "int_mm"
    with pytest.raises(ValueError, match="int8_kernel"):
        build_qengine(small_model, recipe, int8_kernel="cutlass")
    x = torch.randn(40, lin.in_features) * 3
    ref, got = lin.reference(x), lin.kernel_forward(x)  # 40 rows: the _int_mm branch
    assert quant.sqnr_db(ref, got) > 60, quant.sqnr_db(ref, got)
    mlps = [m for m in eng.modules() if isinstance(m, FusedMlp)]
    assert mlps and not [m for m in build_qengine(small_model, recipe, int8_kernel="int_mm").modules()
                         if isinstance(m, FusedMlp)]
    mlp = mlps[0]
    x = torch.randn(2, 20, mlp.fc1.in_features)
    # 40 rows: fc2(act(fc1(x))), on the CPU the layers' references (a Triton launch would raise here)
    assert torch.equal(mlp.fused_forward(x), mlp(x))


# -- the compile mode (runtime.regional_compile) and what Inductor sees of the engine ------------------
def test_compile_blocks_passes_the_mode_to_torch_compile(small_model):
    """compile_blocks(model, mode) compiles every block with the mode's Inductor options: a recording
    backend receives them as torch.compile hands them to a backend; "default" passes none. The option
    names exist in the installed torch (torch.compile validates Inductor options when it is called:
    a bogus name is refused, so the check is real)."""
    from dtq.runtime.regional_compile import compile_blocks, compile_kwargs, inductor_options

    calls = []

    def record(gm, example_inputs, **kwargs):  # a torch.compile backend: runs the captured graph as is
        calls.append(kwargs)
        return gm.forward

    x, t, y = random_inputs(small_model, 2, seed=3)
    torch._dynamo.reset()
    try:
        for mode in ("max-autotune", "default"):
            calls.clear()
            model = compile_blocks(build_qengine(small_model, minmax_recipe(small_model, "fp8")), mode, backend=record)
            with torch.no_grad():
                model(x, t, y)
            assert calls, mode  # the blocks were compiled (one compilation serves both)
            for kwargs in calls:
                if mode == "default":
                    assert kwargs == {}
                    continue
                opts = kwargs["options"]
                assert opts == inductor_options("max-autotune")
                assert opts["max_autotune"] and opts["max_autotune_gemm"] and opts["epilogue_fusion"]
                assert not opts.get("triton.cudagraphs")  # dtq captures its own CUDA graphs
                tma = "triton.enable_persistent_tma_matmul" in torch._inductor.config.get_config_copy()
                assert opts.get("triton.enable_persistent_tma_matmul", False) is tma
    finally:
        torch._dynamo.reset()
    torch.compile(torch.nn.Identity(), **compile_kwargs("max-autotune"))  # Inductor accepts every option name
    with pytest.raises(RuntimeError):
        torch.compile(torch.nn.Identity(), options={"no_such_inductor_option": True})
    with pytest.raises(ValueError, match="compile mode"):
        compile_blocks(small_model, "max-autotune-no-cudagraphs")


def _aten_ops(fn, *args) -> list[str]:
    """The ATen ops ``fn`` runs, traced with fake tensors: what torch.compile hands to Inductor."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*args)
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("precision,options,scalings", [
    ("fp8", {"fuse_mlp": (), "fuse_residual": ()}, ("tensorwise", "rowwise", "rowwise+bias")),
    ("int8", {"int8_kernel": "int_mm"}, (None,)),
])
def test_gemm_epilogues_are_torch_ops_for_inductor(small_model, precision, options, scalings):
    """Unfused FP8 (cuBLAS _scaled_mm, every scaling mode) and INT8 on torch._int_mm run their MLP's GPU path as
    ATen ops only: GEMM, dequantize / bias, GELU, fc2's quantize, GEMM, with no dtq custom op between,
    so Inductor's max-autotune can put the GEMM on its template and fuse GELU + quantize into its
    epilogue; likewise proj's output into the gated residual add. Their blocks stay unfused DiTBlocks."""
    from dtq.runtime.model import DiTBlock, Mlp

    eng = build_qengine(small_model, minmax_recipe(small_model, precision, balance=True), fuse_norm=False, **options)
    block = eng.blocks[0]
    assert type(block) is DiTBlock and type(block.mlp) is Mlp  # no FusedMlp / FusedResidualBlock
    mlp, proj = block.mlp, block.attn.proj
    gemm = "aten._scaled_mm.default" if precision == "fp8" else "aten._int_mm.default"
    x = torch.randn(40, small_model.config.hidden_size, dtype=torch.bfloat16)
    gate, res = torch.randn(2, proj.out_features, dtype=torch.bfloat16), torch.randn(2, 20, proj.out_features)
    for scaling in scalings:
        for layer in engine_layers(eng).values():
            if scaling:
                layer.scaling = scaling
        ops = _aten_ops(lambda x: mlp.fc2.kernel_forward(mlp.act(mlp.fc1.kernel_forward(x))), x)
        assert all(op.startswith("aten.") for op in ops), (scaling, ops)
        first, second = (i for i, op in enumerate(ops) if op == gemm)
        between = ops[first + 1:second]
        assert "aten.gelu.default" in between, (scaling, between)
        quantize = between[between.index("aten.gelu.default"):]  # fc2's input quantization after the GELU
        assert any(op.startswith("aten.clamp") for op in quantize) and "aten._to_copy.default" in quantize, between
        ops = _aten_ops(lambda h: res + gate.unsqueeze(1) * proj.kernel_forward(h).reshape(2, 20, -1), x)
        assert all(op.startswith("aten.") for op in ops) and ops.count(gemm) == 1, (scaling, ops)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed: custom ops unregistered")
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_default_fused_mlp_is_an_opaque_custom_op(small_model, precision):
    """The control for the test above: the default INT8 and FP8 engines' fused MLP calls dtq's Triton
    kernels, custom ops Inductor cannot look into (max-autotune leaves them as they are)."""
    from dtq.runtime import kernel_ops  # noqa: F401  (registers torch.ops.dtq.*)
    from dtq.runtime.qengine import FusedMlp

    eng = build_qengine(small_model, minmax_recipe(small_model, precision, balance=True))
    mlp = eng.blocks[0].mlp
    assert isinstance(mlp, FusedMlp)
    ops = _aten_ops(lambda x: mlp.fused_forward(x), torch.randn(40, small_model.config.hidden_size, dtype=torch.bfloat16))
    assert "dtq.mm8_gelu_quant.default" in ops and "aten.gelu.default" not in ops, ops
