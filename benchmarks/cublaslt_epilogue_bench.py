"""Can cuBLASLt (via nvmath-python) run DiT-XL/2's FP8 fc1 as ONE GEMM with bias + GELU and an E4M3 D?

dtq's FP8 engine runs fc1 as ``torch._scaled_mm`` (bf16 out) and then an Inductor pass GELU(tanh) -> / q ->
E4M3 for fc2's input (5.6 ms of a ~47 ms forward at batch 64; docs/engines.md, "Session 11 measurements").
cuBLASLt has GELU_BIAS epilogues and FP8 outputs with a D scale: if one such GEMM gives the same codes and
beats GEMM + pass, the pass can go. Standalone (nothing from dtq); each case records its exception and the
run goes on. ``--dry-run`` only lists the cases (CPU). On the GPU: ``benchmarks/run_cublaslt_gpu.sh``.

nvmath-python 1.0.0 facts used here (its source: linalg/advanced/matmulmod.py, _configuration.py,
linalg/_internal/epilog_protocol.py):
- FP8 layouts: ``a`` (M, K) row-major, ``b`` (K, N) column-major; nvmath sets transa = OP_T itself.
- A *BIAS epilog's bias has length M, the rows of D ("The M dimension of the bias vector must match the M
  dimension of A") and forces a column-major D (``BiasHandler.order = COL``). fc1's bias runs over its
  N = 4608 output channels, so we compute D^T = W @ A^T: a = W [N, K], b = A.t() [K, M]; D^T comes back
  (N, M) column-major = [M, N] row-major in memory, ``.t()`` is fc1's output without a copy. The naive
  orientation (a = A, b = W.t(), bias [N]) is tried once to record its error.
- With no C operand D defaults to A's dtype (E4M3): a bf16 D needs ``result_type=CUDA_R_16BF``. For an FP8
  D nvmath makes the (absent) C float16, and cuBLASLt ties the bias type to C, so bf16 and fp16 biases are
  both tried ("auto" cases then use the first that worked).
- ``quantization_scales``: python scalars (copied to the GPU at plan()) or float32 tensors of shape ()/(1,);
  "d" only for a narrow D. cuBLASLt: D = fp8(scale_d * epilog(scale_a*scale_b*(A@B) + bias)): d = 1/q.
- Per-tensor scales only: a length-N tensor is rejected (``_validate_tensor_scale``). cuBLASLt >= 12.9 has
  an OUTER_VEC_32F scale mode (per-row A / per-column B vectors); the ``nv_pc[...]`` cases set it through
  nvmath's private descriptor (``mm.mm_desc_ifc.a_scale_mode``) just before plan()'s heuristic query.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import platform
import statistics
import sys
import traceback

import torch
import torch.nn.functional as F

K, N = 1152, 4608  # DiT-XL/2 fc1: hidden 1152 -> 4 x 1152
E4M3 = torch.float8_e4m3fn


def build_cases(ms: list[int]) -> list[dict]:
    """Every case at the first (main) M; the headline ones at the smaller Ms."""
    cases = []
    for i, m in enumerate(ms):
        def add(name, kind, **kw):
            cases.append({"name": name, "m": m, "kind": kind, **kw})
        full = i == 0
        add("torch_scaled_mm_bias", "torch", stage="pre")  # fc1 GEMM alone, bf16 out (tensor-wise scales)
        add("torch_scaled_mm_bias+gelu_quant", "torch", stage="act", gelu_pass=True)  # dtq today
        if full:
            add("torch_rowwise_bias", "torch", stage="pre_pc", rowwise=True)  # dtq's per-channel GEMM
            add("nv_naive_orientation", "nv_naive", stage="act")
            add("nv_stateless_fp8_gelu_bias", "nv_stateless", epilog="GELU_BIAS", out="e4m3", bias="bf16", stage="act")
            for b in ("bf16", "fp16"):
                add(f"nv_fp8_gelu_bias[{b} bias]", "nv", epilog="GELU_BIAS", out="e4m3", bias=b, stage="act")
            add("nv_bf16_gelu_bias", "nv", epilog="GELU_BIAS", out="bf16", bias="bf16", stage="act")
            add("nv_bf16_bias", "nv", epilog="BIAS", out="bf16", bias="bf16", stage="pre")
            add("nv_fp8_bias", "nv", epilog="BIAS", out="e4m3", bias="auto", stage="pre")
            add("nv_fp8_default(no bias)", "nv", epilog=None, out="e4m3", stage="pre_nobias", orient="plain")
            add("nv_pc_public_tensor_scale", "nv_pc_public", stage="act_pc")
            add("nv_pc[a]_fp8_gelu_bias", "nv", epilog="GELU_BIAS", out="e4m3", bias="auto", stage="act_pc", pc="a")
            add("nv_pc[ab]_fp8_gelu_bias", "nv", epilog="GELU_BIAS", out="e4m3", bias="auto", stage="act_pc", pc="ab")
            add("nv_pc[ab]_bf16_gelu_bias", "nv", epilog="GELU_BIAS", out="bf16", bias="bf16", stage="act_pc", pc="ab")
        else:
            add("nv_fp8_gelu_bias", "nv", epilog="GELU_BIAS", out="e4m3", bias="auto", stage="act")
    return cases


class Data:
    """Realistic fc1 operands (E4M3 codes + per-tensor scales) and lazily built float32 references."""

    def __init__(self, m: int, dev: str, seed: int = 0):
        g = torch.Generator(device=dev).manual_seed(seed)
        self.a_s, self.w_s = 4.0 / 448, 0.08 / 448  # 4 sigma of the activations (std 1) / weights (std 0.02)
        self.A = (torch.randn(m, K, device=dev, generator=g) / self.a_s).clamp(-448, 448).to(E4M3)
        self.W = (torch.randn(N, K, device=dev, generator=g) * 0.02 / self.w_s).clamp(-448, 448).to(E4M3)
        self.w_vec = self.w_s * (0.5 + torch.rand(N, device=dev, generator=g))  # per-channel variant
        self.bias = (torch.randn(N, device=dev, generator=g) * 0.1).to(torch.bfloat16)
        self.m, self._ref, self._q = m, {}, {}

    def ref(self, stage: str) -> torch.Tensor:
        if stage not in self._ref:
            base, erf = stage.removesuffix("_erf"), stage.endswith("_erf")
            pc = "_pc" in base
            w = self.W.float() * (self.w_vec[:, None] if pc else self.w_s)
            x = (self.A.float() * self.a_s) @ w.t()  # exact fp32 (TF32 off in main())
            if base == "pre_nobias":
                self._ref[stage] = x
            elif base.startswith("pre"):
                self._ref[stage] = x + self.bias.float()
            else:
                self._ref[stage] = F.gelu(x + self.bias.float(), approximate="none" if erf else "tanh")
        return self._ref[stage]

    def q(self, stage: str) -> float:  # output scale: amax of the reference / 448
        if stage not in self._q:
            self._q[stage] = self.ref(stage).abs().amax().item() / 448.0
        return self._q[stage]

    def codes(self, stage: str, erf: bool = False) -> torch.Tensor:
        return (self.ref(stage + ("_erf" if erf else "")) / self.q(stage)).clamp(-448, 448).to(E4M3)


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    err = (ref - x).pow(2).sum(dtype=torch.float64).item()
    return float("inf") if err == 0 else 10 * math.log10(ref.pow(2).sum(dtype=torch.float64).item() / err)


def metrics(out: torch.Tensor, stage: str, d: Data) -> dict:
    """Codes equal to the tanh reference's, SQNR vs fp32 tanh / erf GELU, and which GELU the output follows."""
    q = d.q(stage)
    if out.dtype == E4M3:
        deq, codes = out.float() * q, out
    else:  # a bf16 output, quantized the way dtq's pass would
        deq = out.float()
        codes = (deq / q).clamp(-448, 448).to(E4M3)
    cu, ct = codes.view(torch.uint8), d.codes(stage).view(torch.uint8)
    r = {"codes_equal": (cu == ct).float().mean().item(), "sqnr_db": sqnr(d.ref(stage), deq)}
    if stage.startswith("act"):  # which GELU? tanh and erf differ by <= 5e-4, below an E4M3 / bf16 ulp, so:
        ce = d.codes(stage, erf=True).view(torch.uint8)
        r["codes_equal_erf"] = (cu == ce).float().mean().item()
        r["sqnr_erf_db"] = sqnr(d.ref(stage + "_erf"), deq)
        split = ct != ce  # ~0.2% of elements: whose code does the output take there? 1 = tanh, 0 = erf
        n_t, n_e = (cu == ct)[split].sum().item(), (cu == ce)[split].sum().item()
        r["tanh_vote"] = n_t / max(n_t + n_e, 1)
        if out.dtype != E4M3:  # bf16: the mean signed error where they differ, 1 = tanh, 0 = erf
            diff = d.ref(stage) - d.ref(stage + "_erf")
            mask = diff.abs() > 1e-4
            signed = ((deq - d.ref(stage + "_erf")) * diff.sign())[mask].mean().item()
            r["tanh_score"] = signed / diff.abs()[mask].mean().item()
    return r


def _timed(fn, iters: int, reps: int = 5) -> float:
    """Median over reps of (events around `iters` back-to-back calls) / iters: keeps the GPU queue full."""
    ts = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / iters)
    return statistics.median(ts)


def bench(fn, iters: int, check=None, graph: bool = True) -> dict:
    """Eager timing (CUDA events), then one call captured in a CUDA graph and its replays timed."""
    fn()
    torch.cuda.synchronize()
    r = {"events_ms": _timed(fn, iters)}
    for mode in ("global", "relaxed") if graph else ():  # "relaxed": if the capture trips on a prohibited call
        g = None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(), fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, capture_error_mode=mode):
                out = fn()
            g.replay()
            torch.cuda.synchronize()
            r.update(graph_ms=_timed(g.replay, iters), graph_capture=mode)
            if check is not None:  # the replayed graph's output, checked too
                r["graph_check"] = check(out)
            break
        except Exception as e:  # noqa: BLE001
            r[f"graph_error_{mode}"] = f"{type(e).__name__}: {e}"[:600]
            torch.cuda.synchronize()
        finally:
            del g
    r["ms"] = r.get("graph_ms", r["events_ms"])
    return r


def gelu_quant_eager(y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:  # dtq's pass (tanh GELU)
    return (F.gelu(y.float(), approximate="tanh") / q).clamp(-448, 448).to(E4M3)


gelu_quant = torch.compile(gelu_quant_eager)


def run_torch(c: dict, d: Data, iters: int) -> dict:
    dev = d.A.device
    if c.get("rowwise"):  # per-channel weight scales: cuBLAS's row-wise scaled GEMM, as dtq's FP8Linear
        sa, sb = torch.full((d.m, 1), d.a_s, device=dev), d.w_vec.reshape(1, N).contiguous()
    else:
        sa, sb = torch.tensor(d.a_s, device=dev), torch.tensor(d.w_s, device=dev)
    def gemm():
        return torch._scaled_mm(d.A, d.W.t(), scale_a=sa, scale_b=sb, bias=d.bias, out_dtype=torch.bfloat16)
    fn = gemm
    if c.get("gelu_pass"):
        qt = torch.tensor(d.q("act"), device=dev)
        fn = lambda: gelu_quant(gemm(), qt)  # noqa: E731
    r = metrics(fn(), c["stage"], d)
    return r | bench(fn, iters, check=lambda o: metrics(o, c["stage"], d)["codes_equal"])


STATE: dict = {}  # "fp8_bias": the bias dtype cuBLASLt took with an E4M3 D


def run_nv(c: dict, d: Data, iters: int, nv) -> dict:
    nvmath, nla, lt = nv
    E, dt = nla.MatmulEpilog, nvmath.CudaDataType
    stage, kind, r = c["stage"], c["kind"], {}
    fp8_out = c.get("out", "e4m3") == "e4m3"
    opts = {"result_type": dt.CUDA_R_8F_E4M3 if fp8_out else dt.CUDA_R_16BF}
    bias_name = STATE.get("fp8_bias", "fp16") if c.get("bias") == "auto" else c.get("bias", "bf16")
    bias = d.bias.to(torch.float16 if bias_name == "fp16" else torch.bfloat16)
    r["bias_dtype"] = bias_name
    if kind == "nv_naive":  # a = A [M, K], b = W.t(): the bias would have to be [M]
        nla.matmul(d.A, d.W.t(), epilog=E.GELU_BIAS, epilog_inputs={"bias": bias},
                   quantization_scales={"a": d.a_s, "b": d.w_s, "d": 1 / d.q(stage)}, options=opts)
        return r | {"note": "accepted (unexpected)"}
    swap = c.get("orient", "swap") == "swap"
    a, b = (d.W, d.A.t()) if swap else (d.A, d.W.t())
    scales = {"a": d.w_s if swap else d.a_s, "b": d.a_s if swap else d.w_s}
    if fp8_out:
        scales["d"] = 1.0 / d.q(stage)
    epilog = getattr(E, c["epilog"]) if c.get("epilog") else None
    inputs = {"bias": bias} if c.get("epilog") and "BIAS" in c["epilog"] else None
    view = (lambda o: o.t()) if swap else (lambda o: o)  # (N, M) col-major -> [M, N] row-major
    if kind == "nv_pc_public":  # the documented API with a length-N weight scale
        nla.Matmul(a, b, quantization_scales={**scales, "a": d.w_vec}, options=opts)
        return r | {"note": "accepted (unexpected)"}
    if kind == "nv_stateless":  # plans on every call: the timing includes the heuristic query
        fn = lambda: nla.matmul(a, b, epilog=epilog, epilog_inputs=inputs, quantization_scales=scales,  # noqa: E731
                                options=opts)
        out = fn()
        r |= metrics(view(out), stage, d) | {"out_shape_stride": [list(out.shape), list(out.stride())]}
        return r | bench(fn, 10, graph=False)
    mm = nla.Matmul(a, b, quantization_scales=scales, options=opts)
    try:
        if c.get("pc"):  # private: per-row A (= W's output channels) [and per-column B] OUTER_VEC_32F scales
            mm.quantization_scales.a = d.w_vec.contiguous()
            if c["pc"] == "ab":
                mm.quantization_scales.b = torch.full((d.m,), d.a_s, device=d.A.device)
            orig = mm._prepare_operand_quantization_scales
            def patched(sc, stream_holder):
                orig(sc, stream_holder)  # sets pointers + SCALAR_32F; then switch the mode before the heuristic
                mm.mm_desc_ifc.a_scale_mode = lt.MatmulMatrixScale.OUTER_VEC_32F
                if c["pc"] == "ab":
                    mm.mm_desc_ifc.b_scale_mode = lt.MatmulMatrixScale.OUTER_VEC_32F
            mm._prepare_operand_quantization_scales = patched
        algos = mm.plan(preferences={"limit": 16}, epilog=epilog, epilog_inputs=inputs)
        r["n_algorithms"] = len(algos)
        try:
            mm.autotune(iterations=5)
            r["autotuned"] = True
        except Exception as e:  # noqa: BLE001
            r["autotune_error"] = f"{type(e).__name__}: {e}"[:300]
        try:
            best = mm.algorithms[0]
            r["algorithm"] = {"id": best.algorithm_id, "tile": str(best.tile), "stages": str(best.stages),
                              "split_k": best.split_k, "ids": [al.algorithm_id for al in mm.algorithms][:16]}
        except Exception as e:  # noqa: BLE001
            r["algorithm_error"] = f"{type(e).__name__}: {e}"[:300]
        out = mm.execute()
        torch.cuda.synchronize()
        r |= metrics(view(out), stage, d) | {"out_shape_stride": [list(out.shape), list(out.stride())]}
        if fp8_out and inputs and c.get("bias") != "auto" and r["codes_equal"] > 0.9:
            STATE.setdefault("fp8_bias", bias_name)  # the first bias dtype that gave right codes
        return r | bench(mm.execute, iters, check=lambda o: metrics(view(o), stage, d)["codes_equal"])
    finally:
        mm.free()


def env_info() -> tuple[dict, object]:
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(),
            "capability": list(torch.cuda.get_device_capability())}
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # make torch load its cuBLAS(Lt)
    with open("/proc/self/maps") as f:
        info["cublas_libs_loaded"] = sorted({ln.split()[-1] for ln in f if "libcublas" in ln})
    try:
        import nvmath
        from nvmath.bindings import cublasLt as lt
        from nvmath.linalg import advanced as nla
        import cuda.bindings, cuda.core, cuda.pathfinder  # noqa: E401
        info |= {"nvmath": nvmath.__version__, "cuda_bindings": cuda.bindings.__version__,
                 "cuda_core": cuda.core.__version__, "cuda_pathfinder": cuda.pathfinder.__version__}
        info["cublaslt_version"] = lt.get_version()  # loads it the nvmath way; e.g. 130200 = 13.2.0
        with open("/proc/self/maps") as f:  # a second copy here = nvmath loaded its own
            info["cublas_libs_loaded_after_nvmath"] = sorted({ln.split()[-1] for ln in f if "libcublas" in ln})
    except Exception as e:  # noqa: BLE001
        info["nvmath_error"] = traceback.format_exc()[-2000:]
        seen = set()
        for p in sys.path:  # where a cublasLt could be: print it, the JSON keeps it
            for pat in ("nvidia/**/libcublasLt*", "torch/lib/libcublasLt*"):
                seen.update(glob.glob(f"{p}/{pat}", recursive=True))
        info["cublaslt_candidates"] = sorted(seen)
        print(f"nvmath unavailable: {type(e).__name__}: {e}\nlibcublasLt candidates under sys.path: {sorted(seen)}\n"
              f"loaded by torch: {info['cublas_libs_loaded']}", flush=True)
        return info, None
    try:
        loaded = cuda.pathfinder.load_nvidia_dynamic_lib("cublasLt")
        info["cublaslt_path"], info["cublaslt_found_via"] = loaded.abs_path, loaded.found_via
    except Exception as e:  # noqa: BLE001
        info["cublaslt_path_error"] = f"{type(e).__name__}: {e}"[:500]
    return info, (nvmath, nla, lt)


def row(r: dict) -> str:
    g = lambda k, f: format(r[k], f) if isinstance(r.get(k), (int, float)) else "-"  # noqa: E731
    return (f"{r['m']:>6} {r['name']:<34} ms={g('ms', '.4f')} ({'graph' if 'graph_ms' in r else 'events'}) "
            f"TFLOP/s={g('tflops', '.0f')} codes={g('codes_equal', '.4f')} sqnr={g('sqnr_db', '.2f')} "
            f"erf_sqnr={g('sqnr_erf_db', '.2f')} tanh_vote={g('tanh_vote', '.2f')} {r.get('error', '')[:200]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="cublaslt.json")
    ap.add_argument("--m", type=int, default=32768, help="rows: 128 images x 256 tokens (batch 64 with guidance)")
    ap.add_argument("--extra-m", default="4096,512", help="smaller Ms for the headline cases ('' for none)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--dry-run", action="store_true", help="list the cases and exit (no GPU needed)")
    args = ap.parse_args()
    ms = [args.m] + [int(x) for x in args.extra_m.split(",") if x and int(x) != args.m]
    cases = build_cases(ms)
    if args.dry_run:
        for c in cases:
            rest = " ".join(f"{k}={v}" for k, v in c.items() if k not in ("name", "m"))
            print(f"M={c['m']:>6}  {c['name']:<34} {rest}")
        print(f"{len(cases)} cases; fc1 K={K} N={N}")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references in true fp32
    torch.set_float32_matmul_precision("highest")
    info, nv = env_info()
    print(json.dumps(info, indent=1), flush=True)
    res = {"info": info, "cases": []}
    d = None
    for c in cases:
        if d is None or d.m != c["m"]:
            d = None
            torch.cuda.empty_cache()
            d = Data(c["m"], "cuda")
        rec = {"name": c["name"], "m": c["m"], "case": c}
        try:
            if c["kind"] == "torch":
                rec |= run_torch(c, d, args.iters)
            elif nv is None:
                rec["error"] = "skipped: nvmath unavailable"
            else:
                rec |= run_nv(c, d, args.iters, nv)
            if "ms" in rec:
                rec["tflops"] = 2 * c["m"] * N * K / (rec["ms"] * 1e-3) / 1e12
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"[:1500]
            rec["traceback"] = traceback.format_exc()[-3000:]
            try:
                torch.cuda.synchronize()
            except Exception as e2:  # noqa: BLE001  (a sticky CUDA error: nothing after this can run)
                rec["sync_error"] = str(e2)[:300]
        res["cases"].append(rec)
        print(row(rec), flush=True)
        with open(args.out, "w") as f:  # after every case: a timeout keeps what ran
            json.dump(res, f, indent=1, default=str)
    # headline: the fused GEMM against dtq's GEMM + pass at each M
    summ = {}
    for m in ms:
        by = {r["name"]: r for r in res["cases"] if r["m"] == m and "ms" in r}
        base = by.get("torch_scaled_mm_bias+gelu_quant")
        fused = [r for n, r in by.items() if n.startswith("nv_fp8_gelu_bias") and r.get("codes_equal", 0) > 0.9]
        if base and fused:
            best = min(fused, key=lambda r: r["ms"])
            summ[str(m)] = {"baseline_ms": base["ms"], "fused": best["name"], "fused_ms": best["ms"],
                            "speedup": base["ms"] / best["ms"], "fused_codes_equal": best.get("codes_equal"),
                            "baseline_codes_equal": base.get("codes_equal")}
    res["summary"] = summ
    print("\n" + "\n".join(row(r) for r in res["cases"]) + "\nsummary: " + json.dumps(summ, indent=1))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
