"""dsg_ext.bn_stat_slack_loss against the float64 plain-PyTorch reference (reference.slack_loss_ref)."""

from __future__ import annotations

import math

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
from helpers import check_empty as _check_empty
from helpers import gradcheck_setup as _gradcheck_setup
from helpers import make_targets, make_x
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import slack_loss_lowprec, slack_loss_ref

import dsg_ext

pytestmark = pytest.mark.filterwarnings("ignore:.*degrees of freedom is <= 0:UserWarning")

F64 = torch.float64
MODES = ["per_sample", "batch"]



def run_op(x, mean, std, delta=0.0, gamma=0.0, grad_loss=None, **kw):
    """(loss, stat_mean, stat_std, grad_x) of the op; grad_x from `grad_loss` (or ones) upstream."""
    x = x.detach().clone().requires_grad_(True)
    loss, sm, ss = dsg_ext.bn_stat_slack_loss(x, mean, std, delta, gamma, return_stats=True, **kw)
    g = torch.ones_like(loss) if grad_loss is None else grad_loss.to(loss.device, loss.dtype)
    (gx,) = torch.autograd.grad(loss, x, g) if x.numel() > 0 else (torch.zeros_like(x),)
    return loss.detach(), sm, ss, gx


def run_ref(x, mean, std, delta=0.0, gamma=0.0, grad_loss=None, eps=1e-5, unbiased=False, mode="per_sample"):
    x = cpu64(x).requires_grad_(True)
    loss, sm, ss = slack_loss_ref(x, mean, std, delta, gamma, eps, unbiased, mode, return_stats=True)
    g = torch.ones_like(loss) if grad_loss is None else cpu64(grad_loss)
    (gx,) = torch.autograd.grad(loss, x, g) if x.numel() > 0 else (torch.zeros_like(x),)
    return loss.detach(), sm.detach(), ss.detach(), gx


def assert_all_close(ours, ref, rtol, atol):
    for name, a, b in zip(("loss", "mean~", "std~", "grad_x"), ours, ref):
        torch.testing.assert_close(cpu64(a), b, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{name}: {m}")


SHAPES = [
    (2, 3, 4, 5),
    (1, 3, 4, 5),  # N = 1
    (3, 1, 4, 5),  # C = 1
    (4, 3, 1, 1),  # H * W = 1
    (3, 5),  # 2-D (N, C)
    (2, 3, 2, 3, 4),  # 5-D
    (3, 7, 5, 3),  # non-power-of-two sizes
    (5, 6, 13),  # 3-D
    (1, 1, 1, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("slack", ["zero", "scalar", "per_channel"])
def test_matches_reference_fp64(device, shape, mode, unbiased, slack):
    x = make_x(shape)
    mean, std = make_targets(x)
    c = shape[1]
    delta, gamma = {
        "zero": (0.0, 0.0),
        "scalar": (0.1, 0.05),
        "per_channel": (0.2 * torch.rand(c, dtype=F64), 0.2 * torch.rand(c, dtype=F64)),
    }[slack]
    n_loss = shape[0] if mode == "per_sample" else 1
    grad_loss = torch.randn(n_loss, dtype=F64).reshape(-1 if mode == "per_sample" else ())
    kw = dict(eps=1e-5, unbiased=unbiased, mode=mode)
    ours = run_op(*to_dev(device, x, mean, std, delta, gamma, grad_loss), **kw)
    ref = run_ref(x, mean, std, delta, gamma, grad_loss, **kw)
    assert ours[0].dtype == F64 and ours[0].shape == ref[0].shape
    assert ours[3].shape == x.shape
    assert_all_close(ours, ref, rtol=1e-10, atol=1e-12)
    count = math.prod(shape[2:]) * (shape[0] if mode == "batch" else 1)
    if count > int(unbiased):  # otherwise var has no degree of freedom: NaN, as torch.var
        assert torch.isfinite(ours[0]).all()
    else:
        assert torch.isnan(ours[0]).all()
    assert_matches_cpu(device, lambda *a: run_op(*a, **kw), x, mean, std, delta, gamma, grad_loss, atol=1e-12, rtol=1e-10)


def test_zero_slack_is_zeroq_loss():
    """With zero slack the loss is ZeroQ's squared distance of the statistics, summed over channels."""
    x = make_x((3, 4, 6, 6))
    mean, std = make_targets(x)
    loss = dsg_ext.bn_stat_slack_loss(x, mean, std)
    mu = x.mean(dim=(2, 3))
    sd = torch.sqrt(x.var(dim=(2, 3), unbiased=False) + 1e-5)
    expected = ((mu - mean) ** 2).sum(1) + ((sd - std) ** 2).sum(1)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_slack_zeroes_channels_inside():
    """A slack larger than every gap gives exactly zero loss and zero gradient; the eps is honoured."""
    x = make_x((2, 3, 5, 5))
    mean, std = make_targets(x)
    xr = x.clone().requires_grad_(True)
    loss = dsg_ext.bn_stat_slack_loss(xr, mean, std, 100.0, 100.0)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(2, dtype=F64))
    assert torch.equal(xr.grad, torch.zeros_like(x))
    # eps enters std~ = sqrt(var + eps)
    for eps in (1e-5, 0.5):
        ours = dsg_ext.bn_stat_slack_loss(x, mean, std, eps=eps)
        torch.testing.assert_close(ours, slack_loss_ref(x, mean, std, eps=eps), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_spatial(device, mode, dtype, channels_last):
    x = make_x((1, 3, 300, 300)) + 3.0  # a mean offset stresses the one-pass variance
    mean, std = make_targets(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_loss = torch.tensor([0.7], dtype=F64) if mode == "per_sample" else torch.tensor(0.7, dtype=F64)
    kw = dict(mode=mode, unbiased=True)
    ours = run_op(*to_dev(device, x.to(dtype), mean, std, 0.01, 0.01, grad_loss), **kw)
    ref = run_ref(x.to(dtype), mean, std, 0.01, 0.01, grad_loss, **kw)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-7)
    assert_all_close(ours, ref, **tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_small_spread_fp32(mode, channels_last):
    """fp32 statistics of activations far from zero keep their accuracy (no one-pass cancellation)."""
    x64 = 1000.0 + 0.01 * torch.randn(4, 5, 32, 32, dtype=F64)
    x = x64.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean = torch.full((5,), 999.0, dtype=F64)
    std = torch.full((5,), 0.05, dtype=F64)
    ours = run_op(x, mean.float(), std.float(), mode=mode, eps=0.0)
    ref = run_ref(x, mean.float(), std.float(), mode=mode, eps=0.0)
    torch.testing.assert_close(cpu64(ours[2]), ref[2], rtol=2e-3, atol=0)  # std~ (~0.01) to 0.2 %
    # mean~ ~ 1000 is stored in fp32 (ulp 6e-5), the mean gap is ~1: the loss is good to ~1e-4
    torch.testing.assert_close(cpu64(ours[0]), ref[0], rtol=5e-4, atol=0)
    torch.testing.assert_close(cpu64(ours[3]), ref[3], rtol=1e-3, atol=1e-3 * ref[3].abs().max().item())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", [(4, 8, 9, 10), (2, 67, 5, 3), (3, 5, 1, 7)], ids=str)
def test_channels_last_matches_contiguous(device, mode, dtype, shape):
    x = make_x(shape).to(dtype)
    mean, std = make_targets(x.double())
    gl = torch.randn(shape[0] if mode == "per_sample" else (), dtype=F64)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert not xc.is_contiguous()
    a = run_op(*to_dev(device, x, mean, std, 0.05, 0.05, gl), mode=mode)
    b = run_op(*to_dev(device, xc, mean, std, 0.05, 0.05, gl), mode=mode)
    # the two layouts sum in different orders: equal up to rounding (relative to each tensor's magnitude)
    rel = 1e-12 if dtype == F64 else 2e-6
    for u, v in zip(a, b):
        torch.testing.assert_close(v, u, rtol=rel, atol=rel * u.abs().max().item())
    # and both against the reference
    assert_all_close(b, run_ref(x, mean, std, 0.05, 0.05, gl, mode=mode), rtol=1e-5 if dtype != F64 else 1e-10,
                     atol=1e-6 if dtype != F64 else 1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "make",
    [
        lambda b: b.transpose(2, 3),  # spatial transpose
        lambda b: b[:, ::2],  # every other channel
        lambda b: b[1:, :, 1:-1, ::3],  # sliced
        lambda b: b.permute(1, 0, 2, 3),  # N <-> C
    ],
    ids=["transpose", "channel_stride", "slice", "permute"],
)
def test_non_contiguous(device, mode, make):
    base = make_x((5, 6, 7, 8))
    x = make(base)
    assert not x.is_contiguous()
    mean, std = make_targets(x.contiguous())
    gl = torch.randn(x.shape[0] if mode == "per_sample" else (), dtype=F64)
    ours = run_op(*to_dev(device, x, mean, std, 0.05, 0.02, gl), mode=mode)
    ref = run_ref(x, mean, std, 0.05, 0.02, gl, mode=mode)
    assert_all_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_channels_last_view_at_an_offset(device, mode, dtype):
    x = make_x((3, 16, 5, 7)).to(dtype)
    mean, std = make_targets(x.double())
    gl = torch.randn(3 if mode == "per_sample" else (), dtype=F64)
    x, mean, std, gl = to_dev(device, x.contiguous(memory_format=torch.channels_last), mean, std, gl)
    aligned = run_op(x, mean, std, 0.05, 0.02, gl, mode=mode)
    leaf = x.detach().clone().requires_grad_(True)
    loss, sm, ss = dsg_ext.bn_stat_slack_loss(offset_view(leaf), mean, std, 0.05, 0.02, mode=mode,
                                              return_stats=True)
    (gx,) = torch.autograd.grad(loss, leaf, gl.to(loss.dtype))
    ref = run_ref(x, mean, std, 0.05, 0.02, gl, mode=mode)
    if dtype == torch.bfloat16:  # the two paths may sum in different orders: agree to fp32 rounding
        for u, v in zip(aligned, (loss, sm, ss, gx)):
            torch.testing.assert_close(cpu64(v), cpu64(u), rtol=1e-2, atol=1e-2 * cpu64(u).abs().max().item())
    else:
        tol = (1e-10, 1e-12) if dtype == F64 else (1e-5, 1e-6)
        assert_all_close((loss, sm, ss, gx), ref, rtol=tol[0], atol=tol[1])
        assert_all_close(aligned, ref, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_error_bound(device, dtype, mode, channels_last):
    x = (make_x((4, 8, 16, 16)) + 2.0).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, std = make_targets(x.double())
    ours_loss, _, _, ours_gx = run_op(*to_dev(device, x, mean, std, 0.02, 0.02), mode=mode)
    assert ours_loss.dtype == torch.float32 and ours_gx.dtype == dtype
    ref_loss, _, _, ref_gx = run_ref(x, mean, std, 0.02, 0.02, mode=mode)
    # plain PyTorch in the same low precision (forward and autograd backward)
    xl = x.detach().clone().requires_grad_(True)
    plain = slack_loss_lowprec(xl, mean, std, 0.02, 0.02, mode=mode)
    (plain_gx,) = torch.autograd.grad(plain, xl, torch.ones_like(plain))
    eps = torch.finfo(dtype).eps
    assert_lowprec_bound(ours_loss, ref_loss, plain, atol=1e-6 * ref_loss.abs().max().item(), what="loss")
    assert_lowprec_bound(ours_gx, ref_gx, plain_gx, atol=eps * ref_gx.abs().max().item(), what="grad")
    # the fp32 statistics make the loss far more accurate than the rounding of x itself would allow
    torch.testing.assert_close(cpu64(ours_loss), ref_loss, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("unbiased", [False, True])
def test_gradcheck(mode, unbiased):
    x, mean, std, delta, gamma = _gradcheck_setup(mode, unbiased)
    x.requires_grad_(True)

    def f(inp):
        return dsg_ext.bn_stat_slack_loss(inp, mean, std, delta, gamma, unbiased=unbiased, mode=mode)

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (xc,), eps=1e-6, atol=1e-7, rtol=1e-5)


def _opcheck_samples():
    samples = []
    for mode in MODES:
        for cl, dtype in ((False, F64), (True, torch.float32), (False, torch.float16)):
            x = make_x((2, 4, 3, 5)).to(dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            mean, std = make_targets(x.double())
            acc = F64 if dtype == F64 else torch.float32
            samples.append(
                (
                    x.requires_grad_(True),
                    mean.to(acc),
                    std.to(acc),
                    torch.tensor(0.05, dtype=acc),
                    torch.full((4,), 0.02, dtype=acc),
                    1e-5,
                    cl,
                    mode == "per_sample",
                )
            )
    x5 = make_x((2, 3, 2, 2, 3)).requires_grad_(True)
    m5, s5 = make_targets(x5.detach())
    samples.append((x5, m5, s5, torch.tensor(0.0, dtype=F64), torch.tensor(0.0, dtype=F64), 1e-3, True, True))
    return samples


def test_opcheck_forward():
    for args in _opcheck_samples():
        torch.library.opcheck(torch.ops.dsg_ext.bn_stat_slack_loss.default, args)


def test_opcheck_backward():
    for args in _opcheck_samples():
        x, mean, std, delta, gamma, eps, unbiased, per_sample = args
        _, sm, ss = torch.ops.dsg_ext.bn_stat_slack_loss(x.detach(), mean, std, delta, gamma, eps, unbiased, per_sample)
        gl = torch.randn(sm.shape[0] if per_sample else (), dtype=sm.dtype)
        bargs = (gl, x.detach(), mean, std, delta, gamma, sm, ss, unbiased, per_sample)
        torch.library.opcheck(torch.ops.dsg_ext.bn_stat_slack_loss_backward.default, bargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_compile_fullgraph(device, mode, channels_last):
    x0 = make_x((3, 4, 5, 6)).float()
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    mean, std = (t.float() for t in make_targets(x0.double()))
    x0, mean, std = to_dev(device, x0, mean, std)

    def f(x):
        loss = dsg_ext.bn_stat_slack_loss(torch.tanh(x) * 2.0, mean, std, 0.05, 0.02, mode=mode)
        return (loss * torch.arange(1, loss.numel() + 1, device=x.device).reshape(loss.shape)).sum()

    xe = x0.clone().requires_grad_(True)
    le = f(xe)
    le.backward()
    xc = x0.clone().requires_grad_(True)
    torch._dynamo.reset()
    lc = torch.compile(f, fullgraph=True)(xc)
    lc.backward()
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-7)
    assert xe.grad.abs().sum() > 0


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    c=st.integers(1, 6),
    h=st.integers(1, 7),
    w=st.integers(1, 9),
    mode=st.sampled_from(MODES),
    unbiased=st.booleans(),
    channels_last=st.booleans(),
    slack=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(n, c, h, w, mode, unbiased, channels_last, slack, seed):
    torch.manual_seed(seed)
    x = make_x((n, c, h, w))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, std = make_targets(x)
    gl = torch.randn(n if mode == "per_sample" else (), dtype=F64)
    kw = dict(mode=mode, unbiased=unbiased)
    ours = run_op(x, mean, std, slack, slack / 2, gl, **kw)
    ref = run_ref(x, mean, std, slack, slack / 2, gl, **kw)
    assert_all_close(ours, ref, rtol=1e-9, atol=1e-11)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=5),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_ranks_fp32(shape, mode, seed):
    torch.manual_seed(seed)
    x64 = make_x(tuple(shape))
    mean, std = make_targets(x64)
    x = x64.float()
    ours = run_op(x, mean.float(), std.float(), 0.05, 0.05, mode=mode)
    ref = run_ref(x, mean.float(), std.float(), 0.05, 0.05, mode=mode)
    assert ours[0].dtype == torch.float32 and ours[3].dtype == torch.float32
    assert_all_close(ours, ref, rtol=2e-5, atol=2e-6)



@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (0, 3), (0, 0), (2, 1, 0, 3), (0, 2, 3, 2, 1)], ids=str)
def test_empty(device, shape, mode):
    _check_empty(device, shape, mode)



def test_empty_spatial_isolated():
    """Run in a subprocess: empty inputs once crashed the process (B == 0 taken for channels_last)."""
    run_isolated(
        """
        import torch, dsg_ext
        from helpers import check_empty as _check_empty
        for shape, cl in (((2, 3, 0, 4), False), ((2, 3, 0, 4), True), ((2, 3, 4, 0, 2), False)):
            for mode in ("per_sample", "batch"):
                print("case", shape, "channels_last" if cl else "", mode, flush=True)
                _check_empty("cpu", shape, mode, cl)
        """
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_nan_propagates(device, mode, channels_last):
    x = make_x((3, 4, 5, 5))
    mean, std = make_targets(x)
    x[1, 2, 3, 1] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # a huge slack would hide any finite gap: the NaN must still come through, never become 0
    for slack in (0.0, 1e6):
        loss = dsg_ext.bn_stat_slack_loss(*to_dev(device, x, mean, std), slack, slack, mode=mode).cpu()
        if mode == "per_sample":
            assert torch.isnan(loss[1])
            assert torch.isfinite(loss[[0, 2]]).all()
        else:
            assert torch.isnan(loss)
    ref = slack_loss_ref(x, mean, std, 0.1, 0.1, mode=mode)
    ours = dsg_ext.bn_stat_slack_loss(*to_dev(device, x, mean, std), 0.1, 0.1, mode=mode).cpu()
    torch.testing.assert_close(ours, ref, equal_nan=True, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_deterministic(device, mode, channels_last):
    x = make_x((4, 16, 40, 40)).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, std = (t.float() for t in make_targets(x.double()))
    args = to_dev(device, x, mean, std)
    a = run_op(*args, 0.01, 0.01, mode=mode)
    b = run_op(*args, 0.01, 0.01, mode=mode)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_deterministic_across_thread_counts():
    x = make_x((2, 8, 64, 64)).float()
    mean, std = (t.float() for t in make_targets(x.double()))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = run_op(x, mean, std, 0.01, 0.01, mode="batch")
        torch.set_num_threads(max(2, old))
        b = run_op(x, mean, std, 0.01, 0.01, mode="batch")
    finally:
        torch.set_num_threads(old)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_stats_and_gradient_flow():
    """return_stats gives (mean~, std~) without gradient; targets and slack never receive gradients."""
    x = make_x((2, 3, 4, 4)).requires_grad_(True)
    mean, std = make_targets(x.detach())
    loss, sm, ss = dsg_ext.bn_stat_slack_loss(x, mean, std, return_stats=True, unbiased=True)
    rl, rm, rs = slack_loss_ref(x.detach(), mean, std, unbiased=True, return_stats=True)
    torch.testing.assert_close(sm, rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ss, rs, rtol=1e-12, atol=1e-12)
    assert loss.requires_grad and not sm.requires_grad and not ss.requires_grad
    assert sm.shape == (2, 3) and ss.shape == (2, 3)
    _, bm, bs = dsg_ext.bn_stat_slack_loss(x, mean, std, mode="batch", return_stats=True)
    assert bm.shape == (3,) and bs.shape == (3,)
    assert dsg_ext.bn_stat_slack_loss(x, mean, std, mode="batch").shape == ()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, F64], ids=str)
def test_output_dtypes(dtype):
    x = make_x((2, 3, 4, 4)).to(dtype)
    mean, std = make_targets(x.double())
    loss, sm, ss = dsg_ext.bn_stat_slack_loss(x, mean.float(), std.float(), return_stats=True)
    acc = F64 if dtype == F64 else torch.float32
    assert loss.dtype == sm.dtype == ss.dtype == acc


@requires_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, F64], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_matches_cpu(mode, dtype, channels_last):
    x = (make_x((4, 8, 17, 19)) + 1.0).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, std = make_targets(x.double())
    gl = torch.randn(4 if mode == "per_sample" else (), dtype=F64)
    cpu = run_op(x, mean, std, 0.02, 0.03, gl, mode=mode)
    gpu = run_op(*to_dev("cuda", x, mean, std, 0.02, 0.03, gl), mode=mode)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
    if dtype in LOW_PRECISION:  # the gradient is rounded to the low precision
        tol = dict(rtol=2 * torch.finfo(dtype).eps, atol=1e-5)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, **tol)
