"""What the network sees of the optimised images during synthesis (the augmentation recipe options):

- random crop with extra pixels: the optimised images are ``crop_pad`` pixels larger on every side
  and each iteration shows the network a random ``image_size`` crop; the result is the centre crop;
- random horizontal flip of the whole batch with probability 1/2 per iteration;
- Gaussian smoothing (3x3, ``smoothing`` = sigma) of what the network sees and of the result, so that
  pixel-level noise the network cannot use is not optimised into the images;
- swing convolution (Genie): before every strided convolution the input is shifted by a random
  -1..1 pixels in each direction (reflect padding), so that the images cannot lock onto one
  stride phase.

Every random draw comes from a generator seeded by the batch, so a batch is reproducible.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .config import SynthesisConfig


def gaussian_kernel(sigma: float, channels: int, device, dtype=torch.float32) -> Tensor:
    """(channels, 1, 3, 3) depthwise Gaussian kernel, normalised to sum 1."""
    r = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    k1 = torch.exp(-(r**2) / (2 * sigma**2))
    k2 = torch.outer(k1, k1)
    k2 = (k2 / k2.sum()).to(device=device, dtype=dtype)
    return k2.expand(channels, 1, 3, 3).contiguous()


class Augmenter:
    """Turns the optimised (possibly padded) images into what the network sees, and into the result."""

    def __init__(self, config: SynthesisConfig, model: nn.Module, channels: int, device, seed: int):
        self.config = config
        self.size = config.image_size
        self.pad = config.crop_pad
        self.gen = torch.Generator().manual_seed(seed)
        self.kernel = gaussian_kernel(config.smoothing, channels, device) if config.smoothing > 0 else None
        self.active = False  # swing shifts only while a training view is being computed
        self._handles: List = []
        self._strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1] \
            if config.swing else []

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
        dy, dx = self._draw(3), self._draw(3)
        h, w = x.shape[2], x.shape[3]
        shifted = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")[..., dy:dy + h, dx:dx + w]
        return (shifted,) + tuple(inputs[1:])

    def smooth(self, x: Tensor) -> Tensor:
        if self.kernel is None:
            return x
        k = self.kernel.to(x.dtype)
        return nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), k, groups=x.shape[1])

    def view(self, x: Tensor, train: bool) -> Tensor:
        """The network's view of the optimised images: a random crop/flip when training, else the centre."""
        if self.pad:
            oy, ox = (self._draw(2 * self.pad + 1), self._draw(2 * self.pad + 1)) if train else (self.pad, self.pad)
            x = x[..., oy:oy + self.size, ox:ox + self.size]
        if train and self.config.flip and self._draw(2):
            x = x.flip(3)
        return self.smooth(x)

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
        self._handles = [m.register_forward_pre_hook(self._swing) for m in self._strided]
        self.active = True
        try:
            yield self
        finally:
            self.active = False
            self.close()

    def __enter__(self) -> "Augmenter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
