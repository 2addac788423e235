"""The LayerNorm + modulate + quantize pass (``kernels.norm_quant``) and the engine blocks that hand its
codes to qkv / fc1 (``quantized_input``, ``FusedResidualBlock(norm=True)``), in Triton's interpreter."""

import textwrap

import pytest

from conftest import run_in_triton_interpreter, triton_available

pytestmark = pytest.mark.skipif(not triton_available(),
                                reason="triton is not installed (pip install triton): kernels unchecked")


def test_norm_quant_codes_equal_the_unfused_ops():
    """Codes and per-token scales equal torch's unfused LayerNorm + modulate followed by the layer's
    quantizer (per token: ``quant_rows_int8``, bit for bit in float16; static INT8 / FP8
    ``round(h * mul / s)``: up to a rare one-code difference, the kernel multiplying by ``mul / s``), in
    float16 (the interpreter rounds fp32 -> fp16 to nearest, as the GPU does) and float32 (the
    LayerNorm's reduction order shows in the last bit: a rare one-code difference). Row lengths with and
    without a tail part (40 = 32 + 8, 384 = 256 + 128, 64; 44 = 32 + 12 of a 16-wide part, whose padding
    must stay out of the row's amax), an odd token count (one row per program), no balancing Mul,
    shift / scale as strided views of the adaLN output."""
    code = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from dtq.runtime import kernels
        from dtq.runtime.model import modulate
        torch.manual_seed(0)
        for dt in (torch.float16, torch.float32):
            for B, T, K in ((2, 5, 40), (3, 4, 64), (1, 6, 384), (2, 4, 44)):
                x = (torch.randn(B, T, K) * 3 + 0.5).to(dt)
                c = torch.randn(B, 6 * K).to(dt)
                shift, scale = c[:, 3 * K:4 * K], c[:, 4 * K:5 * K]
                h = modulate(F.layer_norm(x, (K,), eps=1e-6), shift, scale).reshape(-1, K)
                a = torch.tensor(0.02)
                for mul in (torch.rand(K) + 0.5, None):
                    xf = h.float() * (1 if mul is None else mul)
                    # static: one multiply by mul / a where the quantizer multiplies, then divides; a code may
                    # differ by one where the two roundings straddle a tie (none in these 3000 values)
                    q, s = kernels.norm_quant(x, shift, scale, 1e-6, mul, a, "int8")
                    ref = torch.round(xf / a).clamp(-128, 127).to(torch.int8)
                    assert s is a and q.dtype == torch.int8
                    d = (q.int() - ref.int()).abs()
                    assert int(d.max()) <= 1 and int(d.sum()) <= max(1, q.numel() // 1000), (dt, B, T, K, d.sum())
                    q, _ = kernels.norm_quant(x, shift, scale, 1e-6, mul, a, "fp8")
                    ref = (xf / a).clamp(-448, 448).to(torch.float8_e4m3fn).float()
                    assert q.dtype == torch.float8_e4m3fn
                    bad = q.float() != ref  # one E4M3 step at most, as rarely
                    assert int(bad.sum()) <= max(1, q.numel() // 1000), (dt, B, T, K, bad.sum())
                    step = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(2 ** -6))) - 3)
                    assert bool(((q.float() - ref).abs() <= step).all()), (dt, B, T, K)
                    q, s = kernels.norm_quant(x, shift, scale, 1e-6, mul, None, "int8-token")
                    rq, rs = kernels.quant_rows_int8(h, mul)
                    if dt == torch.float16:  # the LayerNorm's output rounds to fp16: the reduction order vanishes
                        assert torch.equal(q, rq) and torch.equal(s, rs), (dt, B, T, K)
                    else:  # float32 keeps the LayerNorm's last-bit differences
                        d = (q.int() - rq.int()).abs()
                        assert int(d.max()) <= 1 and int(d.sum()) <= max(1, q.numel() // 1000), (B, T, K, d.sum())
                        assert float((s / rs - 1).abs().max()) < 1e-6, (B, T, K)
                    assert int(q.abs().max()) == 127
        try:
            kernels.norm_quant(x, shift, scale, 1e-6, None, a, "int4")
        except ValueError as e:
            assert "int8-token" in str(e)
        else:
            raise AssertionError("an unknown code format was accepted")
        print("ok")
    """)
    run_in_triton_interpreter(code)


def test_engine_blocks_take_qkv_and_fc1_codes_from_the_norm_pass():
    """Engine blocks (GPU path in the interpreter, float32) for static INT8 / FP8 / two-level W4A8 and
    per-token INT8: qkv's and fc1's inputs come from the norm pass (two ``norm_quant`` calls per
    block, per-token ``quant_rows`` only for proj and fc2), the output equals the block without it
    (``fuse_norm=False``) to > 60 dB and the simulation's to > 30 dB, and torch.compile(fullgraph) sees
    the opaque ops (INT8, static and per token). A layer with a low-rank branch keeps its own quantizer."""
    code = textwrap.dedent("""
        import torch
        from torch.profiler import profile
        from dtq.runtime import kernel_ops, quant
        from dtq.runtime.model import DiT, DiTConfig
        from dtq.runtime.qengine import FusedResidualBlock, build_qengine
        from dtq.runtime.quantized_input import QuantizedActivation
        from dtq.tools.quick_recipe import minmax_recipe
        torch.manual_seed(0)
        m = DiT(DiTConfig(input_size=4, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                          num_classes=10)).randomize_(seed=1, std=0.1).eval()
        h, c = torch.randn(2, 4, 64), torch.randn(2, 64)
        cases = [("int8", "tensor", {}, 0), ("fp8", "tensor", {}, 0), ("w4a8", "tensor", {"w4a8": "progressive"}, 0),
                 ("int8", "token", {}, 2)]  # per-token two-level W4A8 takes the same INT8 codes
        for p, gran, opts, rows_passes in cases:
            r = minmax_recipe(m, p, group=64, balance=True, act_granularity=gran)
            kw = dict(kernel="gpu", int8_kernel="triton", **opts)
            blk = build_qengine(m, r, **kw).blocks[0]
            assert isinstance(blk, FusedResidualBlock) and blk.fuse_norm, (p, gran)
            assert blk.attn.qkv.norm_codes_format() == ("int8-token" if gran == "token" else p[:4].replace("w4a8", "int8"))
            with torch.no_grad():
                with profile() as prof:
                    got = blk(h, c)
                names = [e.name for e in prof.events()]
                plain = build_qengine(m, r, fuse_norm=False, **kw).blocks[0](h, c)
                ref = build_qengine(m, r).blocks[0](h, c)  # the CPU path: the simulation's operations
            norm = sum(n.startswith("dtq::norm_quant") for n in names)
            rows = names.count("dtq::quant_rows_int8") + names.count("dtq::gelu_quant_rows_int8")  # proj's, fc2's
            assert norm == 2 and rows == rows_passes, (p, gran, norm, rows)
            assert quant.sqnr_db(plain, got) > 60, (p, gran, quant.sqnr_db(plain, got))
            assert quant.sqnr_db(ref, got) > 30, (p, gran, quant.sqnr_db(ref, got))
            if p != "int8":  # the compiled graph: once per granularity (the slowest step here)
                continue
            graphs = []
            def record(gm, example_inputs):
                graphs.append(gm)
                return gm.forward
            torch._dynamo.reset()
            with torch.no_grad():
                compiled = torch.compile(blk, backend=record, fullgraph=True)(h, c)
            called = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
            assert sum("norm_quant" in t for t in called) == 2, (p, gran, called)
            assert torch.equal(compiled, got), (p, gran)
        # a low-rank branch needs the unquantized input: that layer keeps its own quantizer
        r = minmax_recipe(m, "int8", balance=True)
        eng = build_qengine(m, r, kernel="gpu", int8_kernel="triton")
        qkv = eng.blocks[0].attn.qkv
        qkv.lowrank_up, qkv.lowrank_down = torch.zeros(qkv.out_features, 4), torch.zeros(4, qkv.in_features)
        qkv.lowrank_up_h, qkv.lowrank_down_h = qkv.lowrank_up.half(), qkv.lowrank_down.half()
        assert eng.blocks[0].attn.qkv.norm_codes_format() is None and eng.blocks[0].mlp.fc1.norm_codes_format() == "int8"
        with torch.no_grad(), profile() as prof:
            eng.blocks[0](h, c)
        assert sum(e.name.startswith("dtq::norm_quant") for e in prof.events()) == 1
        print("ok")
    """)
    run_in_triton_interpreter(code)
