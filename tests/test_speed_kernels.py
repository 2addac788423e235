"""Speed-oriented kernels: two-level INT4 weights (QServe-style progressive quantization) and the
W4A8 engine path that accumulates int8 MMAs in int32 over the whole K (quantizer, Triton kernel in
the interpreter, engine); the W4A16 kernel's small-M / split-dot autotune candidates."""

import textwrap

import pytest
import torch

from dtq.calibrate.search import search_weight_scale
from dtq.runtime import quant
from dtq.runtime.qengine import Int4Linear, Int4ProgressiveLinear, build_qengine, engine_layers
from dtq.runtime.recipe import apply_recipe
from dtq.runtime.zoo import load_builtin
from dtq.tools.quick_recipe import minmax_recipe, random_inputs
from conftest import run_in_triton_interpreter, triton_available


def test_two_level_codes_are_int8_products_with_an_exact_float_scale():
    torch.manual_seed(0)
    w = torch.randn(96, 256) * torch.logspace(-3, 0, 96)[:, None]  # channels over three decades
    q4, s1, s2 = quant.progressive_int4(w, 64)
    assert q4.dtype == s2.dtype == torch.int8 and s1.dtype == torch.float32
    assert q4.shape == w.shape and s1.shape == (96,) and s2.shape == (96, 4)
    assert int(q4.min()) >= -8 and int(q4.max()) <= 7 and int(s2.min()) >= 1 and int(s2.max()) == quant.S2_MAX
    w8 = q4.int() * s2.int().repeat_interleave(64, dim=1)
    assert int(w8.min()) >= -128 and int(w8.max()) <= 127  # what the kernel computes in registers
    # s1 * s2 in float32 is exact, so DequantizeLinear with that product scale gives the same numbers
    assert torch.equal((s1[:, None] * s2.float()).double(), s1.double()[:, None] * s2.double())
    deq = quant.dequantize_progressive(q4, s1, s2)
    assert torch.equal(deq, w8.float() * s1[:, None])
    assert torch.equal(quant.fake_quant_progressive(w, 64), deq)


def test_two_level_accuracy_on_real_weights():
    """Tiny model's fc2 weights (C_in 512, group 64): integer group scales lose < 0.3 dB against
    MSE-searched float group scales and beat min-max float group scales by > 0.5 dB."""
    model = load_builtin()
    ws = [b.mlp.fc2.weight.detach().float() for b in model.blocks]
    w = torch.cat(ws)
    minmax = quant.fake_quant_weight(w, quant.weight_scale(w, "int4", "group", 64), "int4", "group", 64)
    mse = quant.fake_quant_weight(w, search_weight_scale(w, "int4", "group", 64, method="mse"), "int4", "group", 64)
    two = quant.fake_quant_progressive(w, 64)
    db = {k: quant.sqnr_db(w, v) for k, v in (("minmax", minmax), ("mse", mse), ("two", two))}
    assert db["two"] > db["minmax"] + 0.5 and db["two"] > db["mse"] - 0.3, db
    assert 15 < db["two"] < 30, db


def test_progressive_engine_vs_simulation():
    """The engine requantizes the recipe's INT4 weights: close to the simulation, not equal; its CPU
    path is its own reference; ineligible layers keep the group-scale kernel."""
    model = load_builtin()
    recipe = minmax_recipe(model, "w4a8", group=64, balance=True)
    sim = apply_recipe(model, recipe)
    eng = build_qengine(model, recipe, w4a8="progressive")
    layers = engine_layers(eng)
    assert layers and all(type(m) is Int4ProgressiveLinear for m in layers.values())
    for name, lin in layers.items():
        s = quant.sqnr_db(sim.get_submodule(name).fake_quant_weight(), lin.dequantized_weight())
        assert 28 < s, (name, s)
    x, t, y = random_inputs(model, 4, seed=7)
    with torch.no_grad():
        fp, ref, got = model(x, t, y), sim(x, t, y), eng(x, t, y)
    assert not torch.equal(ref, got) and quant.sqnr_db(ref, got) > 25, quant.sqnr_db(ref, got)
    assert abs(quant.sqnr_db(fp, got) - quant.sqnr_db(fp, ref)) < 0.5  # same distance from the FP model
    assert all(type(m) is Int4Linear for m in engine_layers(build_qengine(model, recipe)).values())
    w4a16 = build_qengine(model, minmax_recipe(model, "w4a16", group=64), w4a8="progressive")
    assert all(type(m) is Int4Linear for m in engine_layers(w4a16).values())  # weight-only: not eligible
    with pytest.raises(ValueError):
        build_qengine(model, recipe, w4a8="bogus")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_progressive_kernel_in_interpreter():
    """The Triton kernel equals the exact integer GEMM bit for bit (unit scales, float32 out), agrees
    with the float64 reference within epilogue rounding (scales + bias, ragged M/N, a group inside /
    spanning a K tile), and the engine layer's GPU path matches its reference."""
    code = textwrap.dedent("""
        import torch
        from dtq.runtime import kernel_ops, kernels, quant
        from dtq.runtime.kernels_ref import pack_int4
        from dtq.runtime.model import DiT, DiTConfig
        from dtq.runtime.qengine import build_qengine, engine_layers
        from dtq.tools.quick_recipe import minmax_recipe
        torch.manual_seed(0)
        M, N = 37, 48
        for K, g in ((96, 32), (128, 64), (96, 16)):  # interpreter tiles: BLOCK_K 32
            a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
            q = torch.randint(-8, 8, (N, K), dtype=torch.int8)
            s2 = torch.randint(1, 17, (N, K // g), dtype=torch.int8)
            s2[0, 0], q[0, :g] = 16, -8  # the extreme product -128
            w8 = q.long() * s2.long().repeat_interleave(g, 1)
            exact = a.long() @ w8.T
            c = kernels.w4a8_progressive_mm(a, pack_int4(q), s2, g, torch.ones(N), torch.ones(()), None,
                                            out_dtype=torch.float32)
            assert torch.equal(c, exact.float()), (K, g, (c - exact.float()).abs().max())
            s1, sa, b = torch.rand(N) * 1e-3 + 1e-5, torch.tensor(0.03), torch.randn(N)
            c = kernels.w4a8_progressive_mm(a, pack_int4(q), s2, g, s1, sa, b, out_dtype=torch.float32)
            ref = exact.double() * (sa.double() * s1.double()) + b.double()
            assert ((c.double() - ref).abs() / ref.abs().max()).max() < 1e-6, (K, g)
            # per-token codes: row m scaled by its own scale (ROW_SCALE); a static scale would be off by
            # up to 30x on some rows
            sr = torch.rand(M) * 0.06 + 0.002
            c = kernels.w4a8_progressive_mm(a, pack_int4(q), s2, g, s1, sr, b, out_dtype=torch.float32)
            ref = exact.double() * (sr.double()[:, None] * s1.double()) + b.double()
            assert ((c.double() - ref).abs() / ref.abs().max()).max() < 1e-6, (K, g, "per token")
            for split, bk in ((1, 32), (2, 32), (2, 64)):  # the split-dot candidates, pinned
                if K % bk == 0:
                    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=bk, GROUP_M=2, SPLIT_DOT=split)
                    c = kernels.w4a8_progressive_mm(a, pack_int4(q), s2, g, torch.ones(N), torch.ones(()), None,
                                                    out_dtype=torch.float32, config=cfg)
                    assert torch.equal(c, exact.float()), (K, g, cfg)
        # W4A16 candidates pinned one by one (the GPU autotuner picks among them): split-dot, the
        # interleaving unpack and the swapped operands (the output tile as its transpose), a group inside
        # one K tile and spanning K tiles
        x, b = torch.randn(M, 128), torch.randn(N)
        for g in (64, 16):
            q = torch.randint(-8, 8, (N, 128), dtype=torch.int8)
            s = torch.rand(N, 128 // g) * 0.1
            ref = x @ (q.float() * s.repeat_interleave(g, 1)).T + b
            for bm, bn, bk, split, swap in ((16, 16, 32, 1, 0), (32, 16, 64, 2, 0), (16, 32, 64, 0, 0),
                                            (16, 32, 64, 0, 1), (32, 16, 32, 0, 1)):
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2, SPLIT_DOT=split, SWAP_AB=swap)
                c = kernels.w4a16_mm(x, pack_int4(q), s, g, b, config=cfg)
                assert (c - ref).abs().max() < 1e-4, (g, cfg, (c - ref).abs().max())
        m = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                          num_classes=10)).randomize_(seed=1, std=0.1).eval()
        for gran in ("tensor", "token"):  # static codes, and per-token codes from quant_rows_int8
            recipe = minmax_recipe(m, "w4a8", group=32, balance=True, act_granularity=gran)
            eng = build_qengine(m, recipe, w4a8="progressive")
            for name, lin in engine_layers(eng).items():
                assert lin.kernel_name().startswith("Int4ProgressiveLinear") and lin.dynamic == (gran == "token")
                # rows of very different size: one static scale would crush the small rows
                x = torch.randn(20, lin.in_features, dtype=torch.float16) * torch.logspace(-2, 1, 20)[:, None].half()
                ref, got = lin.reference(x), lin.kernel_forward(x)
                assert got.shape == ref.shape and got.dtype == x.dtype
                assert quant.sqnr_db(ref.float(), got.float()) > 40, (gran, name, quant.sqnr_db(ref.float(), got.float()))
                if gran == "token":  # each row as close as the whole: no row left with a wrong scale
                    rows = [quant.sqnr_db(ref[i].float(), got[i].float()) for i in range(0, 20, 6)]
                    assert min(rows) > 35, (name, rows)
        print("ok")
    """)
    run_in_triton_interpreter(code)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_w4a16_candidates_by_m():
    """Batch 1-8 with guidance (512-4096 rows) tunes over small tiles, each with and without
    split-dot; large M over the big tiles; K tiles always divide K."""
    from dtq.runtime import kernels

    every = kernels._w4a16_configs()
    small = kernels._prune_w4a16(every, {"M_BUCKET": 512, "K": 1152})
    large = kernels._prune_w4a16(every, {"M_BUCKET": 32768, "K": 4608})
    assert small and large and len(small) + len(large) <= len(every) + 4  # a few shapes serve both ranges
    assert max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in small) == 128 * 128
    assert {c.kwargs["SPLIT_DOT"] for c in small} == {0, 1, 2} and any(c.kwargs["BLOCK_K"] == 128 for c in small)
    assert max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in large) == 128 * 256
    assert all(1152 % c.kwargs["BLOCK_K"] == 0 for c in small)
    assert all(192 % c.kwargs["BLOCK_K"] == 0 for c in kernels._prune_w4a16(every, {"M_BUCKET": 1024, "K": 192}))
    tiny = kernels._prune_w4a16(every, {"M_BUCKET": 16, "K": 1152})  # adaLN at batch rows: 16-row tiles
    assert tiny and {c.kwargs["BLOCK_M"] for c in tiny} == {16} and not set(map(id, tiny)) & set(map(id, small))


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_int8_candidates_bit_exact_in_interpreter():
    """Every INT8 GEMM autotune candidate (both M ranges), pinned one by one in Triton's interpreter,
    equals the integer GEMM bit for bit (unit scales, float32 out: |acc| < 2**24) on ragged M / N with
    several M and N tiles (the GROUP_M swizzle) and a K of two 128-steps; the fused GELU + quantize
    epilogue (fc1) gives the same codes under every candidate. (The interpreter ignores num_warps /
    num_stages: those are the GPU autotuner's to judge.)"""
    code = textwrap.dedent("""
        import torch
        from dtq.runtime import kernels
        torch.manual_seed(0)
        M, N, K = 130, 136, 256  # 64-tiles: 3 x 3 programs, 128: 2 x 2 (ragged), 256: one
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
        a[0], w[0] = -128, -128  # the largest product, K times
        exact = (a.long() @ w.long().T)
        assert int(exact.abs().max()) == 128 * 128 * K < 2 ** 24
        sa, sw, b = torch.tensor(0.02), torch.rand(N) * 0.002 + 1e-4, torch.randn(N)
        ref_codes = None
        configs = kernels._int8_configs()
        assert len(configs) >= 15
        for c in configs:
            cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
            got = kernels.int8_mm(a, w, torch.ones(()), torch.ones(N), None, out_dtype=torch.float32, config=cfg)
            assert torch.equal(got, exact.float()), (cfg, (got - exact.float()).abs().max())
            codes = kernels.mm8_gelu_quant(a, w, sa, sw, b, None, torch.tensor(0.01), config=cfg)
            if ref_codes is None:
                ref_codes = codes
                h = exact.float() * sa * sw + b
                want = torch.round(torch.nn.functional.gelu(h, approximate="tanh") / 0.01).clamp(-128, 127)
                assert (codes.float() - want).abs().max() <= 1 and want.max() == 127 and want.min() < -10
            assert torch.equal(codes, ref_codes), cfg  # same fp32 epilogue on the same int32 sums
        print("ok", len(configs))
    """)
    run_in_triton_interpreter(code)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_int8_candidates_by_m():
    """Batch 1-8 with guidance (M <= 4096) tunes over small tiles, batch 64 over the large ones
    (with 128x128x128 / 128x256x64 for the short-K proj); <= 12 each; GROUP_M swizzle everywhere."""
    from dtq.runtime import kernels

    every = kernels._int8_configs()
    small = kernels._prune_int8(every, {"M_BUCKET": 512, "K": 1152})
    large = kernels._prune_int8(every, {"M_BUCKET": 32768, "K": 4608})
    shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)  # noqa: E731
    assert 6 <= len(small) <= 12 and 6 <= len(large) <= 12
    assert kernels._prune_int8(every, {"M_BUCKET": 4096, "K": 1152}) == small
    assert min(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in small) == 64 * 64
    assert max(c.num_stages for c in small) > 4
    assert {(128, 128, 128, 3, 8), (128, 256, 64, 3, 8), (256, 128, 128, 4, 8)} <= {shape(c) for c in large}
    assert all(c.kwargs["GROUP_M"] == 8 for c in every)
    assert all(1152 % c.kwargs["BLOCK_K"] == 0 for c in small + large)
    assert kernels._prune_int8(every, {"M_BUCKET": 512, "K": 96}) == every  # no K tile divides: all (masked loop)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_fused_epilogues_in_interpreter():
    """The GEMM epilogues of issue #13 in Triton's interpreter: the gated residual add (INT8, FP8 and
    two-level W4A8; a strided gate view, ragged M and N, one gate row per sample's tokens) against a
    float64 reference, the two-level W4A8 fc1 with GELU + fc2's INT8 quantization against torch's
    codes; then INT8 and W4A8-progressive engines whose blocks run the fused path (the fused custom
    ops are called) and match their reference (the CPU path, bit-identical to the simulation)."""
    code = textwrap.dedent("""
        import torch
        from torch.profiler import profile
        from dtq.runtime import kernel_ops, kernels, quant
        from dtq.runtime.kernels_ref import pack_int4
        from dtq.runtime.model import DiT, DiTConfig
        from dtq.runtime.qengine import FusedMlp, FusedResidualBlock, build_qengine
        from dtq.runtime.recipe import apply_recipe
        from dtq.tools.quick_recipe import minmax_recipe
        torch.manual_seed(0)
        B, T, N, K = 3, 13, 48, 96  # M = 39 rows: ragged against the 16-row interpreter tile
        M = B * T
        sa, b = torch.tensor(0.02), torch.randn(N)
        gate = torch.randn(B, 6 * N).chunk(6, dim=1)[2]  # a strided view of the adaLN output, as blocks pass it
        res = torch.randn(M, N)
        def check_gate_res(got, out, name, res=res):
            want = res.double() + gate.double().repeat_interleave(T, 0) * out
            err = float((got.double() - want).abs().max() / want.abs().max())
            assert got.dtype == res.dtype and got.shape == (M, N) and err < 1e-6, (name, err)
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8)
        w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
        sw = torch.rand(N) * 0.01 + 1e-3
        out = (a.int() @ w.int().T).double() * sa.double() * sw.double() + b.double()
        check_gate_res(kernels.mm8_gate_residual(a, w, sa, sw, b, gate, res), out, "int8")
        check_gate_res(torch.ops.dtq.mm8_gate_residual(a, w, sa, sw, None, gate, res), out - b.double(), "int8 op")
        res16 = res.half()  # the residual's dtype is the output's; one rounding of the float32 sum
        got = kernels.mm8_gate_residual(a, w, sa, sw, b, gate, res16)
        want = (res16.double() + gate.double().repeat_interleave(T, 0) * out)
        assert got.dtype == torch.float16 and float((got.double() - want).abs().max() / want.abs().max()) < 1e-3
        af = (torch.randn(M, K) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        wf = (torch.randn(N, K) * 50).clamp(-448, 448).to(torch.float8_e4m3fn)
        outf = (af.double() @ wf.double().T) * sa.double() * sw.double() + b.double()
        check_gate_res(kernels.mm8_gate_residual(af, wf, sa, sw, b, gate, res), outf, "fp8")
        for K2, g in ((96, 32), (128, 64)):
            a = torch.randint(-128, 128, (M, K2), dtype=torch.int8)
            q = torch.randint(-8, 8, (N, K2), dtype=torch.int8)
            s2 = torch.randint(1, 17, (N, K2 // g), dtype=torch.int8)
            exact = a.long() @ (q.long() * s2.long().repeat_interleave(g, 1)).T
            s1 = (torch.rand(N) + 0.5) / (float(exact.double().std()) * sa)  # outputs of order 1
            out = exact.double() * (sa.double() * s1.double()) + b.double()
            check_gate_res(kernels.w4a8_progressive_gate_residual(a, pack_int4(q), s2, g, s1, sa, b, gate, res), out,
                           ("w4a8", K2, g))
            sr = sa * (torch.rand(M) + 0.5)  # per-token codes' scales: the gated residual with ROW_SCALE
            out_r = exact.double() * (sr.double()[:, None] * s1.double()) + b.double()
            check_gate_res(kernels.w4a8_progressive_gate_residual(a, pack_int4(q), s2, g, s1, sr, b, gate, res), out_r,
                           ("w4a8 per token", K2, g))
            qm, qs = torch.rand(N) + 0.5, torch.tensor(0.02)  # saturates above ~2.5
            for mul in (qm, None):
                codes = torch.ops.dtq.w4a8_progressive_gelu_quant(a, pack_int4(q), s2, g, s1, sa, b, mul, qs)
                h = torch.nn.functional.gelu(out, approximate="tanh") * (1 if mul is None else mul.double())
                want = torch.round(h / qs.double()).clamp(-128, 127).to(torch.int8)
                diff = (codes.int() - want.int()).abs()
                assert codes.dtype == torch.int8 and diff.max() <= 1 and (diff > 0).float().mean() < 0.01, diff.max()
                assert want.min() < -5 and want.max() == 127  # negative GELU tail and saturation exercised
        # engines: every block fused (proj and the MLP), the fused kernels called, vs the CPU reference
        m = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                          num_classes=10)).randomize_(seed=1, std=0.1).eval()
        x, t, y = torch.randn(3, 4, 4, 4), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 3])
        for p, kw, ops in (("int8", {}, ("dtq::mm8_gate_residual", "dtq::mm8_gelu_quant")),
                           ("w4a8", dict(w4a8="progressive", w4a8_staged_rows=None),  # in registers; staged: below
                            ("dtq::w4a8_progressive_gate_residual", "dtq::w4a8_progressive_gelu_quant"))):
            recipe = minmax_recipe(m, p, group=32, balance=True)
            eng = build_qengine(m, recipe, **kw)
            assert all(isinstance(blk, FusedResidualBlock) and blk.fuse_proj and blk.fuse_fc2
                       and isinstance(blk.mlp, FusedMlp) for blk in eng.blocks), p
            unfused = build_qengine(m, recipe, fuse_mlp=(), fuse_residual=(), fuse_norm=False, **kw)
            assert not any(isinstance(mod, (FusedResidualBlock, FusedMlp)) for mod in unfused.modules())
            with torch.no_grad():
                if p == "int8":  # the CPU path is still the simulation's, bit for bit
                    assert torch.equal(eng(x, t, y), apply_recipe(m, recipe)(x, t, y))
                assert torch.equal(eng(x, t, y), unfused(x, t, y))
                h = hf = h0 = eng.x_embedder(x) + eng.pos_embed
                c = eng.t_embedder(t) + eng.y_embedder(y)
                for blk in eng.blocks:
                    ref = blk(h, c)  # CPU: DiTBlock's forward
                    with profile() as prof:
                        got = blk.fused_forward(h, c)
                    names = [e.name for e in prof.events()]
                    assert all(names.count(op) == 2 * (op.endswith("gate_residual")) + op.endswith("gelu_quant")
                               for op in ops), (p, sorted(set(n for n in names if n.startswith("dtq::"))))
                    s = quant.sqnr_db(ref, got)
                    assert got.shape == ref.shape and s > 40, (p, s)
                    h, hf = ref, blk.fused_forward(hf, c)
                # the whole model with fused blocks: as far from the simulation / the FP model as the engine
                fused_out = eng.unpatchify(eng.final_layer(hf, c))
                sim_out, eng_out, fp_out = apply_recipe(m, recipe)(x, t, y), eng(x, t, y), m(x, t, y)
                assert quant.sqnr_db(eng_out, fused_out) > 40, (p, quant.sqnr_db(eng_out, fused_out))
                d_eng, d_fused = quant.sqnr_db(sim_out, eng_out), quant.sqnr_db(sim_out, fused_out)
                assert d_fused > 40 if p == "int8" else abs(d_fused - d_eng) < 0.5, (p, d_eng, d_fused)
                # 0.25 dB: the norm pass's codes multiply by mul / s where the quantizer divides (rare flips)
                assert abs(quant.sqnr_db(fp_out, fused_out) - quant.sqnr_db(fp_out, eng_out)) < 0.25
                print(p, "model SQNR vs simulation: engine", round(min(d_eng, 999), 2), "fused", round(d_fused, 2))
                if p == "int8":  # torch.compile traces the fused block whole (fake impls of the ops), two batch sizes
                    f = torch.compile(eng.blocks[0].fused_forward, backend="aot_eager", fullgraph=True)
                    for n in (3, 5):
                        hn, cn = torch.randn(n, *h.shape[1:]), torch.randn(n, c.shape[1])
                        assert torch.equal(f(hn, cn), eng.blocks[0].fused_forward(hn, cn))
                    # another attention backend (EngineAttention, SageAttention's CPU reference): fused the same way
                    sage = build_qengine(m, recipe, attention="sage")
                    blk = sage.blocks[0]
                    assert isinstance(blk, FusedResidualBlock) and type(blk.attn).__name__ == "EngineAttention"
                    assert quant.sqnr_db(blk(h0, c), blk.fused_forward(h0, c)) > 40
        print("ok")
    """)
    run_in_triton_interpreter(code)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_staged_w4a8_and_fused_per_token_mlp_in_interpreter():
    """The 8-bit GEMM's TMA kernel equals its pointer-load kernel (INT8 / FP8, each epilogue). Two-level
    W4A8 staged to int8 (large M): the unpack kernel gives q4 * s2 exactly, and a layer that
    runs the INT8 GEMM on it returns the in-register kernel's output bit for bit (plain, GELU + quantize,
    gated residual; static and per-token scales). The GELU-folding per-token pass gives the unfused
    GELU + pass's codes; a per-token "pass-fused" engine calls it and the per-row gated-residual
    epilogues, and matches the "pass" engine."""
    code = textwrap.dedent("""
        import torch
        from torch.profiler import profile
        from dtq.runtime import kernel_ops, kernels, quant
        from dtq.runtime.kernels_ref import pack_int4
        from dtq.runtime.model import DiT, DiTConfig
        from dtq.runtime.qengine import FusedMlp, FusedResidualBlock, Int4ProgressiveLinear, build_qengine, engine_layers
        from dtq.tools.quick_recipe import minmax_recipe
        torch.manual_seed(0)
        for N, K, g in ((37, 96, 32), (50, 128, 16), (16, 64, 64)):  # ragged N, groups below / at the tile
            q = torch.randint(-8, 8, (N, K), dtype=torch.int8)
            s2 = torch.randint(1, 17, (N, K // g), dtype=torch.int8)
            s2[0, 0], q[0, 0] = 16, -8  # the extreme product -128
            w8 = kernels.unpack_progressive_int8(pack_int4(q), s2, g)
            want = q.int() * s2.int().repeat_interleave(g, 1)
            assert w8.dtype == torch.int8 and torch.equal(w8.int(), want), (N, K, g)
        # the TMA kernel (persistent on the GPU; here one program per tile) equals the pointer-load kernel
        M, N, K = 39, 48, 96
        sa, sw, b = torch.tensor(0.02), torch.rand(N) * 0.01 + 1e-3, torch.randn(N)
        gate, res = torch.randn(3, N), torch.randn(M, N)
        for dt in (torch.int8, torch.float8_e4m3fn):
            if dt == torch.int8:
                a, w = (torch.randint(-128, 128, s, dtype=dt) for s in ((M, K), (N, K)))
            else:
                a, w = ((torch.randn(*s) * 50).clamp(-448, 448).to(dt) for s in ((M, K), (N, K)))
            for kw, out_dt in (({}, torch.float32), (dict(gate=gate, residual=res), torch.float32),
                               (dict(q_scale=torch.tensor(0.05)), dt)):
                c0, c1 = torch.empty(M, N, dtype=out_dt), torch.empty(M, N, dtype=out_dt)
                kernels._mm8(a, w, c0, sa, sw, b, tma=False, **kw)
                kernels._mm8(a, w, c1, sa, sw, b, tma=True, **kw)
                assert torch.equal(c0.view(torch.uint8) if out_dt == dt else c0,
                                   c1.view(torch.uint8) if out_dt == dt else c1), (dt, list(kw))
        # GELU folded into the per-token pass: the codes of GELU (rounded to fp16) then the pass
        x = torch.randn(23, 200, dtype=torch.float16) * torch.logspace(-1, 1, 23)[:, None].half()
        mul = torch.rand(200) + 0.5
        q1, s1 = kernels.quant_rows_int8(x, mul, gelu=True)
        q0, s0 = kernels.quant_rows_int8(torch.nn.functional.gelu(x.float(), approximate="tanh").half(), mul)
        diff = (q1.int() - q0.int()).abs()
        assert torch.allclose(s1, s0, rtol=1e-3) and diff.max() <= 1 and (diff > 0).float().mean() < 0.01, diff.max()
        assert q0.min() < -5 and q0.max() == 127  # the negative GELU tail and each row's amax exercised
        # engines on a tiny DiT
        m = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                          num_classes=10)).randomize_(seed=1, std=0.1).eval()
        xi, t, y = torch.randn(3, 4, 4, 4), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 3])
        for gran in ("tensor", "token"):
            recipe = minmax_recipe(m, "w4a8", group=32, balance=True, act_granularity=gran)
            inreg = build_qengine(m, recipe, w4a8="progressive", kernel="gpu", w4a8_staged_rows=None)
            staged = build_qengine(m, recipe, w4a8="progressive", kernel="gpu", w4a8_staged_rows=1)
            for name, lin in engine_layers(staged).items():
                # one layer per granularity (qkv: K = hidden, static; fc2: K = 4 x hidden, per token); the
                # model check below covers the rest
                if not name.endswith("attn.qkv" if gran == "tensor" else "mlp.fc2"):
                    continue
                other = inreg.get_submodule(name)
                assert isinstance(lin, Int4ProgressiveLinear) and lin.staged(1) and not other.staged(10**9)
                a = torch.randint(-128, 128, (20, lin.in_features), dtype=torch.int8)
                sa = torch.rand(20) * 0.02 + 1e-3 if gran == "token" else lin.act_scale
                assert torch.equal(lin.codes_forward(a, torch.float16, sa), other.codes_forward(a, torch.float16, sa))
                gate, res = torch.randn(4, lin.out_features), torch.randn(20, lin.out_features, dtype=torch.float16)
                assert torch.equal(lin.codes_gate_residual(a, gate, res, sa), other.codes_gate_residual(a, gate, res, sa))
                if gran == "tensor":
                    qs = torch.tensor(0.05)
                    assert torch.equal(lin.codes_gelu_quant(a, None, qs), other.codes_gelu_quant(a, None, qs))
            with profile() as prof, torch.no_grad():
                got, want = staged(xi, t, y), inreg(xi, t, y)
            assert torch.equal(got, want), gran
            names = {e.name for e in prof.events()}
            gemm = "dtq::mm8_gate_residual" if gran == "tensor" else "dtq::int8_mm"  # per token: qkv / fc1
            assert "dtq::unpack_progressive_int8" in names and gemm in names, (gran, sorted(names))
        for p, kw in (("int8", {}), ("w4a8", dict(w4a8="progressive"))):
            recipe = minmax_recipe(m, p, group=32, balance=True, act_granularity="token")
            plain = build_qengine(m, recipe, kernel="gpu", token_quant="pass", **kw)
            fused = build_qengine(m, recipe, kernel="gpu", token_quant="pass-fused", **kw)
            assert not any(isinstance(mod, FusedMlp) for mod in plain.modules()), p  # "pass": no fused epilogue,
            assert all(not (b.fuse_proj or b.fuse_fc2) and b.fuse_norm for b in plain.blocks), p  # the norm pass only
            blk = fused.blocks[0]
            assert isinstance(blk, FusedResidualBlock) and blk.fuse_proj and blk.fuse_fc2 and isinstance(blk.mlp, FusedMlp), p
            with profile() as prof, torch.no_grad():
                got = fused(xi, t, y)
            names = [e.name for e in prof.events()]
            assert names.count("dtq::gelu_quant_rows_int8") == 1, (p, sorted(set(n for n in names if n.startswith("dtq::"))))
            gate_op = "dtq::mm8_gate_residual"  # two-level W4A8 too: staged to int8 by default
            assert names.count(gate_op) == 2, (p, gate_op)
            with torch.no_grad():
                ref, sim = plain(xi, t, y), build_qengine(m, recipe, **kw)(xi, t, y)
            s_plain, s_ref = quant.sqnr_db(ref, got), quant.sqnr_db(sim, got)
            # as close to the CPU engine (int8: the simulation; w4a8: its requantized weights) as "pass" is
            assert s_plain > 40 and s_ref > min(40, quant.sqnr_db(sim, ref) - 0.5), (p, s_plain, s_ref)
            print(p, "per-token pass-fused vs pass", round(s_plain, 1), "dB")
            if p == "w4a8":  # torch.compile traces the per-token fused block whole, staged to int8 too
                staged = build_qengine(m, recipe, kernel="gpu", token_quant="pass-fused", w4a8_staged_rows=1, **kw)
                h = staged.x_embedder(xi) + staged.pos_embed
                c = staged.t_embedder(t) + staged.y_embedder(y)
                f = torch.compile(staged.blocks[0].fused_forward, backend="aot_eager", fullgraph=True)
                with torch.no_grad():
                    assert torch.equal(f(h, c), staged.blocks[0].fused_forward(h, c))
        print("ok")
    """)
    run_in_triton_interpreter(code)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_staged_w4a16_in_interpreter():
    """W4A16 staged (w4a16_staged_rows; the default from W4A16_STAGED_MIN_ROWS rows): the unpack kernel gives q4 * s rounded once to the
    activation type, and the layer's dense GEMM on it matches the INT4 kernel and the reference."""
    code = textwrap.dedent("""
        import torch
        from dtq.runtime import kernel_ops, kernels, quant
        from dtq.runtime.kernels_ref import pack_int4
        from dtq.runtime.model import DiT, DiTConfig
        from dtq.runtime.qengine import Int4Linear, build_qengine, engine_layers
        from dtq.tools.quick_recipe import minmax_recipe
        torch.manual_seed(0)
        for N, K, g in ((37, 96, 32), (16, 128, 128), (20, 64, 16)):  # group 16: scales gathered per column
            q = torch.randint(-8, 8, (N, K), dtype=torch.int8)
            s = torch.rand(N, K // g) * 0.1 + 1e-3
            exact = q.float() * s.repeat_interleave(g, 1)
            w = kernels.unpack_int4_dequant(pack_int4(q), s, g, torch.float16)
            assert w.dtype == torch.float16 and torch.equal(w, exact.half()), (N, K, g)
            # bf16 rounded to nearest even on the bits (the interpreter's own cast truncates): torch's rounding
            w = kernels.unpack_int4_dequant(pack_int4(q), s, g, torch.bfloat16)
            assert w.dtype == torch.bfloat16 and torch.equal(w, exact.bfloat16()), (N, K, g)
            # into a view of a larger buffer (a prefetch slot's), at an even offset; nothing outside it written
            pool = torch.full((N * K + 2 * K,), 7.0, dtype=torch.bfloat16)
            kernels.unpack_int4_dequant(pack_int4(q), s, g, torch.bfloat16, out=pool[K:K + N * K].view(N, K))
            assert torch.equal(pool[K:K + N * K].view(N, K), exact.bfloat16()), (N, K, g)
            assert (pool[:K] == 7).all() and (pool[K + N * K:] == 7).all(), (N, K, g)
        m = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                          num_classes=10)).randomize_(seed=1, std=0.1).eval()
        recipe = minmax_recipe(m, "w4a16", group=32)
        staged = build_qengine(m, recipe, kernel="gpu", w4a16_staged_rows=0)
        inreg = build_qengine(m, recipe, kernel="gpu", w4a16_staged_rows=None)
        for name, lin in engine_layers(staged).items():
            other = inreg.get_submodule(name)
            assert isinstance(lin, Int4Linear) and lin.staged(1) and not other.staged(10**9)
            x = torch.randn(20, lin.in_features, dtype=torch.float16)
            ref, a, b = lin.reference(x), lin.kernel_forward(x), other.kernel_forward(x)
            assert quant.sqnr_db(ref.float(), a.float()) > 40 and quant.sqnr_db(b.float(), a.float()) > 40, name
        print("ok")
    """)
    run_in_triton_interpreter(code)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_w4a16_prefetch_and_gelu_epilogue_in_interpreter():
    """The W4A16 engine's block-ahead weight prefetch (runtime.weight_prefetch; adaLN's whole output computed
    ahead) is scheduling only: the engine's output is bit-identical without it, also under regional torch.compile (one compilation for
    every block: the prefetcher's calls are graph breaks, not guards per block); a layer called outside
    its block never reads its slot; fc1's GELU epilogue (GeluEpilogueMlp) stays within rounding of the
    unfused MLP. The slots are two blocks' weights."""
    code = textwrap.dedent("""
        import torch
        from dtq.runtime import kernel_ops, quant
        from dtq.runtime.model import DiT, DiTConfig
        from dtq.runtime.qengine import (W4A16_STAGED_MIN_ROWS, FusedResidualBlock, GeluEpilogueMlp, Int4Linear,
                                         build_qengine, compile_blocks, weight_bytes)
        from dtq.tools.quick_recipe import minmax_recipe
        torch.manual_seed(0)
        m = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4, num_heads=4,
                          num_classes=10)).randomize_(seed=1, std=0.1).eval()
        recipe = minmax_recipe(m, "w4a16", group=32, adaln=True)
        # float16 activations: the W4A16 path's GEMM type, so the slots are used (a float32 engine casts to
        # bf16 for the GEMM, which the interpreter's INT4 kernel gets wrong: its bf16 casts are not the GPU's)
        build = lambda **kw: build_qengine(m, recipe, kernel="gpu", dtype=torch.float16, **{"w4a16_staged_rows": 0, **kw})
        sim = build_qengine(m, recipe, kernel="reference")
        plain, fetched, full = build(w4a16_prefetch=False, fuse_mlp=()), build(fuse_mlp=()), build()
        blocks = list(fetched.blocks)
        assert all(isinstance(b, FusedResidualBlock) and b.prefetcher is blocks[0].prefetcher for b in blocks)
        assert [b.prefetch_index for b in blocks] == [0, 1, 2, 3] and not hasattr(plain.blocks[0], "prefetcher")
        assert all(isinstance(b.mlp, GeluEpilogueMlp) for b in full.blocks)
        assert not any(isinstance(b.mlp, GeluEpilogueMlp) for b in fetched.blocks)
        x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([1, 3])
        with torch.no_grad():
            ref = sim(x, t, y)
            x = x.half()
            a, b, c = (e(x, t, y).float() for e in (plain, fetched, full))
            assert torch.equal(a, b), (a - b).abs().max()  # scheduling only
            assert quant.sqnr_db(ref, a) > 35 and quant.sqnr_db(a, c) > 40, (quant.sqnr_db(ref, a), quant.sqnr_db(a, c))
            # a layer called on its own is not armed: it unpacks its weight, whatever its slot holds
            lin = fetched.blocks[1].attn.qkv
            assert isinstance(lin, Int4Linear) and lin.prefetched_weight is not None and not lin.prefetch_armed
            # blocks 1 and 3 share slot 1, where the last forward left block 3's weights, as unpacked
            last = fetched.blocks[3].attn.qkv
            assert lin.prefetched_weight.data_ptr() == last.prefetched_weight.data_ptr()
            assert torch.equal(last.prefetched_weight, last.dense_weight(torch.float16))  # unarmed: its own unpack
            lin.prefetch_armed = True  # armed (inside its block's forward), the layer reads the slot
            assert lin.dense_weight(torch.float16) is lin.prefetched_weight
            lin.prefetch_armed = False
            # the bias cast once with the slots; an fp16 input without balancing passes as it is
            assert lin.bias_cast.dtype == torch.float16 and torch.equal(lin.bias_cast, lin.bias.half())
            h16 = torch.randn(8, lin.in_features).half()
            a16, b16 = lin._weight_only_input(h16)
            assert a16 is h16 and b16 is lin.bias_cast
            # adaLN (same input in every block): its output was computed ahead, as the layer computes it
            ada = fetched.blocks[2].adaLN_modulation[-1]
            cond = torch.nn.functional.silu(fetched.t_embedder(t).half() + fetched.y_embedder(y).half())
            assert ada.prefetched_output is not None and torch.equal(ada.prefetched_output, ada(cond))
            ada.prefetch_armed = True
            assert ada(cond) is ada.prefetched_output
            ada.prefetch_armed = False
            h = torch.randn(5, 64, dtype=torch.float16)
            lin.prefetched_weight.zero_()
            assert torch.equal(lin(h), plain.blocks[1].attn.qkv(h))
            # the default row threshold: adaLN at 2 rows runs the INT4 kernel, its slot is neither filled nor read
            d_on, d_off = build(w4a16_staged_rows=W4A16_STAGED_MIN_ROWS), build(w4a16_staged_rows=W4A16_STAGED_MIN_ROWS,
                                                                               w4a16_prefetch=False)
            assert torch.equal(d_on(x, t, y), d_off(x, t, y))
            ada = d_on.blocks[2].adaLN_modulation[-1]
            assert not ada.staged(2) and ada.staged(32) and d_on.blocks[2].attn.qkv.staged(32)
            ada.prefetched_weight.fill_(float("nan"))
            assert torch.equal(d_on(x, t, y), d_off(x, t, y)) and torch.isnan(ada.prefetched_weight).all()
            pf = blocks[0].prefetcher
            layer_elems = sum(lin.in_features * lin.out_features for lin in pf.blocks[0])
            assert pf.scratch_bytes() == 2 * layer_elems * 2  # float16
            assert weight_bytes(fetched) == weight_bytes(plain)  # the slots are scratch, not weights
            # regional compile: the blocks share their compilations (the prefetcher's calls are graph
            # breaks; block 0 compiles again for its transposed input, as any engine's): 2 frames x 2,
            # where a guard on each block's index compiled 2 frames per block
            import torch._dynamo
            from torch._dynamo.utils import counters
            torch._dynamo.reset(); counters.clear()
            compile_blocks(fetched, backend="aot_eager")
            assert torch.equal(fetched(x, t, y).float(), b) and torch.equal(fetched(x, t, y).float(), b)
            assert counters["frames"]["ok"] <= 5, dict(counters["frames"])
        print("ok")
    """)
    run_in_triton_interpreter(code)


# interpreter snippet: a small per-token INT8 DiT's output through the "pass-fused" engine and through one with
# ``token_quant`` (fp16, fixed inputs), every MLP fused and only the latter taking that token_quant's MLP path
_PER_TOKEN_ENGINES = textwrap.dedent("""
    def per_token_engine_outputs(token_quant):
        import torch
        from dtq.runtime.model import DiT, DiTConfig
        from dtq.runtime.qengine import FusedMlp, build_qengine
        from dtq.tools.quick_recipe import minmax_recipe
        torch.manual_seed(1)
        m = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
                          num_classes=10)).randomize_(seed=1, std=0.1).eval()
        recipe = minmax_recipe(m, "int8", act_granularity="token")
        x, t, y = torch.randn(2, 4, 8, 8).half(), torch.tensor([10.0, 500.0]), torch.tensor([1, 3])
        outs = {}
        for tq in ("pass-fused", token_quant):
            e = build_qengine(m, recipe, kernel="gpu", dtype=torch.float16, token_quant=tq)
            assert all(isinstance(b.mlp, FusedMlp) for b in e.blocks)
            assert e.blocks[0].mlp.rowquant_fusable(32, token_quant) == (tq == token_quant)
            with torch.no_grad():
                outs[tq] = e(x, t, y).float()
        return outs
""")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_per_token_fc2_quantized_in_the_gemm_in_interpreter():
    """token_quant="gemm": fc1's epilogue writes GELU(fc1) and each row's amax of fc2's balanced input (atomic
    max over N tiles: exactly torch's amax of what it stored); fc2's GEMM quantizes that input per row as it
    loads it, giving quant_rows_int8's scales and its codes up to rounding ties, so its output matches the
    pass + int8_mm path (plain and gated-residual epilogues); and the per-token engine with it stays within
    rounding of the "pass-fused" engine."""
    code = _PER_TOKEN_ENGINES + textwrap.dedent("""
        import torch
        from dtq.runtime import kernel_ops, kernels, quant
        torch.manual_seed(0)
        M, K, N, N2 = 70, 96, 160, 64  # ragged M, several N tiles, K = 3 tiles of 32
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8)
        w1 = torch.randint(-127, 128, (N, K), dtype=torch.int8)
        w2 = torch.randint(-127, 128, (N2, N), dtype=torch.int8)
        sa, sw1, sw2 = torch.rand(M) * 1e-3 + 1e-4, torch.rand(N) * 1e-2 + 1e-3, torch.rand(N2) * 1e-2 + 1e-3
        b1, b2, mul = torch.randn(N), torch.randn(N2), torch.rand(N) + 0.5
        h, amax = kernels.mm8_gelu_rowmax(a, w1, sa, sw1, b1, mul, torch.float16)
        exact = torch.nn.functional.gelu((a.float() @ w1.float().t()) * sa[:, None] * sw1 + b1, approximate="tanh")
        assert h.dtype == torch.float16 and quant.sqnr_db(exact, h.float()) > 50
        assert torch.equal(amax, (h.float() * mul).abs().amax(dim=1))  # the atomic max is exact
        codes, s = kernels.quant_rows_int8(h, mul)
        ref = kernels.int8_mm(codes, w2, s, sw2, b2, torch.float32)
        got = kernels.mm8_rowquant(h, amax, mul, w2, sw2, b2, torch.float32)
        assert quant.sqnr_db(ref, got) > 60, quant.sqnr_db(ref, got)
        # the codes it made: the same as the pass's but for rounding ties (x * (1/s) against x / s)
        inv = 1.0 / torch.clamp(amax / 127.0, min=1e-12)
        mine = torch.round(h.float() * mul * inv[:, None]).clamp(-128, 127)
        assert (mine != codes.float()).float().mean() < 1e-3 and (mine - codes.float()).abs().max() <= 1
        gate, res = torch.randn(2, N2), torch.randn(M - M % 2, N2)
        hh, aa = h[: M - M % 2], amax[: M - M % 2]
        ref = kernels.mm8_gate_residual(codes[: M - M % 2], w2, s[: M - M % 2], sw2, b2, gate, res)
        got = kernels.mm8_rowquant(hh, aa, mul, w2, sw2, b2, gate=gate, residual=res)
        assert quant.sqnr_db(ref, got) > 60, quant.sqnr_db(ref, got)
        # the engine: per-token INT8 DiT, "gemm" against "pass-fused"
        outs = per_token_engine_outputs("gemm")
        assert quant.sqnr_db(outs["pass-fused"], outs["gemm"]) > 35, quant.sqnr_db(outs["pass-fused"], outs["gemm"])
        print("ok")
    """)
    run_in_triton_interpreter(code)


def _ptx_for_hopper(fn, consts: dict, ptrs: dict, num_warps: int = 4, num_stages: int = 3) -> str:
    """PTX of a Triton kernel compiled for sm_90 on the CPU (no GPU needed)."""
    return _compile_for_hopper(fn, consts, ptrs, num_warps, num_stages)["ptx"]


def _compile_for_hopper(fn, consts: dict, ptrs: dict, num_warps: int = 4, num_stages: int = 3) -> dict:
    """The compiled kernel's ``asm`` (``ttgir``, ``ptx``, ...) for sm_90, on the CPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: "constexpr" if n in consts else ptrs.get(n, "*fp32" if n.endswith("_ptr") else "i32")
           for n in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n] != "constexpr"}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=aligned),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages}).asm


def _count(ptx: str, op: str) -> int:
    return sum(op in line for line in ptx.splitlines())


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_w4a16_unpack_compiles_to_pairs_for_hopper():
    """The W4A16 unpack (runtime.weight_prefetch's, next to the forward on the GPU, so its SM time counts)
    writes each packed byte's two weights as one 32-bit word: one packed ``cvt.rn.bf16x2.f32`` per byte, the
    group scale loaded once per row of a tile, and no more than the one layout change Triton makes between
    the byte load's and the word store's vector widths (an interleave of two tiles made two more)."""
    from dtq.runtime import kernels

    asm = _compile_for_hopper(kernels._unpack_int4_kernel, {"GROUP": 128, "OUT_DTYPE": 1, "BLOCK_N": 64, "BLOCK_KP": 64},
                              {"w_ptr": "*u8", "s_ptr": "*fp32", "out_ptr": "*i32"}, num_stages=1)
    per_thread = 64 * 64 // 128  # bytes of the tile a thread handles (4 warps)
    assert _count(asm["ptx"], "cvt.rn.bf16x2.f32") == per_thread, _count(asm["ptx"], "cvt.rn.bf16x2.f32")
    assert _count(asm["ptx"], "cvt.rn.bf16.f32") == 0
    assert asm["ttgir"].count("ttg.convert_layout") <= 1, asm["ttgir"].count("ttg.convert_layout")
    assert _count(asm["ptx"], "ld.global") <= 10  # bytes in 16-byte vectors plus a scale a row, not one a weight


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
@pytest.mark.parametrize("fp8", [False, True], ids=["int8", "fp8"])
def test_fc1_epilogue_math_compiles_cheap_for_hopper(fp8):
    """fc1's GELU + quantize epilogue as the GPU runs it (the interpreter tests check the numbers of the
    portable forms): on Hopper the MUFU and conversion units run at an eighth of the float32 rate and bound
    this epilogue, so per element it may take one ``tanh.approx`` and no other MUFU operation (no ``ex2``,
    no approximate division: at most the per-tile ``1 / scale``), no IEEE division, no float-to-int
    convert for INT8 codes (read out of the rounding add's bits: the 1.5 * 2**23 add must survive the
    compiler), and the hardware's round-to-nearest-even E4M3 convert for FP8 codes."""
    from dtq.runtime import kernels

    t = "*fp8e4nv" if fp8 else "*i8"
    consts = dict(K=1152, FP8=fp8, HAS_BIAS=True, GELU_QUANT=True, HAS_QMUL=True, GATE_RESIDUAL=False,
                  ROW_SCALE=False, A_ROWQUANT=False, HAS_AMUL=False, GELU_ROWMAX=False, stride_ak=1, stride_wk=1,
                  stride_cn=1, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)
    ptx = _ptx_for_hopper(kernels._mm8_kernel.fn, consts,
                          {"a_ptr": t, "w_ptr": t, "c_ptr": t, "gate_ptr": "*bf16", "res_ptr": "*bf16"})
    assert "wgmma.mma_async" in ptx and (".e4m3.e4m3" if fp8 else ".s8.s8") in ptx  # the GEMM of the epilogue
    elements = 64 * 64 // (4 * 32)  # one tile per program, per thread
    assert _count(ptx, "tanh.approx.f32") == elements
    assert _count(ptx, "ex2.approx") == 0 and _count(ptx, "div.rn.f32") == 0
    assert _count(ptx, "div.full.f32") <= 1  # the per-tile 1 / scale
    if fp8:
        assert _count(ptx, "cvt.rn.satfinite.e4m3x2.f32") == elements // 2
    else:
        assert _count(ptx, "cvt.rzi") == 0 and _count(ptx, "cvt.rni") == 0
        assert "0f4B400000" in ptx, "the round-half-even add was folded away"


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_per_token_gelu_pass_compiles_cheap_for_hopper():
    """fc2's per-token input pass (GELU + row amax + INT8 codes) at DiT-XL/2's 4608 columns, compiled for
    sm_90: the row in two blocks, 4096 + 512 (one 8192-wide block computed 44% masked-off lanes), one MUFU
    operation per element for GELU (the division by the row's scale is an approximate ``div.full``, whose
    reciprocal ptxas computes once per row), no IEEE division, no float-to-int convert."""
    from dtq.runtime import kernels

    block_a, block_b = kernels._row_parts(4608)
    assert (block_a, block_b) == (4096, 512) and kernels._row_parts(1152) == (1024, 128)
    assert kernels._row_parts(1024) == (1024, 0)
    consts = dict(HAS_MUL=True, GELU=True, QMAX=127.0, MIN_SCALE=1e-12, ROWS=1, BLOCK_A=block_a, BLOCK_B=block_b)
    ptx = _ptx_for_hopper(kernels._quant_rows_kernel, consts, {"x_ptr": "*bf16", "q_ptr": "*i8"}, num_stages=1)
    elements = 4608 // (4 * 32)
    assert _count(ptx, "tanh.approx.f32") == elements and _count(ptx, "ex2.approx") == 0
    assert _count(ptx, "cvt.rzi") == 0 and _count(ptx, "div.rn.f32") == 0


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_paired_token_pass_compiles_to_one_layout_for_hopper():
    """The paired per-token pass (bf16 pairs read as int32, int16 pairs of codes written) at fc2's 4608
    columns, compiled for sm_90: one register layout for every load and store (the row-block kernel moved its
    tensors between three through shared memory), one ``tanh.approx`` per element, one packed bf16x2 rounding
    per pair and no single-value convert, no IEEE division, no float-to-int convert, the rounding add kept."""
    from dtq.runtime import kernels

    assert kernels._pair_plan(4608, torch.bfloat16) == (512, 4, 256, 4)
    assert kernels._pair_plan(1152, torch.bfloat16) == (128, 4, 64, 1)
    assert kernels._pair_plan(1151, torch.bfloat16) is None and kernels._pair_plan(1152, torch.float32) is None
    consts = dict(P=2304, BF16=True, HAS_MUL=True, GELU=True, QMAX=127.0, MIN_SCALE=1e-12, CHUNK=512, FULL=4,
                  TAIL=256)
    asm = _compile_for_hopper(kernels._quant_pairs_kernel, consts, {"x_ptr": "*i32", "q_ptr": "*i16"}, num_stages=1)
    ptx = asm["ptx"]
    assert "convert_layout" not in asm["ttgir"]
    elements = 4608 // (4 * 32)
    assert _count(ptx, "tanh.approx.f32") == elements and _count(ptx, "ex2.approx") == 0
    assert _count(ptx, "cvt.rn.bf16x2.f32") == elements // 2 and _count(ptx, "cvt.rn.bf16.f32") == 0
    assert _count(ptx, "cvt.rzi") == 0 and _count(ptx, "div.rn.f32") == 0
    assert "0f4B400000" in ptx, "the round-half-even add was folded away"


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_paired_token_pass_in_interpreter():
    """The paired pass gives the row-block kernel's scales and its codes but for reciprocal-rounding ties,
    which are the simulation's quantizer (the GELU rounded to the activation type first), for bf16 and fp16
    rows: chunks + a tail (K = 1152), one masked chunk (K = 200), GELU and the balancing Mul on and off, the
    Mul laid out by the layer (``EngineLinear.input_mul_pairs``) or by the pass."""
    code = textwrap.dedent('''
        import torch
        from dtq.runtime import kernels, quant
        from dtq.runtime.qengine import EngineLinear
        torch.manual_seed(0)
        assert kernels._pair_plan(200, torch.float16) == (128, 1, 0, 1)
        for dt in (torch.bfloat16, torch.float16):
            for K in (1152, 200):
                x = (torch.randn(6, K) * torch.logspace(-2, 1, 6)[:, None]).to(dt)
                x[2] = 0
                x[4, 7] = 30.0  # one large value sets the row's scale
                mul = torch.rand(K) + 0.5
                for gelu in (False, True):
                    for m in (None, mul):
                        q0, s0 = kernels.quant_rows_int8(x, m, gelu=gelu, _paired=False)
                        pairs = None if m is None else kernels.pair_columns(m)
                        q1, s1 = kernels.quant_rows_int8(x, None if gelu else m, gelu=gelu, mul_pairs=pairs)
                        assert torch.equal(s0, s1), (dt, K, gelu, m is None)
                        d = (q1.int() - q0.int()).abs()
                        assert d.max() <= 1 and (d > 0).float().mean() < 2e-3, (dt, K, gelu, int((d > 0).sum()))
                        h = torch.nn.functional.gelu(x.float(), approximate="tanh").to(dt) if gelu else x
                        xb = h.float() * (m if m is not None else 1.0)
                        ref = quant.fake_quant_act(xb, None, "int8", "token")
                        assert (q1.float() * s1[:, None] != ref).float().mean() < 2e-3, (dt, K, gelu)
                        assert q1[4].abs().max() == 127 and not q1[2].any()
        assert torch.equal(kernels.pair_columns(torch.arange(6.0)), torch.tensor([[0.0, 2, 4], [1, 3, 5]]))
        print("ok")
    ''')
    run_in_triton_interpreter(code)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_fc1_writes_per_token_codes_in_interpreter():
    """token_quant="epilogue": fc1's GEMM writes fc2's per-token codes and row scales (token_gemm), the numbers
    of fc1's output rounded to the activation type + the paired GELU pass, exactly: against torch's rounding of
    the same float32 products for bf16 and fp16 (Triton's interpreter truncates float32 to bf16 in its own
    stores, so the bf16 reference is torch's), per-row and static input scales, with and without bias and Mul,
    ragged M and N. The interpreter runs the two phases one after the other (nothing may wait there). Then the
    per-token engine with it gives the "pass-fused" engine's output bit for bit (fp16)."""
    code = _PER_TOKEN_ENGINES + textwrap.dedent('''
        import torch
        from dtq.runtime import kernel_ops, kernels, quant, token_gemm  # noqa: F401  (kernel_ops: the custom ops)
        torch.manual_seed(0)
        for (M, K, N, dt, rows, has_mul, has_bias) in [(40, 64, 80, torch.bfloat16, True, True, True),
                                                       (33, 96, 48, torch.float16, False, False, True),
                                                       (16, 32, 32, torch.bfloat16, True, True, False),
                                                       (20, 32, 33, torch.bfloat16, True, True, True)]:
            a = torch.randint(-127, 128, (M, K), dtype=torch.int8)
            w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
            sa = torch.rand(M) * 1e-2 + 1e-3 if rows else torch.tensor(0.004)
            sw = torch.rand(N) * 1e-2 + 1e-3
            b = torch.randn(N) if has_bias else None
            mul = torch.rand(N) + 0.5 if has_mul else None
            q, s = token_gemm.mm8_gelu_token_codes(a, w, sa, sw, b, mul, dt)
            h = (a.double() @ w.double().T).float() * ((sa[:, None] if rows else sa) * sw)
            h = (h + b if b is not None else h).to(dt)  # fc1's output as its GEMM stores it
            q0, s0 = kernels.quant_rows_int8(h, mul, gelu=True)
            assert torch.equal(s, s0) and torch.equal(q, q0), (M, N, dt, (q.int() - q0.int()).abs().max())
            assert q.abs().max() == 127  # each row's largest value takes the full range
            ref = torch.nn.functional.gelu(h.float(), approximate="tanh") * (mul if mul is not None else 1)
            assert quant.sqnr_db(ref, q.float() * s[:, None]) > 30
            # exact=False: fc1's output and the GELU stay float32; codes within a step of the rounded ones
            q2, s2 = token_gemm.mm8_gelu_token_codes(a, w, sa, sw, b, mul, dt, exact=False)
            assert (q2.int() - q.int()).abs().max() <= 1 and (q2 != q).float().mean() < 0.2
            assert torch.allclose(s2, s, rtol=2 ** -7) and quant.sqnr_db(ref, q2.float() * s2[:, None]) > 30
        # the engine: per-token INT8 DiT, "epilogue" against "pass-fused"
        outs = per_token_engine_outputs("epilogue")
        assert torch.equal(outs["pass-fused"], outs["epilogue"]), quant.sqnr_db(outs["pass-fused"], outs["epilogue"])
        print("ok")
    ''')
    run_in_triton_interpreter(code)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_fc1_token_codes_kernel_compiles_for_hopper():
    """The fused kernel as the GPU runs it (fc1 of DiT-XL/2, 128 x 256 tiles): int8 wgmma, the tile's columns
    counted at its row block's 64-bit counter with acquire-release (the parts of the row amax written before the
    count says so; the last tile's own count sees the group complete), polled relaxed, then read with acquire,
    the parts read from L2 (``.cg``: other SMs wrote them), a ticket taken as the program starts and zeroed by
    the program drawing the last, nothing counted on the way out; per element one ``tanh.approx``, two roundings
    to bf16 in packed converts (one per pair each), no IEEE division and no float-to-int convert (codes from the
    rounding add's bits)."""
    from dtq.runtime import token_gemm

    consts = dict(N=4608, K=1152, ROW_SCALE=True, HAS_BIAS=True, HAS_MUL=True, BF16=True, ROUND=True, PUBLISH=True,
                  QUANTIZE=True, WAIT=True, BLOCK_M=128, BLOCK_N=256, BLOCK_K=128)
    ptx = _ptx_for_hopper(token_gemm._mm8_token_codes_kernel.fn, consts,
                          {"a_desc": "tensordesc<i8[128, 128]>", "w_desc": "tensordesc<i8[256, 128]>", "q_ptr": "*i8",
                           "sync_ptr": "*i64"}, num_warps=8)
    assert "wgmma.mma_async" in ptx and ".s8.s8" in ptx
    assert _count(ptx, "atom.global.gpu.acq_rel.add.u64") == 1 and _count(ptx, "ld.global.gpu.acquire.b64") == 1
    assert _count(ptx, "ld.global.gpu.relaxed.b64") == 1  # the poll before the acquire (which invalidates the L1)
    assert _count(ptx, "ld.global.cg") == 4608 // 256  # each N tile's part of the 128 rows: one load a thread
    assert _count(ptx, "atom.global.gpu.relaxed.add") == 1 and _count(ptx, "st.global.b64") == 1  # the ticket
    elements = 128 * 256 // (8 * 32)
    assert _count(ptx, "tanh.approx.f32") == elements and _count(ptx, "ex2.approx") == 0
    assert _count(ptx, "cvt.rn.bf16x2.f32") == elements and _count(ptx, "cvt.rn.bf16.f32") == 0
    assert _count(ptx, "cvt.rzi") == 0 and _count(ptx, "div.rn.f32") == 0
    assert "0f4B400000" in ptx, "the round-half-even add was folded away"


@pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def _ws_kernel_for_hopper(**consts):
    """token_gemm_ws's kernel at DiT-XL/2's fc1, compiled for sm_90 on the CPU (Gluon has no interpreter); by
    default with the row blocks' counters and two sync warps (the ablations' and diagnoses' base)."""
    pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon: the kernel is unchecked")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from dtq.runtime import token_gemm_ws

    layout = gl.NVMMASharedLayout.get_default_for([128, 128], gl.int8)
    descs = {n: mangle_type(TensorDescriptor.from_tensor(torch.zeros(rows, 1152, dtype=torch.int8), [128, 128], layout))
             for n, rows in (("a_desc", 256), ("w_desc", 4608))}
    fn = token_gemm_ws._ws_token_codes_kernel
    consts = dict(N=4608, K=1152, ROW_SCALE=True, HAS_BIAS=True, HAS_MUL=True, BF16=True, WAIT=True, PLAIN=False,
                  SYNC_WARP=True, DEFER=False, SPLIT_SYNC=True, STAGES=4, CONSUMER_REGS=240, PRODUCER_REGS=24,
                  PROBE=False, DIAG=0, FLAGS=False) | consts
    ptrs = {**descs, "q_ptr": "*i8", "sync_ptr": "*i64", "probe_ptr": "*i64"}
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "*fp32" if n.endswith("_ptr") else "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if sig[n].startswith(("*", "i32"))}
    return triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": 168})


@pytest.mark.parametrize("split_sync, defer", [(False, False), (True, False), (True, True)])
def test_fc1_token_codes_warp_specialized_kernel_compiles_for_hopper(split_sync, defer):
    """The warp-specialized fc1 writing fc2's per-token codes (token_gemm_ws, token_gemm's on Hopper by default)
    with the row blocks' counters (``flags=False``, sessions 24-27's),
    compiled for sm_90 on the CPU (the GPU check is benchmarks/token_ws_bench.py): a producer warp of TMA loads,
    two consumer warpgroups with int8 warpgroup MMAs and sync warps, with their own register budgets; the row
    groups' 64-bit release count, relaxed poll and acquire once each, in the sync warps alone (the consumers wait
    on shared-memory barriers), and nothing counted on the way out (the counters are never reset); per element
    one ``tanh.approx`` and two bf16 roundings in packed converts; no IEEE division; nothing in local memory,
    the deferred tile (batch 64's default) included."""
    kernel = _ws_kernel_for_hopper(SPLIT_SYNC=split_sync, DEFER=defer)
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and ".s8.s8" in ptx and _count(ptx, "cp.async.bulk.tensor") == 2
    budgets = {" ".join(line.split()[1:]) for line in ptx.splitlines() if "setmaxnreg" in line}
    assert "240;" in budgets and "24;" in budgets, budgets
    # the poll: relaxed loads, then one acquire (an acquire also invalidates the SM's L1)
    for op in ("red.release.gpu.global.add.u64", "ld.relaxed.gpu.global.b64", "ld.acquire.gpu.global.b64"):
        assert _count(ptx, op) == 1, op
    assert _count(ptx, "atom.") == 0
    elements = 128 * 128 // 128  # a consumer's tile over its 128 threads
    assert _count(ptx, "tanh.approx.f32") == 2 * elements and _count(ptx, "ex2.approx") == 0
    assert _count(ptx, "cvt.rn.bf16x2.f32") == 2 * elements and _count(ptx, "div.rn.f32") == 0
    assert kernel.metadata.shared <= 227 * 1024  # one CTA per SM (the grid is at most one per SM)
    assert "st.local" not in ptx


@pytest.mark.parametrize("defer", [False, True])
def test_warp_specialized_flags_replace_the_counters(defer):
    """token_gemm_ws's per-tile flags (``flags=True``, the default since session 28): one sync warp reads its
    tile's word (relaxed), stores it + 1 with release once the tile is published, and polls the row block's words
    by volatile loads until all hold that number, then fences (acquire); no atomic, no counter, no acquire load.
    The diag runs found the count's one atomic per tile to cost 0.03 ms of fc1 at 32768 rows (session 27)."""
    from dtq.runtime import token_gemm_ws

    kernel = _ws_kernel_for_hopper(DEFER=defer, SPLIT_SYNC=False, FLAGS=True)
    ptx = kernel.asm["ptx"]
    for op in ("red.release", "red.relaxed", "atom.", "ld.acquire"):
        assert _count(ptx, op) == 0, op
    for op in ("ld.relaxed.gpu.global.b64", "st.release.gpu.global.b64", "fence.acq_rel.gpu"):
        assert _count(ptx, op) == 1, op
    assert _count(ptx, "ld.volatile.global") == 1 and "st.local" not in ptx
    assert "wgmma.mma_async" in ptx and _count(ptx, "tanh.approx.f32") == 2 * 128
    budgets = {" ".join(line.split()[1:]) for line in ptx.splitlines() if "setmaxnreg" in line}
    assert "240;" in budgets and "24;" in budgets and kernel.metadata.shared <= 227 * 1024, budgets
    # a warp loads a row's words at once: 36 N tiles of DiT-XL/2's fc1 in 64 words, 2 a lane
    assert token_gemm_ws._flag_width(36) == 64 and token_gemm_ws._flag_width(9) == 32


def test_warp_specialized_host_picks_its_synchronisation_words(monkeypatch):
    """token_gemm_ws's host side (``_sync_words``, on the CPU): the flag rows (a row block's ``_flag_width``
    words) from their own pool, the counters (one a row block) from theirs, and a zeroed buffer of its own for the
    SPREAD_COUNT diagnosis, whose DIAG bits the host reads as ints (the constexpr bits once broke every call)."""
    pytest.importorskip("triton.experimental.gluon", reason="this Triton has no Gluon: the kernel is unchecked")
    from dtq.runtime import token_gemm_ws as ws

    monkeypatch.setattr(ws, "_FLAGS", {})  # empty pools of the test's own: the module's stay as they were
    monkeypatch.setattr(ws, "_SYNC", {})
    cpu = torch.device("cpu")
    flags = ws._sync_words(cpu, 256, 4608, True, 0)
    counters = ws._sync_words(cpu, 256, 4608, False, 0)
    assert flags.dtype == counters.dtype == torch.int64 and flags.numel() >= 256 * 64 and counters.numel() >= 256
    assert flags.data_ptr() != counters.data_ptr() and ws._sync_words(cpu, 2, 4608, True, 0) is flags
    spread = ws._sync_words(cpu, 4, 4608, False, (ws.DIAG_NO_POLL | ws.DIAG_SPREAD_COUNT).value)
    assert spread.numel() == 4 + 4 * 36 and not spread.any()
    assert ws._sync_words(cpu, 4, 4608, False, ws.DIAG_CHAIN.value) is ws._sync_words(cpu, 1, 4608, False, 0)
    with pytest.raises(AssertionError, match="STORE_COUNT"):
        ws._sync_words(cpu, 4, 4608, False, ws.DIAG_SPREAD_COUNT.value)


def test_warp_specialized_diagnoses_take_out_what_they_say():
    """token_gemm_ws's DIAG bits, which token_ws_bench's diag step times: DIAG_RELAXED_COUNT counts without the
    release (the rest as shipped); DIAG_LOCAL touches no counter at all (no count or poll); DIAG_EARLY tells the
    consumers at once and still counts and polls as shipped; DIAG_BACKOFF sleeps between polls; DIAG_NO_ACQUIRE
    polls without the acquire; DIAG_CG_VECTORS loads the consumers' vectors from L2; DIAG_DECOUPLED: the
    consumers never wait; DIAG_CHAIN (with DIAG_LOCAL) the handshake through the counting warp; DIAG_NO_POLL no
    poll; with it, DIAG_SPREAD_COUNT counts at a word of the tile's own and DIAG_STORE_COUNT stores there."""
    from dtq.runtime import token_gemm_ws

    ptx = _ws_kernel_for_hopper(DIAG=token_gemm_ws.DIAG_RELAXED_COUNT.value).asm["ptx"]
    assert _count(ptx, "red.release") == 0 and _count(ptx, "red.relaxed.gpu.global.add.u64") == 1
    assert _count(ptx, "ld.acquire.gpu.global") == 1 and _count(ptx, "ld.relaxed.gpu.global") == 1
    ptx = _ws_kernel_for_hopper(DIAG=token_gemm_ws.DIAG_LOCAL.value).asm["ptx"]
    for op in ("red.release", "red.relaxed", "atom.", "ld.relaxed", "ld.acquire"):
        assert _count(ptx, op) == 0, op
    assert "wgmma.mma_async" in ptx and _count(ptx, "tanh.approx.f32") == 2 * 128
    shipped = _ws_kernel_for_hopper(DEFER=True).asm["ptx"]
    for diag in (token_gemm_ws.DIAG_EARLY.value, token_gemm_ws.DIAG_BACKOFF.value):
        ptx = _ws_kernel_for_hopper(DEFER=True, DIAG=diag).asm["ptx"]
        for op in ("red.release.gpu.global.add.u64", "ld.acquire.gpu.global", "mbarrier.arrive"):
            assert _count(ptx, op) == _count(shipped, op), (diag, op)
        assert _count(ptx, "ld.relaxed.gpu.global") >= 1  # the sleeping loop may be rotated (a load before it)
        assert _count(ptx, "nanosleep") == (1 if diag == token_gemm_ws.DIAG_BACKOFF.value else 0), diag
    assert _count(shipped, "nanosleep") == 0
    # NO_ACQUIRE: the polls' last load relaxed; CG_VECTORS: the consumers' scales, bias and Mul (the 8 vector
    # loads of a deferred tile's two epilogue halves) from L2, the parts' loads ".cg" as shipped
    ptx = _ws_kernel_for_hopper(DEFER=True, DIAG=token_gemm_ws.DIAG_NO_ACQUIRE.value).asm["ptx"]
    assert _count(ptx, "ld.acquire") == 0 and _count(ptx, "ld.relaxed.gpu.global.b64") == 1
    assert _count(ptx, "red.release.gpu.global.add.u64") == 1
    assert _count(ptx, "ld.global.cg") == _count(shipped, "ld.global.cg")
    ptx = _ws_kernel_for_hopper(DEFER=True, DIAG=token_gemm_ws.DIAG_CG_VECTORS.value).asm["ptx"]
    assert _count(ptx, "ld.acquire.gpu.global.b64") == 1
    assert _count(ptx, "ld.global.cg") > _count(shipped, "ld.global.cg") and _count(ptx, "ld.global.b32") == 0
    assert _count(shipped, "ld.global.b32") > 0
    # DECOUPLED: the consumers' shared-memory waits for the row groups gone, the sync warps' work as shipped
    ptx = _ws_kernel_for_hopper(DEFER=True, DIAG=token_gemm_ws.DIAG_DECOUPLED.value).asm["ptx"]
    for op in ("red.release.gpu.global.add.u64", "ld.acquire.gpu.global", "ld.relaxed.gpu.global"):
        assert _count(ptx, op) == _count(shipped, op), op
    assert _count(ptx, "mbarrier.try_wait") < _count(shipped, "mbarrier.try_wait")
    # CHAIN (with LOCAL): no global memory; NO_POLL: the count as shipped, no poll
    chain = token_gemm_ws.DIAG_LOCAL.value | token_gemm_ws.DIAG_CHAIN.value
    ptx = _ws_kernel_for_hopper(DEFER=True, DIAG=chain).asm["ptx"]
    for op in ("red.release", "red.relaxed", "atom.", "ld.relaxed", "ld.acquire"):
        assert _count(ptx, op) == 0, op
    local = _ws_kernel_for_hopper(DEFER=True, DIAG=token_gemm_ws.DIAG_LOCAL.value).asm["ptx"]
    assert _count(ptx, "mbarrier.try_wait") > _count(local, "mbarrier.try_wait")
    ptx = _ws_kernel_for_hopper(DEFER=True, DIAG=token_gemm_ws.DIAG_NO_POLL.value).asm["ptx"]
    assert _count(ptx, "red.release.gpu.global.add.u64") == 1
    assert _count(ptx, "ld.relaxed") == 0 and _count(ptx, "ld.acquire") == 0
    # SPREAD_COUNT: the count (release) at the tile's own word; STORE_COUNT: a relaxed store there, no atomic
    spread = token_gemm_ws.DIAG_NO_POLL.value | token_gemm_ws.DIAG_SPREAD_COUNT.value
    ptx = _ws_kernel_for_hopper(DEFER=True, DIAG=spread).asm["ptx"]
    assert _count(ptx, "red.release.gpu.global.add.u64") == 1 and _count(ptx, "st.relaxed") == 0
    ptx = _ws_kernel_for_hopper(DEFER=True, DIAG=spread | token_gemm_ws.DIAG_STORE_COUNT.value).asm["ptx"]
    assert _count(ptx, "red.release") == 0 and _count(ptx, "red.relaxed") == 0
    assert _count(ptx, "st.relaxed.gpu.global.b64") == 1 and _count(ptx, "ld.relaxed") == 0


def test_warp_specialized_token_codes_only_on_hopper():
    """token_gemm hands a call to the warp-specialized kernel by default (session 24 measured it faster), but
    not when DTQ_TOKEN_CODES_WS=0 or MPS gives the process part of the GPU (its grid needs every SM), and only on
    a Hopper GPU from 4096 rows; the interpreter and the CPU keep the Triton kernel."""
    pytest.importorskip("triton")
    from dtq.runtime import token_gemm

    assert token_gemm.ws_enabled({}) and token_gemm.ws_enabled({"DTQ_TOKEN_CODES_WS": "1"})
    assert not token_gemm.ws_enabled({"DTQ_TOKEN_CODES_WS": "0"})
    assert token_gemm.ws_enabled({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100"})
    for share in ("50", "99.5", "half"):
        assert not token_gemm.ws_enabled({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": share}), share
    assert token_gemm.WS_MIN_ROWS == 4096
    a, w = torch.zeros(4096, 1152, dtype=torch.int8), torch.zeros(4608, 1152, dtype=torch.int8)
    assert not token_gemm._ws_usable(a, w, torch.bfloat16)


def test_token_codes_need_a_row_group_on_the_gpu_at_once(monkeypatch):
    """fc1 writing fc2's per-token codes (the default token_quant) runs only where one row group of its N tiles
    (at the narrowest candidate's BLOCK_N) fits on the GPU with one program per SM, else its programs could
    wait forever: DiT-XL/2's fc1 (N 4608: 36 tiles of 128) on an H200's 132 SMs, not on a 20-SM GPU (the
    engine then runs "pass-fused"); the interpreter (CPU) always."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from dtq.runtime import token_gemm

    assert token_gemm._MIN_BLOCK_N == 128
    for sms, fits in ((132, True), (36, True), (35, False), (20, False)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d, sms=sms: SimpleNamespace(multi_processor_count=sms))
        assert token_gemm.row_group_fits(4608, torch.device("cuda", 0)) == fits, sms
    assert token_gemm.row_group_fits(10**6, torch.device("cpu"))


def test_token_codes_counters_outlive_growth():
    """The fused kernel's int64 counter buffer grows for more row blocks, and the buffer it grew out of stays
    allocated (a CUDA graph captured with it keeps using it) and zero; launches of another width (fc1's N) get a
    buffer of their own (a row block's counter is a multiple of its launches' width between launches)."""
    pytest.importorskip("triton")
    from dtq.runtime import token_gemm

    dev = torch.device("cpu")
    pool = {}
    small = token_gemm._counters(dev, 10, 4608, pool)
    assert token_gemm._counters(dev, 4000, 4608, pool) is small and small.numel() == 4096 and not small.any()
    assert small.dtype == torch.int64
    big = token_gemm._counters(dev, 5000, 4608, pool)
    assert big is not small and big.numel() == 5000 and [id(b) for b in pool[(dev, 4608)]] == [id(small), id(big)]
    other = token_gemm._counters(dev, 10, 1152, pool)
    assert other is not big and other is not small and token_gemm._counters(dev, 10, 4608, pool) is big
