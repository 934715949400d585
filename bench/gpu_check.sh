#!/usr/bin/env bash
# The one prepared GPU check (see ../shared/GPU.md): build with all cores for the card at hand, run
# the CUDA-vs-CPU checks of every op and the CUDA-event timings (ops, full synthesis iterations) in
# separate processes, then the CUDA tests. Logs and JSON go to $OUT; a short table is printed.
#   device run:  bash bench/gpu_check.sh        (carry .whl, timeout_s ~ 480)
#   TESTS="-k cuda_graph" limits the tests; TESTS=none skips them; PARTS="checks" runs only the checks
#   (default "errors checks timings"; "errors" = bench/gpu_errors.py --diagnose, ~1 min; "sweep" = the
#   statistic ops at synthesis' bf16 channels_last shape and ResNet-50 b256 synthesis, once per CUDA
#   tile size in SWEEP_WORK (default "novec 4 8 16 32"; DSG_EXT_CUDA_WORK, ~25 s each; novec = the
#   scalar kernels, DSG_EXT_CUDA_VEC=0): pick the defaults, and whether the vector kernels go on).
# The device machine has no hypothesis/expecttest (the tests import them); carry them as wheels:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl hypothesis sortedcontainers attrs expecttest safetensors tqdm
set -uo pipefail
OUT=${OUT:-/tmp/dsg_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} DSG_EXT_CUDA=1
# The 16-byte vector kernels are off by default until verified here: checks, tests and timings run
# with them on (DSG_EXT_CUDA_VEC=0 bash bench/gpu_check.sh for the scalar kernels).
export DSG_EXT_CUDA_VEC=${DSG_EXT_CUDA_VEC:-1}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
for part in ${PARTS:-errors checks timings}; do
  if [ "$part" = errors ]; then  # does a C++ check error raise, or kill the process? (+ toolchain facts)
    timeout 200 python3 bench/gpu_errors.py --diagnose >"$OUT/errors.log" 2>&1
    echo "errors rc $? after $(( $(date +%s) - start )) s"; grep -E "rc |mapped|ldd|built by|\+\+ " "$OUT/errors.log"
    continue
  fi
  if [ "$part" = sweep ]; then
    for w in ${SWEEP_WORK:-novec 4 8 16 32}; do  # novec: default tile sizes, vectorised channels_last path off
      if [ "$w" = novec ]; then env_set="DSG_EXT_CUDA_VEC=0"; else env_set="DSG_EXT_CUDA_VEC=1 DSG_EXT_CUDA_WORK=$w"; fi
      env $env_set timeout 120 python3 bench/gpu_bench.py --only sweep --out "$OUT/sweep_$w.json" \
        >"$OUT/sweep_$w.log" 2>&1
      echo "sweep $env_set rc $? after $(( $(date +%s) - start )) s"
    done
    python3 - "$OUT" <<'PY'
import glob, json, sys
print(f"{'work':>5s} {'workload':30s} {'impl':30s} {'ms':>8s} {'x floor':>8s}")
key = lambda p: (lambda w: -1 if w == "novec" else int(w))(p.rsplit("_", 1)[1][:-5])
for path in sorted(glob.glob(sys.argv[1] + "/sweep_*.json"), key=key):
    for r in json.load(open(path))["timings"]:
        print(f"{path.rsplit('_', 1)[1][:-5]:>5s} {r['workload'][:30]:30s} {r['impl'][:30]:30s} {r['median_ms']:8.3f}"
              f" {r['ratio_to_floor']:8.2f}")
PY
    continue
  fi
  timeout ${BENCH_TIMEOUT:-240} python3 bench/gpu_bench.py --only $part --out "$OUT/gpu_$part.json" ${BENCH_ARGS:-} \
    >"$OUT/$part.log" 2>&1
  echo "$part rc $? after $(( $(date +%s) - start )) s"
done
if [ "${TESTS:-}" != none ]; then
  timeout ${TEST_TIMEOUT:-150} python3 -m pytest python_tests -q ${TESTS:--k cuda} --maxfail=25 -p no:cacheprovider \
    >"$OUT/tests.log" 2>&1
  echo "tests rc $? after $(( $(date +%s) - start )) s"
  tail -25 "$OUT/tests.log" | grep -E "FAILED|ERROR|passed|failed|Error" | head -30
fi
grep -E "^FAIL|Fatal Python|Segmentation|File \"" "$OUT"/checks.log | head -20
grep -E "Error|Fatal Python|Segmentation" "$OUT"/timings.log | head -10
sed -n '/^correctness/p' "$OUT"/checks.log
sed -n '/^card .*copy bandwidth/,$p' "$OUT"/timings.log
