#!/usr/bin/env bash
# Session 6 quality batch 1 (issue #12, existing code): per-token W8A8 (INT8 with and without GPTQ;
# FP8) on the reference DiT-S/2, the per-token W4A8 recipe's simulation beside last session's engine
# set, the second architecture (built-in tiny DiT: per-token W4A8 / W8A8 engine sets), then
# block-reconstruction time on DiT-XL/2 (random weights, alone on the GPU). Runs from /tmp/repo.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/pkg:/tmp/stage/site:/tmp/site DTQ_FMNIST_DIR=/tmp/stage/fmnist DTQ_CACHE_DIR=/tmp/cache
cd /tmp/repo
O=/tmp/q1; mkdir -p $O/r $O/s $O/log; T=$O/times.tsv
REF=/tmp/stage/ref/model.safetensors; TINY=/tmp/repo/runtime/assets/dit-tiny-fmnist/model.safetensors
stamp() { local name=$1; shift; local t0=$(date +%s); "$@" > $O/log/$name.log 2>&1; local rc=$?
  printf '%s\t%s\t%s\n' $name $rc $(( $(date +%s) - t0 )) >> $T; return $rc; }
CAL="python -m dtq.tools.calibrate --device cuda --eval-n 8 --no-progress"
ENGINE="--dtype bf16 --compile --cuda-graphs"; PROTO="--dtype bf16 --autocast --compile --cuda-graphs"
W4="--method smoothquant --alpha 0.5 --no-smooth-fc2 --precision w4a8 --weight-granularity group128 --gptq --act-granularity token"
W8="--method ditas --act-granularity token"
S() { local name=$1 ck=$2; shift 2; stamp s-$name python -m dtq.tools.sample --ckpt $ck --per-class 1000 --batch-size 1000 --device cuda --no-progress "$@" --out $O/s/$name; }
sq() { grep -o '"all": [0-9.]*' $O/log/cal-$1.log | head -1 | cut -d' ' -f2; }
stamp cal-ref-w8tok $CAL --ckpt $REF $W8 --out $O/r/ref-w8tok
CD="--cali-data $O/r/ref-w8tok/calibration_set.safetensors"
stamp cal-ref-w8tok-gptq $CAL --ckpt $REF $CD $W8 --gptq --out $O/r/ref-w8tok-gptq &
stamp cal-ref-fp8tok $CAL --ckpt $REF $CD --method ditas --precision fp8 --act-granularity token --out $O/r/ref-fp8tok &
stamp cal-ref-w4tok $CAL --ckpt $REF $CD $W4 --out $O/r/ref-w4tok &
( stamp cal-tiny-w8tok $CAL --ckpt $TINY $W8 --out $O/r/tiny-w8tok
  stamp cal-tiny-w4tok $CAL --ckpt $TINY --cali-data $O/r/tiny-w8tok/calibration_set.safetensors $W4 --out $O/r/tiny-w4tok ) &
wait
BEST=ref-w8tok; python -c "import sys; sys.exit(not float('$(sq ref-w8tok-gptq)' or 0) > float('$(sq ref-w8tok)' or 0))" && BEST=ref-w8tok-gptq
echo "best W8A8 per-token: $BEST ($(sq ref-w8tok) / $(sq ref-w8tok-gptq))" >> $T
( S w8tok-eng-50 $REF --steps 50 --backend recipe:$O/r/$BEST $ENGINE; S w8tok-eng-100 $REF --steps 100 --backend recipe:$O/r/$BEST $ENGINE ) &
( S fp8tok-eng-50 $REF --steps 50 --backend recipe:$O/r/ref-fp8tok $ENGINE; S w4tok-sim-50 $REF --steps 50 --backend sim:$O/r/ref-w4tok $PROTO ) &
( S tiny-fp-50 $TINY --steps 50 $PROTO; S tiny-w4tok-eng-50 $TINY --steps 50 --backend recipe:$O/r/tiny-w4tok $ENGINE
  S tiny-w8tok-eng-50 $TINY --steps 50 --backend recipe:$O/r/tiny-w8tok $ENGINE
  S tiny-fp-100 $TINY --steps 100 $PROTO; S tiny-w4tok-eng-100 $TINY --steps 100 --backend recipe:$O/r/tiny-w4tok $ENGINE ) &
wait
echo SETS-DONE >> $T
SETS=$(ls $O/s/*/samples.npz | paste -sd,)
stamp fid python -m dtq.tools.fid_cli --samples "$SETS" --reference fmnist-test --device cuda --batch-size 500 --out $O/fid.json
stamp recon-xl timeout 200 python benchmarks/recon_time.py --device cuda --depth 2
cp $O/log/recon-xl.log $O/recon_time_xl.json 2>/dev/null
echo JOB-DONE >> $T
