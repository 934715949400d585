"""Typed Python API of the fused dsg_ext ops (torch.ops.dsg_ext.*).

Each op is declared once in C++ (csrc/ops.cpp) and implemented for CPU and CUDA. This module adds
what the dispatcher needs from Python: fake (meta) implementations so the ops trace under
torch.compile, and autograd formulas that call the fused backward ops.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .adaround_math import as_tensor
from .arg_checks import _check_target_std, _float_arg, _int_arg, _zero_point_arg
from .shape_checks import acc_dtype

_ops = torch.ops.dsg_ext

Number = Union[int, float]
__all__ = ["bn_stat_slack_loss", "bn_eval_slack", "fake_quant", "adaround", "grad_scale", "reflect_shift"]

# --------------------------------------------------------------------------------------------
# 1. BN-statistic slack loss
# --------------------------------------------------------------------------------------------

_SLACK_MODES = ("per_sample", "batch")


def _slack_margins(op: str, x: Tensor, delta, gamma, **targets) -> Tuple[Tensor, Tensor]:
    """delta and gamma as tensors in the accumulation dtype on x's device; refuses any of them or of
    ``targets`` requiring grad (the slack ops give gradients to x only)."""
    acc = acc_dtype(x) if x.is_floating_point() else torch.float32
    delta = as_tensor(delta, x.device, acc)
    gamma = as_tensor(gamma, x.device, acc)
    for name, t in (*targets.items(), ("delta", delta), ("gamma", gamma)):
        if isinstance(t, Tensor) and t.requires_grad:
            raise ValueError(f"{op}: {name} requires grad, but gradients flow to x only; pass {name}.detach()")
    return delta, gamma


def bn_stat_slack_loss(
    x: Tensor,
    mean: Tensor,
    std: Tensor,
    delta: Union[Number, Tensor] = 0.0,
    gamma: Union[Number, Tensor] = 0.0,
    *,
    eps: float = 1e-5,
    unbiased: bool = False,
    mode: str = "per_sample",
    return_stats: bool = False,
):
    """Squared-hinge distance between the channel statistics of x and a BatchNorm's statistics.

    x: (N, C, *spatial) activations (fp32/fp16/bf16/fp64, NCHW or channels_last).
    mean, std: (C) targets, e.g. ``bn.running_mean`` and ``sqrt(bn.running_var + bn.eps)``.
    delta, gamma: slack on the mean / std gap, scalar or (C); 0 gives ZeroQ's loss.
    mode "per_sample": mean~, std~ over H*W for every (n, c), loss of shape (N)
      L[n] = sum_c max(|mean~ - mean| - delta, 0)^2 + max(|std~ - std| - gamma, 0)^2.
    mode "batch": statistics over N*H*W, scalar loss.
    std~ = sqrt(var + eps), var with Bessel's correction when ``unbiased`` (as torch.var).
    The loss (and the statistics) are float32, float64 for float64 x. Gradients flow to x only.
    With ``return_stats`` also returns (mean~, std~), which carry no gradient.
    """
    if mode not in _SLACK_MODES:
        raise ValueError(f"bn_stat_slack_loss: mode must be one of {_SLACK_MODES}, got {mode!r}")
    delta, gamma = _slack_margins("bn_stat_slack_loss", x, delta, gamma, mean=mean, std=std)
    eps = _float_arg("bn_stat_slack_loss", "eps", eps, 0.0)
    _check_target_std("bn_stat_slack_loss", std)
    loss, stat_mean, stat_std = _ops.bn_stat_slack_loss(
        x, mean, std, delta, gamma, eps, bool(unbiased), mode == "per_sample"
    )
    if return_stats:
        return loss, stat_mean, stat_std
    return loss


def _slack_setup(ctx, inputs, output):
    x, mean, std, delta, gamma, _eps, unbiased, per_sample = inputs
    _loss, stat_mean, stat_std = output
    ctx.save_for_backward(x, mean, std, delta, gamma, stat_mean, stat_std)
    ctx.unbiased = unbiased
    ctx.per_sample = per_sample
    ctx.mark_non_differentiable(stat_mean, stat_std)


def _slack_backward(ctx, grad_loss, _grad_mean, _grad_std):
    x, mean, std, delta, gamma, stat_mean, stat_std = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _ops.bn_stat_slack_loss_backward(
            grad_loss, x, mean, std, delta, gamma, stat_mean, stat_std, ctx.unbiased, ctx.per_sample
        )
    return grad_x, None, None, None, None, None, None, None


torch.library.register_autograd("dsg_ext::bn_stat_slack_loss", _slack_backward, setup_context=_slack_setup)


def bn_eval_slack(
    x: Tensor,
    bn_scale: Tensor,
    bn_shift: Tensor,
    mean: Tensor,
    std: Tensor,
    delta: Union[Number, Tensor] = 0.0,
    gamma: Union[Number, Tensor] = 0.0,
    *,
    eps: float = 1e-5,
    unbiased: bool = False,
    mode: str = "per_sample",
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inference-mode BatchNorm fused with the slack loss on its input.

    Returns (y, loss, mean~, std~): y = x * bn_scale[c] + bn_shift[c] (dtype and layout of x) -- an
    eval-mode BatchNorm with bn_scale = weight / sqrt(running_var + bn.eps) and bn_shift = bias -
    running_mean * bn_scale -- and loss = ``bn_stat_slack_loss(x, mean, std, delta, gamma, mode=mode)``
    with its statistics: (N) per sample, or a scalar over the batch (N*H*W) with mode "batch". The
    backward gives x the gradient of both in one pass (grad_y * bn_scale + d loss / dx); bn_scale,
    bn_shift and the targets get none.
    """
    if mode not in _SLACK_MODES:
        raise ValueError(f"bn_eval_slack: mode must be one of {_SLACK_MODES}, got {mode!r}")
    delta, gamma = _slack_margins("bn_eval_slack", x, delta, gamma, bn_scale=bn_scale, bn_shift=bn_shift, mean=mean,
                                  std=std)
    eps = _float_arg("bn_eval_slack", "eps", eps, 0.0)
    _check_target_std("bn_eval_slack", std)
    return _ops.bn_eval_slack(x, bn_scale, bn_shift, mean, std, delta, gamma, eps, bool(unbiased), mode == "per_sample")


def _bn_eval_slack_setup(ctx, inputs, output):
    x, bn_scale, _shift, mean, std, delta, gamma, _eps, unbiased, *rest = inputs
    _y, _loss, stat_mean, stat_std = output
    ctx.save_for_backward(x, bn_scale, mean, std, delta, gamma, stat_mean, stat_std)
    ctx.unbiased = unbiased
    ctx.per_sample = rest[0] if rest else True
    ctx.mark_non_differentiable(stat_mean, stat_std)


def _bn_eval_slack_backward(ctx, grad_y, grad_loss, _grad_mean, _grad_std):
    x, bn_scale, mean, std, delta, gamma, stat_mean, stat_std = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        acc = stat_mean.dtype
        if grad_loss is None:
            grad_loss = x.new_zeros((x.shape[0],) if ctx.per_sample else (), dtype=acc)
        if grad_y is None:  # y unused: only the loss's gradient
            grad_x = _ops.bn_stat_slack_loss_backward(grad_loss, x, mean, std, delta, gamma, stat_mean, stat_std,
                                                      ctx.unbiased, ctx.per_sample)
        else:
            grad_x = _ops.bn_eval_slack_backward(grad_y, grad_loss, x, bn_scale, mean, std, delta, gamma, stat_mean,
                                                 stat_std, ctx.unbiased, ctx.per_sample)
    return grad_x, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("dsg_ext::bn_eval_slack", _bn_eval_slack_backward, setup_context=_bn_eval_slack_setup)


# --------------------------------------------------------------------------------------------
# 2. Fake quantization
# --------------------------------------------------------------------------------------------


def fake_quant(
    x: Tensor,
    scale: Union[float, Tensor],
    zero_point: Union[Number, Tensor],
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
    *,
    grad_factor: float = 1.0,
) -> Tensor:
    """Affine fake quantization, per tensor (axis=None) or per channel along ``axis``.

    out = (clamp(round_half_even(x * (1/scale)) + zero_point, quant_min, quant_max) - zero_point) * scale,
    bitwise equal to torch.fake_quantize_per_tensor_affine / per_channel_affine for fp32 inputs.
    Backward: straight-through to x (zero where clamped). When scale (and a floating zero_point)
    require grad, their gradients follow torch._fake_quantize_learnable_*, reduced per channel
    inside the kernel, times ``grad_factor`` (LSQ's gradient scale, applied by ``grad_scale`` on
    the parameters). A single zero point applies to every channel. Floating zero points are rounded
    half to even and clamped into the range; integer ones must lie inside it. NaN inputs give NaN
    outputs. On CUDA an invalid scale or zero point gives NaN (checking it would need a device sync).
    """
    scale = as_tensor(scale, x.device, torch.float32)
    zero_point = _zero_point_arg("fake_quant", zero_point, x.device, torch.float32)
    grad_factor = _float_arg("fake_quant", "grad_factor", grad_factor)
    if grad_factor != 1.0:
        scale = grad_scale(scale, grad_factor) if scale.requires_grad else scale
        zero_point = grad_scale(zero_point, grad_factor) if zero_point.requires_grad else zero_point
    return _ops.fake_quant(x, scale, zero_point, _int_arg("fake_quant", "quant_min", quant_min),
                           _int_arg("fake_quant", "quant_max", quant_max), axis)


@torch.library.custom_op("dsg_ext::grad_scale", mutates_args=())
def grad_scale(t: Tensor, factor: float) -> Tensor:
    """The identity whose gradient is multiplied by ``factor`` (LSQ's step-size gradient scale)."""
    return t.clone()


@grad_scale.register_fake
def _grad_scale_fake(t, factor):
    return torch.empty_like(t)


def _grad_scale_setup(ctx, inputs, output):
    ctx.factor = inputs[1]


def _grad_scale_backward(ctx, grad):
    return grad * ctx.factor, None


grad_scale.register_autograd(_grad_scale_backward, setup_context=_grad_scale_setup)


def _fake_quant_setup(ctx, inputs, output):
    x, scale, zero_point, quant_min, quant_max, axis = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.args = (quant_min, quant_max, axis)


def _fake_quant_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, dscale, dzero = _ops.fake_quant_backward(grad, x, scale, zero_point, *ctx.args, bool(needs[1] or needs[2]))
    return dx if needs[0] else None, dscale if needs[1] else None, dzero if needs[2] else None, None, None, None


torch.library.register_autograd("dsg_ext::fake_quant", _fake_quant_backward, setup_context=_fake_quant_setup)


# --------------------------------------------------------------------------------------------
# 3. AdaRound
# --------------------------------------------------------------------------------------------


def adaround(
    w: Tensor,
    v: Tensor,
    scale: Union[float, Tensor],
    zero_point: Union[Number, Tensor],
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
    *,
    beta: float = 2.0,
    hard: bool = False,
) -> Tuple[Tensor, Tensor]:
    """AdaRound rounding of weights w with rounding variables v (same shape and dtype).

    h(v) = clamp(sigmoid(v) * 1.2 - 0.1, 0, 1) (soft) or 1[v >= 0] (hard);
    w~ = scale * (clamp(floor(w / scale) + h + zero_point, quant_min, quant_max) - zero_point).
    Returns (w~, R) with R = sum(1 - |2h - 1|^beta) (0 when hard), in one fused pass; the backward
    gives gradients to v (and to scale when it requires grad) in one pass. scale/zero_point are
    per tensor (axis=None) or per channel along ``axis`` (usually 0, the output channels); a single
    zero point applies to every channel.
    """
    acc = acc_dtype(w) if w.is_floating_point() else torch.float32
    scale = as_tensor(scale, w.device, acc)
    zero_point = _zero_point_arg("adaround", zero_point, w.device, acc)
    return _ops.adaround(w, v, scale, zero_point, _int_arg("adaround", "quant_min", quant_min),
                         _int_arg("adaround", "quant_max", quant_max), axis, float(beta), bool(hard))


def _adaround_setup(ctx, inputs, output):
    w, v, scale, zero_point, quant_min, quant_max, axis, beta, hard = inputs
    ctx.save_for_backward(w, v, scale, zero_point)
    ctx.args = (quant_min, quant_max, axis, beta, hard)


def _adaround_backward(ctx, grad_w, grad_reg):
    w, v, scale, zero_point = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_v, grad_scale = _ops.adaround_backward(grad_w, grad_reg, w, v, scale, zero_point, *ctx.args, bool(needs[2]))
    # floor(w / scale) is flat almost everywhere: w receives no gradient.
    return None, grad_v if needs[1] else None, grad_scale if needs[2] else None, None, None, None, None, None, None


torch.library.register_autograd("dsg_ext::adaround", _adaround_backward, setup_context=_adaround_setup)


# --------------------------------------------------------------------------------------------
# 4. Swing convolution's shift
# --------------------------------------------------------------------------------------------


def reflect_shift(x: Tensor, shift: Tensor) -> Tensor:
    """x (N, C, H, W) shifted by ``shift`` = (dy, dx) pixels with reflection at the borders:
    ``out[..., i, j] = x[..., r(i + dy), r(j + dx)]``, r as torch's "reflect" padding (-1 -> 1, H -> H-2),
    i.e. ``F.pad(x, (p, p, p, p), mode="reflect")[..., p + dy:p + dy + H, p + dx:p + dx + W]`` without the
    padded copy. ``shift`` is an integer tensor of two values on x's device, read there (no host sync: a
    CUDA graph or torch.compile captures it with the values changing between replays); each value is
    clamped to +-(size - 1), on every device alike. The output keeps x's dtype and layout (contiguous or
    channels_last); the backward is the exact adjoint, one gather pass."""
    return _ops.reflect_shift(x, shift)


def _reflect_shift_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _reflect_shift_backward(ctx, grad):
    (shift,) = ctx.saved_tensors
    return _ops.reflect_shift_backward(grad, shift), None


def _reflect_shift_backward_backward(ctx, grad):  # the adjoint of the adjoint: double backward works too
    (shift,) = ctx.saved_tensors
    return _ops.reflect_shift(grad, shift), None


torch.library.register_autograd("dsg_ext::reflect_shift", _reflect_shift_backward, setup_context=_reflect_shift_setup)
torch.library.register_autograd("dsg_ext::reflect_shift_backward", _reflect_shift_backward_backward,
                                setup_context=_reflect_shift_setup)
