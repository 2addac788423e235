#!/usr/bin/env bash
# Can cuBLASLt (through nvmath-python) run DiT-XL/2's FP8 fc1 as one GEMM with bias + GELU and an E4M3
# output, faster than _scaled_mm + dtq's Inductor GELU/quantize pass? (benchmarks/cublaslt_epilogue_bench.py)
# The wheels (cp312, ~20 MB, no network on the GPU machine) sit in .nstage/wheels/ (git-ignored through
# .git/info/exclude), so the device call must carry them:
#   run(carry=[".nstage"], command="OUT=$OUT bash benchmarks/run_cublaslt_gpu.sh")
# nvmath_python 1.0.0, cuda_bindings 13.5.0, cuda_core 1.2.2, cuda_pathfinder 1.9.1; --no-deps: numpy and
# the CUDA 13 libraries (cuBLAS as torch cu130's nvidia/cu13 pip packages) come from the torch environment.
# One pip call into one --target folder (a second call into the same folder can skip shared folders,
# docs/engines.md session 11), skipped when already installed. Env: TIMEOUT_S (240), BENCH_ARGS (extra flags).
set -uo pipefail
: "${OUT:?set OUT}"
cd "$(dirname "$0")/.."
NV=/tmp/nvsite
if [ ! -d $NV/nvmath ]; then
  ls .nstage/wheels/*.whl >/dev/null 2>&1 || { echo "no wheels in .nstage/wheels: carry .nstage"; exit 1; }
  echo "installing $(ls .nstage/wheels/*.whl | wc -l) wheels into $NV"
  python -m pip install -q --no-deps --target $NV .nstage/wheels/*.whl || exit 1
fi
export PYTHONPATH=$NV${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${TIMEOUT_S:-240}" python benchmarks/cublaslt_epilogue_bench.py --out "$OUT/cublaslt.json" ${BENCH_ARGS:-} \
  2>&1 | tee "$OUT/cublaslt.log"
echo "exit ${PIPESTATUS[0]}"
