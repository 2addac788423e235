#!/usr/bin/env bash
# Issue #12, the follow-up of session 8's H200 batch (benchmarks/results/quality_s8), about 12 GPU-minutes:
#  1. FID of the 11 sets session 8 sampled and could not score (its FID stage lacked an import). They
#     travel in the staged tar as samples.tgz (SAMPLES_TGZ); scored first, so they come back whatever
#     happens later.
#  2. W4A8 with GPTQ's act-order and DiTAS balancing (W4B below), the same options on both models: on
#     the tiny model (CPU, the "medium" sets of w4a8_levers_tiny.py) act-order took held-out SQNR from 36.76 to
#     37.80 dB and DiTAS + act-order to 38.04 (docs/results/quality_s8.md). Plain on the tiny model;
#     + 10% INT8 mixed precision + block reconstruction on both, 50 and 100 steps through the engine.
#  3. The reconstruction fix (AdaRound starts at GPTQ's exact codes) on session 8's options: tiny
#     W4A8 + reconstruction, next to session 8's tiny-w4-eng-50 (same options, no reconstruction).
#  4. FID of the new sets.
#   REF_CKPT=... SAMPLES_TGZ=/tmp/stage/samples.tgz DTQ_FMNIST_DIR=... OUT=/tmp/f benchmarks/run_quality_followup_gpu.sh
#   DRY=1 OUT=/tmp/fdry benchmarks/run_quality_followup_gpu.sh   # CPU dry run: tiny model for both, a few steps
# Writes $OUT/times.tsv, $OUT/log/, $OUT/fid_s8.json, $OUT/fid.json and $OUT/keep/ (recipe.json,
# sensitivity.json of each recipe).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
source benchmarks/quality_lanes.sh quality_followup_out  # DEV, O, T, TINY, REF, stamp, S, CAL, ENGINE, W4, FIDLIM
FID="python -m dtq.tools.fid_cli --reference fmnist-test --device $DEV --batch-size 500 --no-progress $FIDLIM"
MIXREC="python -m dtq.tools.sensitivity --device $DEV --eval-n 8 --no-progress --budget 0.1 --high-precision int8 --reconstruct $SMALL"
W4B="--method ditas --precision w4a8 --weight-granularity group32 --gptq --gptq-act-order --act-granularity token"
# 1: session 8's sets (the reference statistics land in $DTQ_CACHE_DIR for stage 4)
if [ -f "${SAMPLES_TGZ:-}" ]; then
  ( mkdir -p $O/s8 && tar xzf $SAMPLES_TGZ -C $O/s8 && \
    stamp fid-s8 $FID --samples "$(ls $O/s8/s/*/samples.npz | paste -sd,)" --out $O/fid_s8.json ) &
else echo "SAMPLES_TGZ not set or missing: session 8's sets are not scored" >&2; fi
# 2, 3: calibrations (each model's first run samples its calibration set, the rest reuse it), then lanes
stamp cal-tiny-w4b $CAL --ckpt $TINY $W4B --out $O/r/tiny-w4b &
stamp cal-ref-w4b $CAL --ckpt $REF $W4B --out $O/r/ref-w4b &
wait
TCD="--cali-data $O/r/tiny-w4b/calibration_set.safetensors"; RCD="--cali-data $O/r/ref-w4b/calibration_set.safetensors"
S tiny-w4b-eng-50 $TINY --steps $S50 --backend recipe:$O/r/tiny-w4b $ENGINE &
stamp cal-ref-w4bmixrec $MIXREC --ckpt $REF $RCD $W4B --out $O/r/ref-w4bmixrec && \
  ( S w4bmixrec-eng-50 $REF --steps $S50 --backend recipe:$O/r/ref-w4bmixrec $ENGINE & S w4bmixrec-eng-100 $REF --steps $S100 --backend recipe:$O/r/ref-w4bmixrec $ENGINE; wait ) &
stamp cal-tiny-w4bmixrec $MIXREC --ckpt $TINY $TCD $W4B --out $O/r/tiny-w4bmixrec && \
  ( S tiny-w4bmixrec-eng-50 $TINY --steps $S50 --backend recipe:$O/r/tiny-w4bmixrec $ENGINE & S tiny-w4bmixrec-eng-100 $TINY --steps $S100 --backend recipe:$O/r/tiny-w4bmixrec $ENGINE; wait ) &
stamp cal-tiny-w4rec $CAL --ckpt $TINY $TCD $W4 --reconstruct --out $O/r/tiny-w4rec && S tiny-w4rec-eng-50 $TINY --steps $S50 --backend recipe:$O/r/tiny-w4rec $ENGINE &
wait
echo SETS-DONE >> $T
# 4
stamp fid $FID --samples "$(ls $O/s/*/samples.npz | paste -sd,)" --out $O/fid.json
for d in $O/r/*/; do n=$(basename $d); mkdir -p $O/keep/$n; cp $d/recipe.json $d/sensitivity.json $O/keep/$n/ 2>/dev/null; done
echo JOB-DONE >> $T
