"""bn_eval_slack: inference-mode BatchNorm fused with the slack loss on its input (per sample, and over
the batch: mode="batch"), against
an independent float64 reference (torch's batch_norm + the plain-PyTorch loss), gradients included."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import LOW_PRECISION, cpu64, offset_view, to_dev
from helpers import gradcheck_setup as _gradcheck_setup
from helpers import make_targets, make_x
from reference import slack_loss_ref

import dsg_ext

F64 = torch.float64


def bn_params(c, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(c, generator=g, dtype=F64)
    bias = torch.randn(c, generator=g, dtype=F64)
    running_mean = torch.randn(c, generator=g, dtype=F64)
    running_var = torch.rand(c, generator=g, dtype=F64) + 0.5
    scale = weight / torch.sqrt(running_var + 1e-5)
    shift = bias - running_mean * scale
    return (weight, bias, running_mean, running_var), scale.to(dtype), shift.to(dtype)


def reference(x, bn, mean, std, delta, gamma, grad_y, grad_loss, unbiased, mode="per_sample"):
    """y by torch's batch_norm, loss by the plain reference, gradients by autograd -- all float64."""
    weight, bias, running_mean, running_var = bn
    x = cpu64(x).requires_grad_(True)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=1e-5)
    loss = slack_loss_ref(x, mean, std, delta, gamma, 1e-5, unbiased, mode)
    (gx,) = torch.autograd.grad([y, loss], [x], [cpu64(grad_y), cpu64(grad_loss)])
    return y.detach(), loss.detach(), gx


def ours(x, scale, shift, mean, std, delta, gamma, grad_y, grad_loss, unbiased, mode="per_sample"):
    x = x.detach().clone().requires_grad_(True)
    y, loss, _, _ = dsg_ext.bn_eval_slack(x, scale, shift, mean, std, delta, gamma, unbiased=unbiased, mode=mode)
    (gx,) = torch.autograd.grad([y, loss], [x], [grad_y.to(y.dtype), grad_loss.to(loss.dtype)])
    return y, loss, gx


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 3, 4, 5), (3, 1, 4, 5), (3, 7, 5, 3), (2, 67, 3, 3), (5, 6, 13),
                                   (3, 16, 5, 3)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("mode", ["per_sample", "batch"])
def test_matches_reference_fp64(device, shape, channels_last, unbiased, mode):
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last needs 4-D")
    x = make_x(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    bn, scale, shift = bn_params(c)
    mean, std = make_targets(x)
    delta, gamma = torch.full((c,), 0.05, dtype=F64), torch.tensor(0.1, dtype=F64)
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(shape, generator=g, dtype=F64)
    grad_loss = torch.randn(shape[0] if mode == "per_sample" else (), generator=g, dtype=F64)
    if mode == "batch":
        mean, std = mean + 0.3, std * 1.2  # batch statistics sit near the per-sample targets' centre
    y_ref, loss_ref, gx_ref = reference(x, bn, mean, std, delta, gamma, grad_y, grad_loss, unbiased, mode)
    y, loss, gx = ours(*to_dev(device, x, scale, shift, mean, std, delta, gamma, grad_y, grad_loss), unbiased, mode)
    assert loss.shape == loss_ref.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert gx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cpu64(y), y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cpu64(loss), loss_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cpu64(gx), gx_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32] + list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_matches_the_unfused_ops(device, dtype, channels_last):
    """In fp32/fp16/bf16 the fused op equals torch's eval BatchNorm + our slack loss to the rounding of
    the dtype (y and grad_x computed in fp32, rounded once)."""
    x = (make_x((4, 8, 9, 7)) + 1.0).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bn, scale, shift = bn_params(8, torch.float32)
    mean, std = (t.float() for t in make_targets(x.double()))
    grad_y = torch.randn(x.shape, dtype=torch.float32).to(dtype)
    grad_loss = torch.randn(4)
    x, scale, shift, mean, std, grad_y, grad_loss = to_dev(device, x, scale, shift, mean, std, grad_y, grad_loss)
    y, loss, gx = ours(x, scale, shift, mean, std, 0.02, 0.02, grad_y, grad_loss, True)
    assert y.dtype == dtype and gx.dtype == dtype and loss.dtype == torch.float32
    xr = x.detach().clone().requires_grad_(True)
    y2 = (xr.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(dtype)
    loss2 = dsg_ext.bn_stat_slack_loss(xr, mean, std, 0.02, 0.02, unbiased=True)
    (gx2,) = torch.autograd.grad([y2, loss2], [xr], [grad_y, grad_loss])
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(y.float(), y2.float(), rtol=tol, atol=tol * y2.float().abs().max().item())
    torch.testing.assert_close(loss, loss2, rtol=1e-5, atol=1e-6)
    # one rounding in ours vs two (grad_y * scale, then + loss grad) in the unfused sum
    torch.testing.assert_close(gx.float(), gx2.float(), rtol=2 * tol, atol=2 * tol * gx2.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_channels_last_view_at_an_offset(device, dtype):
    """channels_last input not on a 16-byte boundary (the CUDA vector path's condition) gives what the
    aligned copy gives."""
    x = (make_x((3, 16, 5, 7)) + 1.0).to(dtype).contiguous(memory_format=torch.channels_last)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    _, scale, shift = bn_params(16, acc)
    mean, std = (t.to(acc) for t in make_targets(x.double()))
    g = torch.Generator().manual_seed(2)
    grad_y = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dtype)
    grad_loss = torch.randn(3, generator=g, dtype=torch.float64).to(acc)
    x, scale, shift, mean, std, grad_y, grad_loss = to_dev(device, x, scale, shift, mean, std, grad_y, grad_loss)
    aligned = ours(x, scale, shift, mean, std, 0.05, 0.02, grad_y, grad_loss, True)
    leaf = x.detach().clone().requires_grad_(True)
    y, loss, _, _ = dsg_ext.bn_eval_slack(offset_view(leaf), scale, shift, mean, std, 0.05, 0.02,
                                          unbiased=True)
    (gx,) = torch.autograd.grad([y, loss], [leaf], [grad_y, grad_loss])
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for u, v in zip(aligned, (y, loss, gx)):
        torch.testing.assert_close(cpu64(v), cpu64(u), rtol=tol, atol=tol * cpu64(u).abs().max().item())


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("mode", ["per_sample", "batch"])
def test_gradcheck(unbiased, mode):
    x, mean, std, delta, gamma = _gradcheck_setup(mode, unbiased)
    _, scale, shift = bn_params(3)

    def f(inp):
        return dsg_ext.bn_eval_slack(inp, scale, shift, mean, std, delta, gamma, unbiased=unbiased, mode=mode)[:2]

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True),), eps=1e-6, atol=1e-7, rtol=1e-5)
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    assert torch.autograd.gradcheck(f, (xc,), eps=1e-6, atol=1e-7, rtol=1e-5)
    # y alone and the loss alone (the other output unused: its gradient is None in the backward)
    assert torch.autograd.gradcheck(lambda i: f(i)[0], (x,), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda i: f(i)[1], (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def _samples():
    out = []
    for cl, dtype in ((False, F64), (True, torch.float32), (False, torch.bfloat16)):
        x = make_x((2, 4, 3, 5)).to(dtype)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)
        acc = F64 if dtype == F64 else torch.float32
        _, scale, shift = bn_params(4, acc)
        mean, std = make_targets(x.double())
        out.append((x.requires_grad_(True), scale, shift, mean.to(acc), std.to(acc), torch.tensor(0.05, dtype=acc),
                    torch.full((4,), 0.02, dtype=acc), 1e-5, cl))
    return out


@pytest.mark.parametrize("per_sample", [True, False])
def test_opcheck(per_sample):
    for args in _samples():
        args = args + (per_sample,)
        torch.library.opcheck(torch.ops.dsg_ext.bn_eval_slack.default, args)
        x, scale, shift, mean, std, delta, gamma, eps, unbiased, _ = args
        _, _, sm, ss = torch.ops.dsg_ext.bn_eval_slack(x.detach(), *args[1:])
        grad_loss = torch.randn(x.shape[0] if per_sample else (), dtype=sm.dtype)
        bargs = (torch.randn_like(x.detach()), grad_loss, x.detach(), scale, mean, std,
                 delta, gamma, sm, ss, unbiased, per_sample)
        torch.library.opcheck(torch.ops.dsg_ext.bn_eval_slack_backward.default, bargs)


def test_bad_inputs_are_named():
    x = torch.randn(2, 3, 4, 4)
    ok = dict(bn_scale=torch.ones(3), bn_shift=torch.zeros(3), mean=torch.zeros(3), std=torch.ones(3))
    with pytest.raises(RuntimeError, match="bn_scale must have shape"):
        dsg_ext.bn_eval_slack(x, torch.ones(4), ok["bn_shift"], ok["mean"], ok["std"])
    with pytest.raises(RuntimeError, match="bn_shift must be a floating tensor"):
        dsg_ext.bn_eval_slack(x, ok["bn_scale"], torch.zeros(3, dtype=torch.long), ok["mean"], ok["std"])
    with pytest.raises(ValueError, match="bn_scale requires grad"):
        dsg_ext.bn_eval_slack(x, torch.ones(3, requires_grad=True), ok["bn_shift"], ok["mean"], ok["std"])
    _, _, sm, ss = torch.ops.dsg_ext.bn_eval_slack(x, ok["bn_scale"], ok["bn_shift"], ok["mean"], ok["std"],
                                                   torch.tensor(0.0), torch.tensor(0.0), 1e-5, False)
    with pytest.raises(RuntimeError, match="grad_y must have the shape of x"):
        torch.ops.dsg_ext.bn_eval_slack_backward(torch.randn(2, 3, 4, 5), torch.ones(2), x, ok["bn_scale"], ok["mean"],
                                                 ok["std"], torch.tensor(0.0), torch.tensor(0.0), sm, ss, False)


def test_synthesis_with_fused_bn_matches_the_hooks(device):
    """The taps replace plain BN layers' forward by the fused op (on the CPU by default) and give the
    same synthesis as forward pre-hooks + torch's BatchNorm; the original forward is back afterwards."""
    from tiny_models import tiny_bn_net

    from dsg_ext.synthesis import BatchNormTaps, SynthesisConfig, batchnorm_layers, synthesize_batch

    model = tiny_bn_net()
    cfg = SynthesisConfig(method="dsg", iterations=6, batch_size=4, image_size=12, lr=0.1)
    results = {}
    for fused in (False, True):
        results[fused] = synthesize_batch(model.to(device), dataclasses.replace(cfg, fused_bn=fused), batch_index=0,
                                          device=device)
    torch.testing.assert_close(results[True].images, results[False].images, rtol=1e-4, atol=1e-5)
    assert results[True].final_layer_losses == pytest.approx(results[False].final_layer_losses, rel=1e-4, abs=1e-6)
    layers = batchnorm_layers(model)
    with BatchNormTaps(layers, unbiased=True):
        assert all("forward" in bn.__dict__ for _, bn in layers)
    assert all("forward" not in bn.__dict__ for _, bn in layers)
    with BatchNormTaps(layers, unbiased=True, fused=False):  # pre-hooks only
        assert all("forward" not in bn.__dict__ for _, bn in layers)
