"""cuDNN FP8 (E4M3) fused attention vs bf16 SDPA at DiT-XL/2's attention shape, on Hopper.

A measurement for issue #13's "FP8 attention" lever: is cuDNN's per-tensor FP8 SDPA (frontend graph API
``graph.sdpa_fp8``) faster than bf16 ``F.scaled_dot_product_attention`` at 16 heads x 256 tokens x head dim 72
(batch rows 128 / 16 / 2), and how accurate is it?

    PYTHONPATH=/tmp/site python benchmarks/cudnn_fp8_attention_bench.py --out $OUT/cudnn_fp8_attn.json
    cd benchmarks && python -c "import cudnn_fp8_attention_bench as b; print(b.reference_case(2, 80))"  # CPU self-check

(/tmp/site holds the ``nvidia-cudnn-frontend`` wheel, import name ``cudnn``.) FP8 SDPA wants head dim % 16 == 0: q/k/v
are zero-padded 72 -> 80 (128 as a second variant; zero columns keep Q K^T, the extra O columns are zero and sliced
off), attn_scale stays 1/sqrt(72); d_pad 64 is the native control (true head dim 64). Per case: bf16 SDPA (default
backend) and the cuDNN FP8 graph execute, median ms of ``triton.testing.do_bench`` (and replayed from a CUDA graph
where capture works: at B=2 per-call numbers can be host-bound); eager (and compiled) pad + per-tensor quantize of
q, k, v with calibrated scales (amax not timed); SQNR (dB) / cosine of both against fp32 math attention of the
unquantized bf16 inputs, next to a torch emulation of the FP8 pipeline (a cuDNN SQNR far below it hints at a scale
convention error). Scales: x_fp8 = x / descale, descale = amax/448; P is stored as P * scale_s, scale_s = 448,
descale_s = 1/448; O bf16 (scale_o = 1) if cuDNN builds it, else E4M3 with scale_o = 1/descale_v. Failures (import,
build, execute, timing) are recorded as "stage: Type: first line" and the run goes on: exit 0 (2 without CUDA), the
JSON rewritten after every case.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from attention_bench import HEADS, TOKENS, HEAD_DIM, accuracy, make_inputs, time_ms  # benchmarks/ is sys.path[0]

FP8_MAX = 448.0  # largest float8_e4m3fn
SCALE_S = FP8_MAX  # softmax P in [0, 1] is stored as P * 448 (descale_s = 1/448)
SCALARS = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
# (O in bf16?, BSHD-strided layout?, generate_stats?) in order of preference; the first that builds and runs wins
ATTEMPTS = [(ob, bshd, st) for ob in (True, False) for bshd in (True, False) for st in (False, True)]


class StageError(RuntimeError):
    """A failure already formatted as "stage: Type: first line"."""


def err(exc: BaseException, stage: str = "") -> str:
    if isinstance(exc, StageError):
        return str(exc)
    line = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{stage + ': ' if stage else ''}{type(exc).__name__}: {line}"


def staged(stage: str, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 -- recorded by the caller, which moves on
        raise StageError(err(exc, stage)) from exc


def guarded(probe):
    try:
        return probe()
    except Exception as exc:  # noqa: BLE001
        return err(exc)


def pad_quant_qkv(q, k, v, d_pad: int, descales):
    """[B, S, H, d] each -> [B, S, H, d_pad] float8_e4m3fn: zero-pad the head dim, divide by the descale, saturate."""
    return tuple((F.pad(x, (0, d_pad - x.shape[-1])).float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
                 for x, s in zip((q, k, v), descales))


def attention_ref(q, k, v, scale: float) -> torch.Tensor:
    """fp32 math attention of [B, S, H, d] inputs -> [B, S, H, d] fp32."""
    qh, kh, vh = (t.float().transpose(1, 2) for t in (q, k, v))
    p = torch.softmax((qh @ kh.transpose(-1, -2)) * scale, dim=-1)
    return (p @ vh).transpose(1, 2)


def emulate_fp8(q8, k8, v8, descales, scale: float, d_true: int) -> torch.Tensor:
    """The FP8 pipeline in torch (P quantized after normalization; the fused kernel quantizes its running P)."""
    dq, dk, dv = descales
    qh, kh, vh = (t.float().transpose(1, 2) for t in (q8, k8, v8))
    p = torch.softmax((qh @ kh.transpose(-1, -2)) * (dq * dk * scale), dim=-1)
    p8 = (p * SCALE_S).to(torch.float8_e4m3fn).float()
    return ((p8 @ vh) * (dv / SCALE_S)).transpose(1, 2)[..., :d_true]


def prepare(batch: int, d_pad: int, d_true: int, device):
    """Inputs, calibrated descales, padded FP8 q/k/v, fp32 reference: shared by the CPU check and the GPU run."""
    q, k, v = make_inputs(batch, device, head_dim=d_true)  # keys with a shared component
    descales = tuple((t.abs().amax().float() / FP8_MAX).clamp_min(1e-12) for t in (q, k, v))  # x ~= x_fp8 * descale
    return (q, k, v), descales, pad_quant_qkv(q, k, v, d_pad, descales), attention_ref(q, k, v, d_true ** -0.5)


def reference_case(batch: int, d_pad: int, d_true: int | None = None, device="cpu") -> dict:
    """CPU self-check of padding, quantization and the reference (no cudnn needed)."""
    d_true = d_true or (64 if d_pad == 64 else HEAD_DIM)
    (q, k, v), descales, q8s, ref = prepare(batch, d_pad, d_true, device)
    bf16 = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    emulated = emulate_fp8(*q8s, descales, d_true ** -0.5, d_true)
    return {"B": batch, "d_pad": d_pad, "d_true": d_true, "descales": [round(float(s), 6) for s in descales],
            "fp8_shape": list(q8s[0].shape),
            "pad_columns_zero": all(bool((t[..., d_true:].float() == 0).all()) for t in q8s),
            "bf16_sdpa": accuracy(ref, bf16), "fp8_emulated": accuracy(ref, emulated)}


def bench(fn, graph: bool = False) -> float:
    """Median ms: per-call launches, or replayed from a CUDA graph (no host overhead)."""
    return round(time_ms(fn, "cudagraph" if graph else "kernel"), 4)


def run_fp8(cudnn, handle, q8s, descales, d_pad, d_true, scale, o_bf16, bshd, stats):
    """Build the sdpa_fp8 graph and run it once -> (timed callable, output [B, S, H, d_true] fp32, info)."""
    dt, dev, B = cudnn.data_type, q8s[0].device, q8s[0].shape[0]
    dims = [B, HEADS, TOKENS, d_pad]  # logical BHSD; physical [B, S, H, d] (DiT's qkv) or contiguous BHSD
    strides = [TOKENS * HEADS * d_pad, d_pad, HEADS * d_pad, 1] if bshd else \
        [HEADS * TOKENS * d_pad, TOKENS * d_pad, d_pad, 1]
    g = staged("pygraph", lambda: cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT,
                                                compute_data_type=dt.FLOAT, handle=handle))
    t = {n: g.tensor(dim=dims, stride=strides, data_type=dt.FP8_E4M3, name=n) for n in "qkv"}
    t.update({n: g.tensor(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=dt.FLOAT, name=n) for n in SCALARS})
    o, st, amax_s, amax_o = staged("sdpa_fp8", lambda: g.sdpa_fp8(
        t["q"], t["k"], t["v"], *(t[n] for n in SCALARS), attn_scale=scale, generate_stats=stats))
    o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(dt.BFLOAT16 if o_bf16 else dt.FP8_E4M3)
    for a in (amax_s, amax_o):
        a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(dt.FLOAT)
    if stats:
        st.set_output(True).set_dim([B, HEADS, TOKENS, 1]).set_stride([HEADS * TOKENS, TOKENS, 1, 1])
        st.set_data_type(dt.FLOAT)
    heuristics = [cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK]
    for stage in ("validate", "build_operation_graph", "create_execution_plans", "check_support", "build_plans"):
        staged(stage, getattr(g, stage), *([heuristics] if stage == "create_execution_plans" else []))
    views = [x.permute(0, 2, 1, 3) if bshd else x.permute(0, 2, 1, 3).contiguous() for x in q8s]  # [B, H, S, d]
    odt = torch.bfloat16 if o_bf16 else torch.float8_e4m3fn
    o_buf = torch.empty(B, TOKENS, HEADS, d_pad, dtype=odt, device=dev).permute(0, 2, 1, 3) if bshd else \
        torch.empty(B, HEADS, TOKENS, d_pad, dtype=odt, device=dev)
    scale_o = 1.0 if o_bf16 else 1.0 / float(descales[2])  # fp8 O: |O| <= amax(v), so v's scale fits
    full = lambda x: torch.full((1, 1, 1, 1), float(x), dtype=torch.float32, device=dev)  # noqa: E731
    vals = dict(zip(SCALARS, (*descales, 1 / SCALE_S, SCALE_S, scale_o)))
    pack = {t[n]: full(vals[n]) for n in SCALARS}
    pack.update({t["q"]: views[0], t["k"]: views[1], t["v"]: views[2], o: o_buf})
    pack.update({amax_s: full("nan"), amax_o: full("nan")})
    if stats:
        pack[st] = torch.empty(B, HEADS, TOKENS, 1, dtype=torch.float32, device=dev)
    ws_size = int(staged("get_workspace_size", g.get_workspace_size))
    ws = torch.empty(max(ws_size, 1), dtype=torch.uint8, device=dev)  # allocated once, outside the timed region

    def fn():
        cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)  # cached: a no-op unless the stream changed
        g.execute(pack, ws, handle=handle)

    staged("execute", lambda: (fn(), torch.cuda.synchronize()))
    out = o_buf.permute(0, 2, 1, 3)[..., :d_true].float() / scale_o
    info = {"o_dtype": "bf16" if o_bf16 else "fp8_e4m3", "layout": "bshd_strided" if bshd else "bhsd_contiguous",
            "generate_stats": stats, "scale_o": scale_o, "workspace_bytes": ws_size,
            "amax_s": pack[amax_s].item(), "amax_o": pack[amax_o].item(),
            "plan": guarded(lambda: g.get_plan_name_at_index(getattr(g, "_plan_index", 0)))}
    return fn, out, info


def run_case(cudnn, cudnn_error, handle, B, d_pad, d_true, args) -> dict:
    scale = d_true ** -0.5
    rec = {"B": B, "heads": HEADS, "tokens": TOKENS, "d_true": d_true, "d_pad": d_pad, "attn_scale": scale,
           "errors": {}}

    def guard(key, f):
        try:
            return f()
        except Exception as exc:  # noqa: BLE001
            rec["errors"][key] = err(exc)
            return None

    (q, k, v), descales, q8s, ref = prepare(B, d_pad, d_true, "cuda")
    rec["descales"] = [float(s) for s in descales]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, d] views, as DiT's attention gets them
    sdpa = lambda: F.scaled_dot_product_attention(qh, kh, vh)  # noqa: E731
    rec["bf16_sdpa_ms"] = guard("bf16_time", lambda: bench(sdpa))
    rec.update({f"bf16_{key}": val for key, val in (guard("bf16_accuracy", lambda: accuracy(
        ref, sdpa().transpose(1, 2))) or {}).items()})
    rec["pad_quant_ms"] = guard("pad_quant_time", lambda: bench(lambda: pad_quant_qkv(q, k, v, d_pad, descales)))
    if not args.no_compile:
        compiled = torch.compile(pad_quant_qkv, dynamic=False)
        rec["pad_quant_compiled_ms"] = guard("pad_quant_compiled_time",
                                             lambda: bench(lambda: compiled(q, k, v, d_pad, descales)))
    rec.update({f"fp8_emulated_{key}": val for key, val in (guard("fp8_emulated", lambda: accuracy(
        ref, emulate_fp8(*q8s, descales, scale, d_true))) or {}).items()})
    fn, rec["fp8_attempts_failed"] = None, []
    if cudnn is None:
        rec["errors"]["cudnn_import"] = cudnn_error
    for o_bf16, bshd, stats in (ATTEMPTS if cudnn is not None else []):
        try:
            fn, out, info = run_fp8(cudnn, handle, q8s, descales, d_pad, d_true, scale, o_bf16, bshd, stats)
        except Exception as exc:  # noqa: BLE001
            rec["fp8_attempts_failed"].append(
                {"o_bf16": o_bf16, "bshd": bshd, "generate_stats": stats, "error": err(exc)})
            continue
        rec.update(info)
        rec.update({f"fp8_{key}": val for key, val in (guard("fp8_accuracy", lambda: accuracy(ref, out)) or {}).items()})
        rec["cudnn_fp8_ms"] = guard("fp8_time", lambda: bench(fn))
        break
    if fn is None and cudnn is not None:
        rec["errors"]["cudnn_fp8"] = "no attempt built and ran (see fp8_attempts_failed)"
    bf, f8, pq, pqc = (rec.get(x) for x in ("bf16_sdpa_ms", "cudnn_fp8_ms", "pad_quant_ms", "pad_quant_compiled_ms"))
    if bf and f8:
        rec["speedup"] = round(bf / f8, 3)
        rec["speedup_with_pad_quant"] = round(bf / (f8 + pq), 3) if pq else None
        rec["speedup_with_pad_quant_compiled"] = round(bf / (f8 + pqc), 3) if pqc else None
    if not args.no_cudagraph:  # last: a failed capture must not spoil the numbers above
        bfg = rec["bf16_sdpa_graph_ms"] = guard("bf16_graph_time", lambda: bench(sdpa, graph=True))
        if fn is not None:
            f8g = rec["cudnn_fp8_graph_ms"] = guard("fp8_graph_time", lambda: bench(fn, graph=True))
            rec["speedup_graph"] = round(bfg / f8g, 3) if bfg and f8g else None
    return rec


def env_info(cudnn) -> dict:
    """dtq-bench's environment record (GPU, versions, commit, driver) plus the cuDNN pieces this run used."""
    from dtq.tools.bench_engines import env_info as bench_env

    probes = {"torch_cudnn": torch.backends.cudnn.version,
              "cuda_python": lambda: importlib.import_module("cuda.bindings").__version__}  # the frontend imports it
    if cudnn is not None:
        probes.update({"cudnn_frontend": lambda: cudnn.__version__, "cudnn_frontend_file": lambda: cudnn.__file__,
                       "cudnn_backend_version": cudnn.backend_version,
                       "cudnn_backend_version_string": cudnn.backend_version_string})
    return {**bench_env(), **{key: guarded(probe) for key, probe in probes.items()}}


def log_line(r: dict) -> str:
    return (f"B={r['B']:3d} d_pad={r['d_pad']:3d} | bf16 {r.get('bf16_sdpa_ms')} ms {r.get('bf16_sqnr_db')} dB | "
            f"fp8 {r.get('cudnn_fp8_ms')} ms {r.get('fp8_sqnr_db')} dB (emulated {r.get('fp8_emulated_sqnr_db')}) "
            f"o={r.get('o_dtype')} {r.get('layout')} | pad+quant {r.get('pad_quant_ms')} ms | speedup "
            f"{r.get('speedup')} / with pad+quant {r.get('speedup_with_pad_quant')} / graphed {r.get('speedup_graph')}"
            f" | errors {sorted(r.get('errors', {}))}, failed fp8 attempts {len(r.get('fp8_attempts_failed', []))}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON path")
    ap.add_argument("--batches", default="128,16,2")
    ap.add_argument("--d-pads", default="80,128,64", help="padded head dims; 64 runs the true-64 control")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd pad+quantize timing")
    ap.add_argument("--no-cudagraph", action="store_true", help="skip the CUDA-graph replay timings")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("cudnn_fp8_attention_bench: CUDA is not available; this benchmark needs an NVIDIA GPU (Hopper)",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    dynamo_config = importlib.import_module("torch._dynamo").config
    for knob in ("cache_size_limit", "recompile_limit"):  # one compile of pad+quantize per case shape
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, 64)
    cudnn, cudnn_error, handle = None, None, None
    try:
        import cudnn as cudnn_module

        handle = cudnn_module.create_handle()
        cudnn = cudnn_module
    except Exception as exc:  # noqa: BLE001
        cudnn_error = err(exc, "import cudnn / create_handle")
        print(cudnn_error, flush=True)
    result = {"benchmark": "cudnn_fp8_attention_bench (issue #13, FP8 attention)", "env": env_info(cudnn),
              "convention": {"descale": "amax/448 per tensor (x_fp8 = x / descale)", "scale_s": SCALE_S,
                             "descale_s": 1 / SCALE_S, "scale_o": "1 for bf16 O, 1/descale_v for fp8 O",
                             "pad_quant": "q+k+v, calibrated descales (amax not timed)"}, "cases": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for B in (int(x) for x in args.batches.split(",")):
        for d_pad in (int(x) for x in args.d_pads.split(",")):
            d_true = 64 if d_pad == 64 else HEAD_DIM
            try:
                rec = run_case(cudnn, cudnn_error, handle, B, d_pad, d_true, args)
            except Exception as exc:  # noqa: BLE001
                rec = {"B": B, "d_pad": d_pad, "d_true": d_true, "errors": {"case": err(exc)}}
            result["cases"].append(rec)
            print(log_line(rec), flush=True)
            out.write_text(json.dumps(result, indent=1, default=str))
            guarded(torch.cuda.empty_cache)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
