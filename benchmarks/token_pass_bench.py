"""Issue #13, session 18: the per-token quantization pass alone, row-block kernel against the paired one.

Per-token INT8 (ViDiT-Q) quantizes fc2's input in one pass over fc1's output (GELU + balancing Mul + row amax
+ codes, 32768 x 4608 at DiT-XL/2 batch 64 with guidance) and proj's input over the attention output (Mul +
amax + codes, 32768 x 1152). This times, as medians of CUDA-graph replays, for the ``dtq`` that imports:

- ``kernels.quant_rows_int8(..., _paired=False)``: the row-block kernel (sessions 16-17);
- the paired kernel (``_quant_pairs_kernel``) at each warp count that holds the row;
- a floor: torch's bf16 -> int8 cast, which reads and writes the same bytes and computes nothing;

and counts, on the same inputs, how many codes the two kernels give differently (the paired one multiplies
by the reciprocal scale) and whether their scales are equal. Then fc1 and fc2's input at DiT-XL/2's shape
(K 1152, N 4608): the static engine's fc1 (GELU + quantize epilogue, ``mm8_gelu_quant``: codes out), the
per-token engine's fc1 (``int8_mm``, bf16 out), that fc1 + the paired GELU pass (what per-token costs
there against static) and (session 19) ``token_gemm.mm8_gelu_token_codes``, fc1 writing fc2's per-token codes
itself (row groups exchanging their amaxes), checked against fc1 + the pass and timed per candidate tile,
and (session 20) each timed again without the wait for the row group (``_wait=False``, wrong codes): the
barrier's cost. The static fc1 is also timed on each of its two kernels, pointer loads (``_mm8_kernel``) and
TMA. (Variants measured slower and removed, docs/engines.md: session 20's deferred one, whose programs wrote a
tile's codes after computing their next tile from a 16-bit copy in L2; session 21's, which held the tile in
registers; session 22's pointer-load candidates, as the static engine's fused fc1 loads.)

    python benchmarks/token_pass_bench.py --out token_pass.json
"""

from __future__ import annotations

import argparse
import json

import torch

from attention_bench import time_ms  # benchmarks/ is sys.path[0]


def run(rows: list[int], fc1_only: bool = False) -> dict:
    from dtq.runtime import kernels
    from dtq.tools import bench_engines as be

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    res = {"env": be.env_info(), "kernels_file": kernels.__file__, "cases": {}}
    for m in rows:
        for name, width, gelu in () if fc1_only else (("fc2_gelu", 4608, True), ("proj", 1152, False)):
            x = (torch.randn(m, width, device=dev, generator=g) * 2).to(torch.bfloat16)
            mul = torch.rand(width, device=dev, generator=g) + 0.5
            pairs = kernels.pair_columns(mul)
            case = {"rows": m, "width": width, "gelu": gelu, "ms": {}}
            q0, s0 = kernels.quant_rows_int8(x, mul, gelu=gelu, _paired=False)
            case["ms"]["row_block"] = round(time_ms(lambda: kernels.quant_rows_int8(x, mul, gelu=gelu, _paired=False),
                                                    "cudagraph"), 5)
            for w in (1, 2, 4, 8, 16):
                if kernels._pair_plan(width, x.dtype, w) is None:
                    continue
                q1, s1 = kernels.quant_rows_int8(x, gelu=gelu, mul_pairs=pairs, _warps=w)
                diff = (q1.int() - q0.int()).abs()
                case[f"paired_w{w}_check"] = {"scales_equal": bool(torch.equal(s0, s1)),
                                              "codes_differing": int((diff > 0).sum()), "max_diff": int(diff.max()),
                                              "codes": diff.numel()}
                case["ms"][f"paired_w{w}"] = round(time_ms(
                    lambda: kernels.quant_rows_int8(x, gelu=gelu, mul_pairs=pairs, _warps=w), "cudagraph"), 5)
            case["ms"]["paired_default"] = round(time_ms(
                lambda: kernels.quant_rows_int8(x, gelu=gelu, mul_pairs=pairs), "cudagraph"), 5)
            case["ms"]["floor_cast_bf16_to_int8"] = round(time_ms(lambda: x.to(torch.int8), "cudagraph"), 5)
            case["floor_gb_s"] = round(x.numel() * 3 / case["ms"]["floor_cast_bf16_to_int8"] / 1e6, 1)
            res["cases"][f"{name}_{m}"] = case
            print(name, m, case["ms"], {k: v for k, v in case.items() if k.endswith("_check")}, flush=True)
        res["cases"][f"fc1_{m}"] = fc1_case(kernels, m, dev, g)
    return res


def fc1_case(kernels, m: int, dev, g, k: int = 1152, n: int = 4608) -> dict:
    from dtq.runtime import token_gemm

    a = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=g)
    sa_rows = torch.rand(m, device=dev, generator=g) * 1e-3 + 1e-4
    sa, q_scale = sa_rows[0].clone(), torch.tensor(0.03, device=dev)
    sw = torch.rand(n, device=dev, generator=g) * 1e-3 + 1e-4
    b = torch.randn(n, device=dev, generator=g)
    mul = torch.rand(n, device=dev, generator=g) + 0.5
    pairs = kernels.pair_columns(mul)

    def plain_pass():
        h = kernels.int8_mm(a, w, sa_rows, sw, b, torch.bfloat16)
        return kernels.quant_rows_int8(h, gelu=True, mul_pairs=pairs)

    case = {"rows": m, "k": k, "n": n, "ms": {}}
    coop = lambda config=None, wait=True: token_gemm.mm8_gelu_token_codes(  # noqa: E731
        a, w, sa_rows, sw, b, mul, torch.bfloat16, config, _wait=wait)
    static = lambda tma: kernels._mm8(a, w, torch.empty((m, n), device=dev, dtype=torch.int8), sa, sw, b,  # noqa: E731
                                      mul, q_scale, tma=tma)
    for name, fn in (("static_fc1_gelu_quant", lambda: kernels.mm8_gelu_quant(a, w, sa, sw, b, mul, q_scale)),
                     ("static_fc1_gelu_quant_pointer", lambda: static(False)),
                     ("static_fc1_gelu_quant_tma", lambda: static(True)),
                     ("token_fc1_plain", lambda: kernels.int8_mm(a, w, sa_rows, sw, b, torch.bfloat16)),
                     ("token_fc1_plain_plus_pass", plain_pass), ("token_fc1_coop", coop),
                     ("token_fc1_coop_float32", lambda: token_gemm.mm8_gelu_token_codes(
                         a, w, sa_rows, sw, b, mul, torch.bfloat16, exact=False)),
                     ("token_fc1_coop_nowait", lambda: coop(wait=False))):
        fn()  # autotunes outside the graph capture
        case["ms"][name] = round(time_ms(fn, "cudagraph"), 5)
        print(name, case["ms"][name], flush=True)  # as it goes: a run killed at its timeout keeps the log
    # the row-group kernel against fc1 + the paired pass: the same codes and scales (up to the GELU's
    # compilation), twice over (the counters must be ready for the next launch), and each candidate's time
    q0, s0 = plain_pass()
    for rep in range(2):
        q1, s1 = coop()
        diff = (q1.int() - q0.int()).abs()
        case[f"coop_check_{rep}"] = {"scales_equal": bool(torch.equal(s0, s1)), "codes_differing": int((diff > 0).sum()),
                                     "max_diff": int(diff.max()), "codes": diff.numel()}
        print(case[f"coop_check_{rep}"], flush=True)
    case["coop_choice"] = str(token_gemm._mm8_token_codes_kernel.best_config)
    case["static_choice"] = str(kernels._mm8_tma_kernel.best_config)
    case["static_pointer_choice"] = str(kernels._mm8_kernel.best_config)
    for cand in token_gemm._CANDIDATES:
        cfg = token_gemm._config(*cand)
        name = "coop_{}x{}x{}_s{}_w{}_r{}".format(*cand)
        try:
            coop(cfg)
            case["ms"][name] = round(time_ms(lambda: coop(cfg), "cudagraph"), 5)  # noqa: B023
            # the same without the wait for the row group (wrong codes): what the barrier costs
            case["ms"][name + "_nowait"] = round(time_ms(lambda: coop(cfg, False), "cudagraph"), 5)  # noqa: B023
            print(name, case["ms"][name], case["ms"][name + "_nowait"], flush=True)
        except Exception as exc:  # a candidate that does not fit is a result
            case["ms"][name] = f"{type(exc).__name__}: {exc}"[:200]
    print("fc1", m, case, flush=True)
    return case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="32768,4096", help="row counts (batch 64 / 8 with guidance, 256 tokens)")
    ap.add_argument("--fc1-only", action="store_true", help="only the fc1 cases (no pass-alone timings)")
    args = ap.parse_args()
    res = run([int(r) for r in args.rows.split(",")], args.fc1_only)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
