"""The deployment placement: activation quantizers where an integer runtime needs them.

onnxruntime turns a QDQ graph into integer kernels only where every tensor such a kernel consumes or
produces is on an integer grid: QLinearConv wants DequantizeLinear on its input and weight, an int32
bias at scale s_input * s_weight and a QuantizeLinear on its output (a ReLU / ReLU6 before that
QuantizeLinear is absorbed when the range starts at zero); QLinearAdd, QLinearConcat and
QLinearGlobalAveragePool want their inputs and output quantized; Reshape / Flatten / MaxPool keep
their input's grid. The ``input`` placement (a quantizer before each layer) leaves the outputs of
convolutions and residual sums float, so the runtime cannot fuse them.

``place`` rewrites a model in place so that it computes exactly what such a runtime computes:

- each module that calls others (the model itself, its blocks, Sequentials) is traced with torch.fx,
  its direct children as leaves, and its ``forward`` replaced by the traced graph with *points*
  (``QuantPoint`` submodules) added: after each Conv2d / Linear and the activations that follow it
  (Identity left by BN folding, ReLU, ReLU6, Hardtanh, clamp, Dropout), after each add / concat /
  product of two tensors / average pool / sigmoid / leaky ReLU, before their inputs, and after shape
  ops, max pooling and the pieces of a channel split (which keep the grid). Activations onnxruntime
  has no integer kernel for are first rewritten into ones it has (``_decompose``: SiLU, hard-swish,
  hard-sigmoid, a spatial mean). The
  module keeps its class, name, children and hooks (reconstruction finds its blocks as before);
  the trace is taken in eval mode with the non-tensor arguments of the example's forward.
- one forward of the example decides what each point is, by following which tensors are already on
  a grid: an output point quantizes (its own range); an input point quantizes only a tensor not yet
  on a grid; a shape point repeats its input's grid (no quantization of its own, but the exported
  file gets the Q/DQ pair the runtime's rule needs). A layer whose input is on no grid (after an op
  the placement has no integer form for) gets its own input quantizer, as the ``input`` placement
  does, and is reported (``dsg_deploy_float``).
- each biased layer rounds its bias to the int32 grid s_input * s_weight, as the exported file stores it.

The logits (the model's output) stay float: onnxruntime's QGemm takes a float output.
"""

from __future__ import annotations

import inspect
import operator
import types
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .folding import QUANT_TYPES, LayerLeafTracer, ScopeTracer, edge_layers, scope_graphs  # noqa: F401 (the last two: deprecated here)
from .quantizers import ActQuantizer

# Ops that keep a conv's output "the conv's output" for the runtime: absorbed into QLinearConv's
# requantization (ReLU / clip at zero) or gone in eval mode.
_CHAIN_MODULES = (nn.Identity, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Dropout)
_CHAIN_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, torch.clamp, F.dropout}
_CHAIN_METHODS = {"relu", "relu_", "clamp", "clamp_"}
_MERGES = {operator.add, operator.iadd, torch.add, torch.cat, torch.concat}
_MERGE_METHODS = {"add", "add_"}
# Products of two tensors (squeeze-excite's scale, SiLU's and hard-swish's x * gate): QLinearMul, broadcast too. A
# product with a constant stays float in onnxruntime, so it is no merge (no requantization for nothing).
_PRODUCTS = {operator.mul, operator.imul, torch.mul}
_PRODUCT_METHODS = {"mul"}  # not "mul_": an input point would gate its copy, and later readers of the tensor miss it
# Ops with one quantized input and output: average pools (QLinearAveragePool / QLinearGlobalAveragePool), sigmoid
# (QLinearSigmoid) and leaky ReLU (QLinearLeakyRelu), onnxruntime's lookup-table kernels.
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Sigmoid, nn.LeakyReLU)
_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.avg_pool2d, torch.sigmoid, F.sigmoid, F.leaky_relu}
_POOL_METHODS = {"sigmoid"}
_SAME_MODULES = (nn.Flatten, nn.MaxPool2d)
_SAME_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, F.max_pool2d, torch.transpose,
                   torch.permute}
_SAME_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "transpose", "permute", "contiguous"}
# Ops whose outputs are pieces of their input (ShuffleNet's channel split): each piece keeps the input's grid.
_SPLIT_FUNCTIONS = {torch.chunk, torch.split}
_SPLIT_METHODS = {"chunk", "split"}
# Activations without an integer kernel in onnxruntime, rewritten into ops that have one (see _decompose).
_HARD_SIGMOID = ((nn.Hardsigmoid,), {F.hardsigmoid})
_HARD_SWISH = ((nn.Hardswish,), {F.hardswish})
_SILU = ((nn.SiLU,), {F.silu})


class QuantPoint(nn.Module):
    """A tensor of the deployment graph that is on an integer grid. ``kind`` is where it sits
    ("output" of an integer op, "input" of one, "same" grid as its input, "hardsigmoid": the output of
    hard-sigmoid applied to its quantized input); ``mode``, set by ``place``'s probe, is what it does:
    "quant" (its own ``act_quant``), "mirror" (its input's grid, identity in torch; a Q/DQ pair with the
    source's range in the exported file) or "off" (identity).

    A "hardsigmoid" point computes ``act_quant(hardsigmoid(x))``. onnxruntime has no integer hard-sigmoid;
    the exported file computes it as QLinearAdd(x, 3) quantized at 6 times the point's step
    (``export.qdq.HardSigmoidQDQ``): the same integers, as relu6(x + 3) / 6 = hardsigmoid(x) and the
    quantizer's range (from 0 to at most half a step above 1) does the clipping."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.mode = kind, "off"
        object.__setattr__(self, "source", None)  # mirror: the module holding the act_quant it repeats
        self.export_qdq: Optional[nn.Module] = None  # set by export.qdq.deploy_module for a mirror

    def forward(self, x: Tensor, grid_of: Optional[Tensor] = None) -> Tensor:
        """``grid_of``: for a "same" point, the op's input, whose grid the output ``x`` keeps."""
        if not isinstance(x, Tensor):  # a number the graph computes (x * x.size(1)): nothing to quantize
            return x
        if self.export_qdq is not None:
            return self.export_qdq(x)
        if self.kind == "hardsigmoid":
            x = F.hardsigmoid(x)
        if _PROBE is not None:
            return _PROBE.visit(self, x, x if grid_of is None else grid_of)
        if self.mode == "quant":
            return self.act_quant(x)
        return x

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.mode}"


class _Probe:
    """One forward that tags tensors on a grid (by object identity, the tensors kept alive)."""

    def __init__(self):
        self.grid: Dict[int, Tuple[Tensor, nn.Module]] = {}
        self.layer_source: Dict[str, Optional[nn.Module]] = {}
        self.seen: set = set()

    def source(self, x: Tensor) -> Optional[nn.Module]:
        hit = self.grid.get(id(x))
        return hit[1] if hit is not None and hit[0] is x else None

    def tag(self, x: Tensor, holder: nn.Module) -> None:
        self.grid[id(x)] = (x, holder)

    def visit(self, point: QuantPoint, x: Tensor, grid_of: Tensor) -> Tensor:
        first = id(point) not in self.seen
        self.seen.add(id(point))
        src = self.source(grid_of)
        if first:
            if point.kind in ("output", "hardsigmoid") or (point.kind == "input" and src is None):
                point.mode = "quant"
            elif point.kind == "same" and src is not None:
                point.mode = "mirror"
                object.__setattr__(point, "source", src)
        if point.mode == "quant":
            y = x.clone()  # a new tensor: this point's grid, not its input's
            self.tag(y, point)
            return y
        if point.mode == "mirror" and point.source is not None:
            self.tag(x, point.source)
        return x


_PROBE: Optional[_Probe] = None


def _kind(node: fx.Node, modules: Dict[str, nn.Module]):
    if node.op == "call_module":
        m = modules.get(node.target)
        for kind, types_ in (("layer", QUANT_TYPES), ("chain", _CHAIN_MODULES), ("pool", _POOL_MODULES),
                             ("same", _SAME_MODULES)):
            if isinstance(m, types_):
                return kind
        return None
    if node.op == "call_function":
        target = node.target
        if target in _PRODUCTS:
            return "merge" if _two_activations(node) else None
        for kind, group in (("chain", _CHAIN_FUNCTIONS), ("merge", _MERGES), ("pool", _POOL_FUNCTIONS),
                            ("same", _SAME_FUNCTIONS), ("split", _SPLIT_FUNCTIONS)):
            if target in group:
                return kind
        return None
    if node.op == "call_method":
        if node.target in _PRODUCT_METHODS:
            return "merge" if _two_activations(node) else None
        for kind, group in (("chain", _CHAIN_METHODS), ("merge", _MERGE_METHODS), ("pool", _POOL_METHODS),
                            ("same", _SAME_METHODS), ("split", _SPLIT_METHODS)):
            if node.target in group:
                return kind
    return None


_NUMBER_METHODS = {"size", "dim", "numel"}
_NUMBER_FUNCTIONS = {getattr, operator.getitem, operator.pow, operator.mul, operator.truediv, operator.add,
                     operator.sub, operator.floordiv}


def _activation(a: Any) -> bool:
    """Whether a graph value is an activation tensor: not a constant, not a module's parameter or buffer
    (``x * self.gamma``: a weight, not an activation to quantize per tensor), not a number computed from a
    shape (``x.size(1) ** -0.5``)."""
    if not isinstance(a, fx.Node) or a.op == "get_attr":
        return False
    if a.op == "call_method" and a.target in _NUMBER_METHODS:
        return False
    if a.op == "call_function" and a.target in _NUMBER_FUNCTIONS and a.args:
        if a.target is getattr:
            return a.args[1] != "shape"
        return any(_activation(b) for b in a.args[:2]) and not (a.target is operator.getitem
                                                                and not _activation(a.args[0]))
    return True


def _two_activations(node: fx.Node) -> bool:
    """A product of two activations (QLinearMul), not of an activation and a constant (float in onnxruntime)."""
    return len(node.args) >= 2 and all(_activation(a) for a in node.args[:2])


def _matches(node: fx.Node, modules: Dict[str, nn.Module], group) -> bool:
    module_types, functions = group
    if node.op == "call_module":
        return isinstance(modules.get(node.target), module_types)
    return node.op == "call_function" and node.target in functions


def _spatial_mean(node: fx.Node) -> Optional[bool]:
    """For a mean over the two spatial axes (``x.mean((2, 3))``, ShuffleNet's head): whether it keeps them;
    None for any other node. onnxruntime has no integer ReduceMean; it is a global average pool."""
    if not ((node.op == "call_method" and node.target == "mean") or (node.op == "call_function"
                                                                      and node.target is torch.mean)):
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    # (2, 3) only: the axes of a 4-D (N, C, H, W) map (the input's rank is not known here; (-2, -1) is often
    # a (B, N, C) tensor's, which a 2-D pool would not average alike)
    if not isinstance(dims, (list, tuple)) or sorted(dims) != [2, 3] or "dtype" in node.kwargs:
        return None
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


def _decompose(graph: fx.Graph, modules: Dict[str, nn.Module], add_point: Callable) -> None:
    """Rewrites the activations onnxruntime has no integer kernel for into ops it has one for, computing the
    same function: hard-sigmoid -> a "hardsigmoid" point; hard-swish -> x * hardsigmoid(x); SiLU -> x *
    sigmoid(x) (QLinearSigmoid, QLinearMul); a mean over the spatial axes -> a global average pool (and a
    flatten where the axes go). The rewritten activation's input gets an "input" point shared by its uses."""
    for node in list(graph.nodes):
        keep = _spatial_mean(node)
        if keep is not None:
            with graph.inserting_before(node):
                new = graph.call_function(F.adaptive_avg_pool2d, (node.args[0], 1))
                if not keep:
                    new = graph.call_function(torch.flatten, (new, 1))
        elif any(_matches(node, modules, g) for g in (_HARD_SIGMOID, _HARD_SWISH, _SILU)) and node.args:
            with graph.inserting_before(node):
                x = add_point("input", node.args[0], "_in_" + node.name)
                if _matches(node, modules, _HARD_SIGMOID):
                    new = add_point("hardsigmoid", x, "_" + node.name)
                elif _matches(node, modules, _HARD_SWISH):
                    new = graph.call_function(operator.mul, (x, add_point("hardsigmoid", x, "_" + node.name)))
                else:
                    new = graph.call_function(operator.mul, (x, graph.call_function(torch.sigmoid, (x,))))
        else:
            continue
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _chain_end(node: fx.Node, modules: Dict[str, nn.Module]) -> fx.Node:
    """The last node of the single-user chain of activations after ``node``."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if _kind(user, modules) != "chain" or not user.args or user.args[0] is not node:
            break
        node = user
    return node


def _rewrite(scope: nn.Module, concrete: Dict[str, Any], root: bool) -> int:
    """Adds points to ``scope``'s traced forward and makes it the scope's forward; returns how many."""
    params = list(inspect.signature(scope.forward).parameters)
    graph = ScopeTracer().trace(scope, concrete_args=concrete or None)
    for node, param in zip([n for n in graph.nodes if n.op == "placeholder"], params):
        node.target = param  # fx renames a specialised argument; the callers use its name
    modules = dict(scope.named_modules())
    count = 0

    def add_point(kind: str, node: fx.Node, suffix: str = "", grid: Optional[fx.Node] = None) -> fx.Node:
        nonlocal count
        name = f"dsg_q_{node.name}{suffix}"
        while hasattr(scope, name):
            name += "_"
        scope.add_module(name, QuantPoint(kind))
        count += 1
        return graph.call_module(name, (node, grid) if kind == "same" else (node,))

    _decompose(graph, modules, add_point)
    modules = dict(scope.named_modules())
    # ("output" | "same", node the point follows, the node whose first input's grid a "same" point keeps)
    after: List[Tuple[str, fx.Node, Optional[fx.Node]]] = []
    consumers: List[fx.Node] = []  # merges and pools: their tensor inputs get "input" points
    ends = set()
    for node in list(graph.nodes):
        kind = _kind(node, modules)
        if node.op == "placeholder" and root and not ends:
            ends.add(node)
            after.append(("output", node, None))
        elif kind in ("layer", "merge", "pool"):
            if kind != "layer":
                consumers.append(node)
            end = _chain_end(node, modules)
            if end not in ends and not (root and any(u.op == "output" for u in end.users)):
                ends.add(end)
                after.append(("output", end, None))
        elif kind == "same" and node.args and isinstance(node.args[0], fx.Node):
            after.append(("same", node, node))
        elif kind == "split" and node.args and isinstance(node.args[0], fx.Node):
            after.extend(("same", piece, node) for piece in node.users
                         if piece.op == "call_function" and piece.target is operator.getitem)

    for kind, node, op in after:  # (an op's first input is read now: it may be a point added before)
        with graph.inserting_after(node):
            point = add_point(kind, node, grid=op.args[0] if op is not None else None)
        node.replace_all_uses_with(point, delete_user_cb=lambda u, _p=point: u is not _p)
    for consumer in consumers:
        group = consumer.args[0] if consumer.target in (torch.cat, torch.concat) else consumer.args[:2]
        for a in group if isinstance(group, (list, tuple)) else [group]:
            if not isinstance(a, fx.Node) or (a.op == "call_module" and a.target.startswith("dsg_q_")
                                              and getattr(scope, a.target).kind != "same"):
                continue
            with graph.inserting_before(consumer):
                point = add_point("input", a, "_in_" + consumer.name)
            consumer.replace_input_with(a, point)
    graph.lint()
    code = fx.GraphModule(scope, graph)
    object.__setattr__(scope, "forward", types.MethodType(type(code).forward, scope))
    return count


def _scope_calls(model: nn.Module, example: Tensor) -> Dict[str, Optional[Dict[str, Any]]]:
    """Per module that calls others: the non-tensor arguments of its (first) call, or None when it cannot
    be traced on its own (called with differing ones, or with tensors inside containers)."""
    scopes = {n: m for n, m in model.named_modules() if not isinstance(m, QUANT_TYPES)
              and any(True for _ in m.children()) and not isinstance(m, (nn.ModuleList, nn.ModuleDict))}
    inside_layers = {n for n, m in model.named_modules() if isinstance(m, QUANT_TYPES)}
    scopes = {n: m for n, m in scopes.items() if not any(n.startswith(p + ".") for p in inside_layers)}
    calls: Dict[str, Optional[Dict[str, Any]]] = {}

    def record(name: str) -> Callable:
        def hook(m, args, kwargs):
            try:
                signature = inspect.signature(m.forward)
                bound = dict(signature.bind(*args, **kwargs).arguments)
            except TypeError:
                calls[name] = None
                return
            # An argument left at its default is part of the call too: traced as a placeholder, a None default
            # would be taken for a tensor (DLA's blocks: `if shortcut is None` inside).
            bound.update({k: p.default for k, p in signature.parameters.items() if k not in bound
                          and p.default is not inspect.Parameter.empty
                          and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)})
            concrete = {k: v for k, v in bound.items() if not isinstance(v, Tensor)}
            if any(isinstance(v, (list, tuple, dict)) for v in concrete.values()):
                calls[name] = None
            elif name in calls and calls[name] != concrete:  # e.g. a shortcut tensor in one call, None in another
                calls[name] = None
            else:
                calls.setdefault(name, concrete)
        return hook

    handles = [m.register_forward_pre_hook(record(n), with_kwargs=True) for n, m in scopes.items()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return calls


def _act_pre_hook(module: nn.Module, inputs):
    return (module.act_quant(inputs[0]),) + tuple(inputs[1:])


def int32_bias(layer: nn.Module) -> Optional[Tuple[Tensor, Tensor]]:
    """(bias as int32 integers, their per-channel scale s_input * s_weight) of a deployment-placed
    layer, or None where it has no bias or its input range is not set yet."""
    holder = getattr(layer, "_dsg_bias_input", None)
    if holder is None or layer.bias is None:
        return None
    aq = holder.act_quant
    if not isinstance(aq, ActQuantizer) or not aq.calibrated or aq.calibrating:
        return None
    wq = layer.parametrizations.weight[0]
    scale = (aq.scale.detach().float() * wq.scale.detach().float().reshape(-1)).expand(layer.bias.shape[0])
    integers = torch.round(layer.bias.detach().float() / scale).clamp(-2**31, 2**31 - 1)
    return integers.to(torch.int32), scale


def _bias_hook(layer: nn.Module, _inputs, out: Tensor) -> Tensor:
    got = int32_bias(layer)
    if got is None:
        return out
    integers, scale = got
    delta = (integers.float() * scale - layer.bias.detach().float()).to(out.dtype)
    return out + delta.view([1, -1] + [1] * (out.dim() - 2))


def place(model: nn.Module, example: Tensor, order: List[str], bits_for: Callable[[bool], int],
          make_quantizer: Callable[[int], ActQuantizer]) -> Dict[str, Any]:
    """Rewrites ``model`` (in place) for the deployment placement; see the module docstring.

    Args:
        model: the float model, BN folded, weights not parametrized yet.
        example: one input batch.
        order: its Conv2d / Linear layers in execution order.
        bits_for: activation bits for a quantizer that feeds the first or last layer (True) or not.
        make_quantizer: an ActQuantizer of the given bits.

    Returns:
        What was done: scopes rewritten, scopes left as they were (untraceable), layers whose input
        needed its own quantizer.
    """
    global _PROBE
    if example is None:
        raise ConfigError("the deployment placement needs an example input (quantize_model(..., example=))")
    calls = _scope_calls(model, example)
    rewritten, untraced = [], []
    for name, concrete in calls.items():
        scope = model.get_submodule(name) if name else model
        if concrete is None:
            untraced.append(name or "(model)")
            continue
        try:
            if _rewrite(scope, concrete, root=name == ""):
                rewritten.append(name or "(model)")
        except Exception as e:  # noqa: BLE001 -- any tracing failure: the scope keeps its forward
            why = str(e).splitlines()[0][:120] if str(e) else ""
            untraced.append(f"{name or '(model)'} ({type(e).__name__}: {why})")
    layers = {n: model.get_submodule(n) for n in order}
    probe = _Probe()

    def see(name: str) -> Callable:
        def hook(_m, inputs):
            probe.layer_source.setdefault(name, probe.source(inputs[0]))
        return hook

    handles = [m.register_forward_pre_hook(see(n)) for n, m in layers.items()]
    _PROBE = probe
    try:
        with torch.no_grad():
            model(example)
    finally:
        _PROBE = None
        for h in handles:
            h.remove()
    edge_holders, edges = set(), set(edge_layers(model, order))
    own_input = []
    for name, layer in layers.items():
        holder = probe.layer_source.get(name)
        if holder is None:
            own_input.append(name)
            layer.act_quant = make_quantizer(bits_for(name in edges))
            layer.register_forward_pre_hook(_act_pre_hook)
            holder = layer
        elif name in edges:
            edge_holders.add(id(holder))
        object.__setattr__(layer, "_dsg_bias_input", holder)
        if layer.bias is not None:
            layer.register_forward_hook(_bias_hook)
    for m in model.modules():
        if isinstance(m, QuantPoint) and m.mode == "quant":
            m.act_quant = make_quantizer(bits_for(id(m) in edge_holders))
    return {"rewritten": rewritten, "untraced": untraced, "own_input": own_input}
