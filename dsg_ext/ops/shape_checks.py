"""Shape checks of the ops' fake (meta) kernels: the rules of csrc/checks.cpp, written with
``torch._check`` so that a traced or compiled program with a shape error is refused when it is
built, not when it first runs."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def acc_dtype(x: Tensor) -> torch.dtype:
    """The dtype the kernels accumulate in: float64 for float64 inputs, float32 for every other."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_channels(op: str, name: str, t: Tensor, channels, allow_scalar: bool) -> None:
    if allow_scalar and t.dim() <= 1 and t.numel() == 1:
        return
    torch._check(t.dim() == 1, lambda: f"{op}: {name} must have shape ({channels}), got shape {list(t.shape)}")
    torch._check(t.shape[0] == channels,
                 lambda: f"{op}: {name} must have shape ({channels}) to match the channel dimension of x, "
                         f"got shape {list(t.shape)}")


def _check_same_shape(op: str, name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    torch._check(a.shape == b.shape,
                 lambda: f"{op}: {name_b} must have the shape of {name_a} {list(a.shape)}, got {list(b.shape)}")


def _check_slack_shapes(op: str, x: Tensor, mean: Tensor, std: Tensor, delta: Tensor, gamma: Tensor) -> None:
    torch._check(x.dim() >= 2, lambda: f"{op}: x must have shape (N, C, *spatial), got shape {list(x.shape)}")
    c = x.shape[1]
    _check_channels(op, "mean", mean, c, False)
    _check_channels(op, "std", std, c, False)
    _check_channels(op, "delta", delta, c, True)
    _check_channels(op, "gamma", gamma, c, True)


def _check_quant_shapes(op: str, x: Tensor, scale: Tensor, zero_point: Tensor, axis: Optional[int]) -> None:
    if axis is None:
        torch._check(scale.numel() == 1, lambda: f"{op}: per-tensor quantization (axis=None) needs a single scale")
        torch._check(zero_point.numel() == 1,
                     lambda: f"{op}: per-tensor quantization (axis=None) needs a single zero_point")
        return
    torch._check(-x.dim() <= axis < x.dim(),
                 lambda: f"{op}: axis {axis} is out of range for a tensor of {x.dim()} dimensions")
    c = x.shape[axis]
    _check_channels(op, "scale", scale, c, False)
    _check_channels(op, "zero_point", zero_point, c, True)
