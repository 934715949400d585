"""Independent plain-PyTorch references for the dsg_ext ops.

Nothing here calls dsg_ext: these are straightforward (slow, float64) transcriptions of the op
contracts in dsg_ext/ops/, used as the oracle of the tests. Gradients come from autograd of
these functions (slack loss, AdaRound) or from the closed forms that torch's own learnable
fake-quantization ops implement (fake quant).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

F64 = torch.float64
ZETA, GAMMA = 1.1, -0.1


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / arithmetic precision of the ops: fp64 for fp64 inputs, fp32 otherwise."""
    return F64 if dtype == F64 else torch.float32


def _as_tensor(v, dtype=F64) -> Tensor:
    return v.detach().to("cpu", dtype) if isinstance(v, Tensor) else torch.tensor(v, dtype=dtype)


def channel_view(t: Tensor, ndim: int, axis: Optional[int]) -> Tensor:
    """A per-tensor (numel 1) or per-channel (length of dim `axis`) parameter, broadcastable to an ndim tensor."""
    if axis is None:
        return t.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


# ---------------------------------------------------------------------------------------------
# BN-statistic slack loss
# ---------------------------------------------------------------------------------------------


def slack_stats_ref(x: Tensor, eps: float = 1e-5, unbiased: bool = False, mode: str = "per_sample"):
    """(mean~, std~) of x (float64, differentiable): (N, C) per sample, (C) per batch."""
    x = x.to(F64)
    n, c = x.shape[0], x.shape[1]
    m = math.prod(x.shape[2:])
    if mode == "per_sample":
        g = x.reshape(n, c, m)
    elif mode == "batch":
        g = x.reshape(n, c, m).transpose(0, 1).reshape(c, n * m)
    else:
        raise ValueError(mode)
    mean = g.mean(dim=-1)
    var = g.var(dim=-1, correction=1 if unbiased else 0)
    std = torch.sqrt(var + eps)
    return mean, std


def slack_loss_ref(
    x: Tensor,
    mean: Tensor,
    std: Tensor,
    delta: Union[float, Tensor] = 0.0,
    gamma: Union[float, Tensor] = 0.0,
    eps: float = 1e-5,
    unbiased: bool = False,
    mode: str = "per_sample",
    return_stats: bool = False,
):
    """L[n] = sum_c relu(|mean~ - mean| - delta)^2 + relu(|std~ - std| - gamma)^2 (scalar in batch mode)."""
    sm, ss = slack_stats_ref(x, eps, unbiased, mode)
    mu = _as_tensor(mean).to(sm.device)
    sigma = _as_tensor(std).to(sm.device)
    d = _as_tensor(delta).to(sm.device)
    g = _as_tensor(gamma).to(sm.device)
    term = torch.relu((sm - mu).abs() - d) ** 2 + torch.relu((ss - sigma).abs() - g) ** 2
    loss = term.sum(dim=-1)
    if return_stats:
        return loss, sm, ss
    return loss


def slack_loss_lowprec(x: Tensor, mean, std, delta=0.0, gamma=0.0, eps=1e-5, unbiased=False, mode="per_sample"):
    """The same loss computed by plain PyTorch in the dtype of x (fp16/bf16), as a user would write it."""
    dt = x.dtype
    n, c = x.shape[0], x.shape[1]
    m = math.prod(x.shape[2:])
    g = x.reshape(n, c, m) if mode == "per_sample" else x.reshape(n, c, m).transpose(0, 1).reshape(c, n * m)
    sm = g.mean(dim=-1)
    ss = torch.sqrt(g.var(dim=-1, correction=1 if unbiased else 0) + eps)
    mu, sigma = _as_tensor(mean, dt), _as_tensor(std, dt)
    d, gm = _as_tensor(delta, dt), _as_tensor(gamma, dt)
    term = torch.relu((sm - mu).abs() - d) ** 2 + torch.relu((ss - sigma).abs() - gm) ** 2
    return term.sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# Fake quantization
# ---------------------------------------------------------------------------------------------


def fq_zero_point(zero_point: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """Effective zero point (float64): floating ones rounded half to even and clamped; integers as is."""
    z = _as_tensor(zero_point)
    if zero_point.is_floating_point():
        z = torch.round(torch.clamp(z, quant_min, quant_max))
    return z


def _fq_levels(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min, quant_max, axis):
    """(unclamped level round(x * (1/s)) + z, clamped level, s, 1/s, z) in float64.

    1/s is computed in fp32 and x * (1/s) is rounded to the op's arithmetic precision (fp32, or fp64
    for fp64 x) before rounding half to even, as torch's fake-quantization kernels do.
    """
    acc = acc_dtype(x.dtype)
    s32 = _as_tensor(scale, torch.float32)
    inv32 = 1.0 / s32
    s = channel_view(s32.to(F64), x.dim(), axis)
    inv = channel_view(inv32, x.dim(), axis)
    z = channel_view(fq_zero_point(zero_point, quant_min, quant_max), x.dim(), axis)
    xd = x.detach().to("cpu")
    prod = (xd.to(acc) * inv.to(acc)).to(F64)
    level = torch.round(prod) + z
    q = torch.clamp(level, quant_min, quant_max)
    return level, q, s, inv.to(F64), z


def fake_quant_ref(x: Tensor, scale, zero_point, quant_min: int, quant_max: int, axis: Optional[int] = None) -> Tensor:
    """out = (clamp(round(x * (1/s)) + z, qmin, qmax) - z) * s, float64."""
    _, q, s, _, z = _fq_levels(x, scale, zero_point, quant_min, quant_max, axis)
    return (q - z) * s


def fake_quant_grads_ref(
    x: Tensor,
    grad: Tensor,
    scale,
    zero_point,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
    grad_factor: float = 1.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dscale, dzero_point) in float64: STE for x, torch._fake_quantize_learnable_* for the parameters.

    dscale/dzero_point have the shape of scale/zero_point (summed over everything but the channel).
    """
    level, q, s, inv, z = _fq_levels(x, scale, zero_point, quant_min, quant_max, axis)
    xd = x.detach().to("cpu", F64)
    dy = grad.detach().to("cpu", F64)
    out = (q - z) * s
    below = level < quant_min
    above = level > quant_max
    inside = ~(below | above)
    dx = torch.where(inside, dy, torch.zeros_like(dy))
    ds_el = torch.where(inside, dy * (out - xd) * inv, torch.where(below, dy * (quant_min - z), dy * (quant_max - z)))
    dz_el = torch.where(inside, torch.zeros_like(dy), -dy * s)
    if axis is None:
        ds, dz = ds_el.sum(), dz_el.sum()
    else:
        dims = [d for d in range(x.dim()) if d != axis % x.dim()]
        # (sum over an empty dim list would reduce everything)
        ds, dz = (ds_el.sum(dim=dims), dz_el.sum(dim=dims)) if dims else (ds_el, dz_el)
    shape_s = scale.shape if isinstance(scale, Tensor) else ()
    shape_z = zero_point.shape if isinstance(zero_point, Tensor) else ()
    return dx, (ds * grad_factor).reshape(shape_s), (dz * grad_factor).reshape(shape_z)


def fake_quant_lowprec(x: Tensor, scale, zero_point, quant_min, quant_max, axis=None) -> Tensor:
    """The fake-quantization formula evaluated by plain PyTorch entirely in the dtype of x (fp16/bf16)."""
    dt = x.dtype
    s = channel_view(_as_tensor(scale, torch.float32), x.dim(), axis)
    inv = (1.0 / s).to(dt)
    z = channel_view(fq_zero_point(zero_point, quant_min, quant_max), x.dim(), axis).to(dt)
    q = torch.clamp(torch.round(x * inv) + z, quant_min, quant_max)
    return (q - z) * s.to(dt)


# ---------------------------------------------------------------------------------------------
# AdaRound
# ---------------------------------------------------------------------------------------------


def rectified_sigmoid(v: Tensor) -> Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def adaround_ref(
    w: Tensor,
    v: Tensor,
    scale,
    zero_point,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
    beta: float = 2.0,
    hard: bool = False,
    div_dtype: torch.dtype = F64,
):
    """(w~, R) in float64 (differentiable in v and in a float64 scale tensor).

    w~ = s * (clamp(floor(w / s) + h + z, qmin, qmax) - z),  R = sum(1 - |2h - 1|^beta) (0 when hard).
    floor(w / s) is taken of w / s computed in ``div_dtype`` (the op's arithmetic precision).
    """
    if isinstance(scale, Tensor) and scale.requires_grad:
        s_t = scale
    else:
        s_t = _as_tensor(scale)
    s = channel_view(s_t.to(F64), w.dim(), axis)
    zp = zero_point if isinstance(zero_point, Tensor) else torch.tensor(zero_point)
    z = channel_view(fq_zero_point(zp, quant_min, quant_max), w.dim(), axis).to(s.device)
    wd = w.detach().to(s.device)
    ratio = (wd.to(div_dtype) / s.detach().to(div_dtype)).to(F64)
    if hard:
        h = (v.detach() >= 0).to(F64)
    else:
        h = rectified_sigmoid(v.to(F64))
    level = torch.floor(ratio) + h + z
    wq = s * (torch.clamp(level, quant_min, quant_max) - z)
    if hard:
        reg = torch.zeros((), dtype=F64)
    else:
        reg = (1.0 - (2.0 * h - 1.0).abs() ** beta).sum()
    return wq, reg


def adaround_lowprec(w: Tensor, v: Tensor, scale, zero_point, quant_min, quant_max, axis=None, beta=2.0):
    """Soft AdaRound computed by plain PyTorch in the dtype of w (fp16/bf16)."""
    dt = w.dtype
    s = channel_view(_as_tensor(scale, dt), w.dim(), axis)
    zp = zero_point if isinstance(zero_point, Tensor) else torch.tensor(zero_point)
    z = channel_view(fq_zero_point(zp, quant_min, quant_max), w.dim(), axis).to(dt)
    h = torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    wq = s * (torch.clamp(torch.floor(w / s) + h + z, quant_min, quant_max) - z)
    reg = (1.0 - (2.0 * h - 1.0).abs() ** beta).sum()
    return wq, reg
