"""Fashion-MNIST: the IDX files of the Debian package `dataset-fashion-mnist`
(/usr/share/datasets/fashion-mnist, or the directory $DSG_FASHION_MNIST names) and the
preprocessing of the shipped ResNet-20 (28x28 padded to 32x32, normalised with the training-set
mean and std)."""

from __future__ import annotations

import gzip
import os
import struct
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DataSourceError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530


def data_dir() -> str:
    """The IDX directory: $DSG_FASHION_MNIST (configuration, read when data is loaded) or the Debian path."""
    return os.environ.get("DSG_FASHION_MNIST", DEFAULT_DIR)


def _read_idx(path: str, expected_dims: int) -> Tensor:
    if not os.path.exists(path):
        raise DataSourceError(
            f"{path} not found: install the Debian package dataset-fashion-mnist "
            f"(apt-get install dataset-fashion-mnist) or set DSG_FASHION_MNIST"
        )
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataSourceError(f"{path} is not readable ({e})") from e
    if len(data) < 4:
        raise DataSourceError(f"{path} is truncated")
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or dims != expected_dims:
        raise DataSourceError(f"{path} is not an IDX file of unsigned bytes with {expected_dims} dimensions")
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    count = 1
    for s in shape:
        count *= s
    body = data[4 + 4 * dims :]
    if len(body) != count:
        raise DataSourceError(f"{path} holds {len(body)} bytes of data, its header promises {count}: corrupt file")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def load_split(train: bool, directory: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N)) of the training or test split."""
    directory = directory or data_dir()
    prefix = "train" if train else "t10k"
    images = _read_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), 3)
    labels = _read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), 1).long()
    if images.shape[0] != labels.shape[0]:
        raise DataSourceError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def preprocess(images: Tensor) -> Tensor:
    """uint8 (N, 28, 28) -> normalised float (N, 1, 32, 32), zero-padded by 2 pixels (pad value = black)."""
    x = images.float().div_(255.0).unsqueeze(1)
    x = F.pad(x, (2, 2, 2, 2), value=0.0)
    return (x - MEAN) / STD


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Training augmentation of preprocessed (N, 1, 32, 32) images: random 32-px crops of the 4-pixel-padded
    images and horizontal flips (the ResNet-20's and the zoo's, scripts/train_*.py)."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4), value=float(x.min()))
    dx, dy = torch.randint(0, 9, (2, n), generator=gen)
    rows = torch.arange(32)[None, :] + dy[:, None]
    cols = torch.arange(32)[None, :] + dx[:, None]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(1)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(-1)
    return out
