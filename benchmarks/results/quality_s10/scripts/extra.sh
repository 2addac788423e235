#!/usr/bin/env bash
# Run inline on the H200 after benchmarks/run_quality_close_gpu.sh's JOB-DONE, in the same lease
# (session 10), on the recipe that batch wrote to /tmp/c/r/ref-w8mix: W8A8 mix through the engine
# under --autocast at 100 steps (seed 0) and at 50 steps with seed 1. The sample folders' configs did
# not come back (only the FID JSONs, times.tsv and logs did), hence no sample_configs/ for these two.
cd /tmp/repo && export PYTHONPATH=/tmp/stage/site:/tmp/site DTQ_FMNIST_DIR=/tmp/stage/fmnist DTQ_CACHE_DIR=/tmp/cache \
  REF_CKPT=/tmp/stage/ref/model.safetensors OUT=/tmp/c && timeout 440 bash -c 'source benchmarks/quality_lanes.sh x; P="--dtype bf16 --autocast --compile --cuda-graphs"; SF ref-w8mix-amp-100 $REF --steps 100 --backend recipe:$O/r/ref-w8mix $P & SF ref-w8mix-amp-50-seed1 $REF --steps 50 --seed 1 --backend recipe:$O/r/ref-w8mix $P & wait'
