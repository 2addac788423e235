#!/usr/bin/env bash
# Issue #13's quality deliverable: FID-10k of the reference DiT-S/2 through the engines the speed table
# calls fastest, each beside its simulation (same recipe, seeds and protocol), so a speed-up is not
# bought with images. Three streams side by side, engine first in each, every set scored as soon as it
# is sampled ($OUT/fid/NAME.json), so a run cut short still returns what it finished:
#  A. static FP8 (ditas + MSE, session 5's recipe: +3.41 through the cuBLAS engine then): the default
#     FP8 engine now (Triton GEMMs with fused epilogues, the LayerNorm + quantize pass), then `sim:`.
#  B. static W4A8 g128 + GPTQ (session 9's fastest-W4A8 recipe, +2.60 then) through the two-level
#     kernel (--w4a8-kernel progressive, staged to INT8, norm pass), then `sim:`.
#  C. static INT8 (ditas + MSE, session 5: +0.29 at 50 steps) through the default INT8 engine, then `sim:`.
# FP at 50 steps, seed 0 is 8.720 (sessions 4, 9 and 12 measured it with this protocol); not re-sampled.
#   REF_CKPT=... DTQ_FMNIST_DIR=... OUT=/tmp/f benchmarks/run_quality_fastest_gpu.sh
#   DRY=1 OUT=/tmp/fdry benchmarks/run_quality_fastest_gpu.sh   # CPU dry run: the tiny model, a few steps
# STAGE_WAIT=/tmp/stage/unpacked lets it start before the staged inputs are there (it waits for them).
# Writes $OUT/times.tsv, $OUT/log/, $OUT/fid/, $OUT/r/ (recipes) and JOB-DONE at the end of times.tsv.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
source benchmarks/quality_lanes.sh quality_fastest_out  # DEV, O, T, REF, stamp, stage_ready, SF, FID, CAL, ENGINE
PROTO="--dtype bf16 --autocast --compile --cuda-graphs"; [ "${DRY:-0}" = 1 ] && PROTO="--dtype bf16 --autocast"
W4G128="--method smoothquant --alpha 0.5 --no-smooth-fc2 --precision w4a8 --weight-granularity group128 --gptq"
stage_ready
mkdir -p $O/fid; READY=$O/fid/reference-ready; rm -f $READY
[ "${DRY:-0}" = 1 ] || stamp fid-reference $FID --make-reference
touch $READY
# A
( stamp cal-ref-fp8 $CAL --ckpt $REF --method ditas --precision fp8 --act-search mse --out $O/r/ref-fp8 && \
  SF ref-fp8-eng-50 $REF --steps $S50 --backend recipe:$O/r/ref-fp8 $ENGINE && \
  SF ref-fp8-sim-50 $REF --steps $S50 --backend sim:$O/r/ref-fp8 $PROTO ) &
# B
( stamp cal-ref-w4a8g128 $CAL --ckpt $REF $W4G128 --out $O/r/ref-w4a8g128 && \
  SF ref-w4a8g128-prog-50 $REF --steps $S50 --backend recipe:$O/r/ref-w4a8g128 $ENGINE --w4a8-kernel progressive && \
  SF ref-w4a8g128-sim-50 $REF --steps $S50 --backend sim:$O/r/ref-w4a8g128 $PROTO ) &
# C
( stamp cal-ref-int8 $CAL --ckpt $REF --method ditas --act-search mse --out $O/r/ref-int8 && \
  SF ref-int8-eng-50 $REF --steps $S50 --backend recipe:$O/r/ref-int8 $ENGINE && \
  SF ref-int8-sim-50 $REF --steps $S50 --backend sim:$O/r/ref-int8 $PROTO ) &
wait
echo JOB-DONE >> $T
