"""Images from a small generator and a per-batch latent (Genie, CVPR'23), instead of free pixels.

Genie optimises, for every batch, a freshly initialised generator together with the batch's latent
vectors against the BN statistics: the generator's convolutions tie neighbouring pixels together (a
prior towards smooth, image-like structure) and its batch normalisations keep the batch spread out,
while the latent gives each sample its own degrees of freedom. The architecture is the paper's:
latent -> Linear -> (c1, s/4, s/4) -> BN -> upsample x2 -> conv 3x3 -> BN -> LeakyReLU(0.2) ->
upsample x2 -> conv 3x3 -> tanh -> BN without affine parameters (each image channel normalised over
the batch, i.e. a standard-normal input distribution as the statistic loss's input term asks).
Its batch normalisations run in training mode (batch statistics) throughout, as in the paper.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import SynthesisConfig


class ImageGenerator(nn.Module):
    """latent (N, latent_dim) -> images (N, channels, size, size) in the model's normalised space."""

    def __init__(self, size: int, channels: int, latent_dim: int = 256, width: int = 128):
        super().__init__()
        self.size = size
        self.base = math.ceil(size / 4)  # generated at 4 * base, then centre-cropped to size
        self.width = width
        self.linear = nn.Linear(latent_dim, width * self.base**2)
        self.body = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, width // 2, 3, padding=1),
            nn.BatchNorm2d(width // 2),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width // 2, channels, 3, padding=1),
            nn.Tanh(),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: Tensor) -> Tensor:
        x = self.body(self.linear(z).view(z.shape[0], self.width, self.base, self.base))
        off = (x.shape[-1] - self.size) // 2
        return x[..., off:off + self.size, off:off + self.size] if x.shape[-1] != self.size else x


class GeneratedImages(nn.Module):
    """One batch's generator and latent, seeded from (seed, batch index) only; calling it renders the batch.

    The images are ``crop_pad`` pixels larger on every side than ``image_size``, like the free pixels
    they replace (the augmenter crops them)."""

    def __init__(self, config: SynthesisConfig, batch_index: int, count: int, device):
        super().__init__()
        seed = config.batch_seed(batch_index)
        size = config.image_size + 2 * config.crop_pad
        with torch.random.fork_rng(devices=[]):  # torch's default initialisation, without touching the global RNG
            torch.manual_seed(seed)
            self.net = ImageGenerator(size, config.channels, config.latent_dim)
        gen = torch.Generator().manual_seed(seed)
        self.latent = nn.Parameter(torch.randn(count, config.latent_dim, generator=gen))
        self.to(device)

    def forward(self) -> Tensor:
        return self.net(self.latent)
