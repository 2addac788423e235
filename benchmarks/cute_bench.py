"""Issue #13: what the CuTe-DSL libraries give on this GPU, measured before dtq writes more kernels by hand.

The FP8 engine's remaining gap (docs/engines.md, "Where the time goes") is the work around cuBLAS's
``_scaled_mm``, which takes no custom epilogue: fc1's GELU + fc2's input quantization is a separate
pass over the 4x-hidden tensor (~8 ms of a 49 ms forward at batch 64), and proj / fc2's adaLN-gated
residual add another (~3 ms). quack-kernels' GEMMs (CuTe DSL, Hopper WGMMA + TMA) take an epilogue
written as a Python function of the accumulator (``quack.epilogue.frontend.gemm_epilogue``), so
each of those passes can move into the GEMM. This script times, at DiT-XL/2's block shapes:

- ``gemm``: bf16 and FP8 GEMMs (+ per-channel scale and bias), cuBLAS vs quack;
- ``fc1``: FP8 fc1 + GELU(tanh) + fc2's static E4M3 quantization: cuBLAS + an Inductor pointwise
  kernel (the engine today) vs one quack GEMM writing E4M3 codes;
- ``gated``: FP8 proj / fc2 + ``residual + gate[b] * out``: cuBLAS + Inductor vs one quack GEMM
  (batched over the images, the weight shared through a stride-0 batch dimension, the gate a
  per-image row vector);
- ``attention``: FlashAttention-4 (CuTe DSL) bf16 at head dim 72 vs torch SDPA.

Every case also checks its numbers against a float32 reference (SQNR) and records failures as
data. Times are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``), events when
a kernel cannot be captured. GPU only:

    PYTHONPATH=$CUTE/nvidia_cutlass_dsl/dsl_packages:$CUTE python benchmarks/cute_bench.py --out cute.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
import traceback

import torch
import torch.nn.functional as F

# DiT-XL/2 block GEMMs: name -> (K, N)
SHAPES = {"qkv": (1152, 3456), "proj": (1152, 1152), "fc1": (1152, 4608), "fc2": (4608, 1152)}
TOKENS = 256  # DiT-XL/2 at 256 px: 32 x 32 latents, patch 2
E4M3_MAX = 448.0


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.double(), x.double()
    err = (ref - x).pow(2).sum().item()
    return float("inf") if err == 0 else 10 * math.log10(ref.pow(2).sum().item() / err)


def time_ms(fn) -> tuple[float, str]:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")), "cudagraph"
    except Exception:  # noqa: BLE001  (a kernel that cannot be captured: time it with events instead)
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")), "events"


def run_case(results: list, name: str, fn) -> None:
    t0 = time.time()
    try:
        row = fn()
        row.update(case=name, ok=True, wall_s=round(time.time() - t0, 1))
    except Exception as e:  # noqa: BLE001  (failures are data)
        row = {"case": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
               "trace": traceback.format_exc()[-3000:], "wall_s": round(time.time() - t0, 1)}
    print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    results.append(row)


def quack_mods():
    """The epilogues (benchmarks/cute_epilogues.py; needs quack-kernels)."""
    import cute_epilogues as ce  # benchmarks/ is sys.path[0] when this script runs

    return ce.scale_bias, ce.gelu_quant, ce.gate_residual


def quack_configs(names: str):
    from quack.gemm_config import GemmConfig

    presets = {
        "default": GemmConfig(tile_m=128, tile_n=192, cluster_m=2, cluster_n=1, pingpong=True,
                              is_dynamic_persistent=False),
        "c128x256": GemmConfig(tile_m=128, tile_n=256, cluster_m=2, cluster_n=1, pingpong=False,
                               is_dynamic_persistent=False),
        "c256x128": GemmConfig(tile_m=256, tile_n=128, cluster_m=2, cluster_n=1, pingpong=False,
                               is_dynamic_persistent=False),
        "p128x128": GemmConfig(tile_m=128, tile_n=128, cluster_m=2, cluster_n=1, pingpong=True,
                               is_dynamic_persistent=False),
    }
    return {n: presets[n] for n in names.split(",")}


def note_best(row: dict, tried: dict, best: str | None) -> None:
    """The fastest quack config of a fused case, its time and its speed against cuBLAS + Inductor."""
    row["quack_best"] = best
    if best:
        row["quack_ms"] = tried[best]["ms"]
        row["quack_vs_cublas_inductor"] = row["cublas_inductor_ms"] / tried[best]["ms"]


def fp8_operands(m: int, k: int, n: int, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=g)
    w = torch.randn(n, k, device=dev, generator=g) * 0.02
    b = torch.randn(n, device=dev, generator=g) * 0.1
    s_a = x.abs().max() / E4M3_MAX
    s_w = w.abs().amax(1) / E4M3_MAX
    xq = (x / s_a).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    wq = (w / s_w[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    ref = (xq.float() * s_a) @ (wq.float() * s_w[:, None]).t() + b  # float32, the codes' exact product
    return dict(x=x, w=w, b=b, s_a=s_a, s_w=s_w, xq=xq, wq=wq, ref=ref)


def cublas_fp8(o, out_dtype=torch.bfloat16):
    m = o["xq"].shape[0]
    sa = o["s_a"].reshape(1, 1).expand(m, 1).contiguous()
    sb = o["s_w"].reshape(1, -1).contiguous()
    bias = o["b"].to(out_dtype)
    return lambda: torch._scaled_mm(o["xq"], o["wq"].t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=out_dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="32768,4096", help="GEMM rows (2 x batch x 256 tokens with guidance)")
    ap.add_argument("--configs", default="default,c128x256,c256x128",
                    help="quack GemmConfig presets tried per case (each a JIT compile)")
    ap.add_argument("--skip", default="", help="comma list of: gemm,fc1,gated,attention")
    args = ap.parse_args()
    dev = torch.device("cuda")
    skip = set(filter(None, args.skip.split(",")))
    results: list = []
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds")}
    for mod in ("triton", "quack", "cutlass", "flash_attn"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            meta[mod] = f"unavailable: {type(e).__name__}: {e}"[:300]
    try:
        from importlib.metadata import version
        meta["nvidia-cutlass-dsl"] = version("nvidia-cutlass-dsl")
        meta["quack-kernels"] = version("quack-kernels")
        meta["flash-attn-4"] = version("flash-attn-4")
    except Exception as e:  # noqa: BLE001
        meta["versions_error"] = str(e)[:300]
    print(json.dumps(meta), flush=True)
    mods = None
    try:
        mods = quack_mods()
    except Exception as e:  # noqa: BLE001
        results.append({"case": "quack-import", "ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                        "trace": traceback.format_exc()[-3000:]})
    configs = quack_configs(args.configs) if mods else {}
    rows_list = [int(r) for r in args.rows.split(",")]

    def best_quack(call, ref_fn):
        """Each config: (ms, timing, sqnr, compile s); the fastest that ran."""
        tried = {}
        for cname, cfg in configs.items():
            t0 = time.time()
            try:
                out = call(cfg)
                torch.cuda.synchronize()
                comp = time.time() - t0
                acc = ref_fn(out)
                ms, how = time_ms(lambda: call(cfg))
                tried[cname] = {"ms": ms, "timing": how, "sqnr_db": acc, "first_call_s": round(comp, 1)}
            except Exception as e:  # noqa: BLE001
                tried[cname] = {"error": f"{type(e).__name__}: {e}"[:600]}
            print(f"    {cname}: {tried[cname]}", flush=True)
        ok = {c: r for c, r in tried.items() if "ms" in r}
        best = min(ok, key=lambda c: ok[c]["ms"]) if ok else None
        return tried, best

    for m in rows_list:
        for lname, (k, n) in SHAPES.items():
            if "gemm" in skip:
                break

            def gemm_case(lname=lname, k=k, n=n, m=m):
                o = fp8_operands(m, k, n, dev)
                row = {"rows": m, "layer": lname, "K": k, "N": n}
                xb, wb, bb = o["x"].bfloat16(), o["w"].bfloat16(), o["b"].bfloat16()
                row["bf16_cublas_ms"], _ = time_ms(lambda: F.linear(xb, wb, bb))
                f = cublas_fp8(o)
                row["fp8_cublas_sqnr_db"] = sqnr(o["ref"], f())
                row["fp8_cublas_ms"], _ = time_ms(f)
                if mods:
                    scale_bias = mods[0]
                    sn = (o["s_a"] * o["s_w"]).reshape(1, -1).float().contiguous()
                    bn = o["b"].reshape(1, -1).float().contiguous()
                    call = lambda cfg: scale_bias(o["xq"], o["wq"].t(), out_dtype=torch.bfloat16, config=cfg,  # noqa: E731
                                                  tuned=False, scale_n=sn, bias_n=bn)["D"]
                    tried, best = best_quack(call, lambda out: sqnr(o["ref"], out))
                    row["fp8_quack"] = tried
                    row["fp8_quack_best"] = best
                    if best:
                        row["fp8_quack_ms"] = tried[best]["ms"]
                        row["fp8_quack_vs_cublas"] = row["fp8_cublas_ms"] / tried[best]["ms"]
                flops = 2 * m * k * n
                row["fp8_cublas_tflops"] = flops / row["fp8_cublas_ms"] / 1e9
                row["bf16_cublas_tflops"] = flops / row["bf16_cublas_ms"] / 1e9
                return row

            run_case(results, f"gemm/{lname}/{m}", gemm_case)

        if "fc1" not in skip:
            def fc1_case(m=m):
                k, n = SHAPES["fc1"]
                o = fp8_operands(m, k, n, dev)
                qmul = (torch.rand(n, device=dev) + 0.5) / 0.05  # fc2's balancing Mul / its act scale
                ref_codes = (F.gelu(o["ref"], approximate="tanh") * qmul).clamp(-E4M3_MAX, E4M3_MAX)
                ref_q = ref_codes.to(torch.float8_e4m3fn).float()  # the codes of the exact product
                f = cublas_fp8(o)
                post = torch.compile(lambda h: (F.gelu(h.float(), approximate="tanh") * qmul)
                                     .clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn))
                base = lambda: post(f())  # noqa: E731
                row = {"rows": m, "layer": "fc1+gelu+quant"}
                out = base().float()
                row["cublas_inductor_sqnr_db"] = sqnr(ref_codes, out)
                row["cublas_inductor_code_mismatch"] = (out != ref_q).float().mean().item()
                row["cublas_inductor_ms"], _ = time_ms(base)
                row["cublas_gemm_only_ms"], _ = time_ms(f)
                if mods:
                    gelu_quant = mods[1]
                    sn = (o["s_a"] * o["s_w"]).reshape(1, -1).float().contiguous()
                    bn = o["b"].reshape(1, -1).float().contiguous()
                    qn = qmul.reshape(1, -1).float().contiguous()
                    call = lambda cfg: gelu_quant(o["xq"], o["wq"].t(), out_dtype=torch.float8_e4m3fn, config=cfg,  # noqa: E731
                                                  tuned=False, scale_n=sn, bias_n=bn, qmul_n=qn)["D"]

                    def acc(out):
                        out = out.float()
                        return {"sqnr_db": sqnr(ref_codes, out), "code_mismatch": (out != ref_q).float().mean().item()}

                    tried, best = best_quack(call, acc)
                    row["quack"] = tried
                    note_best(row, tried, best)
                return row

            run_case(results, f"fc1/{m}", fc1_case)

        if "gated" not in skip:
            for lname in ("proj", "fc2"):
                def gated_case(lname=lname, m=m):
                    k, n = SHAPES[lname]
                    o = fp8_operands(m, k, n, dev)
                    batch = m // TOKENS
                    g = torch.Generator(device=dev).manual_seed(1)
                    gate = torch.randn(batch, n, device=dev, generator=g).bfloat16()
                    res = torch.randn(batch, TOKENS, n, device=dev, generator=g).bfloat16()
                    ref = res.float() + gate.float()[:, None, :] * o["ref"].reshape(batch, TOKENS, n)
                    f = cublas_fp8(o)
                    post = torch.compile(lambda y: res + gate[:, None, :] * y.reshape(batch, TOKENS, n))
                    base = lambda: post(f())  # noqa: E731
                    row = {"rows": m, "layer": f"{lname}+gate+residual"}
                    row["cublas_inductor_sqnr_db"] = sqnr(ref, base())
                    row["cublas_inductor_ms"], _ = time_ms(base)
                    if mods:
                        gate_residual = mods[2]
                        a3 = o["xq"].reshape(batch, TOKENS, k)
                        b3 = o["wq"].t().unsqueeze(0).expand(batch, k, n)  # one weight, stride-0 batch
                        sn = (o["s_a"] * o["s_w"]).reshape(1, -1).float().expand(batch, n).contiguous()
                        bn = o["b"].reshape(1, -1).float().expand(batch, n).contiguous()
                        call = lambda cfg: gate_residual(a3, b3, out_dtype=torch.bfloat16, config=cfg, tuned=False,  # noqa: E731
                                                         scale_n=sn, bias_n=bn, gate=gate, res=res)["D"]
                        tried, best = best_quack(call, lambda out: sqnr(ref, out))
                        row["quack"] = tried
                        if not best:  # no stride-0 batch: one weight copy per image (an upper bound on time)
                            b3c = o["wq"].unsqueeze(0).expand(batch, n, k).contiguous().transpose(1, 2)
                            call = lambda cfg: gate_residual(a3, b3c, out_dtype=torch.bfloat16, config=cfg,  # noqa: E731
                                                             tuned=False, scale_n=sn, bias_n=bn, gate=gate, res=res)["D"]
                            tried, best = best_quack(call, lambda out: sqnr(ref, out))
                            row["quack_weight_per_image"] = tried
                        note_best(row, tried, best)
                    return row

                run_case(results, f"gated/{lname}/{m}", gated_case)

    if "attention" not in skip:
        for batch in (128, 16):  # rows of a DiT-XL/2 forward at batch 64 / 8 with guidance
            def attn_case(batch=batch):
                g = torch.Generator(device=dev).manual_seed(2)
                q, k, v = (torch.randn(batch, TOKENS, 16, 72, device=dev, generator=g).bfloat16() for _ in range(3))
                ref = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # the engine's SDPA layout [B, H, T, D]
                sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
                row = {"batch_rows": batch, "shape": [batch, TOKENS, 16, 72]}
                row["sdpa_sqnr_db"] = sqnr(ref, sdpa().transpose(1, 2))
                row["sdpa_ms"], _ = time_ms(sdpa)
                from flash_attn.cute import flash_attn_func

                def fa4():
                    out = flash_attn_func(q, k, v)
                    return out[0] if isinstance(out, tuple) else out

                t0 = time.time()
                out = fa4()
                torch.cuda.synchronize()
                row["fa4_first_call_s"] = round(time.time() - t0, 1)
                row["fa4_sqnr_db"] = sqnr(ref, out)
                row["fa4_ms"], row["fa4_timing"] = time_ms(fa4)
                row["fa4_vs_sdpa"] = row["sdpa_ms"] / row["fa4_ms"]
                return row

            run_case(results, f"attention/{batch}", attn_case)

    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
    print(f"wrote {args.out}: {sum(r['ok'] for r in results if 'ok' in r)} of {len(results)} cases ran")


if __name__ == "__main__":
    main()
