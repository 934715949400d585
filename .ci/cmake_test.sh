#!/usr/bin/env bash
# CMake (LibTorch, no Python at run time) build of the dsg_ext ops: configure a clean build directory,
# build libdsg_ext_ops.so and cpp_tests/, run ctest. Exits nonzero on any failure.
#
#   bash .ci/cmake_test.sh                          # CPU ops (the default)
#   bash .ci/cmake_test.sh -DDSG_EXT_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90   # + CUDA kernels
#
# Extra arguments go to the cmake configure step. Environment: PYTHON (default python; only used
# to locate torch's CMake files), DSG_EXT_CMAKE_BUILD_DIR (default build-cmake), JOBS (default 2).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python}"
BUILD_DIR="${DSG_EXT_CMAKE_BUILD_DIR:-build-cmake}"
JOBS="${JOBS:-2}"

case "$BUILD_DIR" in
  "" | "/" | "." | "..") echo "cmake_test.sh: refusing to use build directory '$BUILD_DIR'" >&2; exit 2 ;;
esac

TORCH_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
echo "cmake_test.sh: torch CMake prefix: $TORCH_PREFIX"

start=$(date +%s)
rm -rf "$BUILD_DIR"
cmake -S . -B "$BUILD_DIR" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" \
  -DDSG_EXT_BUILD_TESTS=ON \
  "$@"
cmake --build "$BUILD_DIR" -j "$JOBS"
(cd "$BUILD_DIR" && ctest --output-on-failure)
echo "cmake_test.sh: passed in $(( $(date +%s) - start )) s"
