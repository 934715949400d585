"""What a loaded model is: its input (``InputSpec``), and its identity (a SHA-256 over its tensors,
which ties datasets and quantized files to the weights that made them)."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import List, Tuple

import torch
from torch import nn

from ..errors import ConfigError, DsgError, ModelSourceError


@dataclasses.dataclass
class InputSpec:
    """How the model sees images: channels, square size, and the normalisation of its input
    (normalised = (pixel in [0, 1] - mean) / std), used to turn samples back into pictures."""

    channels: int = 3
    image_size: int = 224
    mean: Tuple[float, ...] = (0.485, 0.456, 0.406)
    std: Tuple[float, ...] = (0.229, 0.224, 0.225)

    def valid_range(self) -> Tuple[List[float], List[float]]:
        """Per-channel (low, high) of normalised pixels whose image-space value lies in [0, 1]."""
        return ([(0 - m) / s for m, s in zip(self.mean, self.std)], [(1 - m) / s for m, s in zip(self.mean, self.std)])


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


def probe_model(model: nn.Module, example: torch.Tensor, source: str) -> None:
    """One forward pass of ``example`` before long work starts: an exception from the model's own
    code (a shape assert, a wrong channel count) becomes ModelSourceError "the model rejected ...",
    with the original message."""
    try:
        with torch.no_grad():
            model(example)
    except DsgError:
        raise
    except Exception as e:
        raise ModelSourceError(f"the model {source} rejected a {'x'.join(map(str, example.shape))} input "
                               f"({example.dtype}, {example.device}): {type(e).__name__}: {e}") from e


def check_device(device: str) -> str:
    """``device`` if torch can use it here, else ConfigError naming why (not a device name, no GPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device={device!r} is not a device torch knows (use cpu, cuda or cuda:N)",
                          parameter="device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device}: no CUDA GPU is available on this machine (use device=cpu)",
                              parameter="device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device}: this machine has {torch.cuda.device_count()} GPU(s)",
                              parameter="device")
    elif dev.type != "cpu":
        raise ConfigError(f"device={device}: only cpu and cuda are supported", parameter="device")
    return device


def load_state_dict_file(model: nn.Module, weights: str) -> None:
    """Loads a state-dict file (safetensors, or a weights-only torch pickle) into ``model``; ModelSourceError
    names a file that cannot be read or does not fit."""
    import io

    from .._utils.io import read_regular

    data = read_regular(weights, ModelSourceError, "weights file")
    try:
        if weights.endswith(".safetensors"):
            from safetensors.torch import load

            state = load(data)
        else:  # weights_only: a pickle naming anything but tensors and containers is refused, never run
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file, or a pickle that would run code
        raise ModelSourceError(f"cannot read weights file {weights!r}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except Exception as e:
        raise ModelSourceError(f"weights file {weights!r} does not fit the model: {e}") from e
