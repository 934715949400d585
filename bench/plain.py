"""The peers' way: the same computations in plain PyTorch, as ZeroQ, DSG, BRECQ and AIMET write them.

These are the baselines the fused ops are benchmarked against (bench/); the package never uses
them. The tests keep their own float64 references in python_tests/.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from dsg_ext.ops import rectified_sigmoid


def slack_loss(
    x: Tensor,
    mean: Tensor,
    std: Tensor,
    delta=0.0,
    gamma=0.0,
    *,
    eps: float = 1e-5,
    unbiased: bool = False,
    mode: str = "per_sample",
) -> Tensor:
    """Per-sample (or batch) statistics with torch.mean / torch.var, squared hinge, summed over C."""
    spatial = tuple(range(2, x.dim()))
    dims = spatial if mode == "per_sample" else (0,) + spatial
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    mu = xf.mean(dims)
    sigma = torch.sqrt(xf.var(dims, correction=1 if unbiased else 0) + eps)
    gap_mean = torch.relu((mu - mean).abs() - delta)
    gap_std = torch.relu((sigma - std).abs() - gamma)
    return gap_mean.pow(2).sum(-1) + gap_std.pow(2).sum(-1)


def fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int, axis: Optional[int] = None):
    """PyTorch's own fake-quantization op (per tensor or per channel)."""
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point.to(torch.int32), quant_min, quant_max)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point.to(torch.int32), axis, quant_min, quant_max)


def fake_quant_learnable(
    x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int, axis: Optional[int] = None
):
    """PyTorch's learnable (LSQ-style) fake quantization: gradients to scale and zero point."""
    if axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, quant_min, quant_max, 1.0)
    return torch._fake_quantize_learnable_per_channel_affine(x, scale, zero_point, axis, quant_min, quant_max, 1.0)


def adaround(
    w: Tensor,
    v: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_min: int,
    quant_max: int,
    beta: float,
    hard: bool = False,
):
    """AdaRound as BRECQ/AIMET write it: a chain of elementwise ops for the rounding and the regularizer.

    scale and zero_point broadcast against w (e.g. shape (O, 1, 1, 1) per output channel).
    """
    w_floor = torch.floor(w / scale)
    if hard:
        h = (v >= 0).to(w.dtype)
    else:
        h = rectified_sigmoid(v)
    w_q = scale * (torch.clamp(w_floor + h + zero_point, quant_min, quant_max) - zero_point)
    reg = (1 - (2 * h - 1).abs().pow(beta)).sum()
    return w_q, reg


def plain_rounding(w: Tensor, v: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                   axis: Optional[int] = None, *, beta: float = 2.0, hard: bool = False):
    """``adaround`` with the signature of ``dsg_ext.adaround`` (per-channel parameters along ``axis``),
    to put in place of a ``WeightQuantizer.rounding`` for timing comparisons."""
    shape = [1] * w.dim()
    if axis is not None:
        shape[axis] = -1
    return adaround(w, v, scale.view(shape), zero_point.view(shape).to(w.dtype), quant_min, quant_max, beta=beta,
                    hard=hard)
