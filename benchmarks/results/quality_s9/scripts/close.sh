# Run inline on the H200 after benchmarks/run_quality_followup_gpu.sh had finished (JOB-DONE), in the same
# lease, from /tmp/repo (the tree of commit fc79446) as:
#   PYTHONPATH=/tmp/stage/site:/tmp/site DTQ_FMNIST_DIR=/tmp/stage/fmnist DTQ_CACHE_DIR=/tmp/cache \
#     REF_CKPT=/tmp/stage/ref/model.safetensors OUT=/tmp/f setsid nohup bash /tmp/close.sh
# It reuses the follow-up batch's calibration sets. ref-w4bmix-eng-100 did not finish before the
# session's device time ran out.
set -uo pipefail; export PYTHONUNBUFFERED=1
source benchmarks/quality_lanes.sh x
FID="python -m dtq.tools.fid_cli --reference fmnist-test --device cuda --batch-size 500 --no-progress"
SENS="python -m dtq.tools.sensitivity --device cuda --eval-n 8 --no-progress --budget 0.1"
W4B="--method ditas --precision w4a8 --weight-granularity group32 --gptq --gptq-act-order --act-granularity token"
W8="--method ditas --act-granularity token --gptq"
SF() { S "$@" && stamp fid-$1 $FID --samples $O/s/$1/samples.npz --out $O/fid/$1.json; }
RCD="--cali-data $O/r/ref-w4b/calibration_set.safetensors"; TCD="--cali-data $O/r/tiny-w4b/calibration_set.safetensors"
stamp cal-ref-w4bmix $SENS --high-precision int8 --ckpt $REF $RCD $W4B --out $O/r/ref-w4bmix && (SF ref-w4bmix-eng-50 $REF --steps 50 --backend recipe:$O/r/ref-w4bmix $ENGINE & SF ref-w4bmix-eng-100 $REF --steps 100 --backend recipe:$O/r/ref-w4bmix $ENGINE; wait) &
stamp cal-tiny-w8mix $SENS --high-precision w8a16 --ckpt $TINY $TCD $W8 --out $O/r/tiny-w8mix && (SF tiny-w8mix-eng-50 $TINY --steps 50 --backend recipe:$O/r/tiny-w8mix $ENGINE & SF tiny-w8mix-eng-100 $TINY --steps 100 --backend recipe:$O/r/tiny-w8mix $ENGINE; wait) &
SF tiny-w4bmix-eng-100 $TINY --steps 100 --backend recipe:$O/r/tiny-w4bmix $ENGINE &
wait; echo CLOSE-DONE >> $T
