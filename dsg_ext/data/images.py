"""Image files from disk, with a model's standard preprocessing: one file (``load_image``) or a
directory, ImageFolder style when labels are wanted (``load_image_folder``)."""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .._utils.io import read_regular
from ..errors import DataSourceError
from ..models.spec import InputSpec

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _image_files(directory: str) -> List[str]:
    files = []
    for root, _dirs, names in os.walk(directory):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


def normalised(im, spec: InputSpec) -> Tensor:
    """A PIL image already at spec.image_size x spec.image_size -> (C, S, S) in the model's input space."""
    s = spec.image_size
    data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    x = data.view(s, s, spec.channels).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(spec.mean).view(-1, 1, 1)) / torch.tensor(spec.std).view(-1, 1, 1)


def load_image(path: str, spec: InputSpec, crop_fraction: float = 0.875) -> Tensor:
    """One image file -> (C, S, S) in the model's normalised input space: shorter side resized to
    S / crop_fraction, centre crop S (the ImageNet evaluation recipe; for 28x28 Fashion-MNIST-like
    images, which are smaller than S, a zero-pad to S as in training)."""
    import io

    from PIL import Image

    data = read_regular(path, DataSourceError, "image file")  # a FIFO among the images must not block
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L" if spec.channels == 1 else "RGB")
            w, h = im.size
            s = spec.image_size
            if spec.channels == 1 and max(w, h) <= s:
                canvas = Image.new("L", (s, s), 0)
                canvas.paste(im, ((s - w) // 2, (s - h) // 2))
                im = canvas
            else:
                short = round(s / crop_fraction)
                scale = short / min(w, h)
                im = im.resize((max(s, round(w * scale)), max(s, round(h * scale))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s))
            return normalised(im, spec)
    except Exception as e:
        raise DataSourceError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def load_image_folder(directory: str, spec: InputSpec, max_images: Optional[int] = None,
                      with_labels: bool = False) -> Tuple[Tensor, Optional[Tensor], List[str]]:
    """Images under ``directory``; with labels, ImageFolder style (class = sorted subdirectory index)."""
    if not os.path.isdir(directory):
        raise DataSourceError(f"{directory}: no such directory")
    files = _image_files(directory)
    if not files:
        raise DataSourceError(f"{directory}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    classes: List[str] = []
    labels = None
    if with_labels:
        classes = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
        if not classes:
            raise DataSourceError(f"{directory}: evaluation needs one subdirectory per class (ImageFolder layout)")
        index = {c: i for i, c in enumerate(classes)}
        files = [f for f in files if os.path.relpath(f, directory).split(os.sep)[0] in index]
        labels = torch.tensor([index[os.path.relpath(f, directory).split(os.sep)[0]] for f in files])
    if max_images is not None:
        g = torch.Generator().manual_seed(0)
        pick = torch.randperm(len(files), generator=g)[:max_images].sort().values.tolist()
        files = [files[i] for i in pick]
        labels = labels[pick] if labels is not None else None
    images = torch.stack([load_image(f, spec) for f in files])
    return images, labels, classes
