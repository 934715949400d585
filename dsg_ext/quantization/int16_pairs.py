"""Integer weights that onnxruntime's x86 kernels compute exactly on every CPU.

On x86 CPUs without VNNI (AVX2, and AVX-512 without VNNI), onnxruntime's uint8 x int8 kernels (MLAS's
QGEMM and symmetric convolution, ``vpmaddubsw``) add two adjacent products ``a[k] w[k] + a[k+1] w[k+1]``
into a *saturating* int16 before widening to int32; 255 * 127 * 2 does not fit. CPUs with VNNI
(``vpdpbusd``) and ARM add exactly. The pairs are consecutive entries (2j, 2j+1) of the reduction axis
in the order the kernels pack it: for a convolution (kernel row, kernel column, input channel) with the
input channel fastest (so a pair straddles two kernel taps when a group has an odd channel count), for
a Linear its input features; an odd final entry pairs with a zero. Activations enter raw (uint8 0..255,
the zero point corrected afterwards in int32; int8 activations are shifted to uint8 by +128 on x86).
Depthwise convolutions (one input and one output channel per group) run in a kernel that widens first
and is exact; so are uint8 weights (the U8U8 kernels widen to int16 before multiplying).

Two steps keep a layer exact at the least cost: ``pair_safe_scale`` widens a channel's scale where
that errs less than moving its large weights (chosen once, before any rounding is learned), and
``limit_pairs``, after the rounding (nearest, GPTQ, AdaRound), moves the weights of the pairs that can
still saturate toward zero, one step at a time, each step on the weight whose rounding error grows least,
until no pair can leave int16 for any input in the layer's activation range.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import QuantizationError

INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1


def uint8_range(qmin: int, qmax: int) -> Tuple[int, int]:
    """The raw uint8 values x86 kernels multiply, for an activation quantizer of range qmin..qmax
    (int8 activations are shifted by +128 on x86)."""
    return (qmin + 128, qmax + 128) if qmin < 0 else (qmin, qmax)


def kernel_pairs(layer: nn.Module) -> bool:
    """Whether onnxruntime runs ``layer`` in a kernel that adds products in pairs (every Conv2d but
    the depthwise ones, every Linear)."""
    if isinstance(layer, nn.Conv2d):
        groups = layer.groups
        return not (layer.in_channels // groups == 1 and layer.out_channels // groups == 1)
    return isinstance(layer, nn.Linear)


def pair_view(w: Tensor) -> Tensor:
    """(rows, K / 2, 2): each output channel's weights in the kernels' reduction order, in pairs.
    A Conv2d weight (out, in/groups, kh, kw) is read (kh, kw, in) per output channel."""
    rows = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.dim() == 4 else w.reshape(w.shape[0], -1)
    if rows.shape[1] % 2:
        rows = F.pad(rows, (0, 1))
    return rows.reshape(rows.shape[0], -1, 2)


def _unview(pairs: Tensor, shape: torch.Size) -> Tensor:
    rows = pairs.reshape(pairs.shape[0], -1)
    if len(shape) == 4:
        out, cin, kh, kw = shape
        # clone, not contiguous(): a 1x1 kernel's permuted view counts as contiguous with channels-last strides,
        # which would make the layer's output channels-last (and the exported graph gain an as_strided)
        return rows[:, : kh * kw * cin].reshape(out, kh, kw, cin).permute(0, 3, 1, 2).clone(
            memory_format=torch.contiguous_format)
    return rows[:, : shape[1]].reshape(shape).contiguous()


def pair_excess(pairs: Tensor, lo: int, hi: int) -> Tuple[Tensor, Tensor]:
    """For pairs of integer weights (..., 2) and inputs in lo..hi: how far the largest pair sum lies
    above int16's top and the smallest below its bottom (> 0 where a pair can saturate)."""
    p = pairs.to(torch.int64)
    pos, neg = p.clamp(min=0).sum(-1), p.clamp(max=0).sum(-1)
    return hi * pos + lo * neg - INT16_MAX, INT16_MIN - (lo * pos + hi * neg)


def can_saturate(w_int: Tensor, lo: int = 0, hi: int = 255) -> Tensor:
    """(rows, K / 2) bool: the pairs of ``w_int`` whose sum can leave int16 for inputs in lo..hi."""
    over, under = pair_excess(pair_view(w_int), lo, hi)
    return (over > 0) | (under > 0)


def could_need_limit(qmin: int, qmax: int, lo: int, hi: int) -> bool:
    """Whether any pair of weights in qmin..qmax can leave int16 for inputs in lo..hi (never below 8-bit
    weights or activations)."""
    worst = torch.tensor([[qmax, qmax], [qmin, qmin]])
    over, under = pair_excess(worst, lo, hi)
    return bool((over > 0).any() or (under > 0).any())


def _fix(q: Tensor, t: Tensor, lo: int, hi: int) -> Tensor:
    """Greedy steps toward zero on pairs (R, 2) until none can saturate: each step on the weight whose
    rounding error grows least (optimal for the squared error, convex and separable)."""
    for _ in range(2 * (1 << 8) + 2):  # each step takes lo or hi (>= 1) off the excess
        over, under = pair_excess(q, lo, hi)
        if not bool((over > 0).any() or (under > 0).any()):
            return q
        error = q.to(torch.float64) - t
        # too high: lower the positive weight rounded furthest up (ties: the larger); too low: the converse
        down = torch.where(q > 0, error + 1e-9 * q, torch.full_like(error, -torch.inf)).argmax(-1, keepdim=True)
        up = torch.where(q < 0, error + 1e-9 * q, torch.full_like(error, torch.inf)).argmin(-1, keepdim=True)
        step = torch.zeros_like(q)
        step.scatter_(-1, down, -(over > 0).to(q.dtype).unsqueeze(-1))
        step.scatter_add_(-1, up, (under > 0).to(q.dtype).unsqueeze(-1))
        q = q + step
    raise QuantizationError("internal: the int16 pair limit did not converge")  # pragma: no cover -- bounded


@torch.no_grad()
def limit_pairs(w_int: Tensor, target: Optional[Tensor], lo: int = 0, hi: int = 255) -> Tuple[Tensor, int]:
    """The integer weights ``w_int`` with every pair that can saturate moved inside int16.

    Args:
        w_int: integer weights (out, in/groups, kh, kw) or (out, in), zero point 0.
        target: the unrounded weights in integer units (w / scale), same shape; the step that grows
            |w_int - target| least is taken first. None: the larger weight of the pair moves.
        lo, hi: the raw uint8 input range (``uint8_range`` of the layer's input quantizer).

    Returns:
        (the weights, same dtype and shape; how many weights moved).
    """
    q = pair_view(w_int.to(torch.int64)).clone()  # a view of w_int itself where that is int64 already
    over, under = pair_excess(q, lo, hi)
    risky = (over > 0) | (under > 0)
    if not bool(risky.any()):
        return w_int, 0
    t = pair_view(target.to(torch.float64)) if target is not None else q.to(torch.float64)
    before = q[risky]
    fixed = _fix(before, t[risky], lo, hi)
    q[risky] = fixed
    return _unview(q, w_int.shape).to(w_int.dtype), int((fixed != before).sum())


@torch.no_grad()
def pair_safe_scale(w: Tensor, scale: Tensor, qmin: int, qmax: int, lo: int = 0, hi: int = 255,
                    candidates: int = 17) -> Tensor:
    """A scale (same shape as ``scale``: per output channel or per tensor) no smaller than ``scale`` for
    which nearest rounding of ``w`` plus ``limit_pairs`` errs least (squared error in float units).

    Where a channel's large weights sit in pairs, keeping the scale and moving them costs far more than
    a slightly coarser grid (EfficientNet-Lite0: the moved weights' error grows 10-70x); the candidates
    run from ``scale`` to the scale at which the float weights' own pairs fit.
    """
    rows = w.shape[0]
    per_row = scale.numel() == rows and rows > 1
    s = scale.detach().to(torch.float64).reshape(-1).expand(rows) if per_row else \
        scale.detach().to(torch.float64).reshape(1).expand(rows)
    t = w.detach().to(torch.float64) / s.view([-1] + [1] * (w.dim() - 1))
    pairs = pair_view(t)
    pos, neg = pairs.clamp(min=0).sum(-1), pairs.clamp(max=0).sum(-1)  # (rows, K/2)
    need = torch.maximum((hi * pos + lo * neg) / INT16_MAX, (lo * pos + hi * neg) / INT16_MIN).amax(-1)
    top = need.clamp(min=1.0) * (1 + 1 / 64)  # past rounding up of both weights
    if not per_row:
        top = top.amax().expand(rows)
    # A coarser grid only shrinks |round(t / f)|, so the pairs that can saturate at some candidate are among
    # those that can at f = 1: limit_pairs runs on those alone (1-5% of the pairs), every other weight keeps
    # its nearest rounding, whose error is summed over the whole tensor.
    over, under = pair_excess(torch.round(pairs).clamp(qmin, qmax), lo, hi)
    risky = (over > 0) | (under > 0)
    risky_rows = risky.nonzero()[:, 0]
    risky_t = pairs[risky]  # (R, 2)
    best_error = torch.full((rows,), torch.inf, dtype=torch.float64, device=t.device)
    best = torch.ones(rows, dtype=torch.float64, device=t.device)
    for j in range(candidates):
        f = 1 + (top - 1) * j / (candidates - 1)
        tf = t / f.view([-1] + [1] * (w.dim() - 1))
        error = ((torch.round(tf).clamp(qmin, qmax) - tf) ** 2).reshape(rows, -1).sum(-1)
        if risky_t.numel():
            sub = risky_t / f[risky_rows, None]
            nearest = torch.round(sub).clamp(qmin, qmax)
            moved = _fix(nearest, sub, lo, hi)
            error = error.index_add(0, risky_rows, ((moved - sub) ** 2 - (nearest - sub) ** 2).sum(-1))
        error = (f * f) * error
        if not per_row:
            error = error.sum().expand(rows)
        better = error < best_error
        best_error, best = torch.where(better, error, best_error), torch.where(better, f, best)
    chosen = s * best
    return (chosen if per_row else chosen[:1]).to(scale.dtype).reshape(scale.shape)
