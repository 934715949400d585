"""Shared fixtures and helpers of the dsg_ext Python tests.

Devices: every device-parametrised test runs on "cpu"; the "cuda" variant runs only when a GPU is
present and the extension was built with its CUDA kernels, and compares CUDA with the CPU
implementation (and with the float64 reference). Without a GPU it is skipped.
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `import reference` from the test modules

import dsg_ext  # noqa: E402

try:
    from hypothesis import settings

    settings.register_profile("dsg", max_examples=30, deadline=None, derandomize=True, print_blob=True)
    settings.load_profile("dsg")
except ImportError:  # pragma: no cover
    pass


def cuda_usable() -> bool:
    return torch.cuda.is_available() and dsg_ext.cuda_ops_built()


requires_cuda = pytest.mark.skipif(
    not cuda_usable(),
    reason="needs a CUDA GPU and a dsg_ext build with the CUDA kernels",
)

# "cpu" always; "cuda" only where a GPU and the CUDA kernels are there. The CUDA-only tests
# (test_cuda_matches_cpu, mixed devices, ...) carry `requires_cuda` and are reported as skipped.
DEVICES = ["cpu"] + (["cuda"] if cuda_usable() else [])
LOW_PRECISION = [torch.float16, torch.bfloat16]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    yield


def to_dev(device, *tensors):
    """A tuple of copies of the tensors on device (non-tensors pass through)."""
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors)


def offset_view(x: torch.Tensor) -> torch.Tensor:
    """x's values as a view in x's memory format (channels_last or contiguous) that starts one element
    into its storage: dense, but not on a 16-byte boundary, so the CUDA kernels cannot take their vector
    path and must fall back. Gradients flow back to x."""
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    order, back = ((0, 2, 3, 1), (0, 3, 1, 2)) if cl else (tuple(range(x.dim())),) * 2
    dense = x.permute(*order)  # the storage order
    view = torch.cat([dense.new_zeros(1), dense.reshape(-1)])[1:].view(dense.shape).permute(*back)
    assert view.storage_offset() == 1 and view.is_contiguous(
        memory_format=torch.channels_last if cl else torch.contiguous_format)
    return view


def cpu64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| with both as float64 on the CPU (NaN positions must agree)."""
    a, b = cpu64(a), cpu64(b)
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN positions differ"
    keep = ~torch.isnan(a)
    if not keep.any():
        return 0.0
    return (a[keep] - b[keep]).abs().max().item()


def assert_lowprec_bound(ours, ref64, plain_lowprec, factor: float = 2.0, atol: float = 0.0, what: str = ""):
    """Error of our low-precision result vs the fp64 reference is at most `factor` times the error of
    the plain-PyTorch computation in the same low precision (plus atol)."""
    ours_err = max_err(ours, ref64)
    torch_err = max_err(plain_lowprec, ref64)
    assert ours_err <= factor * torch_err + atol, (
        f"{what}: error {ours_err:.3g} of the op exceeds {factor} x {torch_err:.3g} (plain PyTorch) + {atol:.3g}"
    )
    return ours_err, torch_err


def assert_matches_cpu(device, fn, *args, atol=0.0, rtol=0.0):
    """On a non-CPU device, fn(args on device) must match fn(args on cpu) (the CPU implementation)."""
    if device == "cpu":
        return
    out_dev = fn(*to_dev(device, *args))
    out_cpu = fn(*args)
    if isinstance(out_dev, torch.Tensor):
        out_dev, out_cpu = (out_dev,), (out_cpu,)
    for a, b in zip(out_dev, out_cpu):
        torch.testing.assert_close(a.cpu(), b, atol=atol, rtol=rtol, equal_nan=True)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_isolated(code: str, timeout: float = 120.0):
    """Runs `code` in a fresh Python process (for inputs that may crash the interpreter, e.g. a
    segfault, which would otherwise take the whole test session down) and asserts it exits cleanly.
    The code can `import dsg_ext, reference`; print() a case name before each step to locate a crash."""
    import subprocess
    import textwrap

    env = dict(os.environ)
    subdirs = sorted(e.path for e in os.scandir(TESTS_DIR) if e.is_dir() and not e.name.startswith((".", "_")))
    env["PYTHONPATH"] = os.pathsep.join([TESTS_DIR, *subdirs, REPO_ROOT, env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"isolated run exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}"
        f"\n--- stderr ---\n{proc.stderr[-3000:]}"
    )
    return proc
