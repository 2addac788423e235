#!/usr/bin/env bash
# Issue #13 attention run, one H200, at most ~9 minutes (150 s + 380 s limits; BUDGET_S 240 cuts the tail): SageAttention (INT8 QK^T, fp16 PV, head dim
# 72 zero-padded to 96) against bf16 SDPA, first per kernel at DiT-XL/2's attention shape
# (benchmarks/attention_bench.py: time from CUDA graphs, accuracy vs fp32 attention, torch's
# experimental FP8 attention tried too), then end to end (dtq-bench: each engine with and without
# "-sage", its correctness stage's attention-sage check first).
#
#   OUT=/path/to/out benchmarks/run_attention_gpu.sh            # the GPU run (OUT defaults to ./attention_out)
#   OUT=/tmp/dry benchmarks/run_attention_gpu.sh --dry-run      # the same pipeline on the CPU (torch reference)
#
# sageattention: taken from the environment, else installed (no network, no deps) from the wheel
# in .stage/wheels/ (git-ignored; `pip download --no-deps sageattention==1.0.6 -d .stage/wheels`;
# the device tool must carry .stage/wheels). Separate from run_speed_gpu.sh so that the two runs can
# be scheduled (and edited) independently.
# Writes $OUT/attention.json (+ .log), $OUT/bench_attention.json (+ .log) and $OUT/check.txt.
# Exit 1 when the attention check fails, a sage kernel or an end-to-end point raised, or a step timed out.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/attention_out}
mkdir -p "$OUT"
source benchmarks/use_checkout.sh
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
    esac
done
if ! python -c "import sageattention" 2>/dev/null; then
    WHEEL=$(ls .stage/wheels/sageattention-1.0.6-*.whl 2>/dev/null | head -1 || true)
    if [[ -n "$WHEEL" ]]; then
        SITE=$(mktemp -d)
        python -m pip install -q --no-deps --no-index --no-compile --target "$SITE" "$WHEEL"
        export PYTHONPATH="$PYTHONPATH:$SITE"
    elif [[ $DRY == 0 ]]; then
        echo "FAILED: sageattention is not importable and no wheel is in .stage/wheels" \
             "(pip download --no-deps sageattention==1.0.6 -d .stage/wheels)" | tee "$OUT/check.txt" >&2
        exit 1
    fi
fi

# end-to-end points in priority order (the budget cuts the tail): each engine next to its -sage twin
POINTS=${POINTS:-"64:int8,int8-sage,fp8,fp8-sage;8:int8,int8-sage;1:int8,int8-sage;64:bf16-compile,bf16-compile-sage"}
if [[ $DRY == 1 ]]; then
    KERNEL_ARGS=(--smoke)
    POINTS=$(sed -E "s/(^|;)64:/\\13:/g; s/(^|;)8:/\\12:/g" <<< "$POINTS")
    E2E_ARGS=(--smoke --steps 1 --repeats 1 --budget-s 900)
    KLIMIT=300 ELIMIT=1200
else
    python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "FAILED: no CUDA GPU" >&2; exit 1; }
    nvidia-smi --query-gpu=name,driver_version --format=csv > "$OUT/check.txt" || true
    KERNEL_ARGS=(--batches 128,16,2)
    E2E_ARGS=(--repeats 1 --budget-s "${BUDGET_S:-240}")
    KLIMIT=${KERNEL_TIMEOUT_S:-150} ELIMIT=${TIMEOUT_S:-380}  # together under the device tool's 600 s a command
fi
rc=0
timeout "$KLIMIT" python benchmarks/attention_bench.py --out "$OUT/attention.json" "${KERNEL_ARGS[@]}" \
    > /dev/null 2> "$OUT/attention.log" || rc=$?
cat "$OUT/attention.log"
[[ $rc -eq 0 ]] || echo "FAILED: attention_bench.py exited with $rc (124: killed after ${KLIMIT} s)" | tee -a "$OUT/check.txt" >&2
rc2=0
timeout "$ELIMIT" python -m dtq.tools.bench_engines --out "$OUT/bench_attention.json" --points "$POINTS" \
    --skip gemms --correctness attention-sage "${E2E_ARGS[@]}" 2>&1 | tee "$OUT/bench_attention.log" || rc2=$?
[[ $rc2 -eq 0 ]] || echo "FAILED: dtq-bench exited with $rc2 (124: killed after ${ELIMIT} s)" | tee -a "$OUT/check.txt" >&2
python - "$OUT" "$rc" "$rc2" <<'PY' | tee -a "$OUT/check.txt"
import json, os, sys
from dtq.tools.bench_engines import end_to_end_problems
out, bad, warn = sys.argv[1], [], []
if sys.argv[2] != "0" or sys.argv[3] != "0":
    bad.append("a step exited non-zero (above)")
path = os.path.join(out, "attention.json")
for row in (json.load(open(path))["batches"] if os.path.exists(path) else []):
    for name, r in row.items():
        if not isinstance(r, dict):
            continue
        if "error" in r:
            (bad if name.startswith("sage") else warn).append(f"kernel {name} rows {row['batch_rows']}: {r['error']}")
        else:
            print(f"kernel {name:15s} rows {row['batch_rows']:4d}: {r['ms']:.4f} ms, x{r.get('speedup_vs_sdpa_auto')} "
                  f"vs sdpa_auto, {r['sqnr_db']} dB / cosine {r['cosine']} vs fp32")
path = os.path.join(out, "bench_attention.json")
res = json.load(open(path)) if os.path.exists(path) else {}
check = res.get("correctness", {}).get("attention-sage")
if not (isinstance(check, dict) and check.get("ok")):
    bad.append(f"correctness attention-sage: {check}")
e2e_bad, e2e_warn = end_to_end_problems(res)
bad += e2e_bad
warn += e2e_warn
for key, a in res.get("summary", {}).get("attention_ablation", {}).items():
    print(f"end to end {key}: {a['images_per_s']} img/s vs {a['sdpa_images_per_s']} with SDPA "
          f"(x{a['speedup_vs_sdpa']}; forward {a['forward_ms']} vs {a['sdpa_forward_ms']} ms)")
for w in warn:
    print("SKIPPED/UNAVAILABLE", w)
for b in bad:
    print("FAILED", b)
print("CHECK", "FAILED" if bad else "OK", f"({len(bad)} failures, {len(warn)} skipped or unavailable)")
sys.exit(1 if bad else 0)
PY
