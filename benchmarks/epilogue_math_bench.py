"""Issue #13, session 16: the MUFU / conversion work of the quantizing kernels, alone, with their codes.

Hopper's MUFU (ex2, rcp) and its float-to-int / float-to-bf16 converts run at 16 results per clock per SM,
an eighth of its float32 rate; the GELU + quantize kernels spend several such operations per element. This
times, for the ``dtq`` that imports (run it once per checkout to compare trees, and with
``DTQ_GELU_TANH_APPROX=0`` for the GELU ablation):

- fc1 at DiT-XL/2 batch 64 (32768 x 4608 x 1152) with the GELU + quantize epilogue (INT8, FP8), and the same
  GEMM with a plain bf16 epilogue: the epilogue's cost is the difference;
- ``quant_rows_int8`` (per-token fc2 input: GELU + row amax + codes) at 32768 x 4608, and at 32768 x 1152
  without GELU (the per-token proj input);
- ``norm_quant`` (LayerNorm + modulate + codes) at 32768 x 1152: static INT8, per-token INT8, static FP8;
- (session 17) per-token fc1 with the GELU + row-amax epilogue against its plain GEMM, and fc2 (gated
  residual) quantizing its bf16 input as it loads it against fc2 on ``quant_rows_int8``'s codes.

Times are medians of CUDA-graph replays. The outputs for fixed seeds are saved (``--codes``) so two runs'
codes can be compared with ``--compare A.pt B.pt``: the fraction of codes that differ and by how much.

    python benchmarks/epilogue_math_bench.py --out new.json --codes new.pt
    python benchmarks/epilogue_math_bench.py --compare old.pt new.pt --out cmp.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from attention_bench import time_ms  # benchmarks/ is sys.path[0]

M, K, HIDDEN, T = 32768, 1152, 4608, 256


def run(out: str, codes_path: str | None) -> dict:
    from dtq.runtime import kernels
    from dtq.tools import bench_engines as be

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    res = {"env": be.env_info(), "gelu_tanh_approx_env": os.environ.get("DTQ_GELU_TANH_APPROX"),
           "kernels_file": kernels.__file__, "ms": {}}
    saved = {}

    def record(name, fn):
        saved[name] = fn()  # the first call also autotunes
        res["ms"][name] = round(time_ms(fn, "cudagraph"), 5)
        print(name, res["ms"][name], flush=True)

    sw = torch.rand(HIDDEN, device=dev, generator=g) * 1e-3 + 1e-4
    bias = torch.randn(HIDDEN, device=dev, generator=g)
    mul = torch.rand(HIDDEN, device=dev, generator=g) + 0.5
    sa, qs = torch.tensor(1e-3, device=dev), torch.tensor(0.03, device=dev)
    for prec, dt in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        if dt == torch.int8:
            a = torch.randint(-127, 128, (M, K), device=dev, dtype=dt, generator=g)
            w = torch.randint(-127, 128, (HIDDEN, K), device=dev, dtype=dt, generator=g)
        else:
            a = (torch.randn(M, K, device=dev, generator=g) * 40).clamp(-448, 448).to(dt)
            w = (torch.randn(HIDDEN, K, device=dev, generator=g) * 40).clamp(-448, 448).to(dt)
        record(f"fc1_{prec}_gelu_quant", lambda: kernels.mm8_gelu_quant(a, w, sa, sw, bias, mul, qs))
        if dt == torch.int8:
            record("fc1_int8_plain", lambda: kernels.int8_mm(a, w, sa, sw, bias))
        else:
            c = torch.empty(M, HIDDEN, device=dev, dtype=torch.bfloat16)
            record("fc1_fp8_plain", lambda: kernels._mm8(a, w, c, sa, sw, bias))
    h = (torch.randn(M, HIDDEN, device=dev, generator=g) * 2).to(torch.bfloat16)
    record("quant_rows_gelu_4608", lambda: kernels.quant_rows_int8(h, mul, gelu=True))
    # session 17, per-token fc2 without the pass: fc1 with GELU + row amax in its epilogue, and fc2 (N = 1152,
    # K = 4608, gated residual) quantizing its bf16 input on load, against fc2 on the pass's codes
    a8 = torch.randint(-127, 128, (M, K), device=dev, dtype=torch.int8, generator=g)
    w1 = torch.randint(-127, 128, (HIDDEN, K), device=dev, dtype=torch.int8, generator=g)
    w2 = torch.randint(-127, 128, (K, HIDDEN), device=dev, dtype=torch.int8, generator=g)
    sa_row = torch.rand(M, device=dev, generator=g) * 1e-3 + 1e-4
    sw2, bias2 = sw[:K].contiguous(), bias[:K].contiguous()
    gate = torch.randn(M // T, K, device=dev, generator=g).to(torch.bfloat16)
    res2 = torch.randn(M, K, device=dev, generator=g).to(torch.bfloat16)
    record("fc1_int8_token_plain", lambda: kernels.int8_mm(a8, w1, sa_row, sw, bias))
    record("fc1_int8_gelu_rowmax", lambda: kernels.mm8_gelu_rowmax(a8, w1, sa_row, sw, bias, mul))
    q2, s2 = kernels.quant_rows_int8(h, mul)
    record("fc2_int8_token_gate_residual", lambda: kernels.mm8_gate_residual(q2, w2, s2, sw2, bias2, gate, res2))
    amax2 = (h.float() * mul).abs().amax(dim=1)
    record("fc2_int8_rowquant_gate_residual",
           lambda: kernels.mm8_rowquant(h, amax2, mul, w2, sw2, bias2, gate=gate, residual=res2))
    p = (torch.randn(M, K, device=dev, generator=g) * 2).to(torch.bfloat16)
    record("quant_rows_1152", lambda: kernels.quant_rows_int8(p, mul[:K]))
    x = (torch.randn(M // T, T, K, device=dev, generator=g) * 2).to(torch.bfloat16)
    ada = torch.randn(M // T, 6 * K, device=dev, generator=g).to(torch.bfloat16)
    shift, scale = ada[:, :K], ada[:, K:2 * K]
    for codes in ("int8", "int8-token", "fp8"):
        record(f"norm_quant_{codes}", lambda: kernels.norm_quant(x, shift, scale, 1e-6, mul[:K], qs, codes))
    if codes_path:
        torch.save({k: tuple(t.cpu() for t in v) if isinstance(v, tuple) else v.cpu() for k, v in saved.items()},
                   codes_path)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    return res


def compare(a_path: str, b_path: str, out: str) -> dict:
    a, b = torch.load(a_path), torch.load(b_path)
    res = {}
    for name in sorted(set(a) & set(b)):
        ta, tb = (a[name][0], b[name][0]) if isinstance(a[name], tuple) else (a[name], b[name])
        d = (ta.float() - tb.float()).abs()
        row = {"differ": round(float((d > 0).float().mean()), 6), "max_diff": float(d.max())}
        if ta.dtype in (torch.int8,):
            row["differ_by_more_than_1"] = round(float((d > 1).float().mean()), 8)
        if ta.dtype in (torch.float8_e4m3fn, torch.bfloat16, torch.float32):
            r = ta.float()
            row["sqnr_db"] = round(float(10 * torch.log10(r.pow(2).mean() / (r - tb.float()).pow(2).mean()
                                                          .clamp_min(1e-30))), 2)
        if isinstance(a[name], tuple):  # per-token scales
            sa, sb = a[name][1].float(), b[name][1].float()
            row["scale_max_rel_diff"] = float(((sa - sb).abs() / sa.abs().clamp_min(1e-30)).max())
        res[name] = row
        print(name, row, flush=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="results JSON")
    ap.add_argument("--codes", help="save the kernels' outputs here (torch.save)")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two saved outputs instead")
    args = ap.parse_args()
    if args.compare:
        compare(*args.compare, args.out)
    else:
        run(args.out, args.codes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
