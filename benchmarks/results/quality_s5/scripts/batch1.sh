#!/usr/bin/env bash
# Session 5 batch 1 (existing code): FP8 and 100-step rows, W4A8 sim beside the engine, W8A8+GPTQ,
# and the second architecture (built-in tiny DiT, hidden 128, depth 6). Runs from /tmp/repo.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/pkg:/tmp/stage/site DTQ_FMNIST_DIR=/tmp/stage/fmnist DTQ_CACHE_DIR=/tmp/cache
cd /tmp/repo
O=/tmp/q1; mkdir -p $O/r $O/s $O/log; T=$O/times.tsv
REF=/tmp/stage/ref/model.safetensors; TINY=dit-tiny-fmnist
stamp() { local name=$1; shift; local t0=$(date +%s); "$@" > $O/log/$name.log 2>&1; local rc=$?
  printf '%s\t%s\t%s\n' $name $rc $(( $(date +%s) - t0 )) >> $T; return $rc; }
CAL="python -m dtq.tools.calibrate --device cuda --eval-n 8 --no-progress"
ENGINE="--dtype bf16 --compile --cuda-graphs"; PROTO="--dtype bf16 --autocast --compile --cuda-graphs"
W4="--method smoothquant --alpha 0.5 --no-smooth-fc2 --precision w4a8 --weight-granularity group128"
S() { local name=$1 ck=$2; shift 2; stamp s-$name python -m dtq.tools.sample --ckpt $ck --per-class 1000 --batch-size 1000 --device cuda --no-progress "$@" --out $O/s/$name; }
for m in ref tiny; do
  ck=$REF; [ $m = tiny ] && ck=$TINY
  stamp cal-$m-w8a8 $CAL --ckpt $ck --method ditas --act-search mse --out $O/r/$m-w8a8
  CD="--cali-data $O/r/$m-w8a8/calibration_set.safetensors"
  stamp cal-$m-w8a8-gptq $CAL --ckpt $ck $CD --method ditas --act-search mse --gptq --out $O/r/$m-w8a8-gptq
  stamp cal-$m-w4a8-gptq-lr $CAL --ckpt $ck $CD $W4 --gptq --lowrank-rank 32 --out $O/r/$m-w4a8-gptq-lr
done
stamp cal-ref-fp8 $CAL --ckpt $REF --cali-data $O/r/ref-w8a8/calibration_set.safetensors --method ditas --precision fp8 --act-search mse --out $O/r/ref-fp8
stamp cal-tiny-w4a8 $CAL --ckpt $TINY --cali-data $O/r/tiny-w8a8/calibration_set.safetensors $W4 --out $O/r/tiny-w4a8
( S fp-100 $REF --steps 100 $PROTO; S w8a8-eng-100 $REF --steps 100 --backend recipe:$O/r/ref-w8a8 $ENGINE ) &
( S fp8-eng-50 $REF --steps 50 --backend recipe:$O/r/ref-fp8 $ENGINE; S w4a8-gptq-lr-sim-50 $REF --steps 50 --backend sim:$O/r/ref-w4a8-gptq-lr $PROTO
  S w8a8-gptq-engamp-50 $REF --steps 50 --backend recipe:$O/r/ref-w8a8-gptq $PROTO ) &
( S tiny-fp-50 $TINY --steps 50 $PROTO; S tiny-w8a8-eng-50 $TINY --steps 50 --backend recipe:$O/r/tiny-w8a8 $ENGINE
  S tiny-w4a8-eng-50 $TINY --steps 50 --backend recipe:$O/r/tiny-w4a8 $ENGINE
  S tiny-w4a8-gptq-lr-eng-50 $TINY --steps 50 --backend recipe:$O/r/tiny-w4a8-gptq-lr $ENGINE
  S tiny-w8a8-gptq-engamp-50 $TINY --steps 50 --backend recipe:$O/r/tiny-w8a8-gptq $PROTO ) &
wait
SETS=$(ls $O/s/*/samples.npz | paste -sd,)
stamp fid python -m dtq.tools.fid_cli --samples "$SETS" --reference fmnist-test --device cuda --batch-size 500 --out $O/fid.json
echo JOB-DONE >> $T
