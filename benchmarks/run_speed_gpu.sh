#!/usr/bin/env bash
# Issue #13 speed measurements, one H200, one call, under 9 minutes (timeout 530 s, budget 430 s for
# starting end-to-end points): engine-vs-simulation SQNR of the fused-epilogue engines (INT8,
# W4A8-progressive; fused GEMM epilogues included; CORRECTNESS= skips it, saving its Triton autotuning
# for the small DiT's shapes) first, then end to end (DiT-XL/2 random weights,
# 256 px, DDPM 50 steps, CFG, regional torch.compile + CUDA graphs) in priority order, batch 64, then
# 8, then 1, each: bf16 torch.compile, INT8 (fused epilogues: fc1 GELU+quantize, proj/fc2 gated
# residual), INT8 unfused, W4A8-progressive fused / unfused, FP8, W4A16. The "-unfused" points are the
# epilogue ablation (summary.epilogue_fusion_speedup). No GEMM table (see --e2e-only or dtq-bench
# --gemm-m); $GEMM_M=32768,... adds one.
#
#   OUT=/path/to/out benchmarks/run_speed_gpu.sh            # the GPU run (OUT defaults to ./speed_out)
#   OUT=/tmp/dry benchmarks/run_speed_gpu.sh --dry-run      # CPU dry run of the same pipeline (tiny model)
#   (per-token dynamic activation cost, target <= 3% slower than static: benchmarks/token_cost_gpu.sh)
#   OUT=/path/to/out benchmarks/run_speed_gpu.sh --e2e-only [--dry-run]   # about 4 minutes, see below
#
# Time estimate (bench_speed_h200_*.log: warm-ups 6-33 s per point, Triton compiles ~1.5 s per new
# (candidate, K, epilogue) triple, ~3 s of sampling at batch 64): start-up + 6 engine builds ~60 s,
# correctness ~90 s (INT8: 10 candidates, W4A8-progressive: 17, for each epilogue and K), batch 64
# 7 points ~200 s (the fused INT8 / W4A8 points compile every epilogue's candidates), batch 8 ~120 s
# (dynamic-batch recompiles, INT8's small-M candidates), batch 1 ~40 s: close to the budget, so the
# order is by priority and points that would start after $BUDGET_S are skipped and listed as SKIPPED
# in check.txt (rerun those with POINTS=... CORRECTNESS= benchmarks/run_speed_gpu.sh).
#
# PAIRED=N: after each batch's points, N rounds of one timed sampling run per engine in turn (dtq-bench
# --paired); the per-token cost is then judged on the rounds' median, where drift between points cancels.
#
# --e2e-only: no correctness stage; the GEMM table for INT8 only (bf16, FP8 tensor-wise, Triton INT8
# with its result checked against torch._int_mm, torch._int_mm) at $GEMM_M, timed from CUDA graphs
# (no host launch overhead: the engine runs graphed), then end-to-end points in priority order
# ($POINTS, one timed sampling run each); points that start after $BUDGET_S s are skipped (listed
# as SKIPPED), the whole run is killed at $TIMEOUT_S s. GEMM_M= (empty) skips the table.
# Writes $OUT/bench_speed.json (every measurement, failures as data, autotuner choices),
# $OUT/bench_speed.log and $OUT/check.txt. Exit 1 when anything failed (a backend that did not build,
# an end-to-end point or GEMM that raised, an engine below its SQNR floor), after writing everything.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/speed_out}
mkdir -p "$OUT"
source benchmarks/use_checkout.sh

E2E_ONLY=0 DRY=0
for arg in "$@"; do
    case "$arg" in
        --e2e-only) E2E_ONLY=1 ;;
        --dry-run) DRY=1 ;;
        *) echo "usage: $0 [--e2e-only] [--dry-run]" >&2; exit 2 ;;
    esac
done
if [[ $E2E_ONLY == 1 ]]; then
    # int8 = int8_kernel "auto" (torch._int_mm at <= 4096 rows); int8-triton pins Triton for comparison
    POINTS=${POINTS:-"64:bf16-compile,fp8,int8;8:bf16-compile,int8,fp8,w4a16;1:bf16-compile,int8,fp8,w4a16;64:w4a8-progressive;8:int8-triton;64:w4a8"}
    GEMM_M=${GEMM_M-32768,4096,512}
    BUDGET_S=${BUDGET_S:-175}
    TIMEOUT_S=${TIMEOUT_S:-235}
    REPEATS=${REPEATS:-1}
    GEMM_ARGS=(--skip correctness,gemms)
    if [[ -n "$GEMM_M" ]]; then
        GEMM_ARGS=(--skip correctness --gemm-m "$GEMM_M" --gemm-timing cudagraph
                   --gemm-kernels fp8_scaled_mm_tensorwise,int8_triton,int8_torch_int_mm)
    fi
    if [[ $DRY == 1 ]]; then  # the same options on the CPU (tiny model; no GEMM stage there)
        POINTS=$(sed -E "s/(^|;)64:/\\13:/g; s/(^|;)8:/\\12:/g" <<< "$POINTS")  # batches 64 / 8 / 1 -> 3 / 2 / 1
        ARGS=(--smoke --steps 1 --repeats 1 --points "$POINTS" "${GEMM_ARGS[@]}" --budget-s 600)
        LIMIT=900
    else
        python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "FAILED: no CUDA GPU" >&2; exit 1; }
        nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > "$OUT/check.txt" || true
        ARGS=(--points "$POINTS" "${GEMM_ARGS[@]}" --repeats "$REPEATS" --budget-s "$BUDGET_S")
        LIMIT=$TIMEOUT_S
    fi
else
    EACH=bf16-compile,int8,int8-unfused,w4a8-progressive,w4a8-progressive-unfused,fp8,w4a16
    POINTS=${POINTS:-"64:$EACH;8:$EACH;1:$EACH"}
    BUDGET_S=${BUDGET_S:-430}
    TIMEOUT_S=${TIMEOUT_S:-530}
    REPEATS=${REPEATS:-1}
    CORRECTNESS=${CORRECTNESS-int8,w4a8-progressive}  # empty: no correctness stage
    PAIRED=${PAIRED:-0}                                # rounds of runs in turn per batch (dtq-bench --paired)
    GEMM_M=${GEMM_M-}                                  # e.g. 32768,4096,512: add the GEMM table
    SKIP=()
    [[ -z "$CORRECTNESS" ]] && SKIP+=(correctness)
    [[ -z "$GEMM_M" ]] && SKIP+=(gemms)
    STAGE_ARGS=(--skip "$(IFS=,; echo "${SKIP[*]}")" --correctness "$CORRECTNESS")
    [[ -n "$GEMM_M" ]] && STAGE_ARGS+=(--gemm-m "$GEMM_M" --gemm-timing cudagraph)
    if [[ $DRY == 1 ]]; then  # the same points on the CPU (tiny model, batches 3 / 2 / 1, no GEMM stage)
        POINTS=$(sed -E "s/(^|;)64:/\\13:/g; s/(^|;)8:/\\12:/g" <<< "$POINTS")
        ARGS=(--smoke --steps 1 --repeats 1 --paired "$PAIRED" --points "$POINTS" "${STAGE_ARGS[@]}" --budget-s 600)
        LIMIT=900
    else
        python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "FAILED: no CUDA GPU" >&2; exit 1; }
        nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > "$OUT/check.txt" || true
        ARGS=(--points "$POINTS" "${STAGE_ARGS[@]}" --repeats "$REPEATS" --paired "$PAIRED" --budget-s "$BUDGET_S")
        LIMIT=$TIMEOUT_S
    fi
fi
rc=0
timeout "$LIMIT" python -m dtq.tools.bench_engines --out "$OUT/bench_speed.json" "${ARGS[@]}" 2>&1 \
    | tee "$OUT/bench_speed.log" || rc=$?
if [[ $rc -ne 0 ]]; then
    echo "FAILED: dtq-bench exited with $rc (124: killed after ${LIMIT} s); partial JSON in $OUT" | tee -a "$OUT/check.txt" >&2
    exit 1
fi
python - "$OUT/bench_speed.json" <<'PY' | tee -a "$OUT/check.txt"
import json, sys
from dtq.tools.bench_engines import end_to_end_problems
res = json.load(open(sys.argv[1]))
bad, warn = [], []
for prec, c in res.get("correctness", {}).items():
    if isinstance(c, dict) and prec != "model" and not c.get("ok"):
        bad.append(f"correctness {prec}: {c.get('error') or c}")
for key in ("gemms",):
    g = res.get(key)
    if isinstance(g, dict) and "error" in g:
        bad.append(f"{key}: {g['error']}")
for m, g in list(res.get("gemms_more", {}).items()) + [(res.get("gemms", {}).get("M"), res.get("gemms", {}))]:
    for lname, row in (g or {}).items():
        for k, v in (row.items() if isinstance(row, dict) else []):
            if isinstance(v, dict) and "error" in v:
                bad.append(f"GEMM M={m} {lname} {k}: {v['error']}")
e2e_bad, e2e_warn = end_to_end_problems(res)
bad += e2e_bad
warn += e2e_warn
for k, v in res.get("summary", {}).get("targets", {}).items():
    print(f"target {k}: measured {v.get('measured')} (target {v.get('target')}): {'met' if v.get('met') else 'NOT met'}")
for w in warn:
    print("SKIPPED", w)
for b in bad:
    print("FAILED", b)
for k, v in res.get("summary", {}).get("epilogue_fusion_speedup", {}).items():
    print(f"fused epilogues vs unfused {k}: {v}x images/s")
print("CHECK", "FAILED" if bad else "OK", f"({len(bad)} failures, {len(warn)} skipped points)")
sys.exit(1 if bad else 0)
PY
