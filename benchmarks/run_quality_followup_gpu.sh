#!/usr/bin/env bash
# Issue #12, the follow-up of session 8's H200 batch (benchmarks/results/quality_s8), about 12 GPU-minutes:
#  1. FID of the 11 sets session 8 sampled and could not score (its FID stage lacked an import). They
#     travel in the staged tar as samples.tgz (SAMPLES_TGZ).
#  2. W4A8 with GPTQ's act-order and DiTAS balancing (W4B below), the same options on both models: on
#     the tiny model (CPU, the "medium" sets of w4a8_levers_tiny.py) act-order took held-out SQNR from
#     36.76 to 37.80 dB and DiTAS + act-order to 38.04 (docs/results/quality_s8.md). Plain on both
#     models; on the tiny model (the one short of the W4A8 goal: +2.5 FID in session 6; the reference
#     was +0.22) also + 10% INT8 mixed precision, and + block reconstruction at 50 and 100 steps
#     through the engine, with the simulation of that recipe beside it (same seeds: per-image PSNR in
#     pairs.json).
#  3. FP8 E4M3 W8A8 with GPTQ (its rounding errors compensated, as for INT4) on the reference, next to
#     session 6's FP8 per token without it (+3.35 FID, 27.12 dB).
#  4. The reconstruction fix (AdaRound starts at GPTQ's exact codes) on session 8's options: tiny
#     W4A8 + reconstruction, next to session 8's tiny-w4-eng-50 (same options, no reconstruction).
# Every set is scored as soon as it is sampled ($OUT/fid/NAME.json), so a batch cut short by the
# device's time limit still returns what it finished. With STAGE_WAIT=/tmp/stage/unpacked the script
# can start from the first staging call: the tiny model's lanes need nothing staged and run while the
# later parts travel; FID, the reference model and session 8's sets wait for the marker.
#   REF_CKPT=... SAMPLES_TGZ=/tmp/stage/samples.tgz DTQ_FMNIST_DIR=... OUT=/tmp/f benchmarks/run_quality_followup_gpu.sh
#   DRY=1 OUT=/tmp/fdry benchmarks/run_quality_followup_gpu.sh   # CPU dry run: tiny model for both, a few steps
# Writes $OUT/times.tsv, $OUT/log/, $OUT/fid_s8.json, $OUT/fid/, $OUT/pairs.json and $OUT/keep/
# (recipe.json, sensitivity.json of each recipe).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
source benchmarks/quality_lanes.sh quality_followup_out  # DEV, O, T, TINY, REF, stamp, stage_ready, S, SF, FID, CAL, ENGINE, W4, W4B
SENS="python -m dtq.tools.sensitivity --device $DEV --eval-n 8 --no-progress --budget 0.1 --high-precision int8 $SMALL"
SIMPROTO="--dtype bf16 --autocast --compile --cuda-graphs"; [ "${DRY:-0}" = 1 ] && SIMPROTO="--dtype bf16 --autocast"
FP8G="--method ditas --precision fp8 --act-granularity token --gptq"
mkdir -p $O/fid; READY=$O/fid/reference-ready; rm -f $READY
# 2, 4: the tiny model (its first calibration samples the calibration set, the others reuse it)
stamp cal-tiny-w4b $CAL --ckpt $TINY $W4B --out $O/r/tiny-w4b
TCD="--cali-data $O/r/tiny-w4b/calibration_set.safetensors"
SF tiny-w4b-eng-50 $TINY --steps $S50 --backend recipe:$O/r/tiny-w4b $ENGINE &
stamp cal-tiny-w4bmixrec $SENS --ckpt $TINY $TCD $W4B --reconstruct --out $O/r/tiny-w4bmixrec && \
  ( SF tiny-w4bmixrec-eng-50 $TINY --steps $S50 --backend recipe:$O/r/tiny-w4bmixrec $ENGINE &
    SF tiny-w4bmixrec-eng-100 $TINY --steps $S100 --backend recipe:$O/r/tiny-w4bmixrec $ENGINE &
    SF tiny-w4bmixrec-sim-50 $TINY --steps $S50 --backend sim:$O/r/tiny-w4bmixrec $SIMPROTO; wait ) &
stamp cal-tiny-w4bmix $SENS --ckpt $TINY $TCD $W4B --out $O/r/tiny-w4bmix && \
  SF tiny-w4bmix-eng-50 $TINY --steps $S50 --backend recipe:$O/r/tiny-w4bmix $ENGINE &
stamp cal-tiny-w4rec $CAL --ckpt $TINY $TCD $W4 --reconstruct --out $O/r/tiny-w4rec && \
  SF tiny-w4rec-eng-50 $TINY --steps $S50 --backend recipe:$O/r/tiny-w4rec $ENGINE &
# what needs the staged inputs: the reference statistics first (cached in $DTQ_CACHE_DIR, so the
# scorers do not race to write them), then session 8's sets (1) and the reference model (2, 3)
stage_ready
[ "${DRY:-0}" = 1 ] || stamp fid-reference $FID --make-reference
touch $READY
if [ -f "${SAMPLES_TGZ:-}" ]; then
  ( mkdir -p $O/s8 && tar xzf $SAMPLES_TGZ -C $O/s8 && \
    stamp fid-s8 $FID --samples "$(ls $O/s8/s/*/samples.npz | paste -sd,)" --out $O/fid_s8.json ) &
else echo "SAMPLES_TGZ not set or missing: session 8's sets are not scored" >&2; fi
stamp cal-ref-w4b $CAL --ckpt $REF $W4B --out $O/r/ref-w4b && \
  SF ref-w4b-eng-50 $REF --steps $S50 --backend recipe:$O/r/ref-w4b $ENGINE &
stamp cal-ref-fp8g $CAL --ckpt $REF $FP8G --out $O/r/ref-fp8g && \
  SF ref-fp8g-eng-50 $REF --steps $S50 --backend recipe:$O/r/ref-fp8g $ENGINE &
wait
P() { echo "$O/s/$1/samples.npz:$O/s/$2/samples.npz"; }
stamp pairs python benchmarks/pair_psnr.py --out $O/pairs.json --limit 2000 --pair "$(P tiny-w4bmixrec-eng-50 tiny-w4bmixrec-sim-50)"
for d in $O/r/*/; do n=$(basename $d); mkdir -p $O/keep/$n; cp $d/recipe.json $d/sensitivity.json $O/keep/$n/ 2>/dev/null; done
echo JOB-DONE >> $T
