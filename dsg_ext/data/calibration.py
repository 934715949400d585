"""Where calibration and evaluation images come from, by the names ``dsg quantize --calib/--real``
and ``dsg eval --data`` take: a ``dsg generate`` directory, Fashion-MNIST, scikit-image's photos,
an image directory, or Gaussian noise. Every source gives images in the model's normalised input
space."""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError, DataSourceError
from ..models.spec import InputSpec, LoadedModel
from . import fashion_mnist, store
from .images import load_image_folder
from .photos import photo_crops

DEFAULT_CALIBRATION_IMAGES = 256
FASHION_MNIST_MODEL = "fashion-mnist-resnet20"  # the model source --real fashion-mnist goes with


def _check_count(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")


def real_fashion_mnist(num: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0) -> Tensor:
    """``num`` random images of the Fashion-MNIST training split, preprocessed."""
    images, _ = fashion_mnist.load_split(train=True)
    g = torch.Generator().manual_seed(seed)
    return fashion_mnist.preprocess(images[torch.randperm(images.shape[0], generator=g)[:num]])


def gaussian_noise(spec: InputSpec, num: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0) -> Tensor:
    """Standard normal images: the data-free baseline that needs no synthesis."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num, spec.channels, spec.image_size, spec.image_size, generator=g)


def synthetic_calibration(directory: str, loaded: LoadedModel, max_samples: Optional[int] = None) -> Tensor:
    """Images of a `dsg generate` dataset, refused when it was made for another model or image size."""
    manifest = store.load_manifest(directory)
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
        raise DataSourceError(
            f"{directory} holds images of shape {manifest.get('image_shape')}, the model takes {shape}")
    images = store.load_images(directory, max_samples=max_samples)
    if images.shape[0] == 0:
        raise DataSourceError(f"{directory}: empty dataset")
    return images


def _check_fashion_model(loaded: LoadedModel, what: str) -> None:
    if loaded.source != FASHION_MNIST_MODEL and not loaded.source.startswith("zoo:"):
        raise DataSourceError(f"{what} goes with --model {FASHION_MNIST_MODEL} or a zoo:NAME network")


def _fashion_for(loaded: LoadedModel, x32: Tensor) -> Tensor:
    """Preprocessed (N, 1, 32, 32) Fashion-MNIST at the model's input: the zoo's 3 x 64 for zoo:NAME."""
    if loaded.source.startswith("zoo:"):
        from ..models.zoo import to_zoo_size

        return to_zoo_size(x32)
    return x32


# The real calibration sources named rather than given as a directory (``--real NAME``).
NAMED_REAL_SOURCES = ("fashion-mnist", "skimage-photos", "noise")


def calibration_images(loaded: LoadedModel, calib: Optional[str], real: Optional[str],
                       max_samples: int = DEFAULT_CALIBRATION_IMAGES) -> Tuple[Tensor, str]:
    """(images, description) from exactly one of a synthetic dataset directory (``calib``) or real
    images (``real``: a directory, "fashion-mnist", "skimage-photos" or "noise")."""
    _check_count("calibration images (--num-samples)", max_samples)
    if (calib is None) == (real is None):
        raise DataSourceError("give exactly one calibration source: --calib DIR (from dsg generate) or --real DIR")
    if calib is not None:
        return synthetic_calibration(calib, loaded, max_samples), f"synthetic:{calib}"
    if real == "fashion-mnist":
        _check_fashion_model(loaded, "--real fashion-mnist")
        return _fashion_for(loaded, real_fashion_mnist(max_samples)), "real:fashion-mnist-train"
    if real == "noise":
        return gaussian_noise(loaded.input, max_samples), "gaussian-noise"
    if real == "skimage-photos":
        return photo_crops(loaded.input)[:max_samples], "real:skimage-photos"
    images, _, _ = load_image_folder(real, loaded.input, max_samples)
    return images, f"real:{real}"


def evaluation_images(loaded: LoadedModel, data: str,
                      max_images: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """(images, labels or None) for ``dsg eval --data``: the Fashion-MNIST test split, an ImageFolder
    directory (labels from its class subdirectories), any image directory, "skimage-photos" or a
    `dsg generate` dataset made for the model (the last three without labels: fidelity only)."""
    if max_images is not None:
        _check_count("--max-images", max_images)
    if data == "skimage-photos":
        images = photo_crops(loaded.input)
        return (images[:max_images] if max_images else images), None
    if data == "fashion-mnist":
        _check_fashion_model(loaded, "--data fashion-mnist")
        images_u8, labels = fashion_mnist.load_split(train=False)
        if max_images:
            images_u8, labels = images_u8[:max_images], labels[:max_images]
        return _fashion_for(loaded, fashion_mnist.preprocess(images_u8)), labels
    if store.load_manifest(data) is not None:  # a `dsg generate` directory: fidelity on synthetic images
        return synthetic_calibration(data, loaded, max_images), None
    has_classes = os.path.isdir(data) and any(os.path.isdir(os.path.join(data, d)) for d in os.listdir(data))
    images, labels, _ = load_image_folder(data, loaded.input, max_images, with_labels=has_classes)
    return images, labels
