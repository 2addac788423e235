"""Control for cute_bench.py: quack's own FP8 / bf16 GEMM entry point (quack.gemm_interface.gemm, its
autotuner over every SM90 config) at fc1's shape, against cuBLAS, to tell a slow library from a slow
use of it. GPU only; prints one JSON line per case."""
import json
import sys
import time

import torch
import triton.testing
from quack.gemm_interface import gemm

m, k, n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768, 1152, 4608
x = torch.randn(m, k, device="cuda")
w = torch.randn(n, k, device="cuda") * 0.02
xq, wq = x.to(torch.float8_e4m3fn), (w * 20).to(torch.float8_e4m3fn)
one = torch.ones((), device="cuda")
t = lambda f: float(triton.testing.do_bench_cudagraph(f, rep=50, return_mode="median"))  # noqa: E731
cases = {
    "cublas_fp8": lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
    "cublas_bf16": lambda: x.bfloat16() @ w.bfloat16().t(),
}
xb, wb = x.bfloat16(), w.bfloat16()
cases["cublas_bf16"] = lambda: xb @ wb.t()
for tuned in (False, True):
    cases[f"quack_fp8_tuned{int(tuned)}"] = lambda tuned=tuned: gemm(xq, wq.t(), out_dtype=torch.bfloat16, tuned=tuned)
    cases[f"quack_bf16_tuned{int(tuned)}"] = lambda tuned=tuned: gemm(xb, wb.t(), tuned=tuned)
for name, f in cases.items():
    t0 = time.time()
    try:
        f()
        torch.cuda.synchronize()
        first = time.time() - t0
        ms = t(f)
        print(json.dumps({"case": name, "rows": m, "ms": ms, "tflops": 2 * m * k * n / ms / 1e9, "first_call_s": round(first, 1)}), flush=True)
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"case": name, "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)
