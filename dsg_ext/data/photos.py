"""Real photos available offline: the sample images inside the scikit-image wheel, as deterministic
crops at a model's input size (no labels: for fidelity measurements and real-photo calibration)."""

from __future__ import annotations

import os
from typing import List, Optional

import torch
from torch import Tensor

from ..errors import DataSourceError
from ..models.spec import InputSpec
from .images import normalised

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "brick.png",
                  "grass.png", "gravel.png", "camera.png", "coins.png", "moon.png", "horse.png", "page.png",
                  "text.png", "cell.png", "clock_motion.png")


def skimage_photo_dir() -> str:
    """The data directory of the installed scikit-image package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError("the skimage-photos image set needs the scikit-image package (pip install scikit-image)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def photo_crops(spec: InputSpec, crops_per_photo: int = 8, photos: Optional[List[str]] = None,
                seed: int = 0) -> Tensor:
    """Several deterministic crops (area 25-100%, random position, half of them mirrored) of each photo,
    resized to the model's input and normalised: a small real-image set for fidelity measurements."""
    from PIL import Image

    directory = skimage_photo_dir()
    g = torch.Generator().manual_seed(seed)
    out = []
    for name in photos or SKIMAGE_PHOTOS:
        path = os.path.join(directory, name)
        if not os.path.exists(path):
            continue
        with Image.open(path) as im:
            im = im.convert("L" if spec.channels == 1 else "RGB")
            w, h = im.size
            for k in range(crops_per_photo):
                area = 0.25 + 0.75 * float(torch.rand((), generator=g))
                side = max(8, int(min(w, h) * area ** 0.5))
                left = int(torch.randint(0, w - side + 1, (), generator=g))
                top = int(torch.randint(0, h - side + 1, (), generator=g))
                crop = im.crop((left, top, left + side, top + side)).resize((spec.image_size, spec.image_size),
                                                                            Image.BILINEAR)
                if k % 2:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                out.append(normalised(crop, spec))
    if not out:
        raise DataSourceError(f"{directory}: none of the sample photos found")
    return torch.stack(out)
