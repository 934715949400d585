#!/usr/bin/env bash
# The one prepared GPU check (see ../shared/GPU.md): build with all cores for the card at hand, run
# the GPU benchmark (CUDA-vs-CPU checks of every op, then CUDA-event timings of the ops and of full
# synthesis iterations), then the CUDA tests. Logs and JSON go to $OUT; a short table is printed.
#   device run:  bash bench/gpu_check.sh        (carry .whl, timeout_s ~ 480)
# The device machine has no hypothesis/expecttest (the tests import them); carry them as wheels:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl hypothesis sortedcontainers attrs expecttest safetensors tqdm
set -uo pipefail
OUT=${OUT:-/tmp/dsg_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} DSG_EXT_CUDA=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
timeout ${BENCH_TIMEOUT:-270} python3 bench/gpu_bench.py --out "$OUT/gpu_bench.json" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
echo "bench rc $? after $(( $(date +%s) - start )) s"
timeout ${TEST_TIMEOUT:-150} python3 -m pytest python_tests -q -k cuda --maxfail=25 -p no:cacheprovider \
  >"$OUT/tests.log" 2>&1
echo "tests rc $? after $(( $(date +%s) - start )) s"
grep -E "^(FAIL|ERR)" "$OUT/bench.log" | head -20
grep -E "Error|error:" "$OUT/bench.log" | grep -v "^ok" | head -10
tail -25 "$OUT/tests.log" | grep -E "FAILED|ERROR|passed|failed|Error" | head -30
sed -n '/^card /,$p' "$OUT/bench.log"
