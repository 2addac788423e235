#!/usr/bin/env bash
# The full measurement protocol of issue 3 on a GPU machine (both models, 64 images, 50 and 100
# steps, guidance 1.5). Run from the repository root with dtq importable (pip install -e . or
# PYTHONPATH pointing at a directory whose `dtq` is this checkout), the reference model at
# ../shared/reference/dit-s2-fmnist/model.safetensors (or pass its path as $1).
set -euo pipefail
REF=${1:-../shared/reference/dit-s2-fmnist/model.safetensors}
python benchmarks/calib_table.py --model dit-tiny-fmnist --device cuda --batch-size 128 \
    --out benchmarks/results/tiny_gpu
python benchmarks/calib_table.py --ckpt "$REF" --device cuda --batch-size 128 \
    --out benchmarks/results/dit-s2-fmnist_gpu
