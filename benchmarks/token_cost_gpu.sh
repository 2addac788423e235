#!/usr/bin/env bash
# Issue #12 / #13: what per-token dynamic activation quantization (ViDiT-Q) costs against static scales,
# on one H200, about 5 minutes (target: <= 3% fewer images/s). Two per-token engines: X-token
# (build_qengine's default token_quant "pass": the Triton quantize pass, no per-token fused epilogue)
# and X-token-tokfused (token_quant "inductor": torch ops Inductor fuses into LN+modulate / GELU, its
# realize_reads_threshold option, per-token gated-residual epilogues; a542954 measured it slower).
# Three steps:
#  1. codes: on the GPU, the compiled per-token quantizer (quant.token_codes_int8 under Inductor, what
#     -tokfused engines run) against the Triton pass (kernels.quant_rows_int8): identical codes
#     and scales on bf16 rows over six decades, an all-zero row, with / without the balancing Mul.
#  2. end to end (dtq-bench; DiT-XL/2 random weights, 256 px, DDPM 50 steps, CFG, batch 64, regional
#     torch.compile + CUDA graphs): int8 vs int8-token / int8-token-tokfused, w4a8 vs w4a8-token /
#     w4a8-token-tokfused -> summary.per_token_cost. POINTS=... adds e.g. int8-token-tokfused-unfused
#     (summary.epilogue_fusion_speedup). $CORRECTNESS=int8-token,w4a8-token adds dtq-bench's
#     engine-vs-simulation stage (~90 s more).
#  3. profile (benchmarks/profile_engines.py, batch 64, no CUDA graph): int8-token and
#     int8-token-tokfused kernel breakdown; the -tokfused engine must run no quant_rows pass (0 calls)
#     and fused_row_amax_kernels > 0 (the row amax inside Inductor's LN / GELU kernels); int8-token
#     runs the pass (calls > 0: the default engine is the one measured before a542954).
#
#   OUT=/path/to/out benchmarks/token_cost_gpu.sh            # the GPU run (OUT defaults to ./token_out)
#   OUT=/tmp/dry benchmarks/token_cost_gpu.sh --dry-run      # CPU dry run: steps 1-2 on the tiny model
#                                                            # (Triton interpreter, no compile); no step 3
# Writes $OUT/codes.json, $OUT/token_bench.json (+ .log), $OUT/profile.json (+ .log) and $OUT/check.txt.
# Exit 1 when a step failed or the codes differ (after writing everything).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/token_out}
mkdir -p "$OUT"
source benchmarks/use_checkout.sh
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
    esac
done
POINTS=${POINTS:-"64:int8,int8-token,int8-token-tokfused,w4a8,w4a8-token,w4a8-token-tokfused"}
CORRECTNESS=${CORRECTNESS-}
SKIP=gemms
[[ -z "$CORRECTNESS" ]] && SKIP=correctness,gemms
if [[ $DRY == 1 ]]; then
    export TRITON_INTERPRET=1
    POINTS=$(sed -E "s/(^|;)64:/\\13:/g" <<< "$POINTS")
    BENCH_ARGS=(--smoke --steps 1 --repeats 1 --budget-s 600)
    ROWS=37 COLS=192
else
    python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "FAILED: no CUDA GPU" >&2; exit 1; }
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > "$OUT/check.txt" || true
    BENCH_ARGS=(--repeats 1 --budget-s 200)
    ROWS=32768 COLS=1152
fi
: >> "$OUT/check.txt"
rc=0

# 1. identical codes: compiled torch ops vs the Triton pass, on this device
ROWS=$ROWS COLS=$COLS timeout 300 python - "$OUT/codes.json" <<'PY' 2>&1 | tee -a "$OUT/check.txt" || rc=1
import json, os, sys
import torch
from dtq.runtime import kernel_ops, quant  # noqa: F401
dev = "cuda" if torch.cuda.is_available() else "cpu"
M, K = int(os.environ["ROWS"]), int(os.environ["COLS"])
g = torch.Generator().manual_seed(0)
x = torch.randn(M, K, generator=g) * torch.logspace(-3, 3, M)[:, None]
x[5] = 0
dtype = torch.bfloat16 if dev == "cuda" else torch.float16  # (the interpreter has no bf16 loads)
x = x.to(dev, dtype)
mul = (torch.rand(K, generator=g) + 0.5).to(dev)
compiled = torch.compile(quant.token_codes_int8, dynamic=False)
res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "rows": M, "cols": K, "cases": {}}
ok = True
for name, m in (("balanced", mul), ("no_mul", None)):
    q, s = compiled(x, m)
    qk, sk = torch.ops.dtq.quant_rows_int8(x, m)
    case = {"codes_differ": int((q != qk).sum()), "max_code_diff": int((q.int() - qk.int()).abs().max()),
            "scales_differ": int((s != sk).sum()), "zero_row_scale": float(s[5]), "zero_row_codes_zero": not bool(q[5].any())}
    case["identical"] = case["codes_differ"] == 0 and case["scales_differ"] == 0
    ok &= case["identical"] and case["zero_row_codes_zero"]
    res["cases"][name] = case
    print(f"codes {name}: {case}")
res["ok"] = ok
json.dump(res, open(sys.argv[1], "w"), indent=1)
print("CODES", "OK (identical)" if ok else "FAILED (compiled per-token codes differ from quant_rows_int8)")
sys.exit(0 if ok else 1)
PY

# 2. end to end: static vs per-token images/s
timeout 420 python -m dtq.tools.bench_engines --out "$OUT/token_bench.json" --points "$POINTS" --skip "$SKIP" \
    ${CORRECTNESS:+--correctness "$CORRECTNESS"} "${BENCH_ARGS[@]}" 2>&1 | tee "$OUT/token_bench.log" || rc=1
python - "$OUT/token_bench.json" <<'PY' 2>&1 | tee -a "$OUT/check.txt" || rc=1
import json, sys
from dtq.tools.bench_engines import end_to_end_problems
res = json.load(open(sys.argv[1]))
bad, warn = end_to_end_problems(res)
for k, v in res.get("summary", {}).get("per_token_cost", {}).items():
    print(f"per-token cost {k}: {v['static_images_per_s']} -> {v['images_per_s']} img/s = {100 * v['cost']:.1f}% "
          f"(target <= 3%): {'met' if v['met'] else 'NOT met'}")
for prec, c in res.get("correctness", {}).items():
    if isinstance(c, dict) and prec != "model" and not c.get("ok"):
        bad.append(f"correctness {prec}: {c.get('error') or c}")
for k, v in res.get("summary", {}).get("epilogue_fusion_speedup", {}).items():
    print(f"fused epilogues vs unfused {k}: {v}x images/s")
for w in warn:
    print("SKIPPED", w)
for b in bad:
    print("FAILED", b)
sys.exit(1 if bad else 0)
PY

# 3. kernel breakdown: does a separate quantize pass remain?
if [[ $DRY == 0 ]]; then
    timeout 300 python benchmarks/profile_engines.py --out "$OUT/profile.json" --backends int8-token,int8-token-tokfused \
        --batch 64 --iters 3 2>&1 | tee "$OUT/profile.log" || rc=1
    python - "$OUT/profile.json" <<'PY' 2>&1 | tee -a "$OUT/check.txt" || rc=1
import json, sys
res = json.load(open(sys.argv[1]))["backends"]
bad = []
for name in ("int8-token", "int8-token-tokfused"):
    r = res.get(name, {})
    if "error" in r or not r:
        bad.append(f"profile {name}: {r.get('error', 'missing')}")
        continue
    print(f"profile {name}: graphed forward {r['graphed_forward_ms']} ms; quant_rows pass {r['quant_rows_pass']}; "
          f"Inductor kernels with a row amax {r['fused_row_amax_kernels']}; {r['categories_ms']}")
# the quantizer fused by Inductor: only the -tokfused engine (token_quant "inductor")
tok = res.get("int8-token-tokfused", {})
if tok.get("quant_rows_pass", {}).get("calls"):
    bad.append(f"int8-token-tokfused still runs a separate quantize pass: {tok['quant_rows_pass']}")
if "fused_row_amax_kernels" in tok and not tok["fused_row_amax_kernels"]["calls"]:
    bad.append("int8-token-tokfused: no Inductor kernel computes a row amax (where did the quantizer go?)")
# the default engine (token_quant "pass") quantizes in its own Triton pass, also compiled
plain = res.get("int8-token", {})
if "quant_rows_pass" in plain and not plain["quant_rows_pass"].get("calls"):
    bad.append("int8-token (token_quant pass) ran no quant_rows pass: the default is not the measured engine")
for b in bad:
    print("FAILED", b)
sys.exit(1 if bad else 0)
PY
fi
echo "CHECK $([[ $rc == 0 ]] && echo OK || echo FAILED)" | tee -a "$OUT/check.txt"
exit $rc
