#!/usr/bin/env bash
# Issue #13 speed measurements, one H200, about 6 minutes: per-GEMM micro-benchmark at M = 32768 /
# 4096 / 512 (DiT-XL/2 batch 64 / 8 / 1 with guidance) and end-to-end dtq-bench at batches 64, 8, 1
# for bf16 torch.compile, FP8, INT8, W4A16, W4A8 (per-tile group rescale) and W4A8-progressive
# (two-level INT4, int32 accumulation over K), all in one process and one run; engine-vs-simulation
# SQNR for the two changed INT4 kernels first.
#
#   OUT=/path/to/out benchmarks/run_speed_gpu.sh            # the GPU run (OUT defaults to ./speed_out)
#   OUT=/tmp/dry benchmarks/run_speed_gpu.sh --dry-run      # CPU dry run of the same pipeline (tiny model)
#
# Writes $OUT/bench_speed.json (every measurement, failures as data, autotuner choices),
# $OUT/bench_speed.log and $OUT/check.txt. Exit 1 when anything failed (a backend that did not build,
# an end-to-end point or GEMM that raised, an engine below its SQNR floor), after writing everything.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/speed_out}
mkdir -p "$OUT"
PKG=$(mktemp -d)
ln -sfn "$PWD" "$PKG/dtq"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
python -c "import dtq, os, sys; sys.exit(os.path.realpath(os.path.dirname(dtq.__file__)) != os.path.realpath('$PWD'))" \
    || { echo "FAILED: dtq does not import from this checkout" >&2; exit 1; }

BACKENDS=bf16-compile,fp8,int8,w4a16,w4a8,w4a8-progressive
if [[ "${1:-}" == "--dry-run" ]]; then
    ARGS=(--smoke --batches 1 --steps 1 --repeats 1 --backends bf16-compile,w4a16,w4a8-progressive
          --correctness w4a8-progressive)
    LIMIT=600
else
    python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || { echo "FAILED: no CUDA GPU" >&2; exit 1; }
    nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > "$OUT/check.txt" || true
    ARGS=(--backends "$BACKENDS" --correctness w4a16,w4a8-progressive --gemm-m 32768,4096,512
          --batches 64,8,1 --repeats 2 --budget-s 330)
    LIMIT=560
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
e2e = res.get("end_to_end", {})
if "error" in e2e:
    bad.append(f"end to end: {e2e['error']}")
for name, entry in e2e.get("backends", {}).items():
    if "error" in entry:
        bad.append(f"{name}: build {entry['error']}")
    for b, r in entry.get("batches", {}).items():
        if "error" in r:
            bad.append(f"{name} batch {b}: {r['error']}")
        elif "skipped" in r:
            warn.append(f"{name} batch {b}: {r['skipped']}")
for k, v in res.get("summary", {}).get("targets", {}).items():
    print(f"target {k}: measured {v.get('measured')} (target {v.get('target')}): {'met' if v.get('met') else 'NOT met'}")
for w in warn:
    print("SKIPPED", w)
for b in bad:
    print("FAILED", b)
print("CHECK", "FAILED" if bad else "OK", f"({len(bad)} failures, {len(warn)} skipped points)")
sys.exit(1 if bad else 0)
PY
