#!/usr/bin/env bash
# Issue #12 on one GPU: calibrate the reference DiT-S/2's recipes with dtq-calibrate / dtq-sensitivity,
# sample FID-10k sets with dtq-sample, the way a user runs them: through the quantized engine
# (--backend recipe:DIR, bf16, --compile --cuda-graphs), with the simulation (sim:DIR under the
# reference protocol: fp32 weights, bf16 autocast) and the engine under that same autocast beside
# the main rows. dtq-sample draws the same noise for every backend, so the sets compare image by
# image (benchmarks/pair_psnr.py) as well as by FID (dtq-fid, Inception on the GPU).
#
#   CKPT=.../model.safetensors DTQ_FMNIST_DIR=<t10k files> O=/tmp/q bash benchmarks/run_quality_gpu.sh
#
# Knobs for a CPU rehearsal: CKPT, O, PER_CLASS, S50, S100, DEV, CALI (extra dtq-calibrate args),
# ENGINE / PROTO (dtq-sample options of the two kinds of run), FIDARGS (extra dtq-fid args).
# Writes $O/times.tsv (each step's exit code and seconds), $O/log/*.log, $O/s/<set>/samples.npz,
# $O/pairs.json, $O/fid.json. On one H200 the calibrations take 2.9 min and each 50-step set 1.8-3.3
# min with two streams sharing the GPU, so the whole list needs ~25 min: more than one 10-minute
# call (session 4 ran it in the background and scored the first eight sets; docs/results/quality_s4.md).
set -uo pipefail
export PYTHONUNBUFFERED=1
CKPT=${CKPT:?checkpoint}; O=${O:-/tmp/q}; PER_CLASS=${PER_CLASS:-1000}
S50=${S50:-50}; S100=${S100:-100}; DEV=${DEV:-cuda}; CALI=${CALI:-}
mkdir -p "$O/r" "$O/s" "$O/log"
T="$O/times.tsv"
stamp() {  # stamp NAME CMD...: run, log, and record exit code and seconds
    local name=$1; shift; local t0; t0=$(date +%s.%N)
    "$@" > "$O/log/$name.log" 2>&1; local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")" >> "$T"
    [ $rc -eq 0 ] || echo "FAILED $name (rc $rc): $(tail -1 "$O/log/$name.log")"
    return $rc
}
CAL="python -m dtq.tools.calibrate --ckpt $CKPT --device $DEV --eval-n 8 --no-progress $CALI"
SAMPLE="python -m dtq.tools.sample --ckpt $CKPT --per-class $PER_CLASS --batch-size 1000 --device $DEV --no-progress"
ENGINE=${ENGINE:-"--dtype bf16 --compile --cuda-graphs"}          # the engine as a user runs it for speed
PROTO=${PROTO:-"--dtype bf16 --autocast --compile --cuda-graphs"}  # fp32 weights, bf16 matmuls (reference protocol)
FIDARGS=${FIDARGS:-}

# 1. recipes; the first run's calibration set is shared by the others (--cali-data)
stamp cal-w8a8 $CAL --method ditas --act-search mse --out $O/r/w8a8
CD="--cali-data $O/r/w8a8/calibration_set.safetensors"
W4="--method smoothquant --alpha 0.5 --no-smooth-fc2 --precision w4a8 --weight-granularity group128"
stamp cal-w4a8 $CAL $CD $W4 --out $O/r/w4a8
stamp cal-w4a8-gptq $CAL $CD $W4 --gptq --out $O/r/w4a8-gptq
stamp cal-w4a8-gptq-lr $CAL $CD $W4 --gptq --lowrank-rank 32 --out $O/r/w4a8-gptq-lr
stamp cal-w4a8-lr $CAL $CD $W4 --lowrank-rank 32 --out $O/r/w4a8-lr
stamp cal-fp8 $CAL $CD --method ditas --precision fp8 --act-search mse --out $O/r/fp8
stamp cal-w4a8-gptq-mixed25 python -m dtq.tools.sensitivity --ckpt $CKPT --device $DEV --eval-n 8 --no-progress $CALI \
    $CD $W4 --gptq --high-precision int8 --budget 0.25 --out $O/r/w4a8-gptq-mixed25
grep -H "held-out" $O/log/cal-*.log

# 2. samples: two streams side by side; the most needed sets first
s() { local name=$1; shift; stamp "s-$name" $SAMPLE "$@" --out $O/s/$name; }
(
  s fp-$S50 --steps $S50 $PROTO
  s w8a8-eng-$S50 --steps $S50 --backend recipe:$O/r/w8a8 $ENGINE
  s w8a8-sim-$S50 --steps $S50 --backend sim:$O/r/w8a8 $PROTO
  s w8a8-engamp-$S50 --steps $S50 --backend recipe:$O/r/w8a8 $PROTO
  s fp-bf16-$S50 --steps $S50 $ENGINE
  s fp8-eng-$S50 --steps $S50 --backend recipe:$O/r/fp8 $ENGINE
  s fp-$S100 --steps $S100 $PROTO
  s w8a8-eng-$S100 --steps $S100 --backend recipe:$O/r/w8a8 $ENGINE
) &
(
  for r in w4a8-gptq-lr w4a8-gptq-mixed25 w4a8 w4a8-gptq w4a8-lr; do
    s $r-eng-$S50 --steps $S50 --backend recipe:$O/r/$r $ENGINE
  done
  s w4a8-gptq-lr-sim-$S50 --steps $S50 --backend sim:$O/r/w4a8-gptq-lr $PROTO
  s w4a8-gptq-lr-eng-$S100 --steps $S100 --backend recipe:$O/r/w4a8-gptq-lr $ENGINE
) &
wait
# 3. image-level agreement of same-seed sets, then FID of every set
P() { echo "$O/s/$1/samples.npz:$O/s/$2/samples.npz"; }
stamp pairs python benchmarks/pair_psnr.py --out $O/pairs.json --pair "$(P w8a8-eng-$S50 w8a8-sim-$S50)" \
    --pair "$(P w8a8-engamp-$S50 w8a8-sim-$S50)" --pair "$(P fp-bf16-$S50 fp-$S50)" \
    --pair "$(P w8a8-sim-$S50 fp-$S50)" --pair "$(P w8a8-eng-$S50 fp-$S50)" \
    --pair "$(P w4a8-gptq-lr-eng-$S50 w4a8-gptq-lr-sim-$S50)" --pair "$(P w4a8-gptq-lr-sim-$S50 fp-$S50)"
SETS=$(ls $O/s/*/samples.npz | paste -sd,)
stamp fid python -m dtq.tools.fid_cli --samples "$SETS" --reference fmnist-test --device $DEV --batch-size 500 \
    --precision-recall $FIDARGS --out $O/fid.json
cat $T
echo JOB-DONE
