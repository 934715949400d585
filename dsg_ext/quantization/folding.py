"""BatchNorm folding and the torch.fx tracers it needs (the deployment placement traces with them too).

``fold_batchnorm`` traces the model with its Conv2d / Linear layers as leaves (``LayerLeafTracer``);
a model that does not trace whole is traced module by module (``scope_graphs``, each module with its
children as leaves: ``ScopeTracer``), skipping those that do not trace.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.fx as fx
from torch import nn

from ..errors import ConfigError

QUANT_TYPES = (nn.Conv2d, nn.Linear)


class ScopeTracer(fx.Tracer):
    """Traces one module: every module it calls is a leaf (their own forwards are rewritten apart)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return True


class LayerLeafTracer(fx.Tracer):
    """Traces a whole model with Conv2d / Linear and their subclasses (EfficientNet's
    Conv2dStaticSamePadding) as leaves, so that BN folding sees them."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QUANT_TYPES) or foldable(m) or super().is_leaf_module(m, qualname)


def foldable(m: nn.Module) -> bool:
    """A BatchNorm2d, or a subclass known to be one followed by modules of its own: timm's BatchNormAct2d
    (batch norm, then its ``drop`` and ``act`` children)."""
    if type(m) is nn.BatchNorm2d:
        return True
    return (isinstance(m, nn.BatchNorm2d) and type(m).__name__ == "BatchNormAct2d"
            and isinstance(getattr(m, "drop", None), nn.Module) and isinstance(getattr(m, "act", None), nn.Module))


def _scale_and_shift(bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(gamma / sqrt(var + eps), beta) of an eval-mode BN: it computes (x - mean) * scale + beta."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    return gamma / std, bn.bias if bn.affine else torch.zeros_like(std)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _after_folding(bn: nn.Module) -> nn.Module:
    """What is left of a folded BN: nothing, or a norm-act's own dropout and activation (the activation alone
    where the dropout is the Identity, so the deploy placement sees the ReLU right after the convolution)."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    return bn.act if isinstance(bn.drop, nn.Identity) else nn.Sequential(bn.drop, bn.act)


def scope_graphs(model: nn.Module) -> List[Tuple[str, fx.Graph]]:
    """(name, graph) of each module with children that traces on its own (children as leaves)."""
    graphs = []
    for name, m in model.named_modules():
        if isinstance(m, QUANT_TYPES) or not any(True for _ in m.children()):
            continue
        try:
            graphs.append((name, ScopeTracer().trace(m)))
        except Exception:  # noqa: BLE001,S112 -- not traceable alone: skipped
            continue
    return graphs


def fold_batchnorm(model: nn.Module) -> List[Tuple[str, str]]:
    """Folds each BatchNorm2d that directly follows a Conv2d (its only user) into that convolution,
    in place; the BN becomes Identity (timm's BatchNormAct2d: its activation, after its dropout). Traces
    the model with torch.fx (Conv2d subclasses as leaves); a model that does not trace whole is traced
    module by module, skipping those that do not trace.
    Returns (conv, bn) pairs."""
    try:
        graphs = [("", LayerLeafTracer().trace(model))]
    except Exception as e:  # noqa: BLE001 -- any tracing failure: try module by module
        graphs = scope_graphs(model)
        if not graphs:
            raise ConfigError(f"BN folding needs a torch.fx-traceable model: {type(e).__name__}: {e}") from e
    modules = dict(model.named_modules())
    pairs = []
    for prefix, graph in graphs:
        def full(target: str, _p=prefix) -> str:
            return f"{_p}.{target}" if _p else target

        for node in graph.nodes:
            if node.op != "call_module" or not foldable(modules.get(full(node.target), nn.Identity())):
                continue
            src = node.args[0]
            if (isinstance(src, fx.Node) and src.op == "call_module"
                    and isinstance(modules.get(full(src.target)), nn.Conv2d) and len(src.users) == 1):
                pairs.append((full(src.target), full(node.target)))
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            k, beta = _scale_and_shift(bn)
            conv.weight.mul_(k.view(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(k)
            new_bias = beta + (bias - bn.running_mean) * k
            conv.bias = nn.Parameter(new_bias)
            _replace(model, bn_name, _after_folding(bn))
    return pairs


def batchnorm_as_convolution(model: nn.Module) -> List[str]:
    """Turns each BatchNorm2d left after ``fold_batchnorm`` (one not fed by a convolution alone: DenseNet's
    pre-activation BN after a concatenation, RepVGG's identity branch) into the same per-channel scale and
    shift as a depthwise 1x1 convolution, in place (timm's BatchNormAct2d keeps its activation after it), so
    that the deployment placement quantizes it and onnxruntime runs it as a QLinearConv instead of a float
    BatchNormalization. Returns the names of the BNs turned."""
    turned = []
    with torch.no_grad():
        for name, bn in list(model.named_modules()):
            if not foldable(bn) or bn.running_mean is None or bn.running_var is None:
                continue
            k, beta = _scale_and_shift(bn)
            channels = k.shape[0]
            conv = nn.Conv2d(channels, channels, 1, groups=channels, bias=True).to(k.device, k.dtype)
            conv.weight.copy_(k.view(-1, 1, 1, 1))
            conv.bias.copy_(beta - bn.running_mean * k)
            conv.dsg_from_batchnorm = True  # not the network's first or last layer (edge_layers)
            rest = _after_folding(bn)
            _replace(model, name, conv if isinstance(rest, nn.Identity) else nn.Sequential(conv, rest))
            turned.append(name)
    return turned


def edge_layers(model: nn.Module, order: List[str]) -> Tuple[str, ...]:
    """The first and last of ``order``'s layers that are the network's own (a BatchNorm turned into a
    convolution by ``batchnorm_as_convolution`` is neither): the layers ``first_last_bits`` applies to."""
    own = [n for n in order if not getattr(model.get_submodule(n), "dsg_from_batchnorm", False)] or order
    return own[0], own[-1]

