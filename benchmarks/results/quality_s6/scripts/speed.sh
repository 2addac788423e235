#!/usr/bin/env bash
# Session 6 speed run (issue #13): the end-to-end points session 5's budget skipped, no correctness
# stage (its autotuning took 222 s last time), alone on the GPU.
export PYTHONPATH=/tmp/site
cd /tmp/repo
CORRECTNESS= POINTS="${POINTS:-64:bf16-compile,int8,int8-unfused,w4a8-progressive,fp8,int8-token,w4a8-progressive-unfused,int8-sage;8:bf16-compile,int8,fp8,w4a16;1:bf16-compile,int8,fp8,w4a16}" \
  BUDGET_S=${BUDGET_S:-380} TIMEOUT_S=${TIMEOUT_S:-470} OUT=${OUT:-/tmp/speed} benchmarks/run_speed_gpu.sh > /tmp/speed.out 2>&1
echo "SPEED-DONE rc=$?" >> /tmp/speed.out
