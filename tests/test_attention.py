"""Attention backends (issue #13): SageAttention's INT8-QK scheme, its head-dim padding (DiT-XL/2's
72 -> 96) and softmax scale, checked on the CPU against torch's SDPA with a torch reference of the
scheme; its quantization against the library's own Triton kernel in triton's interpreter."""

import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from dtq.runtime import attention
from dtq.runtime.attention import (EngineAttention, pad_head_dim, sage_attention_library, sage_attention_reference,
                                   sage_head_dim, use_attention)
from dtq.runtime.quant import sqnr_db
from dtq.runtime.qengine import build_qengine
from dtq.tools.quick_recipe import minmax_recipe, random_inputs

from conftest import run_in_triton_interpreter, small_config


def qkv(b=2, h=3, n=256, d=72, key_offset=3.0, seed=0):
    """q, k, v ``[B, H, N, D]``; the keys share a common component (as DiT keys do), which k
    smoothing removes before quantization."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    return q, k + key_offset * torch.randn(1, 1, 1, d, generator=g), v


def test_sage_head_dims():
    assert [sage_head_dim(d) for d in (16, 32, 64, 72, 96, 100, 128)] == [64, 64, 64, 96, 96, 128, 128]
    with pytest.raises(ValueError, match="up to 128"):
        sage_head_dim(144)


def test_reference_vs_sdpa_and_the_padded_scale():
    """INT8 q/k at head 72 stays within ~38 dB of exact attention; padding to 96 with the true
    head's softmax scale changes nothing, padding with the padded width's default scale (what
    sageattn does when sm_scale is not passed) is a different softmax temperature (~16 dB)."""
    q, k, v = qkv()
    exact = F.scaled_dot_product_attention(q, k, v)
    got = sage_attention_reference(q, k, v)
    assert sqnr_db(exact, got) > 33
    assert F.cosine_similarity(exact.flatten(), got.flatten(), dim=0) > 0.999
    qp, kp, vp = (pad_head_dim(t, 96) for t in (q, k, v))
    padded = sage_attention_reference(qp, kp, vp, sm_scale=72 ** -0.5)
    assert torch.equal(padded[..., 72:], torch.zeros_like(padded[..., 72:]))
    assert sqnr_db(got, padded[..., :72]) > 100  # the same integer q.k; only fp32 summation order differs
    assert sqnr_db(exact, sage_attention_reference(qp, kp, vp)[..., :72]) < 25  # 1/sqrt(96): wrong


def test_reference_smooths_k():
    """A constant added to every key leaves softmax(q k^T) unchanged; the reference removes it
    (k minus its token mean) before quantizing, so a large offset costs nothing. Without smoothing
    the offset would take most of k's int8 range."""
    q, k, v = qkv(key_offset=0.0)
    base = sage_attention_reference(q, k, v)
    shifted = sage_attention_reference(q, k + 20.0 * torch.randn(1, 1, 1, 72, generator=torch.Generator().manual_seed(5)), v)
    assert sqnr_db(base, shifted) > 45
    exact = F.scaled_dot_product_attention(q, k, v)
    assert sqnr_db(exact, shifted) > 33


def test_library_path_pads_smooths_and_passes_the_true_scale(monkeypatch):
    """The CUDA path's own logic, run on the CPU with a stand-in for ``sageattn`` that accepts only
    what the real one takes (head dims 64/96/128, NHD, q / k / v of one dtype: sageattention 1.0.6
    asserts it and casts v to fp16 itself) and computes the reference."""
    calls = []

    def fake_sageattn(q, k, v, tensor_layout, is_causal, sm_scale, smooth_k):
        assert q.shape[-1] in (64, 96, 128) and tensor_layout == "NHD" and not is_causal and not smooth_k
        assert q.dtype == k.dtype == v.dtype and q.is_contiguous() and k.is_contiguous() and sm_scale is not None
        assert torch.allclose(k.float().mean(dim=1), torch.zeros(()), atol=1e-4)  # smoothed before the call
        calls.append((q.shape[-1], sm_scale))
        hnd = lambda t: t.transpose(1, 2)  # noqa: E731
        return hnd(sage_attention_reference(hnd(q), hnd(k), hnd(v.to(torch.float16)), sm_scale))

    monkeypatch.setattr(attention, "_import_sageattn", lambda: fake_sageattn)
    q, k, v = qkv()
    nhd = lambda t: t.transpose(1, 2)  # noqa: E731
    got = sage_attention_library(nhd(q), nhd(k), nhd(v), 72 ** -0.5)
    assert calls == [(96, 72 ** -0.5)] and got.shape == nhd(q).shape
    assert sqnr_db(sage_attention_reference(q, k, v), nhd(got)) > 60  # (k smoothed twice: a few rounding flips)
    # traced as the compiled engine traces it: the library call is one opaque custom op with a fake
    compiled = torch.compile(sage_attention_library, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(nhd(q), nhd(k), nhd(v), 72 ** -0.5), got) and len(calls) == 2


def test_missing_sageattention_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sageattention", None)  # import fails
    q, k, v = (t.transpose(1, 2) for t in qkv(n=8))
    from dtq.extras import MissingExtra

    with pytest.raises(MissingExtra, match=r"pip install sageattention==1\.0\.6"):
        sage_attention_library(q, k, v, 72 ** -0.5)


def test_engine_attention_in_a_dit():
    """``use_attention`` swaps the blocks' attention from outside: "sdpa" is the model's own op
    (bit-identical), "sage" (CPU: the reference) stays close to it on a DiT with head dim 72."""
    torch.manual_seed(0)
    from dtq.runtime.model import DiT

    # std 0.1: attention logits large enough for their quantization to show (at 0.02 softmax is near uniform)
    model = DiT(small_config(input_size=16, hidden_size=144, num_heads=2)).randomize_(seed=1, std=0.1).eval()
    x, t, y = random_inputs(model, 2, seed=3)
    with torch.no_grad():
        ref = model(x, t, y)
        import copy

        sage = use_attention(copy.deepcopy(model), "sage")
        assert all(isinstance(b.attn, EngineAttention) and b.attn.backend == "sage" for b in sage.blocks)
        got = sage(x, t, y)
        assert 40 < sqnr_db(ref, got) < 80  # quantized (not the same numbers), and close: 53 dB
        assert torch.equal(use_attention(sage, "sdpa")(x, t, y), ref)  # EngineAttention with "sdpa"
    with pytest.raises(ValueError, match="attention must be one of"):
        use_attention(model, "flash3")


def test_qengine_takes_the_attention_backend(small_model):
    recipe = minmax_recipe(small_model, "int8", group=32, balance=True)
    x, t, y = random_inputs(small_model, 2, seed=7)
    with torch.no_grad():
        plain = build_qengine(small_model, recipe)(x, t, y)
        eng = build_qengine(small_model, recipe, attention="sage")
        got = eng(x, t, y)
    assert all(b.attn.backend == "sage" for b in eng.blocks)
    assert type(eng.blocks[0].attn.qkv).__name__ == "Int8Linear"  # the engine's layers are kept
    assert not torch.equal(plain, got) and sqnr_db(plain, got) > 40
    with pytest.raises(ValueError, match="attention must be one of"):
        build_qengine(small_model, recipe, attention="fp8")


def _sage_and_triton():
    try:
        import sageattention  # noqa: F401
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _sage_and_triton(), reason="sageattention / triton not installed "
                    "(pip install sageattention==1.0.6 triton): the library's quantization kernel unchecked")
def test_reference_quantization_is_the_library_kernel():
    """sageattention's own per-block INT8 quantization kernel (head 96, Triton interpreter) gives
    exactly the reference's codes and scales for q (scaled by 1/sqrt(72) log2 e) and smoothed k.
    (Its attention kernel: the next test.)"""
    code = textwrap.dedent("""
        import torch
        from sageattention.quant_per_block_hd96 import per_block_int8_hd96
        from dtq.runtime.attention import LOG2E, pad_head_dim, quantize_per_block, smooth_k
        g = torch.Generator().manual_seed(0)
        q, k = (torch.randn(1, 2, 200, 72, generator=g) for _ in range(2))
        qp, kp = pad_head_dim(q, 96), pad_head_dim(smooth_k(k + 3, seq_dim=2), 96)
        qi, qs, ki, ks = per_block_int8_hd96(qp, kp, sm_scale=72 ** -0.5, tensor_layout="HND")
        rqi, rqs = quantize_per_block(qp, 128, 72 ** -0.5 * LOG2E)
        rki, rks = quantize_per_block(kp, 64)
        assert torch.equal(qi, rqi) and torch.equal(ki, rki), "codes"
        assert torch.equal(qs, rqs) and torch.equal(ks, rks), "scales"
        assert qi.abs().max() == 127 and qs.shape == (1, 2, 2, 1) and ks.shape == (1, 2, 4, 1)
        print("ok")
    """)
    run_in_triton_interpreter(code, timeout=300)


def test_attention_bench_smoke(tmp_path):
    """benchmarks/attention_bench.py end to end on the CPU: DiT-XL/2's attention shape, SDPA and the
    SageAttention reference measured against fp32 attention; bad input is exit 2."""
    from conftest import load_benchmark

    bench = load_benchmark("attention_bench")
    out = tmp_path / "attention.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    import json

    (row,) = json.loads(out.read_text())["batches"]
    assert row["shape_bnhd"] == [1, 256, 16, 72]
    assert row["sdpa_auto"]["sqnr_db"] > 45  # bf16 inputs, fp32 SDPA on the CPU: only reduction order differs
    assert 33 < row["sage_reference"]["sqnr_db"] < 45 and row["sage_reference"]["cosine"] > 0.999
    assert bench.main(["--batches", "0"]) == 2


def _numpy_int_of_1d():
    """triton 3.6's interpreter takes int() of 1-element arrays for runtime loop bounds, which newer
    numpy refuses (2.4.6 does; 2.2.6 warns): sageattention's attention kernel then cannot be interpreted."""
    import warnings

    import numpy as np

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int(np.array([1]))
    except TypeError:
        return False
    return True


@pytest.mark.skipif(not (_sage_and_triton() and _numpy_int_of_1d()),
                    reason="needs sageattention + triton, and a numpy that converts 1-element arrays to int (2.2.6 "
                           "does, 2.4.6 does not) for triton 3.6's interpreter to run sageattention's attention "
                           "kernel (its K loop has a runtime bound)")
def test_reference_is_the_library_attention_kernel():
    """sageattention's head-96 attention kernel itself (interpreter) on q / k / v padded from 72 by
    dtq's code agrees with the reference to float rounding (measured 114.6 dB with numpy 2.2.6);
    both are ~38 dB from exact attention."""
    code = textwrap.dedent("""
        import warnings
        warnings.simplefilter("ignore")
        import torch, torch.nn.functional as F
        from sageattention.quant_per_block_hd96 import per_block_int8_hd96
        from sageattention.attn_qk_int8_per_block_h96 import forward
        from dtq.runtime.attention import pad_head_dim, sage_attention_reference, smooth_k
        from dtq.runtime.quant import sqnr_db
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 256, 72, generator=g) for _ in range(3))
        k = k + 3 * torch.randn(1, 1, 1, 72, generator=g)
        qp, kp, vp = pad_head_dim(q, 96), pad_head_dim(smooth_k(k, 2), 96), pad_head_dim(v, 96).half()
        qi, qs, ki, ks = per_block_int8_hd96(qp, kp, sm_scale=72 ** -0.5)
        out = forward(qi, ki, vp, qs, ks, output_dtype=torch.float32)
        assert torch.equal(out[..., 72:], torch.zeros_like(out[..., 72:]))
        ref = sage_attention_reference(q, k, v)
        assert sqnr_db(ref, out[..., :72]) > 90, sqnr_db(ref, out[..., :72])
        assert 33 < sqnr_db(F.scaled_dot_product_attention(q, k, v), out[..., :72]) < 45
        print("ok")
    """)
    run_in_triton_interpreter(code, timeout=300)
