"""AdaRound's formulas in plain torch: the soft rounding h(V), the regularizer R(V) and the start V0.

The fused ``adaround`` op computes h and R in one pass (csrc/adaround.h); these are the same formulas
for statistics on V, baselines, the CUDA-graph engine's device-held beta, and the tests' references.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

ADAROUND_ZETA = 1.1
ADAROUND_GAMMA = -0.1

__all__ = ["ADAROUND_ZETA", "ADAROUND_GAMMA", "rectified_sigmoid", "rounding_regularizer", "adaround_init"]


def as_tensor(value, device, dtype) -> Tensor:
    """``value`` unchanged when it is a tensor, else a tensor of ``dtype`` on ``device``."""
    if isinstance(value, Tensor):
        return value
    return torch.tensor(value, dtype=dtype, device=device)


def rectified_sigmoid(v: Tensor) -> Tensor:
    """AdaRound's soft rounding h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1), in plain torch:
    the formula ``adaround`` fuses (csrc/adaround.h), for statistics on V and for baselines."""
    return torch.clamp(torch.sigmoid(v) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1)


def rounding_regularizer(v: Tensor, beta: Union[float, Tensor]) -> Tensor:
    """AdaRound's R(V) = sum(1 - |2 h(V) - 1|^beta) in plain torch (float32 or wider), for a beta held in
    a device tensor: a CUDA-graph-captured reconstruction step reads the annealed beta there, where
    ``adaround``'s fused R takes beta as a host number fixed at capture."""
    u = (2 * rectified_sigmoid(v if v.dtype == torch.float64 else v.float()) - 1).abs()
    return (1 - u.pow(beta)).sum()


def adaround_init(w: Tensor, scale: Union[float, Tensor], axis: Optional[int] = None) -> Tensor:
    """Rounding variables V0 with h(V0) = frac(w / scale): AdaRound starts from the float weights.

    Checks what ``adaround`` checks: scale finite and > 0, one scale per tensor (axis=None) or one
    per channel along a valid ``axis``."""
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TypeError(f"adaround_init: w must be a floating tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    scale = as_tensor(scale, w.device, w.dtype).to(w.dtype)
    if not scale.is_floating_point() or not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError("adaround_init: scale must be finite and > 0")
    if axis is None:
        if scale.numel() != 1:
            raise ValueError(f"adaround_init: {scale.numel()} scales need an axis (per-channel), got axis=None")
    else:
        if isinstance(axis, bool) or not isinstance(axis, int) or not -w.dim() <= axis < w.dim():
            raise ValueError(f"adaround_init: axis {axis!r} out of range for a {w.dim()}-d w")
        axis = axis % w.dim()
        if scale.numel() not in (1, w.shape[axis]):
            raise ValueError(f"adaround_init: scale must have {w.shape[axis]} values (w.shape[{axis}]), "
                             f"got {scale.numel()}")
    if axis is not None and scale.numel() > 1:
        shape = [1] * w.dim()
        shape[axis] = -1
        scale = scale.reshape(shape)
    scaled = w / scale
    if not bool(torch.isfinite(scaled[torch.isfinite(w)]).all()):
        raise ValueError(f"adaround_init: w / scale overflows {w.dtype} (a scale of {float(scale.min()):.3g} is too "
                         "small for these weights)")
    frac = scaled - torch.floor(scaled)
    ratio = (ADAROUND_ZETA - ADAROUND_GAMMA) / (frac - ADAROUND_GAMMA) - 1.0
    return -torch.log(ratio)
