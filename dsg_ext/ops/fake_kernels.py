"""Fake (meta) kernels of the dsg_ext ops: output shapes, dtypes and layouts without computing,
for tracing and torch.compile. Each checks its inputs' shapes with torch._check (``shape_checks``),
so a wrong shape fails when the op is traced, not only when it runs."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (the op schemas must be registered first)
from .shape_checks import _check_channels, _check_quant_shapes, _check_same_shape, _check_slack_shapes, acc_dtype


def _empty_in_layout(x, dtype=None):
    """An empty tensor shaped like x in the layout the kernels write (contiguous or channels_last)."""
    dtype = dtype or x.dtype
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(x, dtype=dtype, memory_format=torch.channels_last)
    return x.new_empty(x.shape, dtype=dtype)

@torch.library.register_fake("dsg_ext::bn_stat_slack_loss")
def _slack_fake(x, mean, std, delta, gamma, eps, unbiased, per_sample):
    _check_slack_shapes("bn_stat_slack_loss", x, mean, std, delta, gamma)
    acc = acc_dtype(x)
    n, c = x.shape[0], x.shape[1]
    if per_sample:
        return x.new_empty((n,), dtype=acc), x.new_empty((n, c), dtype=acc), x.new_empty((n, c), dtype=acc)
    return x.new_empty((), dtype=acc), x.new_empty((c,), dtype=acc), x.new_empty((c,), dtype=acc)

@torch.library.register_fake("dsg_ext::bn_stat_slack_loss_backward")
def _slack_backward_fake(grad_loss, x, mean, std, delta, gamma, stat_mean, stat_std, unbiased, per_sample):
    op = "bn_stat_slack_loss_backward"
    _check_slack_shapes(op, x, mean, std, delta, gamma)
    torch._check(grad_loss.numel() == (x.shape[0] if per_sample else 1),
                 lambda: f"{op}: grad_loss must have one value per {'sample' if per_sample else 'batch'}")
    return _empty_in_layout(x)

@torch.library.register_fake("dsg_ext::bn_eval_slack")
def _bn_eval_slack_fake(x, bn_scale, bn_shift, mean, std, delta, gamma, eps, unbiased, per_sample=True):
    _check_slack_shapes("bn_eval_slack", x, mean, std, delta, gamma)
    _check_channels("bn_eval_slack", "bn_scale", bn_scale, x.shape[1], False)
    _check_channels("bn_eval_slack", "bn_shift", bn_shift, x.shape[1], False)
    acc = acc_dtype(x)
    n, c = x.shape[0], x.shape[1]
    if not per_sample:
        return (_empty_in_layout(x), x.new_empty((), dtype=acc), x.new_empty((c,), dtype=acc),
                x.new_empty((c,), dtype=acc))
    return (_empty_in_layout(x), x.new_empty((n,), dtype=acc), x.new_empty((n, c), dtype=acc),
            x.new_empty((n, c), dtype=acc))

@torch.library.register_fake("dsg_ext::bn_eval_slack_backward")
def _bn_eval_slack_backward_fake(grad_y, grad_loss, x, bn_scale, mean, std, delta, gamma, stat_mean, stat_std,
                                 unbiased, per_sample=True):
    op = "bn_eval_slack_backward"
    _check_slack_shapes(op, x, mean, std, delta, gamma)
    _check_channels(op, "bn_scale", bn_scale, x.shape[1], False)
    _check_same_shape(op, "x", x, "grad_y", grad_y)
    torch._check(grad_loss.numel() == (x.shape[0] if per_sample else 1),
                 lambda: f"{op}: grad_loss must have one value per {'sample' if per_sample else 'batch'}")
    return _empty_in_layout(x)

@torch.library.register_fake("dsg_ext::fake_quant")
def _fake_quant_fake(x, scale, zero_point, quant_min, quant_max, axis):
    _check_quant_shapes("fake_quant", x, scale, zero_point, axis)
    return _empty_in_layout(x)

@torch.library.register_fake("dsg_ext::fake_quant_backward")
def _fake_quant_backward_fake(grad, x, scale, zero_point, quant_min, quant_max, axis, param_grads):
    _check_quant_shapes("fake_quant_backward", x, scale, zero_point, axis)
    _check_same_shape("fake_quant_backward", "x", x, "grad", grad)
    return _empty_in_layout(x), torch.empty_like(scale), torch.empty_like(zero_point)

@torch.library.register_fake("dsg_ext::adaround")
def _adaround_fake(w, v, scale, zero_point, quant_min, quant_max, axis, beta, hard):
    _check_quant_shapes("adaround", w, scale, zero_point, axis)
    _check_same_shape("adaround", "w", w, "v", v)
    return _empty_in_layout(w), w.new_empty((), dtype=acc_dtype(w))

@torch.library.register_fake("dsg_ext::adaround_backward")
def _adaround_backward_fake(grad_w, grad_reg, w, v, scale, zero_point, quant_min, quant_max, axis, beta, hard, sg):
    _check_quant_shapes("adaround_backward", w, scale, zero_point, axis)
    _check_same_shape("adaround_backward", "w", w, "v", v)
    _check_same_shape("adaround_backward", "w", w, "grad_w", grad_w)
    return _empty_in_layout(w), torch.empty_like(scale)


def _check_shift(op, x, shift):
    name = "x" if op == "reflect_shift" else "grad"
    torch._check(x.dim() == 4, lambda: f"{op}: {name} must have shape (N, C, H, W), got shape {list(x.shape)}")
    torch._check(shift.numel() == 2, lambda: f"{op}: shift must hold two values (dy, dx), got shape "
                                             f"{list(shift.shape)}")


@torch.library.register_fake("dsg_ext::reflect_shift")
def _reflect_shift_fake(x, shift):
    _check_shift("reflect_shift", x, shift)
    return _empty_in_layout(x)


@torch.library.register_fake("dsg_ext::reflect_shift_backward")
def _reflect_shift_backward_fake(grad, shift):
    _check_shift("reflect_shift_backward", grad, shift)
    return _empty_in_layout(grad)
