"""How diverse and how realistic a set of samples is, the measures every `dsg generate` run
reports in its manifest summary:

- relative sample spread per BN layer: the std over samples of the per-sample channel means,
  divided by the BN's running std, averaged over channels (and over layers for the mean); real
  images spread widely, collapsed (homogeneous) samples do not;
- classes predicted: how many different classes the float network predicts on the samples;
- pixel range: the samples' pixels back in [0, 1] image space, and the fraction outside it by more
  than float rounding (PIXEL_TOLERANCE: a pixel clamped to the valid range's edge in normalised space
  comes back as -3e-8 or 1 + 6e-8, which is not outside).
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from ..models import LoadedModel
from .loop import per_sample_statistics
from .taps import batchnorm_layers

PIXEL_TOLERANCE = 1e-5  # image space; 1/255 is one 8-bit level


@torch.no_grad()
def diversity(loaded: LoadedModel, images: torch.Tensor, device: str = "cpu", unbiased: bool = True) -> Dict[str, Any]:
    """The diversity measures of ``images`` (in the model's normalised input space) for ``loaded``."""
    model = loaded.model.eval()
    stats = per_sample_statistics(model, images, unbiased=unbiased, device=device)
    bn_std = {name: torch.sqrt(bn.running_var.float() + bn.eps).cpu() for name, bn in batchnorm_layers(model)}
    relative = {name: float((m.std(0).cpu() / bn_std[name]).mean()) for name, m in stats.items()}
    logits = torch.cat([model(images[i:i + 128].to(device)).float().cpu() for i in range(0, images.shape[0], 128)])
    spec = loaded.input
    mean = torch.tensor(spec.mean[: images.shape[1]]).view(1, -1, 1, 1)
    std = torch.tensor(spec.std[: images.shape[1]]).view(1, -1, 1, 1)
    pixels = images.float() * std + mean
    outside = (pixels < -PIXEL_TOLERANCE) | (pixels > 1 + PIXEL_TOLERANCE)
    return {
        "relative_sample_spread_mean": sum(relative.values()) / len(relative),
        "relative_sample_spread": relative,
        "classes_predicted": int(logits.argmax(1).unique().numel()) if logits.dim() == 2 else None,
        "num_classes": int(logits.shape[1]) if logits.dim() == 2 else None,
        "pixel_min": float(pixels.min()),
        "pixel_max": float(pixels.max()),
        "pixels_outside_valid_range": float(outside.float().mean()),
        "images_measured": int(images.shape[0]),
    }
