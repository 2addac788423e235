"""The passes around a DiT block's GEMMs, alone: LayerNorm + modulate + the next layer's quantization
(Inductor's fused kernel, as the engine compiles it, against ``kernels.norm_quant``), and the per-token
quantize passes (``kernels.quant_rows_int8``, one row per program as before against whole-row blocks).

    python benchmarks/norm_quant_bench.py --out $OUT/norm_quant.json [--rows 32768,4096,512]

Rows: DiT-XL/2 at batch 64 / 8 / 1 with guidance (hidden 1152, 256 tokens; MLP hidden 4608). Times are
``triton.testing.do_bench`` medians (L2 flushed between calls). Also checks the kernels' codes against
torch's unfused ops on the GPU (bf16): mismatching codes and their largest difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dtq.runtime import kernels
from dtq.runtime.model import modulate
from dtq.tools import bench_engines as be

K, HIDDEN, T, EPS = 1152, 4608, 256, 1e-6
BANDWIDTH = 4.8e12  # H200 HBM3e bytes/s (the spec sheet's), for the ideal time of each pass


def inputs(rows: int, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    b = rows // T
    x = (torch.randn(b, T, K, device=dev, generator=g) * 2).to(torch.bfloat16)
    c = torch.randn(b, 6 * K, device=dev, generator=g).to(torch.bfloat16)
    mul = torch.rand(K, device=dev, generator=g) + 0.5
    return x, c[:, :K], c[:, K:2 * K], mul, torch.tensor(0.02, device=dev)


def torch_static(x, shift, scale, mul, a_scale, fp8=False):
    h = modulate(F.layer_norm(x, (K,), eps=EPS), shift, scale).reshape(-1, K)
    xf = h.float() * mul / a_scale
    return xf.clamp(-448, 448).to(torch.float8_e4m3fn) if fp8 else torch.round(xf).clamp(-128, 127).to(torch.int8)


def ln_modulate(x, shift, scale):
    return modulate(F.layer_norm(x, (K,), eps=EPS), shift, scale)


def codes_diff(a, b) -> dict:
    d = (a.float() - b.float()).abs()
    return {"mismatch": float((d > 0).float().mean()), "max_diff": float(d.max())}


def bench_rows(rows: int, dev) -> dict:
    x, shift, scale, mul, a_scale = inputs(rows, dev)
    comp = lambda f: torch.compile(f, dynamic=False)  # noqa: E731
    ln_c, st_c = comp(ln_modulate), comp(torch_static)
    fp8_c = comp(lambda *a: torch_static(*a, fp8=True))
    h = ln_c(x, shift, scale).reshape(-1, K)
    big = torch.randn(rows, HIDDEN, device=dev).to(torch.bfloat16)
    t = {
        "inductor_ln_modulate_bf16": be.bench_ms(lambda: ln_c(x, shift, scale)),
        "inductor_ln_modulate_int8": be.bench_ms(lambda: st_c(x, shift, scale, mul, a_scale)),
        "inductor_ln_modulate_fp8": be.bench_ms(lambda: fp8_c(x, shift, scale, mul, a_scale)),
        "quant_rows_k1152_1row": be.bench_ms(lambda: kernels.quant_rows_int8(h, mul, _rows=1, _warps=4)),
        "quant_rows_k1152": be.bench_ms(lambda: kernels.quant_rows_int8(h, mul)),
        "gelu_quant_rows_k4608_1row": be.bench_ms(lambda: kernels.quant_rows_int8(big, None, True, _rows=1, _warps=4)),
        "gelu_quant_rows_k4608": be.bench_ms(lambda: kernels.quant_rows_int8(big, None, True)),
    }
    for codes in kernels.NORM_CODES:
        s = None if codes == "int8-token" else a_scale
        t[f"norm_quant_{codes}"] = be.bench_ms(lambda: kernels.norm_quant(x, shift, scale, EPS, mul, s, codes))
    sweep = {}
    for r in (1, 2, 4, 8, 16):
        for w in (2, 4, 8, 16):
            sweep[f"norm_quant_int8_r{r}_w{w}"] = be.bench_ms(
                lambda: kernels.norm_quant(x, shift, scale, EPS, mul, a_scale, "int8", _rows=r, _warps=w))
            sweep[f"quant_rows_k1152_r{r}_w{w}"] = be.bench_ms(lambda: kernels.quant_rows_int8(h, mul, _rows=r, _warps=w))
            if r <= 4:
                sweep[f"gelu_quant_rows_k4608_r{r}_w{w}"] = be.bench_ms(
                    lambda: kernels.quant_rows_int8(big, None, True, _rows=r, _warps=w))
    mb = rows * K / 1e6  # MB per byte-width of one [rows, K] tensor
    ideal = {"ln_modulate_bf16": 4 * mb, "norm_quant_8bit": 3 * mb, "quant_rows_k1152": 3 * mb,
             "gelu_quant_rows_k4608": 12 * mb}
    # correctness on the GPU against torch's unfused bf16 ops
    ref_q = torch_static(x, shift, scale, mul, a_scale)
    ref_f8 = torch_static(x, shift, scale, mul, a_scale, fp8=True)
    h_eager = ln_modulate(x, shift, scale).reshape(-1, K)
    ref_tq, ref_ts = kernels.quant_rows_int8(h_eager, mul)
    ref_tq1, _ = kernels.quant_rows_int8(h_eager, mul, _rows=1, _warps=4)
    tq, ts = kernels.norm_quant(x, shift, scale, EPS, mul, None, "int8-token")
    check = {
        "norm_quant_int8_vs_torch": codes_diff(kernels.norm_quant(x, shift, scale, EPS, mul, a_scale, "int8")[0], ref_q),
        "norm_quant_fp8_vs_torch": codes_diff(kernels.norm_quant(x, shift, scale, EPS, mul, a_scale, "fp8")[0], ref_f8),
        "norm_quant_token_vs_ln_then_quant_rows": {**codes_diff(tq, ref_tq),
                                                   "scale_rel": float(((ts / ref_ts) - 1).abs().max())},
        "quant_rows_blocks_vs_1row": codes_diff(ref_tq, ref_tq1),
    }
    return {"ms": t, "sweep_ms": sweep, "ideal_ms": {k: v * 1e6 / BANDWIDTH * 1e3 for k, v in ideal.items()},
            "check": check}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="results JSON")
    ap.add_argument("--rows", default="32768,4096,512", help="comma-separated row counts (multiples of 256)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("norm_quant_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    res = {"env": be.env_info(), "results": {}}
    for rows in (int(r) for r in args.rows.split(",")):
        res["results"][rows] = r = bench_rows(rows, dev)
        print(rows, json.dumps(r["ms"], indent=1), json.dumps(r["check"]), flush=True)
        best = sorted(r["sweep_ms"].items(), key=lambda kv: kv[1])
        for prefix in ("norm_quant_int8", "quant_rows_k1152", "gelu_quant_rows"):
            print(rows, "best", [kv for kv in best if kv[0].startswith(prefix)][:3], flush=True)
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
