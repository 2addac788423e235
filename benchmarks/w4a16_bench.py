"""Issue #13, session 17: W4A16 at batch 1-8, kernel by kernel, on DiT-XL/2's layer shapes.

For each layer shape (``out x in``: qkv, proj, fc1, fc2, adaLN) and row count (the token layers at
batch 1 and 8 with guidance: 512 and 4096 rows; the adaLN layer at 2 x batch rows), CUDA-graph medians of:

- ``bf16``: ``F.linear`` on a bf16 weight (cuBLAS), the baseline's GEMM;
- ``unpack``: ``kernels.unpack_int4_dequant`` alone (what prefetching moves off the critical path), its
  bandwidth (bytes read and written per second) and its weights against torch's (``--unpack-only``: only this);
- ``staged``: unpack + ``F.linear`` (the W4A16 layer without prefetching);
- ``int4``: ``kernels.w4a16_mm``, the INT4 kernel dequantizing in its registers (autotuned);
- fc1 only: ``linear_gelu`` = ``F.linear`` + ``F.gelu(tanh)`` (two kernels, as bf16 torch.compile runs
  them) and ``linear_gelu_epilogue`` = ``dtq::linear_gelu_tanh`` (cuBLASLt's GELU_BIAS epilogue),
  with the epilogue's max error against the tanh and the erf GELU of the float32 GEMM (which GELU it is).

Then (``--engine-check``) the prefetching engine against the one without, on DiT-XL/2's widths (4 blocks,
random weights) at batch 8 with guidance, compiled and CUDA-graphed as dtq-sample runs it: the prefetch is
scheduling only, so the outputs must be bit-identical (the max difference is recorded either way).

Then (``--prefetch-sweep``, session 18) DiT-XL/2 (28 blocks, random weights), graphed forward time at
batch 1 and 8 (``--batches``) with guidance: bf16 torch.compile and the W4A16 engine, interleaved over 3
rounds (median), and (``--sample-rounds``) whole DDPM sampling runs of each, interleaved the same way.

    python benchmarks/w4a16_bench.py --out w4a16.json [--engine-check] [--prefetch-sweep] [--layers qkv]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from attention_bench import time_ms  # benchmarks/ is sys.path[0]

K = 1152
LAYERS = {"qkv": (3456, K), "proj": (K, K), "fc1": (4608, K), "fc2": (K, 4608), "adaLN": (6912, K)}
TOKEN_ROWS = (512, 4096)  # batch 1 and 8, 256 tokens, guidance doubles the batch
ADALN_ROWS = (2, 16, 128, 256, 512)  # 2 x batch for batch 1, 8, 64, 128, 256


def run(out: str, group: int, engine_check: bool = False, layers: tuple[str, ...] = (),
        unpack_only: bool = False) -> dict:
    from dtq.runtime import kernel_ops, kernels
    from dtq.runtime.kernels_ref import pack_int4
    from dtq.tools import bench_engines as be

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    res = {"env": be.env_info(), "group": group, "ms": {}, "gelu_check": {}}

    def record(name, fn):
        fn()  # autotunes / warms up outside the graph
        res["ms"][name] = round(time_ms(fn, "cudagraph"), 5)
        print(name, res["ms"][name], flush=True)

    for layer, (n, k) in LAYERS.items():
        if layers and layer not in layers:
            continue
        q = torch.randint(-8, 8, (n, k), device=dev, dtype=torch.int8, generator=g)
        s = torch.rand(n, k // group, device=dev, generator=g) * 1e-2 + 1e-3
        wp = pack_int4(q.cpu()).to(dev)
        w = kernels.unpack_int4_dequant(wp, s, group, torch.bfloat16)
        bias = torch.randn(n, device=dev, generator=g).to(torch.bfloat16)
        slot = torch.empty_like(w)
        record(f"{layer}_unpack", lambda: kernels.unpack_int4_dequant(wp, s, group, torch.bfloat16, out=slot))
        res["ms"][f"{layer}_unpack_tb_s"] = round((wp.numel() + s.numel() * 4 + w.numel() * 2) / res["ms"][f"{layer}_unpack"] / 1e9, 3)
        # q4 * s in float32 rounded once to bf16 (torch's rounding): every weight equal
        res.setdefault("unpack_check", {})[layer] = int((w != (q.float() * s.repeat_interleave(group, 1)).bfloat16()).sum())
        if unpack_only:
            continue
        for m in (ADALN_ROWS if layer == "adaLN" else TOKEN_ROWS):
            a = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
            tag = f"{layer}_m{m}"
            record(f"{tag}_bf16", lambda: F.linear(a, w, bias))
            record(f"{tag}_staged", lambda: F.linear(a, kernels.unpack_int4_dequant(wp, s, group, torch.bfloat16), bias))
            record(f"{tag}_int4", lambda: kernels.w4a16_mm(a, wp, s, group, bias.float()))
            if layer == "fc1":
                record(f"{tag}_linear_gelu", lambda: F.gelu(F.linear(a, w, bias), approximate="tanh"))
                record(f"{tag}_linear_gelu_epilogue", lambda: torch.ops.dtq.linear_gelu_tanh(a, w, bias))
                exact = F.linear(a.float(), w.float(), bias.float())
                got = torch.ops.dtq.linear_gelu_tanh(a, w, bias).float()
                res["gelu_check"][tag] = {
                    form: round(float((got - F.gelu(exact, approximate=form)).abs().max()), 5)
                    for form in ("tanh", "none")}
                # which GELU: bf16 rounding (~0.016 here) hides tanh vs erf (< 1e-3) in the max error,
                # so also the mean error, and the epilogue on float32 operands (TF32 off)
                for form in ("tanh", "none"):
                    res["gelu_check"][tag][f"mean_{form}"] = float((got - F.gelu(exact, approximate=form)).abs().mean())
                torch.backends.cuda.matmul.allow_tf32 = False
                a32, w32, b32 = a.float(), w.float(), bias.float()
                got32 = torch._addmm_activation(b32, a32, w32.t(), use_gelu=True)
                ex32 = F.linear(a32, w32, b32)
                for form in ("tanh", "none"):
                    res["gelu_check"][tag][f"fp32_{form}"] = float((got32 - F.gelu(ex32, approximate=form)).abs().max())
                two = F.gelu(F.linear(a, w, bias), approximate="tanh").float()
                res["gelu_check"][tag]["unfused_vs_tanh"] = round(float((two - F.gelu(exact, approximate="tanh"))
                                                                        .abs().max()), 5)
                print(tag, res["gelu_check"][tag], flush=True)
    if engine_check:
        res["engine_check"] = prefetch_engine_check(dev)
        print("engine_check", res["engine_check"], flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    return res


def prefetch_engine_check(dev: torch.device, batch: int = 8) -> dict:
    """Graphed W4A16 engines, same inputs: with the weight prefetch; the same engine with its blocks'
    prefetcher detached (each layer unpacks its own weight: same blocks, same compiled code, so any
    difference is the prefetch's); and the engine built without it (plain DiT blocks, whose Inductor
    kernels may round differently). Max differences against the first."""
    from dtq.runtime.backends import GraphedDenoiser
    from dtq.runtime.model import DiT, DiTConfig
    from dtq.runtime.qengine import build_qengine, compile_blocks
    from dtq.tools.quick_recipe import minmax_recipe

    cfg = DiTConfig(depth=4)  # DiT-XL/2's widths, 256 tokens
    model = DiT(cfg).randomize_(seed=0, std=0.02).eval()
    recipe = minmax_recipe(model, "w4a16", group=128, adaln=True)
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(2 * batch, 4, 32, 32, device=dev, generator=g)
    t = torch.randint(0, 1000, (2 * batch,), device=dev, generator=g)
    y = torch.randint(0, 1000, (2 * batch,), device=dev, generator=g)
    outs = {}
    for variant in ("prefetch", "detached", "built_without"):
        eng = build_qengine(model, recipe, device=dev, w4a16_prefetch=variant != "built_without")
        if variant == "detached":
            for block in eng.blocks:
                block.prefetcher = None
        run = GraphedDenoiser(compile_blocks(eng), device=dev)
        with torch.no_grad():
            outs[variant] = [run(x, t, y).clone() for _ in range(3)]  # warm-up + capture, then replays
        torch._dynamo.reset()
    a = outs["prefetch"]
    res = {"batch_rows": 2 * batch, "replays_identical": all(torch.equal(a[0], p) for p in a),
           "output_abs_mean": float(a[0].float().abs().mean())}
    for variant in ("detached", "built_without"):
        b = outs[variant]
        res[variant] = {"bit_identical": all(torch.equal(p, q) for p, q in zip(a, b)),
                        "max_abs_diff": max(float((p.float() - q.float()).abs().max()) for p, q in zip(a, b))}
    return res


def prefetch_sweep(dev: torch.device, batches=(1, 8), rounds: int = 3, sample_rounds: int = 0) -> dict:
    """Graphed DiT-XL/2 forward (ms) at each batch: bf16-compile and W4A16 captured on a stream of priority 0
    (CUDA's default, the prefetch's side stream's). Sessions 18-19 also captured at priority -1 (the
    forward's own kernels first; no difference); session 20 also W4A16 with block 0's unpacks started from
    a forward pre-hook (no consistent difference; removed, docs/engines.md)."""
    from dtq.runtime.backends import CAPTURE_PRIORITY, GraphedDenoiser
    from dtq.tools import bench_engines as be

    base = be.make_xl()
    fingerprint = "sha256:benchmark-random-weights"
    built = {name: be.build_backend(name, base, fingerprint) for name in ("bf16-compile", "w4a16")}
    res = {"capture_priority": CAPTURE_PRIORITY, "rounds": rounds, "forward_ms": {}}
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(2 * batch, 4, 32, 32, generator=g).to(dev)
        t = torch.full((2 * batch,), 500, device=dev, dtype=torch.long)
        y = torch.randint(0, 1000, (2 * batch,), generator=g).to(dev)
        dens = {name: GraphedDenoiser(m, dev, torch.bfloat16) for name, m in built.items()}
        times: dict[str, list[float]] = {}
        for _ in range(rounds):
            for label, den in dens.items():
                with torch.no_grad():
                    den(x, t, y)
                    be.sync()
                    times.setdefault(label, []).append(be.bench_ms(lambda: den(x, t, y), warmup_ms=10, rep_ms=60))
        res["forward_ms"][str(batch)] = {k: round(sorted(v)[len(v) // 2], 4) for k, v in times.items()}
        res["forward_ms"][f"{batch}_all"] = {k: [round(t_, 4) for t_ in v] for k, v in times.items()}
        if sample_rounds:  # whole sampling runs (what dtq-bench's images/s times), interleaved the same way
            res.setdefault("sample_s", {})[str(batch)] = _sample_sweep(dens, batch, dev, sample_rounds)
        print("prefetch sweep, batch", batch, res["forward_ms"][str(batch)], flush=True)
        for den in dens.values():
            den.reset()
    return res


def _sample_sweep(dens: dict, batch: int, dev: torch.device, rounds: int, steps: int = 50) -> dict:
    """DDPM sampling with guidance (dtq-bench's end-to-end run: ``steps`` graphed forwards and the sampler's
    eager steps) for each denoiser, interleaved over ``rounds``: CUDA-event seconds, sorted, and the median."""
    from dtq.runtime.diffusion import GaussianDiffusion
    from dtq.tools import bench_engines as be

    diffusion = GaussianDiffusion.dit(steps)
    gen = torch.Generator().manual_seed(batch)
    noise = torch.randn(batch, 4, 32, 32, generator=gen).to(dev)
    labels = torch.randint(0, 1000, (batch,), generator=gen).to(dev)
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for label, den in dens.items():
            times.setdefault(label, []).append(be.sampling_seconds(den, diffusion, noise, labels))
    out = {k: {"median": round(sorted(v)[len(v) // 2], 4), "all": [round(t, 4) for t in sorted(v)]}
           for k, v in times.items()}
    print("sampling, batch", batch, {k: v["median"] for k, v in out.items()}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--group", type=int, default=128, help="INT4 weight group size (default 128, the speed runs')")
    ap.add_argument("--engine-check", action="store_true", help="also compare the graphed engines with and "
                    "without the weight prefetch (bit-identical expected)")
    ap.add_argument("--prefetch-sweep", action="store_true", help="also time DiT-XL/2's graphed forward at "
                    "batch 1 and 8: bf16-compile and W4A16")
    ap.add_argument("--sample-rounds", type=int, default=0, help="with --prefetch-sweep: also time whole DDPM "
                    "sampling runs (50 steps, guidance) of each engine, interleaved over this many rounds")
    ap.add_argument("--batches", default="1,8", help="with --prefetch-sweep: the batch sizes (default 1,8)")
    ap.add_argument("--skip-layers", action="store_true", help="skip the per-layer kernel table")
    ap.add_argument("--unpack-only", action="store_true", help="per layer, only the unpack kernel (time, TB/s, "
                    "and its weights against torch's rounding)")
    ap.add_argument("--layers", default="", help=f"comma-separated subset of {', '.join(LAYERS)} (default: all)")
    args = ap.parse_args()
    if not args.skip_layers:
        run(args.out, args.group, args.engine_check, tuple(filter(None, args.layers.split(","))), args.unpack_only)
    if args.prefetch_sweep:
        res = {"prefetch_sweep": prefetch_sweep(torch.device("cuda"), tuple(int(b) for b in args.batches.split(",")),
                                                sample_rounds=args.sample_rounds)}
        if not args.skip_layers:
            with open(args.out) as f:
                res = {**json.load(f), **res}
        else:
            from dtq.tools import bench_engines as be
            res["env"] = be.env_info()
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
