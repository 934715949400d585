"""reflect_shift (swing convolution's shift without a padded copy) against an independent float64
reference, torch's reflect padding and a slice, with its adjoint by autograd through that reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import LOW_PRECISION, assert_matches_cpu, cpu64, offset_view, requires_cuda

import dsg_ext.ops as ops

F64 = torch.float64


def reference(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """F.pad(mode="reflect") then the crop at (dy, dx), each shift clamped to +-(size - 1)."""
    h, w = x.shape[2], x.shape[3]
    dy, dx = max(-(h - 1), min(h - 1, dy)), max(-(w - 1), min(w - 1, dx))
    py, px = abs(dy), abs(dx)
    padded = F.pad(x, (px, px, py, py), mode="reflect") if py or px else x
    return padded[..., py + dy:py + dy + h, px + dx:px + dx + w]


SHAPES = [(2, 3, 5, 7), (1, 1, 2, 2), (3, 2, 1, 4), (2, 5, 6, 1), (1, 4, 9, 3), (2, 16, 4, 5)]
SHIFTS = [(0, 0), (1, -1), (-1, 1), (2, 0), (0, -3), (-4, 6), (50, -50)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("shift", SHIFTS, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_reference_fp64(device, shape, shift, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=F64)
    grad = torch.randn(shape, generator=g, dtype=F64)
    if channels_last:  # the backward writes the layout of the gradient it gets
        x, grad = x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
    xr = x.clone().requires_grad_(True)
    want = reference(xr, *shift)
    (gx_want,) = torch.autograd.grad(want, xr, grad)
    xd = x.to(device).requires_grad_(True)
    got = ops.reflect_shift(xd, torch.tensor(shift, device=device))
    (gx,) = torch.autograd.grad(got, xd, grad.to(device))
    assert got.dtype == F64 and got.shape == x.shape
    if channels_last and min(shape[1], shape[2] * shape[3]) > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert gx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cpu64(got), want.detach(), rtol=0, atol=0)
    torch.testing.assert_close(cpu64(gx), gx_want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision(device, dtype, channels_last):
    """The forward is a copy (exact in any dtype); the backward sums at most 3 x 3 terms in fp32 and rounds
    once, so it is within one rounding of the fp64 adjoint."""
    x64 = torch.randn(2, 6, 7, 9, dtype=F64)
    grad64 = torch.randn(2, 6, 7, 9, dtype=F64)
    mf = torch.channels_last if channels_last else torch.contiguous_format
    x = x64.to(dtype).contiguous(memory_format=mf).to(device).requires_grad_(True)
    out = ops.reflect_shift(x, torch.tensor([-1, 1], device=device))
    assert out.dtype == dtype and out.is_contiguous(memory_format=mf)
    torch.testing.assert_close(out.cpu(), reference(x.detach().cpu(), -1, 1), rtol=0, atol=0)
    (gx,) = torch.autograd.grad(out, x, grad64.to(dtype).to(device))
    xr = cpu64(x).requires_grad_(True)
    (gx_want,) = torch.autograd.grad(reference(xr, -1, 1), xr, cpu64(grad64.to(dtype)))
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(cpu64(gx), gx_want, rtol=eps, atol=eps * 4)


def test_non_dense_input_is_read_correctly(device):
    """A transposed or sliced input (neither contiguous nor channels_last) and one offset in its storage."""
    base = torch.randn(2, 3, 8, 10, dtype=F64, device=device)
    for x in (base.transpose(2, 3), base[:, :, 1:7, ::2], offset_view(base)):
        got = ops.reflect_shift(x, torch.tensor([1, -1], device=device))
        torch.testing.assert_close(cpu64(got), reference(cpu64(x), 1, -1), rtol=0, atol=0)


def test_gradcheck_and_double_backward(device):
    x = torch.randn(2, 3, 5, 4, dtype=F64, device=device, requires_grad=True)
    for shift in ((1, -1), (-2, 3), (0, 0)):
        s = torch.tensor(shift, device=device)
        assert torch.autograd.gradcheck(lambda t: ops.reflect_shift(t, s), (x,))
        assert torch.autograd.gradgradcheck(lambda t: ops.reflect_shift(t, s), (x,))


def test_opcheck():
    for x, s in ((torch.randn(2, 3, 5, 4), torch.tensor([1, -1])),
                 (torch.randn(2, 3, 5, 4).contiguous(memory_format=torch.channels_last), torch.tensor([-1, 0])),
                 (torch.randn(1, 2, 3, 3, dtype=F64, requires_grad=True), torch.tensor([2, 1]))):
        torch.library.opcheck(torch.ops.dsg_ext.reflect_shift.default, (x, s))
        torch.library.opcheck(torch.ops.dsg_ext.reflect_shift_backward.default, (torch.randn_like(x.detach()), s))


def test_shift_is_read_on_the_device_when_compiled():
    """One compiled graph serves every shift value: the shift is data, not a constant of the trace."""
    x = torch.randn(2, 3, 6, 6)
    f = torch.compile(lambda t, s: ops.reflect_shift(t, s) * 2, fullgraph=True, dynamic=False)
    for shift in ((1, 1), (-1, 0), (0, -1)):
        torch.testing.assert_close(f(x, torch.tensor(shift)), reference(x, *shift) * 2, rtol=0, atol=0)


def test_other_integer_dtypes_and_shapes_of_shift():
    x = torch.randn(1, 2, 4, 4)
    for s in (torch.tensor([1, -1], dtype=torch.int32), torch.tensor([[1], [-1]], dtype=torch.int16)):
        torch.testing.assert_close(ops.reflect_shift(x, s), reference(x, 1, -1), rtol=0, atol=0)


@pytest.mark.parametrize("case,message", [
    (lambda: ops.reflect_shift(torch.randn(2, 3, 4), torch.tensor([0, 0])), r"must have shape \(N, C, H, W\)"),
    (lambda: ops.reflect_shift(torch.arange(16).view(1, 1, 4, 4), torch.tensor([0, 0])), "floating tensor"),
    (lambda: ops.reflect_shift(torch.randn(1, 1, 4, 4), torch.tensor([0.0, 1.0])), "integer tensor"),
    (lambda: ops.reflect_shift(torch.randn(1, 1, 4, 4), torch.tensor([True, False])), "integer tensor"),
    (lambda: ops.reflect_shift(torch.randn(1, 1, 4, 4), torch.tensor([1, 0, 1])), "two values"),
    (lambda: torch.ops.dsg_ext.reflect_shift_backward(torch.randn(4, 4), torch.tensor([1, 0])),
     r"grad must have shape \(N, C, H, W\)"),
])
def test_bad_inputs_are_named(case, message):
    with pytest.raises(RuntimeError, match=message):
        case()


def test_empty_batch():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    out = ops.reflect_shift(x, torch.tensor([1, 1]))
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


@requires_cuda
def test_cuda_matches_cpu():
    x = torch.randn(3, 5, 9, 11)
    g = torch.randn(3, 5, 9, 11)
    for mf in (torch.contiguous_format, torch.channels_last):
        for shift in ((1, -1), (-8, 10), (0, 1)):
            s = torch.tensor(shift)
            assert_matches_cpu("cuda", lambda t, u: ops.reflect_shift(t.contiguous(memory_format=mf), u), x, s)
            assert_matches_cpu("cuda", lambda t, u: torch.ops.dsg_ext.reflect_shift_backward(
                t.contiguous(memory_format=mf), u), g, s, atol=1e-6, rtol=1e-6)


@requires_cuda
def test_shift_on_another_device_is_refused():
    with pytest.raises(RuntimeError, match="shift is on cpu"):
        ops.reflect_shift(torch.randn(1, 1, 4, 4, device="cuda"), torch.tensor([0, 0]))
