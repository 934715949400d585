"""What the network sees of the optimised images during synthesis (the augmentation recipe options):

- random crop with extra pixels: the optimised images are ``crop_pad`` pixels larger on every side
  and each iteration shows the network a random ``image_size`` crop; the result is the centre crop;
- random horizontal flip of the whole batch with probability 1/2 per iteration;
- Gaussian smoothing (3x3, ``smoothing`` = sigma) of what the network sees and of the result, so that
  pixel-level noise the network cannot use is not optimised into the images;
- swing convolution (Genie): before every strided convolution the input is shifted by a random
  -1..1 pixels in each direction (reflect padding), so that the images cannot lock onto one
  stride phase.

Every random draw comes from a generator seeded by the batch, so a batch is reproducible. With
``augment_rng="device"`` (the default) all draws of a batch are made once, before its first
iteration, into a small table that is moved to the device; each training view reads its row through a
device counter, and crops, flips and shifts are index gathers (``index_select``) built from those
device values; swing's shift is the fused ``reflect_shift`` op (one copy forward, one gather backward,
any layout). No iteration then reads a random number on the host or syncs with the device, so the
whole recommended recipe can be captured in a CUDA graph (``cuda_graph``), and crop + flip + the
smoothing's reflect padding are one gather instead of three copies. ``augment_rng="host"`` is the
earlier path (a Python draw and a slice per step), kept so that datasets written before the table
existed resume with the same draws.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops import reflect_shift
from .config import SynthesisConfig


def gaussian_kernel(sigma: float, channels: int, device, dtype=torch.float32) -> Tensor:
    """(channels, 1, 3, 3) depthwise Gaussian kernel, normalised to sum 1."""
    r = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    k1 = torch.exp(-(r**2) / (2 * sigma**2))
    k2 = torch.outer(k1, k1)
    k2 = (k2 / k2.sum()).to(device=device, dtype=dtype)
    return k2.expand(channels, 1, 3, 3).contiguous()


def reflect_index(n: int, start, device, length: Optional[int] = None) -> Tensor:
    """Indices start + 0..length-1 (length n by default) folded back into 0..n-1 by reflection (torch's
    "reflect" padding: -1 -> 1, n -> n-2); ``start`` a Python int or a 0-d device tensor."""
    i = (torch.arange(n if length is None else length, device=device) + start).abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def gather2d(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """x[..., rows, :][..., cols] as one index_select over the flattened image when x is contiguous."""
    if x.is_contiguous():
        n, c, _h, w = x.shape
        flat = (rows[:, None] * w + cols[None, :]).reshape(-1)
        return x.reshape(n, c, -1).index_select(2, flat).view(n, c, rows.numel(), cols.numel())
    return x.index_select(2, rows).index_select(3, cols)


class Augmenter:
    """Turns the optimised (possibly padded) images into what the network sees, and into the result."""

    def __init__(self, config: SynthesisConfig, model: nn.Module, channels: int, device, seed: int):
        self.config = config
        self.size = config.image_size
        self.pad = config.crop_pad
        self.device = torch.device(device)
        self.gen = torch.Generator().manual_seed(seed)
        self.kernel = gaussian_kernel(config.smoothing, channels, device) if config.smoothing > 0 else None
        self.active = False  # swing shifts only while a training view is being computed
        self._handles: List = []
        self._strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1] \
            if config.swing else []
        self.on_device = config.augment_rng == "device"
        self.table: Optional[Tensor] = None  # (rows, columns) draws: crop oy, ox | flip | swing dy, dx per conv
        self._row: Optional[Tensor] = None
        self._call = 0
        self._fresh = False
        self._crop_indices: Dict[Tuple, Tuple[Tensor, Tensor]] = {}
        if self.on_device:
            self._make_table()

    def _make_table(self) -> None:
        highs = ([2 * self.pad + 1] * 2 if self.pad else []) + ([2] if self.config.flip else []) \
            + [3] * (2 * len(self._strided))
        self._flip_col = 2 if self.pad else 0
        self._swing_col = self._flip_col + (1 if self.config.flip else 0)
        if not highs:
            return
        rows = max(1, self.config.iterations)
        self.table = torch.stack([torch.randint(0, h, (rows,), generator=self.gen) for h in highs], 1).to(self.device)
        self.step_index = torch.zeros(1, dtype=torch.long, device=self.device)  # training views so far

    @property
    def enabled(self) -> bool:
        c = self.config
        return bool(self.pad or c.flip or c.swing or self.kernel is not None)

    def _draw(self, high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=self.gen))

    def _swing(self, _module, inputs) -> Optional[Tuple[Tensor, ...]]:
        if not self.active:
            return None
        x = inputs[0]
        if x.dim() != 4 or min(x.shape[2], x.shape[3]) < 2:
            return None
        h, w = x.shape[2], x.shape[3]
        if self.on_device:  # this conv's column pair of the row (a conv called twice reuses the pairs cyclically)
            col = self._swing_col + 2 * (self._call % len(self._strided))
            self._call += 1
            shifted = reflect_shift(x, self._row[col:col + 2] - 1)
        else:
            dy, dx = self._draw(3), self._draw(3)
            shifted = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")[..., dy:dy + h, dx:dx + w]
        return (shifted,) + tuple(inputs[1:])

    def smooth(self, x: Tensor) -> Tensor:
        if self.kernel is None:
            return x
        k = self.kernel.to(x.dtype)
        return nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), k, groups=x.shape[1])

    def view(self, x: Tensor, train: bool) -> Tensor:
        """The network's view of the optimised images: a random crop/flip when training, else the centre."""
        if self.on_device:
            return self._device_view(x, train)
        if self.pad:
            oy, ox = (self._draw(2 * self.pad + 1), self._draw(2 * self.pad + 1)) if train else (self.pad, self.pad)
            x = x[..., oy:oy + self.size, ox:ox + self.size]
        if train and self.config.flip and self._draw(2):
            x = x.flip(3)
        return self.smooth(x)

    def _advance(self) -> None:
        """The next row of draws (one per training view; read and counted on the device)."""
        self._row = self.table.index_select(0, self.step_index.remainder(self.table.shape[0])).squeeze(0)
        self.step_index.add_(1)
        self._call = 0
        self._fresh = True  # the training forward that follows uses this row

    def _crop_index(self, sh: int, sw: int, device) -> Tuple[Tensor, Tensor]:
        """Rows and columns of the unshifted crop (with the smoothing's reflect padding at its borders),
        made once per shape: each view only adds its offsets."""
        key = (sh, sw, device)
        if key not in self._crop_indices:
            if self.kernel is not None:
                index = (reflect_index(sh, -1, device, length=sh + 2), reflect_index(sw, -1, device, length=sw + 2))
            else:
                index = (torch.arange(sh, device=device), torch.arange(sw, device=device))
            self._crop_indices[key] = index
        return self._crop_indices[key]

    def _device_view(self, x: Tensor, train: bool) -> Tensor:
        """Crop, flip and the smoothing's reflect padding as one gather, offsets read on the device."""
        oy = ox = self.pad
        flip = None
        if train and self.table is not None:
            self._advance()
            if self.pad:
                oy, ox = self._row[0], self._row[1]
            if self.config.flip:
                flip = self._row[self._flip_col]
        if not (self.pad or flip is not None or self.kernel is not None):
            return x
        sh, sw = (self.size, self.size) if self.pad else (x.shape[2], x.shape[3])  # what the network sees
        rows, cols = self._crop_index(sh, sw, x.device)
        if flip is not None:  # mirror inside the crop: c -> sw-1-c
            cols = cols + flip * (sw - 1 - 2 * cols)
        x = gather2d(x, rows + oy, cols + ox)
        if self.kernel is None:
            return x
        return nn.functional.conv2d(x, self.kernel.to(x.dtype), groups=x.shape[1])

    def result(self, x: Tensor) -> Tensor:
        """The images synthesis hands out: the smoothed centre crop."""
        return self.view(x, train=False)

    @contextlib.contextmanager
    def training(self, train: bool = True) -> Iterator["Augmenter"]:
        """The window of a training forward: swing's hooks are on the strided convolutions only inside
        it, so nothing stays on the model whoever holds the Augmenter, and however the forward ends."""
        if not train:
            yield self
            return
        if self.on_device and self._strided and not self._fresh:
            self._advance()  # a training forward without a training view first
        self._handles = [m.register_forward_pre_hook(self._swing) for m in self._strided]
        self.active = True
        try:
            yield self
        finally:
            self.active = False
            self._fresh = False
            self.close()

    def __enter__(self) -> "Augmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
