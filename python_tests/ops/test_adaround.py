"""dsg_ext.adaround / adaround_init against the float64 plain-PyTorch reference (reference.adaround_ref)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    LOW_PRECISION,
    assert_lowprec_bound,
    assert_matches_cpu,
    cpu64,
    requires_cuda,
    run_isolated,
    to_dev,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import adaround_lowprec, adaround_ref, rectified_sigmoid

import dsg_ext

F64 = torch.float64
QRANGES = [(-8, 7), (0, 15), (-128, 127), (0, 255), (0, 1)]


def make_scale(channels=None, dtype=F64):
    if channels is None:
        return torch.empty((), dtype=dtype).uniform_(0.01, 0.05)
    return torch.empty(channels, dtype=dtype).uniform_(0.01, 0.05)


def make_zero_point(kind, qmin, qmax, channels=None):
    z = torch.randint(qmin, qmax + 1, () if channels is None else (channels,))
    return {"int32": z.to(torch.int32), "int64": z.to(torch.int64), "float": z.to(F64)}[kind]


def bview(t, ndim, axis):
    if t.dim() == 0 or axis is None:
        return t.reshape(())
    return t.reshape([-1 if d == axis % ndim else 1 for d in range(ndim)])


def make_w(shape, scale, qmin, qmax, axis=None, dtype=F64):
    """Weights whose levels span the range and a little beyond on both sides."""
    s = bview(torch.as_tensor(scale, dtype=F64), len(shape), axis)
    span = (qmax - qmin + 1) / 2
    return ((torch.rand(shape, dtype=F64) * 2 - 1) * (span + 2) * s).to(dtype)


def op_run(w, v, scale, zp, qmin, qmax, axis=None, beta=2.0, hard=False, gw=None, gr=None, scale_grad=True):
    """(w~, R, grad_v, grad_scale) with upstream gradients gw (for w~) and gr (for R)."""
    v = v.detach().clone().requires_grad_(True)
    s = scale.detach().clone().requires_grad_(scale_grad) if isinstance(scale, torch.Tensor) else scale
    wq, reg = dsg_ext.adaround(w, v, s, zp, qmin, qmax, axis, beta=beta, hard=hard)
    gw = torch.randn_like(wq) if gw is None else gw
    gr = torch.tensor(0.5, dtype=reg.dtype, device=reg.device) if gr is None else gr.to(reg.device, reg.dtype)
    inputs = [v] + ([s] if isinstance(s, torch.Tensor) and s.requires_grad else [])
    grads = torch.autograd.grad((wq, reg), inputs, (gw, gr), allow_unused=True)
    gv = grads[0] if grads[0] is not None else torch.zeros_like(v)
    gs = grads[1] if len(grads) > 1 else None
    return wq.detach(), reg.detach(), gv, gs


def ref_run(w, v, scale, zp, qmin, qmax, axis=None, beta=2.0, hard=False, gw=None, gr=None, div_dtype=F64):
    v = cpu64(v).requires_grad_(True)
    s = cpu64(torch.as_tensor(scale)).requires_grad_(True)
    wq, reg = adaround_ref(cpu64(w), v, s, zp.cpu() if isinstance(zp, torch.Tensor) else zp, qmin, qmax, axis,
                           beta, hard, div_dtype=div_dtype)
    gw = cpu64(gw)
    gr = torch.tensor(0.5, dtype=F64) if gr is None else cpu64(gr)
    outs = (wq, reg) if not hard else (wq,)
    gouts = (gw, gr) if not hard else (gw,)
    gv, gs = torch.autograd.grad(outs, (v, s), gouts, allow_unused=True)
    gv = torch.zeros_like(v) if gv is None else gv
    return wq.detach(), reg.detach(), gv, gs


def assert_matches(ours, ref, rtol, atol, scale_atol=None):
    names = ("w~", "R", "grad_v", "grad_scale")
    for name, a, b in zip(names, ours, ref):
        if a is None and b is None:
            continue
        tol_a = scale_atol if (name == "grad_scale" and scale_atol is not None) else atol
        torch.testing.assert_close(cpu64(a), b, rtol=rtol, atol=tol_a, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------
# reference comparisons
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape_axis", [((6, 4, 3, 3), None), ((6, 4, 3, 3), 0), ((5, 7), 0), ((5, 7), None),
                                        ((1, 3, 1, 1), 0), ((3, 2, 2, 2, 3), 0), ((9,), None), ((9,), 0),
                                        ((6, 4, 3, 3), 1), ((5, 7), -1), ((3, 4, 5), -2)], ids=str)
@pytest.mark.parametrize("qrange", QRANGES, ids=str)
@pytest.mark.parametrize("zp_kind", ["int32", "int64", "float"])
@pytest.mark.parametrize("beta", [2.0, 3.5])
def test_soft_matches_reference_fp64(device, shape_axis, qrange, zp_kind, beta):
    shape, axis = shape_axis
    qmin, qmax = qrange
    c = None if axis is None else shape[axis]
    scale = make_scale(c)
    zp = make_zero_point(zp_kind, qmin, qmax, c)
    w = make_w(shape, scale, qmin, qmax, axis)
    v = torch.randn(shape, dtype=F64) * 2.5  # some h clamped at 0 / 1
    gw, gr = torch.randn(shape, dtype=F64), torch.tensor(-1.3, dtype=F64)
    ours = op_run(*to_dev(device, w, v, scale, zp), qmin, qmax, axis, beta, False, gw.to(device), gr)
    ref = ref_run(w, v, scale, zp, qmin, qmax, axis, beta, False, gw, gr)
    assert ours[0].dtype == F64 and ours[1].dtype == F64 and ours[1].shape == ()
    assert ours[3].shape == scale.shape
    assert_matches(ours, ref, rtol=1e-10, atol=1e-12)
    assert_matches_cpu(device, lambda *a: op_run(*a, qmin, qmax, axis, beta, False, gw.to(a[0].device), gr),
                       w, v, scale, zp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("qrange", [(-8, 7), (0, 255)], ids=str)
def test_hard_mode(device, axis, qrange):
    """Hard rounding: h = 1[v >= 0], i.e. round up where v >= 0, down otherwise; R == 0; no grad to v."""
    qmin, qmax = qrange
    shape = (8, 3, 5)
    c = None if axis is None else shape[0]
    scale = make_scale(c)
    zp = make_zero_point("int32", qmin, qmax, c)
    w = make_w(shape, scale, qmin, qmax, axis)
    v = torch.randn(shape, dtype=F64)
    v.view(-1)[:7] = 0.0  # v == 0 rounds up
    gw = torch.randn(shape, dtype=F64)
    ours = op_run(*to_dev(device, w, v, scale, zp), qmin, qmax, axis, 2.0, True, gw.to(device))
    ref = ref_run(w, v, scale, zp, qmin, qmax, axis, 2.0, True, gw)
    assert_matches(ours, ref, rtol=1e-12, atol=1e-14)
    assert ours[1].item() == 0.0
    assert torch.equal(ours[2].cpu(), torch.zeros(shape, dtype=F64))
    # the round-up rule written out
    s, z = bview(scale, 3, axis), bview(zp.double(), 3, axis)
    level = torch.where(v >= 0, torch.floor(w / s) + 1, torch.floor(w / s))
    expected = s * (torch.clamp(level + z, qmin, qmax) - z)
    torch.testing.assert_close(ours[0].cpu(), expected, rtol=0, atol=1e-15)
    # hard rounding lands on the quantization grid
    grid = ours[0].cpu() / s + z
    torch.testing.assert_close(grid, grid.round(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_adaround_init(axis, dtype):
    shape = (6, 5, 3, 3)
    scale = make_scale(None if axis is None else 6)
    w = make_w(shape, scale, -128, 127, axis).to(dtype)
    s_arg = float(scale) if axis is None else scale.to(dtype)
    v0 = dsg_ext.adaround_init(w, s_arg, axis)
    assert v0.shape == w.shape and v0.dtype == dtype
    ratio = w.double() / bview(scale, 4, axis)
    frac = ratio - torch.floor(ratio)
    tol = dict(rtol=0, atol=1e-12) if dtype == F64 else dict(rtol=0, atol=2e-5)
    torch.testing.assert_close(rectified_sigmoid(v0.double()), frac, **tol)
    # soft rounding at V0 reproduces w wherever the level is not clamped
    zp = torch.zeros(() if axis is None else (6,), dtype=torch.int32)
    wq, reg = dsg_ext.adaround(w, v0, scale.to(dtype), zp, -8, 7, axis)
    inside = (torch.floor(ratio) + frac >= -8) & (torch.floor(ratio) + frac <= 7)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(wq[inside].double(), w[inside].double(), rtol=0, atol=1e-12 if dtype == F64 else 1e-6)
    assert not torch.allclose(wq[~inside].double(), w[~inside].double())
    torch.testing.assert_close(reg.double(), (1 - (2 * frac - 1) ** 2).sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32])
@pytest.mark.parametrize("axis", [None, 0])
def test_fp32_matches_reference(device, dtype, axis):
    shape = (16, 8, 3, 3)
    c = None if axis is None else 16
    scale = make_scale(c, torch.float32)
    zp = make_zero_point("int32", -128, 127, c)
    w = make_w(shape, scale, -128, 127, axis, torch.float32)
    v = (torch.randn(shape) * 2).to(dtype)
    gw = torch.randn(shape)
    ours = op_run(*to_dev(device, w, v, scale, zp), -128, 127, axis, 2.0, False, gw.to(device))
    ref = ref_run(w, v, scale, zp, -128, 127, axis, 2.0, False, gw, div_dtype=torch.float32)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert_matches(ours, ref, rtol=1e-5, atol=1e-6, scale_atol=1e-4)


# ------------------------------------------------------------------------------------------------
# gradcheck
# ------------------------------------------------------------------------------------------------


def _smooth_setup(axis, qmin=-8, qmax=7):
    """w / s = k + f with f in [0.2, 0.8] and levels away from the clamp edges; |v| < 2 keeps
    h(v) = clamp(1.2 sigmoid(v) - 0.1, 0, 1) strictly inside (0, 1)."""
    shape = (4, 3, 2, 3)
    c = None if axis is None else 4
    scale = make_scale(c)
    zp = make_zero_point("int32", qmin + 2, qmax - 2, c)
    s, z = bview(scale, 4, axis), bview(zp.double(), 4, axis)
    k = torch.randint(qmin, qmax, shape).double() - z  # floor(w/s) + z in [qmin, qmax - 1]: inside
    k = torch.where(torch.rand(shape) < 0.15, qmax + 3 - z, k)  # a few clamped above
    k = torch.where(torch.rand(shape) < 0.15, qmin - 4 - z, k)  # and below
    f = torch.empty(shape, dtype=F64).uniform_(0.2, 0.8)
    w = (k + f) * s
    v = torch.empty(shape, dtype=F64).uniform_(-2.0, 2.0)
    return w, v, scale, zp


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("beta", [2.0, 3.0])
def test_gradcheck(axis, beta):
    w, v, scale, zp = _smooth_setup(axis)
    v.requires_grad_(True)
    scale.requires_grad_(True)

    def f(v_, s_):
        wq, reg = dsg_ext.adaround(w, v_, s_, zp, -8, 7, axis, beta=beta)
        return wq, reg

    assert torch.autograd.gradcheck(f, (v, scale), eps=1e-6, atol=1e-6, rtol=1e-5)

    def g(v_):
        return dsg_ext.adaround(w, v_, scale.detach(), zp, -8, 7, axis, beta=beta)[0]

    assert torch.autograd.gradcheck(g, (v,), eps=1e-6, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# layouts, precisions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize("v_layout", ["same", "contiguous"])
def test_channels_last_matches_contiguous(device, axis, v_layout):
    shape = (8, 6, 3, 5)
    c = None if axis is None else shape[axis]
    scale = make_scale(c, torch.float32)
    zp = make_zero_point("int32", -8, 7, c)
    w = make_w(shape, scale, -8, 7, axis, torch.float32)
    v = torch.randn(shape) * 2
    gw = torch.randn(shape)
    wc = w.contiguous(memory_format=torch.channels_last)
    vc = v.contiguous(memory_format=torch.channels_last) if v_layout == "same" else v
    a = op_run(*to_dev(device, w, v, scale, zp), -8, 7, axis, 2.0, False, gw.to(device))
    b = op_run(*to_dev(device, wc, vc, scale, zp), -8, 7, axis, 2.0, False,
               gw.to(device).contiguous(memory_format=torch.channels_last))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    torch.testing.assert_close(b[1], a[1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(b[3], a[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [None, 0])
def test_non_contiguous(device, axis):
    base_w = torch.randn(7, 10, 6, dtype=F64) * 0.1
    w = base_w.transpose(1, 2)[:, ::2]  # (7, 3, 10), strided
    v = (torch.randn(10, 7, 3, dtype=F64) * 2).permute(1, 2, 0)  # another non-contiguous layout
    assert not w.is_contiguous() and not v.is_contiguous()
    c = None if axis is None else 7
    scale = make_scale(c)
    zp = make_zero_point("float", -8, 7, c)
    gw = torch.randn(10, 3, 7, dtype=F64).permute(2, 1, 0)
    ours = op_run(*to_dev(device, w, v, scale, zp), -8, 7, axis, 2.0, False, gw.to(device))
    ref = ref_run(w, v, scale, zp, -8, 7, axis, 2.0, False, gw)
    assert_matches(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("axis", [None, 0])
def test_low_precision_error_bound(device, dtype, axis):
    shape = (16, 8, 3, 3)
    c = None if axis is None else 16
    scale = make_scale(c, torch.float32)
    zp = make_zero_point("int32", -8, 7, c)
    w = make_w(shape, scale, -8, 7, axis, dtype)
    v = (torch.randn(shape) * 2).to(dtype)
    gw = torch.randn(shape).to(dtype)
    ours = op_run(*to_dev(device, w, v, scale, zp), -8, 7, axis, 2.0, False, gw.to(device))
    assert ours[0].dtype == dtype and ours[2].dtype == dtype and ours[1].dtype == torch.float32
    # fp64 reference of the same (rounded) inputs; w / s is taken in fp32, the op's arithmetic precision
    ref = ref_run(w, v, scale, zp, -8, 7, axis, 2.0, False, gw, div_dtype=torch.float32)
    plain_wq, plain_reg = adaround_lowprec(w, v, scale, zp, -8, 7, axis)
    eps = torch.finfo(dtype).eps
    assert_lowprec_bound(ours[0], ref[0], plain_wq, atol=eps * ref[0].abs().max().item(), what="w~")
    assert_lowprec_bound(ours[1], ref[1], plain_reg, atol=1e-6 * ref[1].abs().item(), what="R")
    # plain-PyTorch backward in the same precision
    vl = v.clone().requires_grad_(True)
    pw, pr = adaround_lowprec(w, vl, scale, zp, -8, 7, axis)
    (plain_gv,) = torch.autograd.grad((pw, pr), vl, (gw, torch.tensor(0.5, dtype=dtype)))
    assert_lowprec_bound(ours[2], ref[2], plain_gv, atol=eps * ref[2].abs().max().item(), what="grad_v")
    torch.testing.assert_close(cpu64(ours[3]), ref[3], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# opcheck / torch.compile
# ------------------------------------------------------------------------------------------------


def _opcheck_samples():
    out = []
    for axis, dtype, cl, hard in ((None, F64, False, False), (0, torch.float32, False, False), (0, F64, False, True),
                                  (None, torch.float32, True, False), (0, torch.float16, False, False)):
        shape = (4, 3, 2, 5)
        c = None if axis is None else 4
        acc = F64 if dtype == F64 else torch.float32
        scale = make_scale(c, acc)
        zp = make_zero_point("int32", -8, 7, c)
        w = make_w(shape, scale, -8, 7, axis, dtype)
        v = (torch.randn(shape) * 2).to(dtype)
        if cl:
            w, v = (t.contiguous(memory_format=torch.channels_last) for t in (w, v))
        out.append((w, v.requires_grad_(True), scale.requires_grad_(True), zp, -8, 7, axis, 2.0, hard))
    return out


def test_opcheck_forward():
    for args in _opcheck_samples():
        torch.library.opcheck(torch.ops.dsg_ext.adaround.default, args)


def test_opcheck_backward():
    for w, v, s, z, qmin, qmax, axis, beta, hard in _opcheck_samples():
        gw = torch.randn_like(w)
        gr = torch.tensor(0.3, dtype=torch.float64 if w.dtype == F64 else torch.float32)
        for scale_grad in (False, True):
            args = (gw, gr, w, v.detach(), s.detach(), z, qmin, qmax, axis, beta, hard, scale_grad)
            torch.library.opcheck(torch.ops.dsg_ext.adaround_backward.default, args)



def test_opcheck_channels_last_axis0():
    shape = (4, 3, 2, 5)
    scale = make_scale(4, torch.float32)
    w = make_w(shape, scale, -8, 7, 0, torch.float32).contiguous(memory_format=torch.channels_last)
    v = (torch.randn(shape) * 2).contiguous(memory_format=torch.channels_last)
    args = (w, v.requires_grad_(True), scale.requires_grad_(True), torch.zeros(4, dtype=torch.int32), -8, 7, 0, 2.0, False)
    torch.library.opcheck(torch.ops.dsg_ext.adaround.default, args)


@pytest.mark.parametrize("axis", [None, 0])
def test_torch_compile_fullgraph(device, axis):
    shape = (6, 4, 3, 3)
    c = None if axis is None else 6
    scale0 = make_scale(c, torch.float32)
    zp = make_zero_point("int32", -8, 7, c)
    w = make_w(shape, scale0, -8, 7, axis, torch.float32)
    v0 = torch.randn(shape) * 2
    target = torch.randn(shape) * 0.1
    w, scale0, zp, v0, target = to_dev(device, w, scale0, zp, v0, target)

    def f(v, s):
        wq, reg = dsg_ext.adaround(w, v, s, zp, -8, 7, axis, beta=3.0)
        return ((wq - target) ** 2).sum() + 0.01 * reg

    def run(fn):
        v, s = v0.clone().requires_grad_(True), scale0.clone().requires_grad_(True)
        loss = fn(v, s)
        loss.backward()
        return loss.detach(), v.grad, s.grad

    eager = run(f)
    torch._dynamo.reset()
    compiled = run(torch.compile(f, fullgraph=True))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert eager[1].abs().sum() > 0 and eager[2].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# hypothesis
# ------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    per_channel=st.booleans(),
    qrange=st.sampled_from(QRANGES),
    zp_kind=st.sampled_from(["int32", "int64", "float"]),
    beta=st.sampled_from([1.5, 2.0, 3.0, 8.0, 20.0]),
    hard=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_fp64(shape, per_channel, qrange, zp_kind, beta, hard, seed):
    torch.manual_seed(seed)
    shape = tuple(shape)
    axis = 0 if per_channel else None
    qmin, qmax = qrange
    c = None if axis is None else shape[0]
    scale = make_scale(c)
    zp = make_zero_point(zp_kind, qmin, qmax, c)
    w = make_w(shape, scale, qmin, qmax, axis)
    v = torch.randn(shape, dtype=F64) * 3
    gw, gr = torch.randn(shape, dtype=F64), torch.tensor(0.8, dtype=F64)
    ours = op_run(w, v, scale, zp, qmin, qmax, axis, beta, hard, gw, gr)
    ref = ref_run(w, v, scale, zp, qmin, qmax, axis, beta, hard, gw, gr)
    assert_matches(ours, ref, rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape_axis", [((0, 3), 0), ((0, 3, 2), None), ((0,), None)], ids=str)
def test_empty(device, shape_axis):
    shape, axis = shape_axis
    c = None if axis is None else shape[axis]
    w = torch.zeros(shape, device=device)
    v = torch.zeros(shape, device=device, requires_grad=True)
    s = (torch.full((c,), 0.1) if c is not None else torch.tensor(0.1)).to(device).requires_grad_(True)
    z = torch.zeros(() if c is None else (c,), dtype=torch.int32, device=device)
    wq, reg = dsg_ext.adaround(w, v, s, z, -8, 7, axis)
    assert wq.shape == shape and reg.item() == 0.0
    gv, gs = torch.autograd.grad((wq, reg), (v, s), (torch.ones_like(wq), torch.ones_like(reg)))
    assert gv.shape == shape and torch.equal(gs.cpu(), torch.zeros_like(s).cpu())



def test_empty_isolated():
    """Run in a subprocess: empty inputs once crashed the process (B == 0 taken for channels_last)."""
    run_isolated(
        """
        import torch, dsg_ext
        for shape in ((3, 0), (4, 2, 0, 3)):
            print("case", shape, flush=True)
            c = shape[0]
            w = torch.zeros(shape)
            v = torch.zeros(shape, requires_grad=True)
            s = torch.full((c,), 0.1, requires_grad=True)
            wq, reg = dsg_ext.adaround(w, v, s, torch.zeros(c, dtype=torch.int32), -8, 7, 0)
            assert wq.shape == shape and reg.item() == 0.0
            gv, gs = torch.autograd.grad((wq, reg), (v, s), (torch.ones_like(wq), torch.ones_like(reg)))
            assert gv.shape == shape and torch.equal(gs, torch.zeros(c))
        """
    )


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("hard", [False, True])
def test_deterministic(device, axis, hard):
    shape = (64, 32, 3, 3)
    c = None if axis is None else 64
    scale = make_scale(c, torch.float32)
    zp = make_zero_point("int32", -8, 7, c)
    w = make_w(shape, scale, -8, 7, axis, torch.float32)
    v = torch.randn(shape) * 2
    gw = torch.randn(shape)
    args = to_dev(device, w, v, scale, zp)
    a = op_run(*args, -8, 7, axis, 2.0, hard, gw.to(device))
    b = op_run(*args, -8, 7, axis, 2.0, hard, gw.to(device))
    for u, t in zip(a, b):
        assert torch.equal(u, t)


def test_deterministic_across_thread_counts():
    shape = (64, 32, 3, 3)
    scale = make_scale(64, torch.float32)
    w = make_w(shape, scale, -8, 7, 0, torch.float32)
    v, gw = torch.randn(shape) * 2, torch.randn(shape)
    zp = torch.zeros(64, dtype=torch.int32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = op_run(w, v, scale, zp, -8, 7, 0, 2.0, False, gw)
        torch.set_num_threads(max(2, old))
        b = op_run(w, v, scale, zp, -8, 7, 0, 2.0, False, gw)
    finally:
        torch.set_num_threads(old)
    for u, t in zip(a, b):
        assert torch.equal(u, t)


def test_python_scalar_scale_and_zero_point():
    w = make_w((5, 6), torch.tensor(0.02), -8, 7)
    v = torch.randn(5, 6, dtype=F64)
    wq, reg = dsg_ext.adaround(w, v, 0.02, 3, -8, 7)
    rq, rr = adaround_ref(w, v, 0.02, 3, -8, 7)
    torch.testing.assert_close(wq, rq, rtol=0, atol=1e-15)
    torch.testing.assert_close(reg, rr, rtol=1e-12, atol=1e-12)
    wq2, _ = dsg_ext.adaround(w, v, 0.02, 3.0, -8, 7)  # a float zero point
    torch.testing.assert_close(wq2, rq, rtol=0, atol=1e-15)
    # fractional / out-of-range float zero points are rounded half to even and clamped
    for zf, zeff in ((2.5, 2), (3.5, 4), (-20.0, -8)):
        wq3, _ = dsg_ext.adaround(w, v, 0.02, zf, -8, 7)
        torch.testing.assert_close(wq3, adaround_ref(w, v, 0.02, zeff, -8, 7)[0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("axis", [None, 0])
def test_large_scale_grad_vs_reference(axis):
    """The scale gradient, reduced over ~3e5 weights in fp32, stays accurate."""
    shape = (256, 128, 3, 3)
    c = None if axis is None else 256
    scale = make_scale(c, torch.float32)
    zp = make_zero_point("int32", -8, 7, c)
    w = make_w(shape, scale, -8, 7, axis, torch.float32)
    v = torch.randn(shape) * 2
    gw = torch.randn(shape)
    ours = op_run(w, v, scale, zp, -8, 7, axis, 2.0, False, gw)
    ref = ref_run(w, v, scale, zp, -8, 7, axis, 2.0, False, gw, div_dtype=torch.float32)
    mag = (gw.double().abs().sum() * 8 / (1 if c is None else c)).item()
    assert_matches(ours, ref, rtol=1e-5, atol=1e-6, scale_atol=1e-6 * mag)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, F64], ids=str)
@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("hard", [False, True])
def test_cuda_matches_cpu(dtype, axis, hard):
    shape = (16, 8, 3, 3)
    c = None if axis is None else 16
    acc = F64 if dtype == F64 else torch.float32
    scale = make_scale(c, acc)
    zp = make_zero_point("int32", -8, 7, c)
    w = make_w(shape, scale, -8, 7, axis, dtype)
    v = (torch.randn(shape) * 2).to(dtype)
    gw = torch.randn(shape).to(dtype)
    cpu = op_run(w, v, scale, zp, -8, 7, axis, 2.0, hard, gw)
    gpu = op_run(*to_dev("cuda", w, v, scale, zp), -8, 7, axis, 2.0, hard, gw.cuda())
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-3, atol=1e-3)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, **tol)


def test_scale_grad_only():
    """Only the scale requires grad (v frozen): the scale still gets the reference gradient."""
    w, v, scale, zp = _smooth_setup(0)
    s = scale.clone().requires_grad_(True)
    wq, reg = dsg_ext.adaround(w, v, s, zp, -8, 7, 0)
    gw = torch.randn_like(wq)
    (gs,) = torch.autograd.grad((wq, reg), s, (gw, torch.tensor(1.0, dtype=F64)))
    ref = ref_run(w, v, scale, zp, -8, 7, 0, 2.0, False, gw, torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(gs, ref[3], rtol=1e-10, atol=1e-12)
    assert gs.abs().sum() > 0


@pytest.mark.parametrize("zero_point", [0, torch.tensor(3, dtype=torch.int32), torch.tensor([3.0])])
def test_single_zero_point_applies_to_every_channel(zero_point):
    """A per-channel scale with one zero point (the symmetric example of docs/ops.md) broadcasts it."""
    w = make_w((6, 5), torch.tensor(0.02), -8, 7)
    v = torch.randn(6, 5, dtype=F64)
    scale = make_scale(6)
    got, reg = dsg_ext.adaround(w, v, scale, zero_point, -8, 7, axis=0)
    z = torch.as_tensor(zero_point).reshape(-1).expand(6).to(F64)
    want, want_reg = adaround_ref(w, v, scale, z, -8, 7, 0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)
    torch.testing.assert_close(reg, want_reg, rtol=1e-12, atol=1e-12)
