"""What a loaded model is: its input (``InputSpec``), and its identity (a SHA-256 over its tensors,
which ties datasets and quantized files to the weights that made them)."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Tuple

import torch
from torch import nn


@dataclasses.dataclass
class InputSpec:
    """How the model sees images: channels, square size, and the normalisation of its input
    (normalised = (pixel in [0, 1] - mean) / std), used to turn samples back into pictures."""

    channels: int = 3
    image_size: int = 224
    mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
    std: Tuple[float, ...] = (0.229, 0.224, 0.225)


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module
    source: str
    input: InputSpec
    identity: str  # SHA-256 over the parameters and buffers: which weights produced a dataset


def model_identity(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
