"""Where the time of one DiT-XL/2 forward goes, per backend: a torch.profiler kernel breakdown.

    python benchmarks/profile_engines.py --out $OUT/profile.json [--backends bf16-compile,fp8,int8] [--batch 64]

For each backend (built exactly as ``tools/bench_engines.py`` builds it: regional torch.compile of
the DiT blocks), runs the denoiser on 2*batch rows (classifier-free guidance), then profiles
``--iters`` forwards (no CUDA graph, so that every kernel is visible; the graphed forward time is
measured separately) and groups the GPU kernel time into GEMM / attention / fused elementwise
(Inductor's Triton kernels) / other. Prints the top kernels and the per-forward totals.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import torch

from dtq.tools import bench_engines as be

CATEGORIES = (  # first match wins
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn", re.I)),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|int8_mm|w4a8|w4a16|_mm_kernel|matmul|scaled_mm", re.I)),
    ("elementwise", re.compile(r"^triton_|elementwise|vectorized|reduce|layer_norm|softmax", re.I)),
)


def category(name: str) -> str:
    for cat, rx in CATEGORIES:
        if rx.search(name):
            return cat
    return "other"


def profile_backend(module, batch: int, iters: int) -> dict:
    from dtq.runtime.backends import GraphedDenoiser

    dev = be.DEV
    x = torch.randn(2 * batch, 4, 32, 32, device=dev)
    t = torch.full((2 * batch,), 500, device=dev, dtype=torch.long)
    y = torch.randint(0, 1001, (2 * batch,), device=dev)
    den = GraphedDenoiser(module, dev, torch.bfloat16, cuda_graphs=True)
    den(x, t, y)
    graphed_ms = be.bench_ms(lambda: den(x, t, y), warmup_ms=10, rep_ms=60)
    replay = graph_idle(lambda: den(x, t, y), iters)
    den.reset()
    plain = GraphedDenoiser(module, dev, torch.bfloat16, cuda_graphs=False)
    for _ in range(3):
        plain(x, t, y)
    be.sync()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(iters):
            plain(x, t, y)
        be.sync()
    kernels = defaultdict(lambda: [0.0, 0])
    # host-side copies (ATen copy_ / clone / contiguous / _to_copy, e.g. a layout or dtype change in front of
    # a custom op) with their input shapes: what an ATen elementwise copy kernel in the list moved
    copies = defaultdict(int)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CPU and evt.name in (
                "aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"):
            copies[f"{evt.name} {evt.input_shapes}"] += 1
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[evt.name]
            k[0] += evt.device_time / 1e3  # ms
            k[1] += 1
    per_fwd = {n: (ms / iters, c // iters) for n, (ms, c) in kernels.items()}
    cats = defaultdict(float)
    for n, (ms, _) in per_fwd.items():
        cats[category(n)] += ms
    top = sorted(per_fwd.items(), key=lambda kv: -kv[1][0])[:25]
    # a per-token quantizer's own pass (kernels.quant_rows_int8: token_quant "pass"); "-tokfused" engines fuse it
    # into Inductor's LayerNorm+modulate / GELU kernels, whose names then include "amax"
    quant_pass = [(ms, c) for n, (ms, c) in per_fwd.items() if "quant_rows" in n]
    fused_amax = [(ms, c) for n, (ms, c) in per_fwd.items() if n.startswith("triton_") and "amax" in n]
    return {"graphed_forward_ms": round(graphed_ms, 3), "kernel_ms_per_forward": round(sum(cats.values()), 3),
            "graph_replay": replay,
            "quant_rows_pass": {"ms": round(sum(ms for ms, _ in quant_pass), 3), "calls": sum(c for _, c in quant_pass)},
            "fused_row_amax_kernels": {"ms": round(sum(ms for ms, _ in fused_amax), 3),
                                       "calls": sum(c for _, c in fused_amax)},
            "categories_ms": {k: round(v, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:160], "ms": round(ms, 3), "calls": c, "category": category(n)}
                            for n, (ms, c) in top],
            "host_copies_per_forward": {k: v / iters for k, v in sorted(copies.items(), key=lambda kv: -kv[1])[:10]}}


def graph_idle(forward, iters: int) -> dict:
    """Kernels of CUDA-graph replays as the GPU ran them (CUPTI records a graph's kernels one by one):
    per forward, the time from the first kernel's start to the last one's end, the time some kernel ran,
    and the idle rest, with the largest gaps and the kernels around them. Whether the graphed forward's
    excess over the kernel sum is gaps between kernels (fewer kernels or programmatic dependent launch
    would win it back) or kernels that run slower in the graph than in the profiled eager run."""
    from torch.profiler import ProfilerActivity, profile

    forward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):  # enqueued back to back: the GPU never waits for the host between them
            forward()
        torch.cuda.synchronize()
    ev = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not ev:
        return {"kernels": 0, "note": "no kernel records from the graph replays"}
    busy, gaps, end = 0.0, [], ev[0][0]
    prev = ""
    for start, stop, name in ev:
        if start > end:
            gaps.append((start - end, prev, name))
        busy += max(0.0, stop - max(start, end))
        end, prev = max(end, stop), name
    gaps.sort(key=lambda g: -g[0])
    return {"kernels_per_forward": len(ev) / iters, "span_ms_per_forward": round((end - ev[0][0]) / iters / 1e3, 3),
            "busy_ms_per_forward": round(busy / iters / 1e3, 3),
            "idle_ms_per_forward": round(sum(g[0] for g in gaps) / iters / 1e3, 3),
            "gaps_over_5us_per_forward": sum(1 for g in gaps if g[0] > 5) / iters,
            "largest_gaps": [{"us": round(g, 1), "after": a[:90], "before": b[:90]} for g, a, b in gaps[:8]]}


def attention_variants(batch: int) -> dict:
    """SDPA alone at DiT-XL/2's shape (16 heads of 72, 256 tokens): which backend is fastest."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(2 * batch, 16, 256, 72, device=be.DEV, dtype=torch.bfloat16) for _ in range(3))
    out = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        try:
            with sdpa_kernel(backend):
                out[name] = round(be.bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)), 4)
        except Exception as exc:  # a backend that does not take this shape is a result
            out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    try:
        out["default"] = round(be.bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)), 4)
    except Exception as exc:
        out["default"] = str(exc)[:200]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backends", default="bf16-compile,fp8,int8",
                    help="comma list of tools/bench_engines.py backends; NAME-tw: FP8 with tensor-wise scaling")
    ap.add_argument("--batch", type=int, default=64, help="images (the denoiser sees 2x)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--model", default="DiT-XL/2")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    res = {"env": be.env_info(), "batch": args.batch, "model": args.model, "backends": {}}
    res["attention_alone_ms"] = attention_variants(args.batch)
    be.log(f"attention alone (ms, per layer): {res['attention_alone_ms']}")
    from dtq.runtime.qengine import engine_layers

    base = be.make_xl(args.model)
    for name in args.backends.split(","):
        def one(name=name):
            m = be.build_backend(name.removesuffix("-tw"), base, "sha256:profile")
            if name.endswith("-tw"):  # FP8 with tensor-wise scaling + a per-channel epilogue
                for layer in engine_layers(m).values():
                    layer.scaling = "tensorwise"
            r = profile_backend(m, args.batch, args.iters)
            be.log(f"{name}: graph replay {r['graph_replay']}")
            be.log(f"{name}: graphed forward {r['graphed_forward_ms']} ms, kernels {r['kernel_ms_per_forward']} ms "
                   f"{r['categories_ms']}; quant_rows pass {r['quant_rows_pass']}, "
                   f"Inductor kernels with a row amax {r['fused_row_amax_kernels']}")
            for k in r["top_kernels"][:12]:
                be.log(f"    {k['ms']:8.3f} ms x{k['calls']:3d} [{k['category']}] {k['name'][:110]}")
            for k, n in r["host_copies_per_forward"].items():
                be.log(f"    host copy x{n:g} per forward: {k[:200]}")
            return r

        be.guarded(res["backends"], name, one)
        torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
