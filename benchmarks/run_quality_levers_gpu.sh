#!/usr/bin/env bash
# Issue #12 quality levers on one H200 (prepared and dry-run on the CPU in session 7, when no GPU was
# lent; about 15 minutes of GPU time estimated from session 6's timings):
#  - W8A8 INT8 per token + GPTQ on the reference DiT-S/2: the engine under bf16 autocast (fp32 weights,
#    LayerNorm and residual stream: does the engine's bf16 arithmetic cost the missing ~0.1 FID?), and
#    mixed precision (dtq-sensitivity: the 10% of weight parameters whose W8A16 buys the most held-out
#    SQNR keep bf16 activations) on the default bf16 engine.
#  - W4A8 with generic levers on BOTH models, the same options for each (nothing tuned to either):
#    group 32 instead of 128, per-token activations, GPTQ, then mixed precision (10% of the weight
#    parameters at INT8, picked by the sensitivity sweep), then block reconstruction of the mixed recipe
#    (dtq-sensitivity --reconstruct: the sweep ranks unreconstructed layers, the picked mix is
#    reconstructed once). Intermediate tiny-model recipes are sampled too, so each lever's FID share is
#    measured.
#  - FID through the fastest W4A8 engine (issue #13): a static g128 recipe on the two-level kernel.
# FP FIDs are not re-sampled: same code path, seeds and protocol as sessions 4-6 (reference 8.72 / 8.17
# at 50 / 100 steps; tiny 8.34 / 7.90; tiny FP gave 8.34 in both s5 and s6).
#
#   REF_CKPT=/path/dit-s2-fmnist/model.safetensors DTQ_FMNIST_DIR=... OUT=/tmp/q benchmarks/run_quality_levers_gpu.sh
#   DRY=1 OUT=/tmp/qdry benchmarks/run_quality_levers_gpu.sh   # CPU dry run: tiny model for both, a few steps
# Writes $OUT/times.tsv (name, exit code, seconds per step), $OUT/log/, $OUT/fid.json and
# $OUT/keep/ (each recipe's recipe.json and sensitivity.json, without tensors).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
source benchmarks/quality_lanes.sh quality_levers_out  # DEV, O, T, TINY, REF, stamp, S, CAL, ENGINE, W8, W4
SENS="python -m dtq.tools.sensitivity --device $DEV --eval-n 8 --no-progress --budget 0.1 $SMALL"
PROTO="--dtype bf16 --autocast --compile --cuda-graphs"; [ "${DRY:-0}" = 1 ] && PROTO="--dtype bf16 --autocast"
W4STATIC="--method smoothquant --alpha 0.5 --no-smooth-fc2 --precision w4a8 --weight-granularity group128 --gptq"
# A: calibration (the first of each model samples its calibration set; the rest reuse it)
stamp cal-ref-w8 $CAL --ckpt $REF $W8 --out $O/r/ref-w8 &
stamp cal-tiny-w4 $CAL --ckpt $TINY $W4 --out $O/r/tiny-w4 &
wait
RCD="--cali-data $O/r/ref-w8/calibration_set.safetensors"; TCD="--cali-data $O/r/tiny-w4/calibration_set.safetensors"
# B: lanes, each starting as soon as its recipe exists
( S w8-amp-50 $REF --steps $S50 --backend recipe:$O/r/ref-w8 $PROTO; S w8-amp-100 $REF --steps $S100 --backend recipe:$O/r/ref-w8 $PROTO ) &
stamp sens-ref-w8mix $SENS --ckpt $REF $RCD $W8 --high-precision w8a16 --out $O/r/ref-w8mix && \
  ( S w8mix-eng-50 $REF --steps $S50 --backend recipe:$O/r/ref-w8mix $ENGINE & S w8mix-eng-100 $REF --steps $S100 --backend recipe:$O/r/ref-w8mix $ENGINE; wait ) &
stamp sens-ref-w4mix $SENS --ckpt $REF $RCD $W4 --high-precision int8 --out $O/r/ref-w4mix && \
  stamp cal-ref-w4mixrec $SENS --ckpt $REF $RCD $W4 --high-precision int8 --reconstruct --out $O/r/ref-w4mixrec && \
  ( S w4mixrec-eng-50 $REF --steps $S50 --backend recipe:$O/r/ref-w4mixrec $ENGINE & S w4mixrec-eng-100 $REF --steps $S100 --backend recipe:$O/r/ref-w4mixrec $ENGINE; wait ) &
( S tiny-w4-eng-50 $TINY --steps $S50 --backend recipe:$O/r/tiny-w4 $ENGINE
  stamp cal-tiny-w4rec $CAL --ckpt $TINY $TCD $W4 --reconstruct --out $O/r/tiny-w4rec && S tiny-w4rec-eng-50 $TINY --steps $S50 --backend recipe:$O/r/tiny-w4rec $ENGINE ) &
stamp sens-tiny-w4mix $SENS --ckpt $TINY $TCD $W4 --high-precision int8 --out $O/r/tiny-w4mix && \
  ( S tiny-w4mix-eng-50 $TINY --steps $S50 --backend recipe:$O/r/tiny-w4mix $ENGINE &
    stamp cal-tiny-w4mixrec $SENS --ckpt $TINY $TCD $W4 --high-precision int8 --reconstruct --out $O/r/tiny-w4mixrec && \
    ( S tiny-w4mixrec-eng-50 $TINY --steps $S50 --backend recipe:$O/r/tiny-w4mixrec $ENGINE; S tiny-w4mixrec-eng-100 $TINY --steps $S100 --backend recipe:$O/r/tiny-w4mixrec $ENGINE ); wait ) &
# the fastest W4A8 engine (issue #13): two-level INT4 GEMMs take static activations, so a static g128 recipe
stamp cal-ref-w4static $CAL --ckpt $REF $RCD $W4STATIC --out $O/r/ref-w4static && \
  S w4static-prog-50 $REF --steps $S50 --backend recipe:$O/r/ref-w4static --w4a8-kernel progressive $ENGINE &
wait
echo SETS-DONE >> $T
SETS=$(ls $O/s/*/samples.npz | paste -sd,)
stamp fid python -m dtq.tools.fid_cli --samples "$SETS" --reference fmnist-test --device $DEV --batch-size 500 --out $O/fid.json
# keep what explains each recipe (not its tensors): recipe.json, sensitivity.json, sample configs
for d in $O/r/*/; do n=$(basename $d); mkdir -p $O/keep/$n; cp $d/recipe.json $d/sensitivity.json $O/keep/$n/ 2>/dev/null; done
echo JOB-DONE >> $T
