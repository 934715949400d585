"""Fashion-MNIST and the project's own small real network: a CIFAR-style ResNet-20 with BatchNorm.

Data: the IDX files of the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist,
or $DSG_FASHION_MNIST). Images are 28x28, padded to 32x32, normalised with the training-set mean
and std. The trained checkpoint ships inside the package (dsg_ext/weights/).
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "resnet20_fashion_mnist.safetensors")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class DataError(RuntimeError):
    """Missing or corrupt dataset files."""


def data_dir() -> str:
    return os.environ.get("DSG_FASHION_MNIST", DEFAULT_DIR)


def _read_idx(path: str, expected_dims: int) -> Tensor:
    if not os.path.exists(path):
        raise DataError(
            f"{path} not found: install the Debian package dataset-fashion-mnist "
            f"(apt-get install dataset-fashion-mnist) or set DSG_FASHION_MNIST"
        )
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not readable ({e})") from e
    if len(data) < 4:
        raise DataError(f"{path} is truncated")
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or dims != expected_dims:
        raise DataError(f"{path} is not an IDX file of unsigned bytes with {expected_dims} dimensions")
    shape = struct.unpack(">" + "I" * dims, data[4 : 4 + 4 * dims])
    count = 1
    for s in shape:
        count *= s
    body = data[4 + 4 * dims :]
    if len(body) != count:
        raise DataError(f"{path} holds {len(body)} bytes of data, its header promises {count}: corrupt file")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def load_split(train: bool, directory: str = None) -> Tuple[Tensor, Tensor]:
    """(images uint8 (N, 28, 28), labels int64 (N)) of the training or test split."""
    directory = directory or data_dir()
    prefix = "train" if train else "t10k"
    images = _read_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"), 3)
    labels = _read_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"), 1).long()
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels


def preprocess(images: Tensor) -> Tensor:
    """uint8 (N, 28, 28) -> normalised float (N, 1, 32, 32), zero-padded by 2 pixels (pad value = black)."""
    x = images.float().div_(255.0).unsqueeze(1)
    x = F.pad(x, (2, 2, 2, 2), value=0.0)
    return (x - MEAN) / STD


# --------------------------------------------------------------------------------------------
# ResNet-20 (He et al. 2016, the CIFAR variant: 3 stages x 3 basic blocks, 16/32/64 channels)
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        # ReLU modules (not F.relu) so that quantizers can be placed after them (ZeroQ's placement).
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def pretrained_resnet20() -> ResNet20:
    """The shipped Fashion-MNIST ResNet-20 (eval mode)."""
    from safetensors.torch import load_file

    if not os.path.exists(WEIGHTS):
        raise DataError(f"{WEIGHTS} is missing: train it with `python -m dsg_ext.train_fashion_mnist`")
    model = ResNet20()
    model.load_state_dict(load_file(WEIGHTS))
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1000) -> Tuple[float, float]:
    """(top-1, top-5) accuracy in percent."""
    model.eval()
    top1 = top5 = 0
    for i in range(0, images.shape[0], batch_size):
        logits = model(preprocess(images[i : i + batch_size]))
        y = labels[i : i + batch_size]
        pred = logits.topk(5, dim=1).indices
        top1 += (pred[:, 0] == y).sum().item()
        top5 += (pred == y[:, None]).any(1).sum().item()
    n = images.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n
