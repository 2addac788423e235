#!/usr/bin/env bash
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/pkg:/tmp/stage/site DTQ_FMNIST_DIR=/tmp/stage/fmnist DTQ_CACHE_DIR=/tmp/cache
cd /tmp/repo
O=/tmp/q2; mkdir -p $O/r $O/s $O/log; T=$O/times.tsv
REF=/tmp/stage/ref/model.safetensors
stamp() { local name=$1; shift; local t0=$(date +%s); "$@" > $O/log/$name.log 2>&1; local rc=$?
  printf '%s\t%s\t%s\n' $name $rc $(( $(date +%s) - t0 )) >> $T; return $rc; }
CAL="python -m dtq.tools.calibrate --device cuda --eval-n 8 --no-progress --ckpt $REF"
ENGINE="--dtype bf16 --compile --cuda-graphs"; PROTO="--dtype bf16 --autocast --compile --cuda-graphs"
W4="--method smoothquant --alpha 0.5 --no-smooth-fc2 --precision w4a8 --weight-granularity group128 --gptq"
S() { local name=$1; shift; stamp s-$name python -m dtq.tools.sample --ckpt $REF --per-class 1000 --batch-size 1000 --device cuda --no-progress --steps 50 "$@" --out $O/s/$name; }
stamp cal-w4-tok $CAL $W4 --act-granularity token --out $O/r/w4-tok
CD="--cali-data $O/r/w4-tok/calibration_set.safetensors"
( S w4-tok-eng --backend recipe:$O/r/w4-tok $ENGINE ) &
stamp cal-w4-recon $CAL $CD $W4 --reconstruct --recon-iters 300 --out $O/r/w4-recon & P1=$!
stamp cal-w4-all $CAL $CD $W4 --act-granularity token --rotate-fc2 --reconstruct --recon-iters 300 --out $O/r/w4-all & P2=$!
wait $P1 $P2
( S w4-recon-eng --backend recipe:$O/r/w4-recon $ENGINE ) &
( S w4-all-eng --backend recipe:$O/r/w4-all $ENGINE ) &
wait
echo SETS-DONE >> $T
