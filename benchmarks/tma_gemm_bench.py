"""Issue #13: dtq's 8-bit Triton GEMM with TMA loads in a persistent loop (``kernels._mm8(tma=True)``,
``_mm8_tma_kernel``) against the pointer-load kernel the engines run now (``_mm8_kernel``), cuBLAS
(``torch._scaled_mm`` row-wise FP8, bf16 ``torch.mm``) at DiT-XL/2's block GEMMs, with the epilogue
each layer takes in the INT8 engine: qkv plain, proj / fc2 gated residual, fc1 GELU + quantize.

Times are medians of CUDA-graph replays (``triton.testing.do_bench_cudagraph``), as the engine runs.
Each TMA output is compared with the pointer kernel's (INT8: int32 sums, the same epilogue: equal bit
for bit; FP8: fp32 sums in another order). GPU only.

    python benchmarks/tma_gemm_bench.py --out tma.json [--m 32768,4096] [--precisions int8,fp8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

BLOCK_GEMMS = {"qkv": (3456, 1152), "proj": (1152, 1152), "fc1": (4608, 1152), "fc2": (1152, 4608)}
EPILOGUE = {"qkv": "plain", "proj": "gate_residual", "fc1": "gelu_quant", "fc2": "gate_residual"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--m", default="32768", help="comma-separated row counts (32768 = batch 64 with guidance)")
    ap.add_argument("--precisions", default="int8,fp8")
    args = ap.parse_args()

    import triton
    import triton.testing

    from dtq.runtime import kernels

    dev = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": []}

    def bench(fn) -> float:
        return float(triton.testing.do_bench_cudagraph(fn, rep=30, return_mode="median"))

    def save():
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    torch.manual_seed(0)
    for M in (int(m) for m in args.m.split(",")):
        B = max(1, M // 256)
        for prec in args.precisions.split(","):
            code = torch.int8 if prec == "int8" else torch.float8_e4m3fn
            for lname, (N, K) in BLOCK_GEMMS.items():
                epi = EPILOGUE[lname]
                row = {"M": M, "layer": lname, "N": N, "K": K, "precision": prec, "epilogue": epi}
                if code == torch.int8:
                    a = torch.randint(-127, 128, (M, K), device=dev, dtype=torch.int8)
                    w = torch.randint(-127, 128, (N, K), device=dev, dtype=torch.int8)
                else:
                    a = (torch.randn(M, K, device=dev) * 40).clamp(-448, 448).to(code)
                    w = (torch.randn(N, K, device=dev) * 40).clamp(-448, 448).to(code)
                sa = torch.tensor(1e-3, device=dev)
                sw = torch.rand(N, device=dev) * 1e-3 + 1e-4
                bias = torch.randn(N, device=dev)
                gate = torch.randn(B, 6 * N, device=dev, dtype=torch.bfloat16).chunk(6, dim=1)[2]
                residual = torch.randn(M, N, device=dev, dtype=torch.bfloat16)
                qs = torch.tensor(0.02, device=dev)

                def run(tma: bool):
                    if epi == "gelu_quant":
                        c = torch.empty(M, N, device=dev, dtype=code)
                        return kernels._mm8(a, w, c, sa, sw, bias, None, qs, tma=tma)
                    c = torch.empty(M, N, device=dev, dtype=torch.bfloat16)
                    if epi == "gate_residual":
                        return kernels._mm8(a, w, c, sa, sw, bias, gate=gate, residual=residual, tma=tma)
                    return kernels._mm8(a, w, c, sa, sw, bias, tma=tma)

                t0 = time.time()
                try:
                    ref, got = run(False), run(True)
                    if code == torch.int8 or epi != "gelu_quant":
                        same = torch.equal(ref.view(torch.uint8) if ref.element_size() == 1 else ref,
                                           got.view(torch.uint8) if got.element_size() == 1 else got)
                    else:
                        same = None
                    rf, gf = ref.float(), got.float()
                    row["equal_to_pointer_kernel"] = same
                    row["sqnr_vs_pointer_db"] = round(float(10 * torch.log10(rf.pow(2).mean()
                                                                               / (rf - gf).pow(2).mean().clamp_min(1e-30))), 2)
                    row["pointer_ms"] = bench(lambda: run(False))
                    row["tma_ms"] = bench(lambda: run(True))
                    row["tma_speedup"] = round(row["pointer_ms"] / row["tma_ms"], 3)
                    row["tma_tops"] = round(2 * M * N * K / row["tma_ms"] / 1e9, 1)
                    row["pointer_tops"] = round(2 * M * N * K / row["pointer_ms"] / 1e9, 1)
                    for name, kern in (("pointer", kernels._mm8_kernel), ("tma", kernels._mm8_tma_kernel)):
                        cfg = getattr(kern, "best_config", None)
                        row[f"{name}_config"] = str(cfg) if cfg is not None else None
                except Exception as e:  # a failure is data
                    row["error"] = f"{type(e).__name__}: {e}"[:800]
                # cuBLAS references for the same shape (no epilogue)
                try:
                    ab, wb = torch.randn(M, K, device=dev, dtype=torch.bfloat16), torch.randn(N, K, device=dev, dtype=torch.bfloat16)
                    row["cublas_bf16_ms"] = bench(lambda: ab @ wb.t())
                    if code == torch.float8_e4m3fn:
                        sa_row = sa.reshape(1, 1).expand(M, 1).contiguous()
                        row["cublas_fp8_rowwise_ms"] = bench(lambda: torch._scaled_mm(
                            a, w.t(), scale_a=sa_row, scale_b=sw.reshape(1, -1), bias=bias.bfloat16(),
                            out_dtype=torch.bfloat16))
                except Exception as e:
                    row["cublas_error"] = f"{type(e).__name__}: {e}"[:400]
                row["wall_s"] = round(time.time() - t0, 1)
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
                save()
    # per precision and M: the block's four GEMMs together
    tot = {}
    for r in res["rows"]:
        if "tma_ms" in r:
            k = f"{r['precision']}@{r['M']}"
            t = tot.setdefault(k, {"pointer_ms": 0.0, "tma_ms": 0.0, "cublas_bf16_ms": 0.0, "cublas_fp8_rowwise_ms": 0.0})
            for f in t:
                t[f] += r.get(f, 0.0) or 0.0
    for k, t in tot.items():
        t["tma_speedup"] = round(t["pointer_ms"] / t["tma_ms"], 3) if t["tma_ms"] else None
        t["tma_vs_bf16"] = round(t["cublas_bf16_ms"] / t["tma_ms"], 3) if t["tma_ms"] else None
        t["pointer_vs_bf16"] = round(t["cublas_bf16_ms"] / t["pointer_ms"], 3) if t["pointer_ms"] else None
        print(k, json.dumps({f: round(v, 4) if isinstance(v, float) else v for f, v in t.items()}))
    res["block_totals"] = tot
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
