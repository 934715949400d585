"""The second-order statistics of a layer's inputs: H = sum over input vectors x of x x^T (float64),
for the weight rows of each group of a Conv2d (grouped and depthwise included) or a Linear layer.

A layer's output row is w . x for every input vector x its weight row meets: every spatial position
of an unfolded convolution input (so 64 images give thousands of vectors), every token of a Linear
input. Then ||W X - W~ X||^2 = sum over groups of tr((W_g - W~_g) H_g (W_g - W~_g)^T), the objective
the second-order rounding (second_order.py) minimises.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import QuantizationError

# Unfolded columns held at once (elements): the input is unfolded a few images at a time.
CHUNK_ELEMENTS = 1 << 24


def layer_groups(layer: nn.Module) -> Tuple[int, int]:
    """(groups, input dimension per group) of a Conv2d / Linear layer's weight rows."""
    if isinstance(layer, nn.Linear):
        return 1, layer.in_features
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return layer.groups, layer.in_channels // layer.groups * kh * kw
    raise QuantizationError(f"second-order rounding handles Conv2d and Linear layers, not {type(layer).__name__}")


def grouped_weight(layer: nn.Module, w: Tensor) -> Tensor:
    """``w`` (the layer's weight shape) as (groups, rows per group, input dimension per group)."""
    groups, dim = layer_groups(layer)
    return w.reshape(groups, w.shape[0] // groups, dim)


class LayerHessian:
    """Accumulates H_g = sum x x^T over the inputs ``add`` is given, one per weight group, in ``dtype``
    (float64; float32 where float64 would not fit in memory: second_order.plan_precision)."""

    def __init__(self, layer: nn.Module, device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float64):
        self.layer = layer
        self.groups, self.dim = layer_groups(layer)
        self.h = torch.zeros(self.groups, self.dim, self.dim, dtype=dtype, device=device)
        self.vectors = 0  # input vectors per group

    def _columns(self, x: Tensor) -> Tensor:
        """(groups, dim, M): the M input vectors of ``x`` that the weight rows of each group meet."""
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return x.reshape(-1, self.dim).t().unsqueeze(0)
        if x.dim() != 4:
            raise QuantizationError(f"a Conv2d input must be (N, C, H, W), got shape {tuple(x.shape)}")
        # Padding first (any padding_mode, 'same' included), then unfold without it: the layout of the
        # columns (channel, kernel row, kernel column) is the weight's (C_in / groups, kh, kw).
        pad = layer._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            x = F.pad(x, pad, mode=mode)
        cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)  # (N, C*kh*kw, L)
        n, _, positions = cols.shape
        return cols.reshape(n, self.groups, self.dim, positions).permute(1, 2, 0, 3).reshape(self.groups, self.dim, -1)

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        if not torch.isfinite(x).all():
            raise QuantizationError("a layer input contains NaN or Inf: the calibration images or the model "
                                    "before this layer produce them")
        taps = self.layer.kernel_size[0] * self.layer.kernel_size[1] if isinstance(self.layer, nn.Conv2d) else 1
        step = max(1, CHUNK_ELEMENTS // max(1, x[0].numel() * taps))  # images unfolded at once
        for i in range(0, x.shape[0], step):
            cols = self._columns(x[i : i + step]).to(self.h.dtype)
            self.h += cols @ cols.transpose(1, 2)
            self.vectors += cols.shape[2]
