"""Issue #13, sessions 23-28: fc1 writing fc2's per-token codes, warp-specialized (``runtime.token_gemm_ws``,
``token_gemm``'s on Hopper from 4096 rows), against ``token_gemm``'s Triton kernel and the static
engine's fc1, at DiT-XL/2's fc1 (K 1152, N 4608).

Each step runs in its own process under a timeout, so a launch that never returns costs that step only:
``check:ROWS`` compares the kernel's codes and scales with fc1 + the paired pass's, code for code, twice with a
launch twice as big between (the parts it leaves must not pass for the next launch's) and in two replays of a
CUDA graph, for bf16 (with the sync warp or without, deferred) and fp16; ``time:ROWS`` takes CUDA-graph medians
of every variant, with and without the row-group wait (``_wait=False``: wrong codes, what the synchronisation
costs) and of the pipeline alone (``_plain=True``: no epilogue), next to cuBLAS's int8 GEMM (int32 out);
``probe:ROWS`` records how long each consumer waited for each tile's row group (``_probe``); ``diag:ROWS``
times the synchronisation's parts (``_diag``, ``DIAGNOSED``).

    python benchmarks/token_ws_bench.py --out token_ws.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch


def operands(m: int, k: int = 1152, n: int = 4608, seed: int = 0):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    a = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=g)
    sa = torch.rand(m, device=dev, generator=g) * 1e-3 + 1e-4
    sw = torch.rand(n, device=dev, generator=g) * 1e-3 + 1e-4
    b = torch.randn(n, device=dev, generator=g)
    mul = torch.rand(n, device=dev, generator=g) + 0.5
    return a, w, sa, sw, b, mul


def check(m: int, variants: list[dict]) -> dict:
    from dtq.runtime import kernels, token_gemm_ws

    a, w, sa, sw, b, mul = operands(m)
    h = kernels.int8_mm(a, w, sa, sw, b, torch.bfloat16)
    qb, sb = kernels.quant_rows_int8(h, gelu=True, mul_pairs=kernels.pair_columns(mul))
    out = {}
    h16 = kernels.int8_mm(a, w, sa, sw, b, torch.float16)
    q16, s16 = kernels.quant_rows_int8(h16, gelu=True, mul_pairs=kernels.pair_columns(mul))
    for v in variants:
        call = lambda v=v: token_gemm_ws.mm8_gelu_token_codes_ws(  # noqa: E731
            a, w, sa, sw, b, mul, **{"out_dtype": torch.bfloat16, **v})
        ref = (q16, s16) if v.get("out_dtype") == torch.float16 else (qb, sb)
        for rep in range(2):
            out[f"{_name(v)}_rep{rep}"] = _compare(call(), ref)
            print(m, _name(v), rep, out[f"{_name(v)}_rep{rep}"], flush=True)
            if rep == 0:  # a bigger launch between: its parts and counts (other rows) must not pass for these
                big = operands(2 * m, seed=1)
                token_gemm_ws.mm8_gelu_token_codes_ws(*big, **{"out_dtype": torch.bfloat16, **v})
        graph = torch.cuda.CUDAGraph()  # replays: the counters stay multiples of N in device memory
        with torch.cuda.graph(graph):
            q, s = call()
        for rep in range(2):
            q.zero_(), s.zero_()
            graph.replay()
            out[f"{_name(v)}_graph{rep}"] = _compare((q, s), ref)
            print(m, _name(v), "graph", rep, out[f"{_name(v)}_graph{rep}"], flush=True)
    return out


def _compare(got, ref) -> dict:
    (q, s), (q0, s0) = got, ref
    torch.cuda.synchronize()
    diff = (q.int() - q0.int()).abs()
    return {"scales_equal": bool(torch.equal(s, s0)), "codes_differing": int((diff > 0).sum()),
            "max_diff": int(diff.max()), "codes": diff.numel()}


def timings(m: int, variants: list[dict]) -> dict:
    from attention_bench import time_ms  # benchmarks/ is sys.path[0]

    from dtq.runtime import kernels, token_gemm, token_gemm_ws

    a, w, sa, sw, b, mul = operands(m)
    q_scale = torch.tensor(0.03, device=a.device)
    fns = {"static_fc1_gelu_quant": lambda: kernels.mm8_gelu_quant(a, w, sa[0].clone(), sw, b, mul, q_scale),
           "token_fc1_plain": lambda: kernels.int8_mm(a, w, sa, sw, b, torch.bfloat16),
           "cublas_int_mm_int32_out": lambda: torch._int_mm(a, w.t()),
           "triton_token_codes": lambda: triton_codes(token_gemm, a, w, sa, sw, b, mul),
           "triton_token_codes_nowait": lambda: triton_codes(token_gemm, a, w, sa, sw, b, mul, _wait=False)}
    for v in variants:  # the pipeline alone has no wait; a diagnosis of the wait has one
        for wait in (False,) if v.get("_plain") else (True,) if v.get("_diag") else (True, False):
            fns[_name(v) + ("" if wait else "_nowait")] = (
                lambda v=v, wait=wait: token_gemm_ws.mm8_gelu_token_codes_ws(a, w, sa, sw, b, mul, torch.bfloat16,
                                                                            _wait=wait, **v))
    ms = {}
    for name, fn in fns.items():
        try:
            fn()  # compiles / autotunes outside the graph capture
            ms[name] = round(time_ms(fn, "cudagraph"), 5)
        except Exception as exc:  # a variant that does not compile is a result, not the end of the step
            ms[name] = f"{type(exc).__name__}: {exc}"[:200]
        print(m, name, ms[name], flush=True)
    return ms


def probe(m: int, variants: list[dict]) -> dict:
    """Where the row-group waits fall: each consumer's j-th wait in SM clocks (``_probe``), after two warm-up
    launches; by tile slot, by CTA, and for tiles whose row group lies in one wave of the grid's tiles or
    straddles two (its first part waits for the next wave)."""
    from dtq.runtime import token_gemm_ws

    a, w, sa, sw, b, mul = operands(m)
    shape = token_gemm_ws.probe_shape(a, w)
    ctas, n_tiles = shape[0], -(-w.shape[0] // token_gemm_ws.BLOCK_N)
    out = {"sm_clock_mhz": _sm_clock_mhz()}  # the current SM clock (NVML), to read the clocks as microseconds
    for v in variants:
        t = torch.zeros(shape, device=a.device, dtype=torch.int64)
        for _ in range(3):
            t.zero_()
            token_gemm_ws.mm8_gelu_token_codes_ws(a, w, sa, sw, b, mul, torch.bfloat16, _probe=t, **v)
        torch.cuda.synchronize()
        t = t.cpu()
        total = -(-m // token_gemm_ws.BLOCK_M) * n_tiles
        waits, by_j, by_cta = [], {}, torch.zeros(ctas, dtype=torch.float64)
        groups = {"one_wave": [], "straddling_first_wave": [], "straddling_second_wave": []}
        for cta in range(ctas):
            for c in range(2):
                for j in range(shape[2]):
                    tile = cta + (2 * j + c) * ctas
                    if tile >= total:
                        break
                    x = int(t[cta, c, j])
                    first = (tile // n_tiles) * n_tiles  # the row group's first and last tile, by wave
                    key = ("one_wave" if first // ctas == (first + n_tiles - 1) // ctas else
                           "straddling_first_wave" if tile // ctas == first // ctas else "straddling_second_wave")
                    waits.append(x)
                    by_j.setdefault(j, []).append(x)
                    by_cta[cta] += x
                    groups[key].append(x)
        clocks = torch.tensor(waits, dtype=torch.float64)
        out[_name(v)] = {
            "waits": len(waits), "mean_clocks": round(float(clocks.mean())),
            "quantiles_clocks": [round(float(clocks.quantile(q))) for q in (0.5, 0.9, 0.99, 1.0)],
            "over_2000_clocks": round(float((clocks > 2000).double().mean()), 3),
            "mean_clocks_by_slot": [round(sum(x) / len(x)) for _, x in sorted(by_j.items())],
            "cta_total_clocks_min_median_max": [round(float(q)) for q in (by_cta.min(), by_cta.median(), by_cta.max())],
            "mean_clocks_by_group_kind": {k: (len(x), round(sum(x) / max(len(x), 1))) for k, x in groups.items()}}
        print(m, _name(v), out[_name(v)], flush=True)
    return out


def _sm_clock_mhz():
    try:
        return torch.cuda.clock_rate()
    except Exception as exc:  # NVML missing: the clocks stay clocks
        return f"{type(exc).__name__}: {exc}"[:120]


def triton_codes(token_gemm, *args, **kwargs):
    """token_gemm's Triton kernel, not the warp-specialized one it dispatches to on Hopper."""
    dispatch, token_gemm.WARP_SPECIALIZED = token_gemm.WARP_SPECIALIZED, False
    try:
        return token_gemm.mm8_gelu_token_codes(*args, torch.bfloat16, **kwargs)
    finally:
        token_gemm.WARP_SPECIALIZED = dispatch


def _name(v: dict) -> str:
    parts = (f"{k}{str(val).replace('torch.', '')}" for k, val in sorted(v.items()))
    return "ws_" + "_".join(parts) if v else "ws_default"


# per-tile flags (the default since session 28: one sync warp stores and polls them), deferred (codes a tile
# late) and not, against the row blocks' counters: two sync warps, one counting the tiles, one waiting for the
# row groups (split_sync, sessions 25-27's default), and one sync warp doing both (session 24's); session 24 also
# measured tagged parts (1c29155), session 23's consumers synchronising themselves (sync_warp=False) and the
# pipeline alone (_plain)
COUNTERS = {"flags": False, "split_sync": True}
ONE_COUNTER_WARP = {"flags": False, "split_sync": False}
VARIANTS = [{**ONE_COUNTER_WARP, "defer": False}, {**ONE_COUNTER_WARP, "defer": True}, {**COUNTERS, "defer": False},
            {**COUNTERS, "defer": True}, {"defer": True}, {"defer": False}]
# the counters' cost part by part (token_gemm_ws.DIAG_*, with split_sync; wrong codes possible): the count without
# its release, no global memory at all (the sync warps' handshake alone), the consumers told at once (the counts
# and polls as shipped: their traffic without the wait), the polls half a microsecond apart, no acquire (no L1
# invalidation), the consumers' vectors from L2 with and without the acquire, against "defer" with and without
# its wait, the consumers never waiting (the sync warps as shipped), everything relaxed and the polls asleep, the
# handshake through the counting warp with no global memory, the count without polls (with and without release),
# the same at a word of each tile's own (release, relaxed) and stored there; then the flags (the default)
DIAGNOSED = [{**COUNTERS, "defer": True, "_diag": d}
             for d in (1, 2, 4, 8, 16, 32, 48, 64, 25, 130, 256, 257, 768, 769, 1792)] + [{"defer": True}]
PROBED = [{**ONE_COUNTER_WARP, "defer": True}, {**COUNTERS, "defer": True}, {**COUNTERS, "defer": False},
          {"defer": True}]
CHECKED = [{**ONE_COUNTER_WARP, "defer": False}, {**ONE_COUNTER_WARP, "defer": True}, {**COUNTERS, "defer": False},
           {**COUNTERS, "defer": True}, {"flags": False, "sync_warp": False, "defer": False},
           {"out_dtype": torch.float16}, {"defer": False}, {"defer": True}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--step", default=None, help=argparse.SUPPRESS)  # one step, in a child process
    ap.add_argument("--timeout", type=int, default=120, help="seconds a step may take")
    ap.add_argument("--steps", default="check:512,check:32768,time:32768,time:4096",
                    help="comma-separated check:ROWS / time:ROWS / probe:ROWS / diag:ROWS steps, in order")
    args = ap.parse_args()
    if args.step:
        kind, m = args.step.split(":")
        step = {"check": (check, CHECKED), "time": (timings, VARIANTS), "probe": (probe, PROBED),
                "diag": (timings, [{**COUNTERS, "defer": True}] + DIAGNOSED)}[kind]
        res = step[0](int(m), step[1])
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        return
    from dtq.tools import bench_engines as be

    res = {"env": be.env_info(), "steps": {}}
    steps = args.steps.split(",")
    for step in steps:
        part = f"{args.out}.{step.replace(':', '_')}.json"
        try:
            cmd = [sys.executable, __file__, "--out", part, "--step", step]
            rc = subprocess.run(cmd, timeout=args.timeout).returncode
            res["steps"][step] = json.load(open(part)) if rc == 0 else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            res["steps"][step] = f"timed out after {args.timeout} s"
        print(step, res["steps"][step], flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        if step == steps[0] and not isinstance(res["steps"][step], dict):
            break  # the kernel does not run: nothing else will


if __name__ == "__main__":
    main()
