#!/usr/bin/env bash
# Issues #12 / #13: the W4A8 recipe that meets #12's goal on both models (W4B + mix: g32, GPTQ act-order,
# DiTAS, per-token activations, 10% of weight parameters at INT8) sampled through the fast two-level
# W4A8 kernel (--w4a8-kernel progressive, per-token scales since session 10), against the group-scale
# engine's FID of the same options (reference +0.53 / +0.55, tiny +0.73 / +0.79 at 50 / 100 steps,
# docs/results/quality_s9.md, quality_s10.md). The weights are requantized to integer group scales at
# build time, so this is what the fast kernel costs in images. About 10 GPU-minutes:
#  tiny: calibrate, 50 steps (starts at once: the tiny model is in the repository);
#  reference: calibrate, 50 and 100 steps (after the staged inputs are there).
#   REF_CKPT=... DTQ_FMNIST_DIR=... OUT=/tmp/p benchmarks/run_quality_progressive_gpu.sh
#   DRY=1 OUT=/tmp/pdry benchmarks/run_quality_progressive_gpu.sh   # CPU dry run: the tiny model, a few steps
# STAGE_WAIT=/tmp/stage/unpacked lets the tiny lane start before the staged inputs are there.
# Writes $OUT/times.tsv, $OUT/log/, $OUT/fid/, $OUT/r/ (recipes) and JOB-DONE at the end of times.tsv.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
source benchmarks/quality_lanes.sh quality_progressive_out  # DEV, O, T, TINY, REF, stamp, stage_ready, S, SF, FID, ENGINE, W4B
SENS="python -m dtq.tools.sensitivity --device $DEV --eval-n 8 --no-progress --budget 0.1 --high-precision int8 $SMALL"
PROG="$ENGINE --w4a8-kernel progressive"
mkdir -p $O/fid; READY=$O/fid/reference-ready; rm -f $READY
# LANES (default all three): which sets to make, e.g. LANES="tiny ref50" fits one 10-minute device call
want() { [[ " ${LANES:-tiny ref50 ref100} " == *" $1 "* ]]; }
want tiny && { stamp cal-tiny-w4bmix $SENS --ckpt $TINY $W4B --out $O/r/tiny-w4bmix && \
  SF tiny-w4bmix-prog-50 $TINY --steps $S50 --backend recipe:$O/r/tiny-w4bmix $PROG & }
# the reference statistics once (cached in $DTQ_CACHE_DIR: the scorers do not race to write them)
stage_ready
[ "${DRY:-0}" = 1 ] || stamp fid-reference $FID --make-reference
touch $READY
{ want ref50 || want ref100; } && stamp cal-ref-w4bmix $SENS --ckpt $REF $W4B --out $O/r/ref-w4bmix && \
  ( want ref50 && SF ref-w4bmix-prog-50 $REF --steps $S50 --backend recipe:$O/r/ref-w4bmix $PROG &
    want ref100 && SF ref-w4bmix-prog-100 $REF --steps $S100 --backend recipe:$O/r/ref-w4bmix $PROG; wait ) &
wait
echo JOB-DONE >> $T
