"""Quantization parameters: integer ranges, scale and zero point of a float range, the MSE range
search, and a weight tensor's per-channel ranges by a registered observer's weight rule."""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..errors import QuantizationError
from .config import OBSERVERS, weight_observers


def __getattr__(name: str):
    if name == "WEIGHT_OBSERVERS":  # deprecated here (before 2026-12-07 a tuple of this module)
        return weight_observers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quant_range(bits: int, symmetric: bool) -> Tuple[int, int]:
    """(quant_min, quant_max) of a signed symmetric or an unsigned asymmetric ``bits``-bit integer."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def range_to_qparams(lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool) -> Tuple[Tensor, Tensor]:
    """Scale and integer zero point covering [lo, hi] (elementwise, any shape); the range always holds 0."""
    lo = torch.minimum(lo, torch.zeros_like(lo)).double()
    hi = torch.maximum(hi, torch.zeros_like(hi)).double()
    if symmetric:
        scale = torch.maximum(hi, -lo) / qmax
        zp = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = (qmin - torch.round(lo / scale.clamp_min(1e-30))).clamp(qmin, qmax)
    scale = torch.where(scale > 1e-30, scale, torch.ones_like(scale) * 1e-8)
    return scale.float(), zp.to(torch.int32)


def fake_quant_broadcast(x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int) -> Tensor:
    """Plain fake quantization with broadcasting and no autograd, for the vectorised range searches
    (each candidate range is one slice of ``scale``)."""
    return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale


def mse_search(values: Tensor, lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool,
               candidates: int = 50) -> Tuple[Tensor, Tensor]:
    """Shrinks [lo, hi] by the factor among ``candidates`` in [0.2, 1] that minimises the quantization
    MSE of ``values`` -- all candidates at once (chunked over candidates to bound memory).

    values: (..., M) with lo/hi of shape (...); returns (scale, zero_point) of shape (...)."""
    alphas = torch.linspace(0.2, 1.0, candidates, dtype=torch.float32, device=values.device)
    best_err, best_alpha = None, None
    chunk = max(1, int(2e7 // max(1, values.numel())))
    for i in range(0, candidates, chunk):
        a = alphas[i : i + chunk].view(-1, *([1] * lo.dim()))  # (K, ...)
        s, z = range_to_qparams(lo.unsqueeze(0) * a, hi.unsqueeze(0) * a, qmin, qmax, symmetric)
        fq = fake_quant_broadcast(values.unsqueeze(0), s.unsqueeze(-1), z.unsqueeze(-1).float(), qmin, qmax)
        err = (fq - values.unsqueeze(0)).pow(2).mean(-1)  # (K, ...)
        e, k = err.min(0)
        if best_err is None:
            best_err, best_alpha = e, alphas[i + k]
        else:
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best_alpha = torch.where(better, alphas[i + k], best_alpha)
    return range_to_qparams(lo * best_alpha, hi * best_alpha, qmin, qmax, symmetric)


def weight_qparams(weight: Tensor, qmin: int, qmax: int, per_channel: bool, symmetric: bool,
                   observer: str) -> Tuple[Tensor, Tensor]:
    """Scale and zero point of a weight tensor, per output channel (dim 0) or per tensor, by the
    registered ``observer``'s weight rule (``"minmax"``: its min/max; ``"mse"``: the MSE-best shrinking)."""
    cls = OBSERVERS.get(observer)
    if cls is None or not cls.sets_weights:
        raise QuantizationError(f"weight observer must be one of {weight_observers()}, got {observer!r}")
    w = weight.detach().float()
    flat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    lo, hi = flat.amin(1), flat.amax(1)
    if symmetric:
        lo, hi = torch.minimum(lo, -hi), torch.maximum(hi, -lo)
    return cls.row_qparams(flat, lo, hi, qmin, qmax, symmetric)
