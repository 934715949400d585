"""The emulated-AVX2 runs the tests share: onnxruntime under QEMU as a Haswell (AVX2, no AVX-512, no
VNNI; dsg_ext.export.x86_kernels.run_as_cpu). .ci/run installs qemu-user; without it the tests skip."""

from __future__ import annotations

from dsg_ext.export.x86_kernels import qemu, run_as_cpu

QEMU = qemu()


def run_as_avx2_cpu(path, x, _tmp_path=None):
    return run_as_cpu(path, x)
