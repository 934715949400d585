"""Graph model files turned back into modules: a torch.export program (``.pt2``) or a TorchScript
file (scripted or traced) becomes an fx GraphModule whose BatchNorm, Conv2d, Linear and ReLU calls
are ``nn`` layers holding the same tensors (``modularise``), so BN taps, quantization and AdaRound
work on them as on eager models."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn

from ..errors import ModelSourceError
from .spec import InputSpec

_BN, _CONV = "aten.batch_norm.default", "aten.conv2d.default"
_MODULE_CALLS = (_BN, _CONV, "aten.convolution.default", "aten.linear.default", "aten.relu.default",
                 "aten.relu_.default")


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
        if kind not in _MODULE_CALLS:
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
            module = nn.BatchNorm2d(mean.numel(), eps=float(kw.get("eps", 1e-5)),
                                    momentum=float(kw.get("momentum", 0.1)),
                                    affine=kw.get("weight") is not None)
            module.register_buffer("num_batches_tracked", None)  # kept only where the source had it (below)
            module.running_mean, module.running_var = mean, _attr(gm, rv.target)
            if module.affine:
                module.weight = _as_param(_attr(gm, kw["weight"].target))
                module.bias = _as_param(_attr(gm, kw["bias"].target))
        else:  # conv2d / convolution / linear: weight (and bias) are stored tensors (checked above)
            w, b = kw.get("weight"), kw.get("bias")
            if w is None:
                continue
            weight = _attr(gm, w.target)
            if kind == "aten.linear.default":
                module = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None)
            else:
                transposed = kind != _CONV and (kw.get("transposed") or any(kw.get("output_padding") or ()))
                if weight.dim() != 4 or transposed:
                    continue
                groups = int(kw.get("groups", 1))
                module = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                                   stride=tuple(kw.get("stride", (1, 1))), padding=tuple(kw.get("padding", (0, 0))),
                                   dilation=tuple(kw.get("dilation", (1, 1))), groups=groups, bias=b is not None)
            module.weight = _as_param(weight)
            if b is not None:
                module.bias = _as_param(_attr(gm, b.target))
        extra = {"num_batches_tracked"} if kind == _BN else set()
        holder = _owner(gm, [t.target for t in tensors.values()], extra) if tensors else None
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


def load_graph_file(path: str, spec: InputSpec, image_size: Optional[int],
                    trust_model_code: bool = False) -> Tuple[nn.Module, InputSpec]:
    """A torch.export program (.pt2) or a TorchScript file, as an fx GraphModule with nn layers.

    A .pt2 file is checked first (``pt2_check``: nothing in it may run code when it is loaded). A
    TorchScript file is a program -- loading it runs its code -- so it is refused unless
    ``trust_model_code``."""
    import io

    from .._utils.io import read_regular
    from .pt2_check import check_pt2

    if image_size:
        spec = dataclasses.replace(spec, image_size=image_size)
    import warnings

    data = read_regular(path, ModelSourceError, "model file")
    if path.endswith(".pt2"):
        check_pt2(path, data)
        try:
            ep = torch.export.load(io.BytesIO(data))
        except Exception as e:
            raise ModelSourceError(f"{path!r} is not a torch.export program file: {type(e).__name__}: {e}") from e
        inputs = set(ep.graph_signature.user_inputs)
        shapes = [n.meta["val"].shape for n in ep.graph.nodes if n.op == "placeholder" and n.name in inputs
                  and hasattr(n.meta.get("val"), "shape")]
        if len(shapes) == 1 and len(shapes[0]) == 4:
            c, h = shapes[0][1], shapes[0][2]
            spec = dataclasses.replace(spec, channels=int(c))
            if isinstance(h, int) and not image_size:  # a program exported for one image size
                spec = dataclasses.replace(spec, image_size=int(h))
        gm = ep.module()
    else:
        if not trust_model_code:
            raise ModelSourceError(
                f"{path} is a TorchScript file (or not a .pt2 program): loading TorchScript runs the code it "
                "holds, so dsg_ext loads it only with --trust-model-code (trust_model_code=True). Safer: "
                "torch.export.save the model to a .pt2 file, which is checked and loaded without running code")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated
            warnings.filterwarnings("ignore", "Manually populate", UserWarning)  # unused BN counters
            try:
                ts = torch.jit.load(io.BytesIO(data), map_location="cpu")
            except Exception as e:
                raise ModelSourceError(
                    f"{path!r} is neither a TorchScript file nor a torch.export program (.pt2): {e}") from e
            first_conv = next((m for m in ts.modules() if getattr(m, "original_name", "") == "Conv2d"), None)
            if first_conv is not None:
                channels = int(first_conv.weight.shape[1] * getattr(first_conv, "groups", 1))
                spec = dataclasses.replace(spec, channels=channels)
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
