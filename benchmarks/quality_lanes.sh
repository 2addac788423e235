# Sourced from the repository root by the GPU quality scripts (run_quality_levers_gpu.sh,
# run_quality_followup_gpu.sh) with the default output folder's name as $1: the checkout and FID
# checks, the GPU or DRY=1 (CPU dry run: tiny model for both, a few steps) settings, the two models,
# and the helpers every lane uses:
#   stamp NAME CMD...   runs CMD into $O/log/NAME.log and appends "NAME rc seconds" to $T
#   S NAME CKPT ARGS... one FID set (1000 per class) through dtq-sample into $O/s/NAME
#   SF NAME CKPT ARGS.. S, then the set's FID into $O/fid/NAME.json (with READY=FILE set, once FILE
#                       exists: the reference statistics are computed once, not by racing scorers)
#   stage_ready         with STAGE_WAIT=FILE, waits for FILE (benchmarks/device_setup.sh's "unpacked"
#                       marker), then checks the staged inputs; so a script can start the tiny model's
#                       work while the later staging calls still travel. Without it, they are checked here.
source benchmarks/use_checkout.sh
DEV=cuda; PER=1000; S50=50; S100=100; SMALL=""; FIDLIM=""; ENGINE="--dtype bf16 --compile --cuda-graphs"
[ "${DRY:-0}" = 1 ] && { DEV=cpu; PER=2; S50=3; S100=4; SMALL="--cali-steps 3 --cali-n 2 --eval-n 2 --recon-iters 5"
  FIDLIM="--reference-limit 200 --limit 100"; ENGINE="--dtype bf16"; }
O=${OUT:-$PWD/$1}; mkdir -p $O/r $O/s $O/log; T=$O/times.tsv
TINY=$PWD/runtime/assets/dit-tiny-fmnist/model.safetensors; REF=${REF_CKPT:-}; [ "${DRY:-0}" = 1 ] && REF=$TINY
stage_ready() {
  [ -n "${STAGE_WAIT:-}" ] && { until [ -f "$STAGE_WAIT" ]; do sleep 2; done; echo "staged: $STAGE_WAIT"; }
  source benchmarks/need_fid.sh
  [ -f "$REF" ] || { echo "set REF_CKPT to the reference DiT-S/2 checkpoint (../shared/reference/dit-s2-fmnist/model.safetensors)" >&2; exit 2; }
}
[ -n "${STAGE_WAIT:-}" ] || stage_ready
stamp() { local name=$1; shift; local t0=$(date +%s); "$@" > $O/log/$name.log 2>&1; local rc=$?
  printf '%s\t%s\t%s\n' $name $rc $(( $(date +%s) - t0 )) >> $T; return $rc; }
S() { local name=$1 ck=$2; shift 2; stamp s-$name python -m dtq.tools.sample --ckpt $ck --per-class $PER --batch-size 1000 --device $DEV --no-progress "$@" --out $O/s/$name; }
CAL="python -m dtq.tools.calibrate --device $DEV --eval-n 8 --no-progress $SMALL"
FID="python -m dtq.tools.fid_cli --reference fmnist-test --device $DEV --batch-size 500 --no-progress $FIDLIM"
SF() { S "$@" || return; [ -z "${READY:-}" ] || until [ -f $READY ]; do sleep 2; done
  mkdir -p $O/fid; stamp fid-$1 $FID --samples $O/s/$1/samples.npz --out $O/fid/$1.json; }
# the recipes: W8A8 per token + GPTQ (sessions 6-9); session 8's W4A8 (group 32, per-token
# activations, GPTQ, smoothquant alpha 0.5 without fc2 smoothing); W4B, session 9's (GPTQ act-order, DiTAS)
W8="--method ditas --act-granularity token --gptq"
W4="--method smoothquant --alpha 0.5 --no-smooth-fc2 --precision w4a8 --weight-granularity group32 --gptq --act-granularity token"
W4B="--method ditas --precision w4a8 --weight-granularity group32 --gptq --gptq-act-order --act-granularity token"
