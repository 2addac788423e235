"""Attention kernels at DiT-XL/2's shape (issue #13): time and accuracy, one GPU, prints JSON.

    PYTHONPATH=$SAGE_SITE python benchmarks/attention_bench.py --out $OUT/attention.json
    python benchmarks/attention_bench.py --smoke --out /tmp/attention.json   # CPU dry run (reference only)

Shape: 16 heads x 256 tokens x head dim 72 (DiT-XL/2 at 256 px), the denoiser's rows with
guidance: batch 128 / 16 / 2 = images 64 / 8 / 1. Inputs: bf16 ``q, k, v`` (``[B, N, H, D]``, the
layout qkv's output reshapes to), the keys with a common component as DiT keys have. Candidates:

- ``sdpa_flash`` / ``sdpa_cudnn`` / ``sdpa_efficient`` / ``sdpa_auto``: bf16 ``F.scaled_dot_product_attention``
  pinned to one backend (``sdpa_auto``: torch's choice, what the engine runs today);
- ``sage``: ``runtime.attention.sage_attention_library`` as the engine calls it uncompiled (k
  smoothing and zero-padding 72 -> 96 in eager torch, then sageattention's two Triton kernels);
  ``sage_compiled``: the same under ``torch.compile`` (the preparation fused, as in the compiled
  engine); ``sage_kernels``: the library alone on inputs already padded (the floor);
- ``fp8_sdpa_fa3``: torch's experimental FP8 attention (per-head descales; needs the FlashAttention-3
  implementation, ``activate_flash_attention_impl("FA3")``); its failure is recorded, not fatal.

Accuracy of each against fp32 exact attention of the same bf16 inputs: SQNR (dB), cosine, max abs
error. Time: median ms per call replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``:
no launch overhead, as in the graphed engine), ``--timing events`` for per-call launches.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HEADS, TOKENS, HEAD_DIM = 16, 256, 72  # DiT-XL/2, 256 px (32x32 latents, patch 2)


def make_inputs(batch: int, device, seed: int = 0, heads: int = HEADS, tokens: int = TOKENS, head_dim: int = HEAD_DIM):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, generator=g) for _ in range(3))
    k = k + 3 * torch.randn(1, 1, heads, head_dim, generator=g)  # a shared key component (smoothing's case)
    return tuple(t.to(device, torch.bfloat16) for t in (q, k, v))


def hnd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def candidates(q, k, v) -> dict:
    """name -> zero-argument callable returning ``[B, N, H, D]`` (any dtype)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dtq.runtime.attention import (pad_head_dim, sage_attention, sage_attention_library, sage_head_dim,
                                       smooth_k)

    d = q.shape[-1]
    scale = d ** -0.5
    qh, kh, vh = hnd(q), hnd(k), hnd(v)

    def sdpa(backend):
        def run():
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                return hnd(F.scaled_dot_product_attention(qh, kh, vh))
        return run

    out = {}
    if q.is_cuda:
        out.update(sdpa_auto=sdpa(None), sdpa_flash=sdpa(SDPBackend.FLASH_ATTENTION),
                   sdpa_cudnn=sdpa(SDPBackend.CUDNN_ATTENTION), sdpa_efficient=sdpa(SDPBackend.EFFICIENT_ATTENTION))
        out["sage"] = lambda: sage_attention_library(q, k, v, scale)
        compiled = torch.compile(sage_attention_library)
        out["sage_compiled"] = lambda: compiled(q, k, v, scale)
        width = sage_head_dim(d)
        qp, kp, vp = pad_head_dim(q, width), pad_head_dim(smooth_k(k, seq_dim=1), width), pad_head_dim(
            v.to(torch.float16), width)
        out["sage_kernels"] = lambda: torch.ops.dtq.sage_attention_padded(qp, kp, vp, scale)[..., :d]
        out["fp8_sdpa_fa3"] = fp8_sdpa(q, k, v, scale)
    else:  # --smoke: torch's SDPA and dtq's reference of SageAttention's scheme
        out["sdpa_auto"] = sdpa(None)
        out["sage_reference"] = lambda: sage_attention(q, k, v, scale)
    return out


def fp8_sdpa(q, k, v, scale):
    """torch's experimental FP8 attention (FlashAttention-3 implementation, per-head descales);
    q / k / v are quantized to E4M3 once, outside the timed call (as a fused producer would)."""
    codes, descales = [], []
    for t in (q, k, v):
        th = hnd(t).float()
        s = (th.abs().amax(dim=(2, 3)) / 448.0).clamp_min(1e-12)  # [B, H]: per-head scale
        codes.append((th / s[:, :, None, None]).to(torch.float8_e4m3fn).contiguous())
        descales.append(s.contiguous())

    def run():
        from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl
        from torch.nn.attention.experimental._scaled_dot_product_attention_quantized import (
            _scaled_dot_product_attention_quantized)

        activate_flash_attention_impl("FA3")  # process-wide: restored after each call
        try:
            o = _scaled_dot_product_attention_quantized(*codes, scale=scale, q_descale=descales[0],
                                                        k_descale=descales[1], v_descale=descales[2])
        finally:
            restore_flash_attention_impl()
        return hnd(o)
    return run


def accuracy(exact: torch.Tensor, got: torch.Tensor) -> dict:
    from dtq.runtime.quant import sqnr_db

    e, g = exact.float().flatten(), got.float().flatten()
    return {"sqnr_db": round(sqnr_db(e.cpu(), g.cpu()), 2),
            "cosine": round(float(F.cosine_similarity(e, g, dim=0)), 6),
            "max_abs_err": round(float((e - g).abs().max()), 5)}


def time_ms(fn, timing: str) -> float:
    if not torch.cuda.is_available() or timing == "cpu":
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return sorted(ts)[1]
    import triton.testing

    if timing == "cudagraph":
        return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def bench_batch(batch: int, device, timing: str) -> dict:
    q, k, v = make_inputs(batch, device)
    exact = hnd(F.scaled_dot_product_attention(*(hnd(t).float() for t in (q, k, v))))  # fp32 math
    flops = 4 * batch * HEADS * TOKENS * TOKENS * q.shape[-1]  # QK^T + PV at the true head dim
    res = {"batch_rows": batch, "shape_bnhd": list(q.shape)}
    for name, fn in candidates(q, k, v).items():
        try:
            got = fn()  # compiles / autotunes outside any graph capture
            r = accuracy(exact, got)
            ms = time_ms(fn, timing if device.type == "cuda" else "cpu")
            r.update(ms=round(ms, 4), tflops_at_head_72=round(flops / ms / 1e9, 1))
        except Exception as exc:  # an unavailable kernel is a result
            r = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]}
        res[name] = r
        print(f"B={batch} {name}: {r}", file=sys.stderr, flush=True)
    ref = res.get("sdpa_auto", {}).get("ms")
    for name, r in res.items():
        if isinstance(r, dict) and "ms" in r and ref:
            r["speedup_vs_sdpa_auto"] = round(ref / r["ms"], 3)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--batches", default="128,16,2", help="rows per call (images x 2 with guidance)")
    ap.add_argument("--timing", choices=("cudagraph", "events"), default="cudagraph")
    ap.add_argument("--smoke", action="store_true", help="CPU dry run: batch 1, SDPA and the torch reference")
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
        if any(b < 1 for b in batches):
            raise ValueError
    except ValueError:
        print(f"error: --batches takes positive integers, got {args.batches!r}", file=sys.stderr)
        return 2
    if args.smoke:
        device, batches = torch.device("cpu"), [1]
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("error: this benchmark needs a CUDA GPU (or --smoke for a CPU dry run)", file=sys.stderr)
        return 2
    from dtq.tools.bench_engines import env_info

    env = env_info()
    try:
        import sageattention  # noqa: F401

        env["sageattention"] = getattr(sageattention, "__version__", "installed")
    except ImportError as exc:
        env["sageattention"] = f"not importable: {exc}"
    results = {"env": env, "timing": args.timing if device.type == "cuda" else "cpu",
               "shape": {"heads": HEADS, "tokens": TOKENS, "head_dim": HEAD_DIM}, "batches": []}
    with torch.no_grad():
        for b in batches:
            results["batches"].append(bench_batch(b, device, args.timing))
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
