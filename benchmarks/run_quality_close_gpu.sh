#!/usr/bin/env bash
# Issue #12, what session 9's batch (docs/results/quality_s9.md) left open, on the reference DiT-S/2,
# about 15 GPU-minutes. Three streams side by side, each in priority order; every set is scored as
# soon as it is sampled ($OUT/fid/NAME.json), so a batch cut short still returns what it finished.
#  A. W4B + mix (W4A8 g32, GPTQ act-order, DiTAS, per token, 10% of weight parameters at INT8) at 100
#     steps through the engine: the one cell of the W4A8 goal not measured (50 steps: +0.53). Then its
#     simulation at 50 steps, beside the engine's 9.247.
#  B. W8A8 mix (ditas per token + GPTQ, 10% at W8A16; 50 steps: +0.102, 100: +0.06) at seed 1, paired
#     with FP at seed 1 (stream C): a second draw of the same difference, to see how far +0.10 moves
#     with the seed. Then the same recipe through the engine under --autocast (fp32 residual stream:
#     worth ~0.1 without the mix) and its simulation, both at seed 0.
#  C. FP at seed 1, 50 steps (the baseline of B's seed-1 set).
#   REF_CKPT=... DTQ_FMNIST_DIR=... OUT=/tmp/c benchmarks/run_quality_close_gpu.sh
#   DRY=1 OUT=/tmp/cdry benchmarks/run_quality_close_gpu.sh   # CPU dry run: the tiny model, a few steps
# STAGE_WAIT=/tmp/stage/unpacked lets it start before the staged inputs are there (it waits for them).
# Writes $OUT/times.tsv, $OUT/log/, $OUT/fid/, $OUT/r/ (recipes) and JOB-DONE at the end of times.tsv.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
source benchmarks/quality_lanes.sh quality_close_out  # DEV, O, T, TINY, REF, stamp, stage_ready, S, SF, FID, CAL, ENGINE, W8, W4B
SENS="python -m dtq.tools.sensitivity --device $DEV --eval-n 8 --no-progress --budget 0.1 $SMALL"
PROTO="--dtype bf16 --autocast --compile --cuda-graphs"; [ "${DRY:-0}" = 1 ] && PROTO="--dtype bf16 --autocast"
stage_ready
[ "${DRY:-0}" = 1 ] || stamp fid-reference $FID --make-reference
# A
( stamp cal-ref-w4bmix $SENS --ckpt $REF $W4B --high-precision int8 --out $O/r/ref-w4bmix && \
  SF ref-w4bmix-eng-100 $REF --steps $S100 --backend recipe:$O/r/ref-w4bmix $ENGINE && \
  SF ref-w4bmix-sim-50 $REF --steps $S50 --backend sim:$O/r/ref-w4bmix $PROTO ) &
# B
( stamp cal-ref-w8mix $SENS --ckpt $REF $W8 --high-precision w8a16 --out $O/r/ref-w8mix && \
  SF ref-w8mix-eng-50-seed1 $REF --steps $S50 --seed 1 --backend recipe:$O/r/ref-w8mix $ENGINE && \
  SF ref-w8mix-amp-50 $REF --steps $S50 --backend recipe:$O/r/ref-w8mix $PROTO && \
  SF ref-w8mix-sim-50 $REF --steps $S50 --backend sim:$O/r/ref-w8mix $PROTO ) &
# C
SF ref-fp-50-seed1 $REF --steps $S50 --seed 1 $PROTO &
wait
echo JOB-DONE >> $T
