#!/usr/bin/env bash
# Issue #13: the CuTe-DSL libraries measured on the GPU before more kernels are written by hand
# (benchmarks/cute_bench.py: quack-kernels FP8 GEMMs with dtq's epilogues, FlashAttention-4 at head 72).
# The wheels (cp312, ~106 MB: nvidia-cutlass-dsl 4.8.1 + libs, quack-kernels 0.6.5, flash-attn-4
# 4.0.0b36, apache-tvm-ffi, torch-c-dlpack-ext, einops; cute/maybe/: cuda-bindings, cuda-pathfinder,
# protobuf, installed only where the GPU machine lacks them) travel as .cstage/part00, part01:
#   mkdir -p cute/maybe && pip download --no-deps --python-version 3.12 --only-binary=:all: \
#     --platform manylinux_2_28_x86_64 -d cute <the packages above> && \
#   tar c cute | split -b 56M -d -a 2 - .cstage/part && (cd .cstage && ls part?? > manifest)
# call 1 (carry .cstage/manifest, .cstage/part00): STAGE=cstage bash benchmarks/device_setup.sh
# call 2 (carry .cstage/part01): STAGE=cstage bash benchmarks/device_setup.sh --parts-only && OUT=$OUT bash benchmarks/run_cute_gpu.sh
# quack finds its epilogues' sources only under a path with "site-packages" in it (its kernel-cache
# fingerprint treats such code as installed), hence the target folder's name.
set -uo pipefail
: "${OUT:?set OUT}"
cd "$(dirname "$0")/.."
CUTE=/tmp/cute/site-packages
W=/tmp/cstage/cute
if [ ! -d $CUTE/quack ]; then
  extra=()
  python -c "import cuda.bindings.driver" 2>/dev/null || extra+=($W/maybe/cuda_bindings-*.whl $W/maybe/cuda_pathfinder-*.whl)
  python -c "import google.protobuf" 2>/dev/null || extra+=($W/maybe/protobuf-*.whl)
  echo "installing the CuTe wheels (+ ${#extra[@]} missing dependencies)"
  pip install -q --no-deps --target $CUTE $W/*.whl "${extra[@]}" || exit 1
fi
export PYTHONPATH=$CUTE/nvidia_cutlass_dsl/dsl_packages:$CUTE${PYTHONPATH:+:$PYTHONPATH}
export QUACK_CACHE_DIR=/tmp/quack-cache
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv | tee "$OUT/gpu.txt"
timeout "${TIMEOUT_S:-480}" python benchmarks/cute_bench.py --out "$OUT/cute.json" ${CUTE_ARGS:-} 2>&1 | tee "$OUT/cute.log"
echo "exit ${PIPESTATUS[0]}"
