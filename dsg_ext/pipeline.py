"""Calibration sources, evaluation and the end-to-end `dsg demo` (used by `dsg quantize/eval/demo`)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import dataset
from .models import InputSpec, LoadedModel

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class DataSourceError(RuntimeError):
    """A calibration or evaluation source that cannot be used with this model."""


# --------------------------------------------------------------------------------------------
# Images from disk, with the model's standard preprocessing
# --------------------------------------------------------------------------------------------


def _image_files(directory: str) -> List[str]:
    files = []
    for root, _dirs, names in os.walk(directory):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


def _normalised(im, spec: InputSpec) -> Tensor:
    """A PIL image already at spec.image_size x spec.image_size -> (C, S, S) in the model's input space."""
    s = spec.image_size
    data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    x = data.view(s, s, spec.channels).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(spec.mean).view(-1, 1, 1)) / torch.tensor(spec.std).view(-1, 1, 1)


def load_image(path: str, spec: InputSpec, crop_fraction: float = 0.875) -> Tensor:
    """One image file -> (C, S, S) in the model's normalised input space: shorter side resized to
    S / crop_fraction, centre crop S (the ImageNet evaluation recipe; for 28x28 Fashion-MNIST-like
    images, which are smaller than S, a zero-pad to S as in training)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
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
            return _normalised(im, spec)
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


# --------------------------------------------------------------------------------------------
# Calibration sources
# --------------------------------------------------------------------------------------------


def real_fashion_mnist(num: int = 256, seed: int = 0) -> Tensor:
    from . import fashion_mnist

    images, _ = fashion_mnist.load_split(train=True)
    g = torch.Generator().manual_seed(seed)
    return fashion_mnist.preprocess(images[torch.randperm(images.shape[0], generator=g)[:num]])


def gaussian_noise(spec: InputSpec, num: int = 256, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num, spec.channels, spec.image_size, spec.image_size, generator=g)


def synthetic_calibration(directory: str, loaded: LoadedModel, max_samples: Optional[int] = None) -> Tensor:
    """Images of a `dsg generate` dataset, refused when it was made for another model or image size."""
    manifest = dataset.load_manifest(directory)
    if manifest is None:
        raise DataSourceError(f"{directory}: not a dsg_ext synthetic dataset (no manifest.json); "
                              "for real images use --real")
    made_for = manifest.get("model", {})
    if made_for.get("sha256") != loaded.identity:
        raise DataSourceError(
            f"{directory} was generated for another model ({made_for.get('source')!r}, identity "
            f"{str(made_for.get('sha256'))[:12]}...), not for {loaded.source!r} ({loaded.identity[:12]}...)")
    shape = [loaded.input.channels, loaded.input.image_size, loaded.input.image_size]
    if manifest.get("image_shape") != shape:
        raise DataSourceError(f"{directory} holds images of shape {manifest.get('image_shape')}, the model takes {shape}")
    images = dataset.load_images(directory, max_samples=max_samples)
    if images.shape[0] == 0:
        raise DataSourceError(f"{directory}: empty dataset")
    return images


def calibration_images(loaded: LoadedModel, calib: Optional[str], real: Optional[str],
                       max_samples: int = 256) -> Tuple[Tensor, str]:
    """(images, description) from exactly one of a synthetic dataset directory or real images."""
    if (calib is None) == (real is None):
        raise DataSourceError("give exactly one calibration source: --calib DIR (from dsg generate) or --real DIR")
    if calib is not None:
        return synthetic_calibration(calib, loaded, max_samples), f"synthetic:{calib}"
    if real == "fashion-mnist":
        if loaded.source != "fashion-mnist-resnet20":
            raise DataSourceError("--real fashion-mnist goes with --model fashion-mnist-resnet20")
        return real_fashion_mnist(max_samples), "real:fashion-mnist-train"
    if real == "noise":
        return gaussian_noise(loaded.input, max_samples), "gaussian-noise"
    if real == "skimage-photos":
        return photo_crops(loaded.input)[:max_samples], "real:skimage-photos"
    images, _, _ = load_image_folder(real, loaded.input, max_samples)
    return images, f"real:{real}"


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def topk_accuracy(model: torch.nn.Module, images: Tensor, labels: Tensor, batch_size: int = 200) -> Tuple[float, float]:
    """(top-1, top-5) accuracy in percent of preprocessed images."""
    top1 = top5 = 0
    for i in range(0, images.shape[0], batch_size):
        logits = model(images[i : i + batch_size])
        y = labels[i : i + batch_size]
        pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += int((pred[:, 0] == y).sum())
        top5 += int((pred == y[:, None]).any(1).sum())
    return 100.0 * top1 / images.shape[0], 100.0 * top5 / images.shape[0]


def evaluate(model: torch.nn.Module, loaded: LoadedModel, data: str, max_images: Optional[int] = None,
             fp_model: Optional[torch.nn.Module] = None, batch_size: int = 200) -> Dict[str, Any]:
    """Top-1/top-5 on the Fashion-MNIST test set or an ImageFolder directory; with ``fp_model`` also the
    fidelity to it (top-1 agreement, mean KL). A directory without class subdirectories, or a
    `dsg generate` dataset made for this model, gives fidelity only."""
    from . import quantize

    result: Dict[str, Any] = {"data": data}
    if data == "skimage-photos":
        images, labels = photo_crops(loaded.input), None
        if max_images:
            images = images[:max_images]
    elif data == "fashion-mnist":
        from . import fashion_mnist

        images_u8, labels = fashion_mnist.load_split(train=False)
        if max_images:
            images_u8, labels = images_u8[:max_images], labels[:max_images]
        images = fashion_mnist.preprocess(images_u8)
    elif dataset.load_manifest(data) is not None:  # a `dsg generate` directory: fidelity on synthetic images
        images, labels = synthetic_calibration(data, loaded, max_images), None
    else:
        has_classes = os.path.isdir(data) and any(os.path.isdir(os.path.join(data, d)) for d in os.listdir(data))
        images, labels, _ = load_image_folder(data, loaded.input, max_images, with_labels=has_classes)
    result["images"] = int(images.shape[0])
    if labels is not None:
        result["top1"], result["top5"] = topk_accuracy(model, images, labels, batch_size)
    if fp_model is not None:
        result.update(quantize.fidelity(fp_model, model, images, batch_size))
    return result


# --------------------------------------------------------------------------------------------
# Real photos available offline: the sample images inside the scikit-image wheel
# --------------------------------------------------------------------------------------------

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
                out.append(_normalised(crop, spec))
    if not out:
        raise DataSourceError(f"{directory}: none of the sample photos found")
    return torch.stack(out)
