"""dsg_ext.fake_quant against torch's own fake-quantization ops and the float64 reference."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    LOW_PRECISION,
    assert_lowprec_bound,
    assert_matches_cpu,
    cpu64,
    offset_view,
    requires_cuda,
    run_isolated,
    to_dev,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import fake_quant_grads_ref, fake_quant_lowprec, fake_quant_ref

import dsg_ext

F64 = torch.float64
QRANGES = [(0, 255), (-128, 127), (0, 15), (-8, 7), (0, 1)]
ZP_KINDS = ["int32", "int64", "float", "python"]


def make_zero_point(kind, qmin, qmax, channels=None):
    """An integer-valued zero point inside [qmin, qmax] as an int32/int64/float tensor or a Python int."""
    if channels is None:
        z = torch.randint(qmin, qmax + 1, ())
    else:
        z = torch.randint(qmin, qmax + 1, (channels,))
    if kind == "int32":
        return z.to(torch.int32)
    if kind == "int64":
        return z.to(torch.int64)
    if kind == "float":
        return z.to(torch.float32)
    assert channels is None
    return int(z)


def make_scale(channels=None):
    if channels is None:
        return float(torch.empty(()).uniform_(0.01, 0.2))
    return torch.empty(channels).uniform_(0.01, 0.2)


def make_x(shape, scale, qmin, qmax, dtype=torch.float32, axis=None, ties=True):
    """Values spanning the quantization range and beyond, with exact ties at half steps (if `ties`)."""
    s = torch.as_tensor(scale, dtype=F64)
    if s.dim() == 1 and axis is not None:
        s = s.reshape([-1 if d == axis % len(shape) else 1 for d in range(len(shape))])
    else:
        s = s.reshape(())
    span = (qmax - qmin + 2) // 2
    x = torch.randn(shape, dtype=F64) * span * 1.2 * s
    tie_values = (torch.randint(-2 * span - 4, 2 * span + 4, shape).to(F64) + 0.5) * s
    pick = torch.rand(shape) < (0.25 if ties else 0.0)
    x = torch.where(pick, tie_values, x)
    return x.to(dtype)


def torch_zp(zp):
    """Zero point in a form torch.fake_quantize_per_*_affine accepts (int for per tensor, int32 per channel)."""
    if isinstance(zp, torch.Tensor):
        return int(zp) if zp.dim() == 0 else zp.to(torch.int32)
    return zp


def torch_fq(x, scale, zp, qmin, qmax, axis=None):
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), torch_zp(zp), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, torch_zp(zp), axis % x.dim(), qmin, qmax)


def assert_same_ste_grad_as_torch(device, x, scale, zp, qmin, qmax, axis=None):
    """The straight-through gradient of x equals that of torch.fake_quantize_per_*_affine."""
    g = torch.randn(x.shape)
    xo = x.to(device).requires_grad_(True)
    (dx,) = torch.autograd.grad(dsg_ext.fake_quant(xo, *to_dev(device, scale, zp), qmin, qmax, axis), xo, g.to(device))
    xt = x.clone().requires_grad_(True)
    (tdx,) = torch.autograd.grad(torch_fq(xt, scale, zp, qmin, qmax, axis), xt, g)
    assert torch.equal(dx.cpu(), tdx)
    assert (tdx == 0).any() and (tdx != 0).any()


def op_grads(x, scale, zp, qmin, qmax, axis=None, grad_factor=1.0, grad=None):
    """(out, dx, dscale, dzero_point, grad) of the op for upstream `grad`; the scale always and the zero
    point when it is floating require grad (dzero_point is None for integer zero points)."""
    x = x.detach().clone().requires_grad_(True)
    s = torch.as_tensor(scale).detach().clone().to(x.device).requires_grad_(True)
    z = torch.as_tensor(zp).detach().clone().to(x.device)
    z.requires_grad_(z.is_floating_point())
    out = dsg_ext.fake_quant(x, s, z, qmin, qmax, axis, grad_factor=grad_factor)
    g = torch.randn_like(out) if grad is None else grad
    inputs = [x, s] + ([z] if z.requires_grad else [])
    grads = torch.autograd.grad(out, inputs, g)
    dz = grads[2] if z.requires_grad else None
    return out.detach(), grads[0], grads[1], dz, g


# ------------------------------------------------------------------------------------------------
# forward: bitwise equal to torch (fp32)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qrange", QRANGES, ids=str)
@pytest.mark.parametrize("zp_kind", ZP_KINDS)
def test_per_tensor_bitwise_vs_torch(device, qrange, zp_kind):
    qmin, qmax = qrange
    for scale in (make_scale(), 0.125, 0.1):
        zp = make_zero_point(zp_kind, qmin, qmax)
        x = make_x((3, 4, 5, 7), scale, qmin, qmax)
        ours = dsg_ext.fake_quant(*to_dev(device, x, scale, zp), qmin, qmax).cpu()
        expected = torch_fq(x, scale, zp, qmin, qmax)
        assert ours.dtype == torch.float32
        assert torch.equal(ours, expected), (ours - expected).abs().max()
        assert torch.equal(ours, fake_quant_ref(x, torch.tensor(scale), torch.as_tensor(zp), qmin, qmax).float())
        assert_same_ste_grad_as_torch(device, x, scale, zp, qmin, qmax)


@pytest.mark.parametrize("shape_axis", [((2, 3, 4, 5), 0), ((2, 3, 4, 5), 1), ((2, 3, 4, 5), 2), ((2, 3, 4, 5), 3),
                                        ((2, 3, 4, 5), -1), ((2, 3, 4, 5), -3), ((6, 7), 0), ((6, 7), 1),
                                        ((6, 7), -1), ((9,), 0), ((3, 1, 5), 1), ((2, 3, 4, 5, 6), 2)], ids=str)
@pytest.mark.parametrize("zp_kind", ["int32", "int64", "float"])
@pytest.mark.parametrize("qrange", [(0, 255), (-8, 7), (0, 1)], ids=str)
def test_per_channel_bitwise_vs_torch(device, shape_axis, zp_kind, qrange):
    shape, axis = shape_axis
    qmin, qmax = qrange
    c = shape[axis]
    scale = make_scale(c)
    zp = make_zero_point(zp_kind, qmin, qmax, c)
    x = make_x(shape, scale, qmin, qmax, axis=axis)
    ours = dsg_ext.fake_quant(*to_dev(device, x, scale, zp), qmin, qmax, axis).cpu()
    expected = torch_fq(x, scale, zp, qmin, qmax, axis)
    assert torch.equal(ours, expected), (ours - expected).abs().max()
    assert torch.equal(ours, fake_quant_ref(x, scale, zp, qmin, qmax, axis).float())
    assert_same_ste_grad_as_torch(device, x, scale, zp, qmin, qmax, axis)


def test_round_half_to_even():
    """x / s exactly at k + 1/2 rounds to the even level, as torch.round / std::nearbyint."""
    s = 0.25
    x = (torch.arange(-20, 20, dtype=torch.float32) + 0.5) * s  # exact ties
    out = dsg_ext.fake_quant(x, s, 0, -128, 127)
    expected = torch.round(x / s) * s
    assert torch.equal(out, expected)
    assert out[20].item() == 0.0 and out[21].item() == 0.5  # 0.5 -> 0, 1.5 -> 2


def test_saturation_and_nan():
    x = torch.tensor([float("inf"), float("-inf"), 1e30, -1e30, float("nan"), 0.3, 1e-30])
    out = dsg_ext.fake_quant(x, 0.1, 3, 0, 15)
    s = torch.tensor(0.1, dtype=torch.float32)
    expected = torch.tensor([12.0, -3.0, 12.0, -3.0, float("nan"), 3.0, 0.0]) * s
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    # NaN inside a per-channel tensor only poisons its own element
    xc = torch.randn(3, 4)
    xc[1, 2] = float("nan")
    oc = dsg_ext.fake_quant(xc, torch.full((4,), 0.05), torch.zeros(4, dtype=torch.int32), -128, 127, axis=1)
    assert torch.isnan(oc).sum() == 1 and torch.isnan(oc[1, 2])


def test_float_zero_point_rounded_and_clamped():
    """Floating zero points are rounded half to even and clamped into [qmin, qmax]."""
    x = torch.randn(200) * 5
    for zf, zeff in ((2.5, 2), (3.5, 4), (-0.5, 0), (7.4, 7), (300.0, 255), (-5.0, 0), (float("inf"), 255)):
        ours = dsg_ext.fake_quant(x, 0.1, torch.tensor(zf), 0, 255)
        assert torch.equal(ours, torch.fake_quantize_per_tensor_affine(x, 0.1, zeff, 0, 255)), zf
    xc = torch.randn(50, 4) * 5
    zc = torch.tensor([2.5, 3.5, 300.0, -7.0])
    ours = dsg_ext.fake_quant(xc, torch.full((4,), 0.1), zc, 0, 255, 1)
    expected = torch.fake_quantize_per_channel_affine(xc, torch.full((4,), 0.1), torch.tensor([2, 4, 255, 0], dtype=torch.int32), 1, 0, 255)
    assert torch.equal(ours, expected)


# ------------------------------------------------------------------------------------------------
# gradients
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 0, 1, -1, 2])
@pytest.mark.parametrize("qrange", [(0, 255), (-128, 127), (-8, 7), (0, 1)], ids=str)
@pytest.mark.parametrize("grad_factor", [1.0, 0.37])
def test_fp64_values_and_grads_vs_reference(device, axis, qrange, grad_factor):
    qmin, qmax = qrange
    shape = (3, 4, 5, 6)
    c = None if axis is None else shape[axis]
    scale = torch.tensor(make_scale()) if c is None else make_scale(c)
    zp = make_zero_point("float", qmin, qmax, c)
    x = make_x(shape, scale, qmin, qmax, dtype=F64, axis=axis if axis is not None else 0)
    g = torch.randn(shape, dtype=F64)
    out, dx, ds, dz, _ = op_grads(*to_dev(device, x, scale, zp), qmin, qmax, axis, grad_factor, grad=g.to(device))
    assert out.dtype == F64 and ds.dtype == scale.dtype and dz.dtype == zp.dtype
    torch.testing.assert_close(out.cpu(), fake_quant_ref(x, scale, zp, qmin, qmax, axis), rtol=0, atol=0)
    rdx, rds, rdz = fake_quant_grads_ref(x, g, scale, zp, qmin, qmax, axis, grad_factor)
    torch.testing.assert_close(cpu64(dx), rdx, rtol=0, atol=0)
    torch.testing.assert_close(cpu64(ds), rds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cpu64(dz), rdz, rtol=1e-6, atol=1e-6)
    # clamping is exercised: both the clamped region and the interior occur
    assert (dx == 0).any() and (dx != 0).any()
    assert_matches_cpu(device, lambda *a: op_grads(*a, qmin, qmax, axis, grad_factor, grad=g.to(a[0].device))[:4],
                       x, scale, zp, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
@pytest.mark.parametrize("qrange", [(0, 255), (-128, 127), (0, 15)], ids=str)
@pytest.mark.parametrize("grad_factor", [1.0, 0.5])
def test_learnable_grads_vs_torch(device, axis, qrange, grad_factor):
    """Scale / zero-point gradients follow torch._fake_quantize_learnable_per_{tensor,channel}_affine."""
    qmin, qmax = qrange
    shape = (4, 6, 5)
    c = 1 if axis is None else shape[axis]
    scale = make_scale(c)
    zp = make_zero_point("float", qmin, qmax, c)  # integer-valued floats
    # no exact ties: torch's learnable backward rounds z + x/s (not round(x/s) + z as its forward)
    x = make_x(shape, scale, qmin, qmax, axis=axis if axis is not None else 0, ties=False)
    g = torch.randn(shape)
    out, dx, ds, dz, _ = op_grads(*to_dev(device, x, scale, zp), qmin, qmax, axis, grad_factor, grad=g.to(device))

    xt = x.clone().requires_grad_(True)
    st_ = scale.clone().requires_grad_(True)
    zt = zp.clone().requires_grad_(True)
    if axis is None:
        yt = torch._fake_quantize_learnable_per_tensor_affine(xt, st_, zt, qmin, qmax, grad_factor)
    else:
        yt = torch._fake_quantize_learnable_per_channel_affine(xt, st_, zt, axis % 3, qmin, qmax, grad_factor)
    tdx, tds, tdz = torch.autograd.grad(yt, (xt, st_, zt), g)
    assert torch.equal(out.cpu(), yt.detach())
    assert torch.equal(dx.cpu(), tdx)
    scale_mag = (g.abs().sum() * (qmax - qmin)).item()
    torch.testing.assert_close(ds.cpu(), tds, rtol=1e-5, atol=1e-6 * scale_mag)
    torch.testing.assert_close(dz.cpu(), tdz, rtol=1e-5, atol=1e-6 * g.abs().sum().item())
    assert ds.abs().sum() > 0 and dz.abs().sum() > 0


def test_grad_factor_scales_param_grads_only():
    x = make_x((4, 5, 6), torch.tensor(0.05), -8, 7)
    g = torch.randn(4, 5, 6)
    a = op_grads(x, torch.tensor(0.05), torch.tensor(1.0), -8, 7, None, 1.0, grad=g)
    b = op_grads(x, torch.tensor(0.05), torch.tensor(1.0), -8, 7, None, 0.25, grad=g)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(b[2], a[2] * 0.25, rtol=1e-6, atol=0)
    torch.testing.assert_close(b[3], a[3] * 0.25, rtol=1e-6, atol=0)
    assert a[2] != 0 and a[3] != 0


def test_integer_zero_point_gets_no_grad_and_x_only():
    x = make_x((3, 8), torch.tensor(0.1), 0, 255).requires_grad_(True)
    s = torch.tensor(0.1)
    out = dsg_ext.fake_quant(x, s, torch.tensor(3, dtype=torch.int32), 0, 255)
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    rdx, _, _ = fake_quant_grads_ref(x, g, s, torch.tensor(3), 0, 255)
    torch.testing.assert_close(cpu64(dx), rdx, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# layouts, precisions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 1, 0, 3])
def test_channels_last_matches_contiguous(device, axis):
    shape = (3, 5, 4, 6)
    c = None if axis is None else shape[axis]
    scale = torch.tensor(0.07) if c is None else make_scale(c)
    zp = torch.tensor(4.0) if c is None else make_zero_point("float", -128, 127, c)
    x = make_x(shape, scale, -128, 127, axis=axis if axis is not None else 0)
    xc = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape)
    a = op_grads(*to_dev(device, x, scale, zp), -128, 127, axis, grad=g.to(device))
    b = op_grads(*to_dev(device, xc, scale, zp), -128, 127, axis, grad=g.to(device).contiguous(memory_format=torch.channels_last))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(b[2], a[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b[3], a[3], rtol=1e-5, atol=1e-5)
    assert torch.equal(b[0].cpu(), torch_fq(xc, scale, zp, -128, 127, axis))


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize(
    "make",
    [lambda b: b.transpose(0, 2), lambda b: b[:, ::2, 1:], lambda b: b.permute(2, 0, 1)],
    ids=["transpose", "slice", "permute"],
)
def test_non_contiguous(device, axis, make):
    base = torch.randn(6, 8, 5) * 2
    x = make(base)
    assert not x.is_contiguous()
    c = None if axis is None else x.shape[axis]
    scale = torch.tensor(0.03) if c is None else make_scale(c)
    zp = torch.tensor(-3.0) if c is None else make_zero_point("float", -128, 127, c)
    g = torch.randn(x.shape).transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous upstream gradient
    out, dx, ds, dz, _ = op_grads(*to_dev(device, x, scale, zp), -128, 127, axis, 0.9, grad=g.to(device))
    assert torch.equal(out.cpu(), torch_fq(x, scale, zp, -128, 127, axis))
    rdx, rds, rdz = fake_quant_grads_ref(x, g, scale, zp, -128, 127, axis, 0.9)
    torch.testing.assert_close(cpu64(dx), rdx, rtol=0, atol=0)
    torch.testing.assert_close(cpu64(ds), rds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu64(dz), rdz, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("channels_last", [False, True])
def test_view_at_an_offset(device, axis, channels_last):
    """Dense data that does not start on a 16-byte boundary (CUDA's vector paths need one and must fall
    back to scalar access): the same values and gradients as torch and the reference."""
    shape = (3, 16, 7, 8)
    c = None if axis is None else shape[axis]
    scale = torch.tensor(0.05) if c is None else make_scale(c)
    zp = torch.tensor(2.0) if c is None else make_zero_point("float", -128, 127, c)
    x = make_x(shape, scale, -128, 127, axis=axis if axis is not None else 0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape)
    leaf, s, z = (t.detach().clone().to(device).requires_grad_(True) for t in (x, scale, zp))
    out = dsg_ext.fake_quant(offset_view(leaf), s, z, -128, 127, axis, grad_factor=0.9)
    dx, ds, dz = torch.autograd.grad(out, [leaf, s, z], g.to(device))
    assert torch.equal(out.detach().cpu(), torch_fq(x, scale, zp, -128, 127, axis))
    rdx, rds, rdz = fake_quant_grads_ref(x, g, scale, zp, -128, 127, axis, 0.9)
    torch.testing.assert_close(cpu64(dx), rdx, rtol=0, atol=0)
    torch.testing.assert_close(cpu64(ds), rds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu64(dz), rdz, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("qrange", [(0, 255), (-8, 7)], ids=str)
def test_low_precision(device, dtype, axis, qrange):
    qmin, qmax = qrange
    shape = (4, 8, 6, 6)
    c = None if axis is None else shape[axis]
    scale = torch.tensor(0.0371) if c is None else make_scale(c)
    zp = torch.tensor(float(qmin + 2)) if c is None else make_zero_point("float", qmin, qmax, c)
    x = make_x(shape, scale, qmin, qmax, dtype=dtype, axis=axis if axis is not None else 0)
    g = torch.randn(shape).to(dtype)
    out, dx, ds, dz, _ = op_grads(*to_dev(device, x, scale, zp), qmin, qmax, axis, grad=g.to(device))
    assert out.dtype == dtype and dx.dtype == dtype and ds.dtype == torch.float32
    ref = fake_quant_ref(x, scale, zp, qmin, qmax, axis)
    plain = fake_quant_lowprec(x, scale, zp, qmin, qmax, axis)
    eps = torch.finfo(dtype).eps
    assert_lowprec_bound(out, ref, plain, atol=eps * ref.abs().max().item(), what="forward")
    # torch's kernels also compute in fp32 and round once to the low precision
    assert torch.equal(out.cpu(), torch_fq(x, scale, zp, qmin, qmax, axis))
    rdx, rds, rdz = fake_quant_grads_ref(x, g, scale, zp, qmin, qmax, axis)
    torch.testing.assert_close(cpu64(dx), rdx, rtol=0, atol=0)
    mag = (g.double().abs().sum() * (qmax - qmin + 1)).item()
    torch.testing.assert_close(cpu64(ds), rds, rtol=1e-4, atol=1e-6 * mag)
    torch.testing.assert_close(cpu64(dz), rdz, rtol=1e-4, atol=1e-6 * mag)


# ------------------------------------------------------------------------------------------------
# opcheck / torch.compile
# ------------------------------------------------------------------------------------------------


def _opcheck_samples():
    out = []
    x = make_x((3, 4, 5), torch.tensor(0.1), 0, 255).requires_grad_(True)
    out.append((x, torch.tensor(0.1), torch.tensor(7, dtype=torch.int32), 0, 255, None))
    out.append((x, torch.tensor([0.1], requires_grad=True), torch.tensor([7.0], requires_grad=True), 0, 255, None))
    out.append((x, make_scale(4).requires_grad_(True), torch.zeros(4, requires_grad=True), -128, 127, 1))
    out.append((x.detach().double().requires_grad_(True), make_scale(5), torch.zeros(5, dtype=torch.int64), -8, 7, -1))
    out.append((x.detach().half().requires_grad_(True), make_scale(3).requires_grad_(True), torch.ones(3), 0, 15, 0))
    xcl = make_x((2, 4, 3, 5), torch.tensor(0.1), -128, 127).contiguous(memory_format=torch.channels_last)
    out.append((xcl.requires_grad_(True), make_scale(4).requires_grad_(True), torch.zeros(4, requires_grad=True), -128, 127, 1))
    out.append((xcl, torch.tensor(0.1), torch.tensor(0, dtype=torch.int32), -128, 127, None))
    return out


def test_opcheck_forward():
    for args in _opcheck_samples():
        torch.library.opcheck(torch.ops.dsg_ext.fake_quant.default, args)


def test_opcheck_backward():
    for x, s, z, qmin, qmax, axis in _opcheck_samples():
        g = torch.randn_like(x)
        for param_grads in (False, True):
            args = (g, x.detach(), s.detach(), z.detach(), qmin, qmax, axis, param_grads)
            torch.library.opcheck(torch.ops.dsg_ext.fake_quant_backward.default, args)



@pytest.mark.parametrize("axis", [0, 3])
def test_opcheck_channels_last_other_axis(axis):
    xcl = make_x((2, 4, 3, 5), torch.tensor(0.1), -128, 127).contiguous(memory_format=torch.channels_last)
    c = xcl.shape[axis]
    torch.library.opcheck(
        torch.ops.dsg_ext.fake_quant.default,
        (xcl.requires_grad_(True), make_scale(c).requires_grad_(True), torch.zeros(c, requires_grad=True), -128, 127, axis),
    )


def _compile_check(device, x0, scale0, zp0, qmin, qmax, axis):
    x0, scale0, zp0 = to_dev(device, x0, scale0, zp0)

    def f(x, s, z):
        y = dsg_ext.fake_quant(x * 1.25, s, z, qmin, qmax, axis, grad_factor=0.5)
        return (y * y).sum() + y.mean()

    def run(fn):
        x, s, z = (t.detach().clone().requires_grad_(True) for t in (x0, scale0, zp0))
        loss = fn(x, s, z)
        loss.backward()
        return loss.detach(), x.grad, s.grad, z.grad

    eager = run(f)
    torch._dynamo.reset()
    compiled = run(torch.compile(f, fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert eager[2].abs().sum() > 0


def test_torch_compile_per_tensor(device):
    x = make_x((4, 6, 5), torch.tensor(0.05), 0, 255)
    _compile_check(device, x, torch.tensor(0.05), torch.tensor(10.0), 0, 255, None)


def test_torch_compile_per_channel(device):
    x = make_x((4, 6, 5), torch.tensor(0.05), -8, 7)
    _compile_check(device, x, make_scale(6), torch.zeros(6), -8, 7, 1)


def test_torch_compile_channels_last_axis0():
    x = make_x((2, 4, 3, 5), torch.tensor(0.05), -128, 127).contiguous(memory_format=torch.channels_last)
    s, z = make_scale(2), torch.zeros(2, dtype=torch.int32)

    def f(inp):
        return dsg_ext.fake_quant(inp, s, z, -128, 127, 0) * 2.0

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(x)
    torch.testing.assert_close(out, f(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# hypothesis
# ------------------------------------------------------------------------------------------------


@st.composite
def fq_cases(draw):
    rank = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=rank, max_size=rank)))
    axis = draw(st.one_of(st.none(), st.integers(-rank, rank - 1)))
    qmin, qmax = draw(st.sampled_from(QRANGES + [(-32768, 32767), (3, 200)]))
    zp_kind = draw(st.sampled_from(["int32", "int64", "float"]))
    seed = draw(st.integers(0, 2**16))
    return shape, axis, qmin, qmax, zp_kind, seed


@settings(max_examples=40, deadline=None)
@given(fq_cases())
def test_hypothesis_fp32_bitwise(case):
    shape, axis, qmin, qmax, zp_kind, seed = case
    torch.manual_seed(seed)
    c = None if axis is None else shape[axis]
    scale = torch.tensor(make_scale()) if c is None else make_scale(c)
    zp = make_zero_point(zp_kind, qmin, qmax, c)
    x = make_x(shape, scale, qmin, qmax, axis=axis if axis is not None else 0)
    ours = dsg_ext.fake_quant(x, scale, zp, qmin, qmax, axis)
    assert torch.equal(ours, torch_fq(x, scale, zp, qmin, qmax, axis))


@settings(max_examples=30, deadline=None)
@given(fq_cases(), st.floats(0.1, 2.0))
def test_hypothesis_fp64_grads(case, grad_factor):
    shape, axis, qmin, qmax, _, seed = case
    torch.manual_seed(seed)
    c = None if axis is None else shape[axis]
    scale = torch.tensor(make_scale()) if c is None else make_scale(c)
    zp = make_zero_point("float", qmin, qmax, c)
    x = make_x(shape, scale, qmin, qmax, dtype=F64, axis=axis if axis is not None else 0)
    g = torch.randn(shape, dtype=F64)
    out, dx, ds, dz, _ = op_grads(x, scale, zp, qmin, qmax, axis, grad_factor, grad=g)
    torch.testing.assert_close(out, fake_quant_ref(x, scale, zp, qmin, qmax, axis), rtol=0, atol=0)
    rdx, rds, rdz = fake_quant_grads_ref(x, g, scale, zp, qmin, qmax, axis, grad_factor)
    torch.testing.assert_close(dx, rdx, rtol=0, atol=0)
    torch.testing.assert_close(cpu64(ds), rds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu64(dz), rdz, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape_axis", [((0, 3), 1), ((0, 3, 4), 2), ((2, 0, 5), 1)], ids=str)
def test_empty_per_channel(device, shape_axis):
    shape, axis = shape_axis
    c = shape[axis]
    x = torch.zeros(shape, device=device, requires_grad=True)
    s = torch.full((c,), 0.1, device=device, requires_grad=True)
    z = torch.zeros(c, device=device, requires_grad=True)
    out = dsg_ext.fake_quant(x, s, z, 0, 255, axis)
    assert out.shape == shape
    dx, ds, dz = torch.autograd.grad(out, (x, s, z), torch.ones_like(out))
    assert dx.shape == shape and torch.equal(ds.cpu(), torch.zeros(c)) and torch.equal(dz.cpu(), torch.zeros(c))


def test_empty_isolated():
    """Run in a subprocess: empty runs once crashed the process (B == 0 taken for channels_last)."""
    run_isolated(
        """
        import torch, dsg_ext
        cases = [((0, 3), None), ((3, 0), 0), ((2, 3, 0, 4), 1), ((0,), None)]
        for shape, axis in cases:
            for param_grads in (False, True):
                print("case", shape, axis, param_grads, flush=True)
                c = 1 if axis is None else shape[axis]
                x = torch.zeros(shape, requires_grad=True)
                s = torch.full((c,), 0.1, requires_grad=param_grads)
                z = torch.zeros(c, requires_grad=param_grads)
                out = dsg_ext.fake_quant(x, s, z, 0, 255, axis)
                assert out.shape == shape
                grads = torch.autograd.grad(out, (x, s, z) if param_grads else (x,), torch.ones_like(out))
                assert grads[0].shape == shape
                if param_grads:
                    assert torch.equal(grads[1], torch.zeros(c)) and torch.equal(grads[2], torch.zeros(c))
        """
    )


@pytest.mark.parametrize("qmin, qmax, zp", [(2**24, 2**24 + 1000, 2**24 + 501), (2**31 - 65536, 2**31 - 1, 2**31 - 30001)])
def test_ranges_beyond_16_bits_rejected(qmin, qmax, zp):
    """Levels beyond +-2^16 would not be exact in fp32 (nor bitwise equal to torch): refused clearly."""
    with pytest.raises(RuntimeError, match="quant_min and quant_max must lie in"):
        dsg_ext.fake_quant(torch.randn(10), 0.01, zp, qmin, qmax)


@pytest.mark.parametrize("scale", [1e-45, 1e-39])
def test_subnormal_scale_rejected(scale):
    """1/scale would overflow to inf (0 * inf = NaN), so a subnormal scale is refused on the CPU."""
    with pytest.raises(RuntimeError, match="smallest normal float"):
        dsg_ext.fake_quant(torch.tensor([0.0, 1.0, -1.0]), scale, 0, -128, 127)


def test_16bit_ranges_bitwise_vs_torch():
    x = torch.randn(4000) * 200
    for qmin, qmax, zp in ((0, 65535, 32768), (-32768, 32767, 0), (-32768, 32767, -100)):
        ours = dsg_ext.fake_quant(x, 0.01, zp, qmin, qmax)
        assert torch.equal(ours, torch.fake_quantize_per_tensor_affine(x, 0.01, zp, qmin, qmax))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("axis", [None, 1, 0])
def test_large_param_grads_vs_reference(device, channels_last, axis):
    """Per-channel reductions over many elements (split across tasks) stay accurate."""
    shape = (16, 32, 24, 24)
    c = None if axis is None else shape[axis]
    scale = torch.tensor(0.05) if c is None else make_scale(c)
    zp = torch.tensor(3.0) if c is None else make_zero_point("float", -128, 127, c)
    x = make_x(shape, scale, -128, 127, axis=axis if axis is not None else 0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape)
    out, dx, ds, dz, _ = op_grads(*to_dev(device, x, scale, zp), -128, 127, axis, 0.5, grad=g.to(device))
    rdx, rds, rdz = fake_quant_grads_ref(x, g, scale, zp, -128, 127, axis, 0.5)
    assert torch.equal(cpu64(dx), rdx)
    # the per-element terms are O(1) (in range) or O(128) (clamped); sums over up to 3e5 elements in fp32
    mag = (g.double().abs().sum() * 128 / (1 if c is None else c)).item()
    torch.testing.assert_close(cpu64(ds), rds, rtol=1e-5, atol=1e-6 * mag)
    torch.testing.assert_close(cpu64(dz), rdz, rtol=1e-5, atol=1e-6 * mag)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("axis", [None, 1])
def test_deterministic(device, channels_last, axis):
    x = make_x((16, 32, 24, 24), torch.tensor(0.05), -128, 127)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = None if axis is None else 32
    scale = torch.tensor(0.05) if c is None else make_scale(c)
    zp = torch.tensor(3.0) if c is None else torch.zeros(c)
    g = torch.randn(x.shape)
    a = op_grads(*to_dev(device, x, scale, zp), -128, 127, axis, grad=g.to(device))
    b = op_grads(*to_dev(device, x, scale, zp), -128, 127, axis, grad=g.to(device))
    for u, v in zip(a[:4], b[:4]):
        assert torch.equal(u, v)


def test_deterministic_across_thread_counts():
    x = make_x((16, 32, 24, 24), torch.tensor(0.05), -128, 127)
    g = torch.randn(x.shape)
    old = torch.get_num_threads()
    try:
        res = []
        for n in (1, max(2, old)):
            torch.set_num_threads(n)
            res.append(op_grads(x, make_scale(32) * 0 + 0.05, torch.zeros(32), -128, 127, 1, grad=g)[:4])
            res.append(op_grads(x, torch.tensor(0.05), torch.tensor(2.0), -128, 127, None, grad=g)[:4])
    finally:
        torch.set_num_threads(old)
    for u, v in zip(res[0] + res[1], res[2] + res[3]):
        assert torch.equal(u, v)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, F64], ids=str)
@pytest.mark.parametrize("axis", [None, 0, 1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_cpu(dtype, axis, channels_last):
    shape = (4, 8, 9, 7)
    c = None if axis is None else shape[axis]
    scale = torch.tensor(0.043) if c is None else make_scale(c)
    zp = torch.tensor(5.0) if c is None else make_zero_point("float", -128, 127, c)
    x = make_x(shape, scale, -128, 127, dtype=dtype, axis=axis if axis is not None else 0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape).to(dtype)
    cpu = op_grads(x, scale, zp, -128, 127, axis, 0.7, grad=g)
    gpu = op_grads(*to_dev("cuda", x, scale, zp), -128, 127, axis, 0.7, grad=g.cuda())
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu[3].cpu(), cpu[3], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("axis", [None, 1])
def test_param_grads_only(axis):
    """Only scale / zero point require grad (x is a constant input): their gradients are still right."""
    shape = (5, 4, 3)
    c = None if axis is None else 4
    scale = torch.tensor(0.05) if c is None else make_scale(c)
    zp = torch.tensor(2.0) if c is None else make_zero_point("float", -8, 7, c)
    x = make_x(shape, scale, -8, 7, axis=axis if axis is not None else 0)
    s, z = scale.clone().requires_grad_(True), zp.clone().requires_grad_(True)
    out = dsg_ext.fake_quant(x, s, z, -8, 7, axis, grad_factor=0.8)
    g = torch.randn(shape)
    ds, dz = torch.autograd.grad(out, (s, z), g)
    _, rds, rdz = fake_quant_grads_ref(x, g, scale, zp, -8, 7, axis, 0.8)
    torch.testing.assert_close(cpu64(ds), rds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu64(dz), rdz, rtol=1e-5, atol=1e-5)
    assert rds.abs().sum() > 0 and rdz.abs().sum() > 0


def test_single_zero_point_applies_to_every_channel():
    x = torch.randn(4, 6, 3, dtype=F64)
    scale = make_scale(6)
    got = dsg_ext.fake_quant(x, scale, 0, -8, 7, axis=1)
    want = fake_quant_ref(x, scale, torch.zeros(6, dtype=torch.int32), -8, 7, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
