#!/usr/bin/env bash
# The one prepared GPU check (see ../shared/GPU.md): build with all cores for the card at hand, run
# the CUDA tests, then the GPU benchmark. Logs and JSON go to $OUT; a short table is printed last.
#   device run:  bash bench/gpu_check.sh        (timeout_s ~ 540)
# The device machine has no hypothesis/expecttest; carry them as wheels in .whl/ if wanted:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl hypothesis sortedcontainers attrs expecttest
set -uo pipefail
OUT=${OUT:-/tmp/dsg_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} DSG_EXT_CUDA=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
timeout 200 python3 -m pytest python_tests -q -x -k cuda -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
timeout 300 python3 bench/gpu_bench.py --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/bench.log" | tail -40
