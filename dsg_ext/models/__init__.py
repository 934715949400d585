"""Where networks come from: model source strings (``sources``), graph files turned back into
modules (``graph``), the input description and identity of a loaded model (``spec``), and the
project's own Fashion-MNIST ResNet-20 (``resnet20``)."""

from .graph import load_graph_file, modularise
from .resnet20 import ResNet20, pretrained_resnet20
from .sources import load_model
from .spec import InputSpec, LoadedModel, model_identity

__all__ = ["load_graph_file", "modularise", "ResNet20", "pretrained_resnet20", "load_model", "InputSpec",
           "LoadedModel", "model_identity"]
