"""The quantized PyTorch engine: on the CPU it is bit-identical to the simulated model (codes,
scales and balancing folds verified); the Triton kernels are checked in triton's interpreter."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dtq.runtime import quant
from dtq.runtime.kernels_ref import pack_int4, unpack_int4
from dtq.runtime.qengine import FP8Linear, Int4Linear, Int8Linear, build_qengine, engine_layers, weight_bytes
from dtq.runtime.recipe import apply_recipe
from dtq.tools.quick_recipe import minmax_recipe, random_inputs

LAYER_TYPES = {"int8": Int8Linear, "fp8": FP8Linear, "w4a16": Int4Linear, "w4a8": Int4Linear}


@pytest.mark.parametrize("precision", ["int8", "fp8", "w4a16", "w4a8"])
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


def _triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
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
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.skipif(not _triton_available(), reason="triton is not installed (pip install triton): kernels unchecked")
def test_gpu_layer_paths_in_interpreter():
    """Each engine layer's GPU path (activation quantization, code/scale layouts, bias, run-time
    balancing Mul, custom ops) against its reference, on the CPU: Triton kernels in the
    interpreter, FP8 through torch's CPU ``_scaled_mm``. INT4 layers get fp16 activations: the
    interpreter mis-handles bf16 dot operands (numpy has no bf16); bf16 is checked on the GPU."""
    code = textwrap.dedent("""
        import torch
        from dtq.runtime import kernel_ops, quant
        from dtq.runtime.model import DiT, DiTConfig
        from dtq.runtime.qengine import build_qengine, engine_layers
        from dtq.tools.quick_recipe import minmax_recipe
        torch.manual_seed(0)
        m = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=1, num_heads=4,
                          num_classes=10)).randomize_(seed=1, std=0.1).eval()
        for p in ["int8", "w4a16", "w4a8", "fp8"]:
            eng = build_qengine(m, minmax_recipe(m, p, group=64 if p == "w4a8" else 32, balance=True))
            for name, lin in engine_layers(eng).items():
                if p == "w4a8":
                    assert lin.kernel_name() == "Int4Linear[w4a8 int8-MMA]", lin.kernel_name()
                x = torch.randn(20, lin.in_features, dtype=torch.float16 if p.startswith("w4") else torch.float32)
                ref = lin.reference(x)
                modes = ["tensorwise", "rowwise"] if p == "fp8" else [None]
                for mode in modes:
                    if mode:
                        lin.scaling = mode
                    try:
                        got = lin.kernel_forward(x)
                    except (RuntimeError, NotImplementedError) as exc:
                        if mode == "rowwise":
                            print("rowwise unsupported on CPU:", str(exc)[:80])
                            continue
                        raise
                    s = quant.sqnr_db(ref.float(), got.float())
                    assert got.shape == ref.shape and got.dtype == x.dtype
                    assert s > 40, (p, name, mode, s)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
