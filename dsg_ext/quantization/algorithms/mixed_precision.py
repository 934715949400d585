"""Automatic mixed precision: per-layer weight bits chosen under a size budget.

ZeroQ's recipe (Cai et al. 2020, "Pareto frontier"), on our synthetic images:

1. **Sensitivity**: for every quantized layer and every candidate width b, the mean
   KL(p_fp32 || p) of the network's softmax outputs when that layer alone has its weights quantized
   to b bits (nearest rounding, the configured per-channel ranges), everything else float.
2. **Allocation**: the widths b_i that minimise the sum of the sensitivities under the budget
   sum_i n_i * b_i <= budget * sum_i n_i (n_i: the layer's weight count), i.e. the average weight
   bits of the file. A multiple-choice knapsack, solved exactly by dynamic programming over the size
   (in 1/``RESOLUTION`` of an average bit; layer sizes rounded up, so the budget always holds).

Layers fixed by ``QuantConfig.layer_wbits`` rules keep their widths and count against the budget.
The result is a list of per-layer rules (``Allocation.rules()``) that becomes the config's
``layer_wbits``: the file, ``dsg eval``, ``dsg report`` and the ONNX export need nothing else.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError, InvalidDataError, QuantizationError
from ..capture import batches
from ..config import MAX_BITS, MIN_BITS, QuantConfig
from ..folding import fold_batchnorm
from ..prepare import execution_order, rule_bits
from ..qparams import fake_quant_broadcast, quant_range, weight_qparams

DEFAULT_CHOICES = (2, 3, 4, 5, 6, 8)
DEFAULT_SENSITIVITY_IMAGES = 32
RESOLUTION = 1000  # size units per average weight bit in the dynamic programme


@dataclasses.dataclass
class Allocation:
    """Per-layer weight bits under a budget, and what they were chosen from."""

    budget: float  # the average weight bits asked for
    bits: Dict[str, int]  # layer -> weight bits (execution order)
    params: Dict[str, int]  # layer -> weight count
    sensitivity: Dict[str, Dict[int, float]]  # layer -> {bits: KL with that layer alone quantized}
    fixed: List[str]  # layers whose bits a rule fixed

    @property
    def average_bits(self) -> float:
        return sum(self.bits[n] * self.params[n] for n in self.bits) / sum(self.params.values())

    @property
    def predicted(self) -> float:
        """The objective: the sum of the chosen widths' single-layer KLs."""
        return sum(self.sensitivity[n][b] for n, b in self.bits.items())

    def uniform_predicted(self, bits: int) -> float:
        """The same objective for every free layer at ``bits`` (the fixed ones as fixed)."""
        return sum(self.sensitivity[n][self.bits[n] if n in self.fixed else bits] for n in self.bits)

    def rules(self) -> str:
        """``QuantConfig.layer_wbits`` naming every layer ("name=bits,..."; exact names are globs too)."""
        return ",".join(f"{n}={b}" for n, b in self.bits.items())

    def histogram(self) -> Dict[int, int]:
        counts: Dict[int, int] = {}
        for b in self.bits.values():
            counts[b] = counts.get(b, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> dict:
        """What the quantized file records of it."""
        return {"budget": self.budget, "average_bits": self.average_bits, "predicted_kl": self.predicted,
                "choices": sorted({b for s in self.sensitivity.values() for b in s}), "fixed": self.fixed,
                "sensitivity": {n: {str(b): v for b, v in s.items()} for n, s in self.sensitivity.items()}}


def parse_choices(text: str) -> List[int]:
    """``"2,3,4,5,6,8"`` -> [2, 3, 4, 5, 6, 8] (each in MIN_BITS..MAX_BITS)."""
    try:
        choices = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise ConfigError(f"bit choices {text!r} are not comma-separated integers (e.g. 2,3,4,5,6,8)") from None
    if not choices or not all(MIN_BITS <= c <= MAX_BITS for c in choices):
        raise ConfigError(f"bit choices {text!r}: each must be an integer in {MIN_BITS}..{MAX_BITS}")
    return choices


def check_budget(budget: float, choices: Sequence[int]) -> None:
    """The errors that need no model: a budget outside what the choices can give."""
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not math.isfinite(budget):
        raise ConfigError(f"weight-bit budget must be a number of average weight bits, got {budget!r}")
    if budget < min(choices):
        raise ConfigError(f"weight-bit budget {budget:g} is below the smallest bit choice ({min(choices)}): "
                          "no allocation can meet it")


def _weight_view(model: nn.Module, name: str) -> Tensor:
    return model.get_submodule(name).weight


class _Outputs:
    """The network's log-probabilities with one layer's weight changed, computing only what that layer
    changes: the torch.fx graph runs once in execution order with the float weights, and at each layer's
    first call the values still needed downstream are kept, so each width replays only the rest of the
    network from there (about half a forward on average). Without a traceable graph: whole forwards."""

    def __init__(self, model: nn.Module, images: Tensor, batch_size: int, device: str):
        import torch.fx

        self.model, self.images, self.batch_size, self.device = model, images, batch_size, device
        try:
            self.graph = torch.fx.symbolic_trace(model)
        except Exception:  # noqa: BLE001 (any tracing failure: the whole-forward fallback)
            self.graph = None
            return
        self.nodes = list(self.graph.graph.nodes)
        position = {node: i for i, node in enumerate(self.nodes)}
        self.last_use = {node: max((position[u] for u in node.users), default=position[node])
                         for node in self.nodes}
        self.first_call = {}
        for i, node in enumerate(self.nodes):
            if node.op == "call_module" and node.target not in self.first_call:
                self.first_call[node.target] = i

    def _run(self, interp, start: int, env: dict):
        interp.env = env
        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            value = interp.run_node(node)
            if node.op == "output":
                return value
            env[node] = value
            for arg in node.all_input_nodes:
                if self.last_use[arg] <= i:
                    env.pop(arg, None)
        raise QuantizationError("the traced graph has no output")  # unreachable for a traced module

    @torch.no_grad()
    def sweep(self, order: Sequence[str], variants):
        """Yields (layer, variant, log-probs) for ``variants(layer)`` (an iterator that changes the
        layer's weight before each yield and restores it when exhausted), in the order given."""
        import torch.fx

        chunks = list(batches(self.images, self.batch_size))
        traced = self.graph is not None and all(n in self.first_call for n in order)
        if not traced:
            for name in order:
                for v in variants(name):
                    yield name, v, _log_probs(self.model, self.images, self.batch_size, self.device)
            return
        interp = torch.fx.Interpreter(self.graph)
        # The float run of each chunk, paused at each layer's first call in turn.
        envs = []
        for x in chunks:
            env = {n: x.to(self.device) for n in self.nodes if n.op == "placeholder"}
            envs.append((env, 0))
        targets = sorted(order, key=lambda n: self.first_call[n])
        for name in targets:
            stop = self.first_call[name]
            paused = []
            for env, at in envs:
                interp.env = env
                for i in range(at, stop):
                    node = self.nodes[i]
                    if node.op != "placeholder":
                        env[node] = interp.run_node(node)
                        for arg in node.all_input_nodes:
                            if self.last_use[arg] <= i:
                                env.pop(arg, None)
                paused.append((env, stop))
            envs = paused
            for v in variants(name):
                logp = torch.cat([F.log_softmax(self._run(interp, stop, dict(env)).double(), 1) for env, _ in envs])
                yield name, v, logp


@torch.no_grad()
def _log_probs(model: nn.Module, images: Tensor, batch_size: int, device: str) -> Tensor:
    return torch.cat([F.log_softmax(model(x.to(device)).double(), 1) for x in batches(images, batch_size)])


@torch.no_grad()
def layer_sensitivity(model: nn.Module, images: Tensor, config: QuantConfig, choices: Sequence[int] = DEFAULT_CHOICES,
                      example: Optional[Tensor] = None, batch_size: int = 32, device: str = "cpu",
                      layers: Optional[Sequence[str]] = None, progress: bool = True) -> Dict[str, Dict[int, float]]:
    """{layer: {bits: mean KL(p_fp32 || p)}} with that layer's weights alone quantized to ``bits``.

    Args:
        model: the float network (BN folded first when ``config.fold_bn``, as the quantized model will be).
        images: sensitivity images (synthetic or real), in the model's input space.
        config: weight granularity, symmetry and range observer of the quantized model.
        choices: candidate widths.
        example: one input batch for the execution order (default: ``images[:1]``).
        layers: measure only these (default: every Conv2d/Linear).
    """
    from tqdm.auto import tqdm

    if images.numel() == 0 or not torch.isfinite(images).all():
        raise InvalidDataError("sensitivity images are empty or contain NaN/Inf")
    fp = copy.deepcopy(model).eval()
    if config.fold_bn:
        fold_batchnorm(fp)
    order = list(layers) if layers is not None else execution_order(fp, (example if example is not None
                                                                         else images[:1]).to(device))
    reference = _log_probs(fp, images, batch_size, device)
    outputs = _Outputs(fp, images, batch_size, device)

    def variants(name):
        weight = fp.get_submodule(name).weight
        original = weight.detach().clone()
        shape = [-1] + [1] * (original.dim() - 1)
        try:
            for b in choices:
                qmin, qmax = quant_range(b, config.w_symmetric)
                scale, zp = weight_qparams(original, qmin, qmax, config.w_per_channel, config.w_symmetric,
                                           config.weight_observer)
                if not config.w_per_channel:
                    shape = [1] * original.dim()
                weight.copy_(fake_quant_broadcast(original.float(), scale.view(shape), zp.view(shape).float(),
                                                  qmin, qmax).to(original.dtype))
                yield b
        finally:
            weight.copy_(original)

    result: Dict[str, Dict[int, float]] = {name: {} for name in order}
    with tqdm(total=len(order) * len(choices), desc="bit sensitivity (layer x width)", disable=not progress,
              unit="pass") as bar:
        for name, b, logp in outputs.sweep(order, variants):
            kl = float(F.kl_div(logp, reference, log_target=True, reduction="sum")) / images.shape[0]
            if not math.isfinite(kl):
                raise InvalidDataError(f"layer {name} at {b} bits gives non-finite outputs")
            result[name][b] = max(kl, 0.0)
            bar.update()
    return result


def allocate(sensitivity: Dict[str, Dict[int, float]], params: Dict[str, int], budget: float,
             fixed: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """The per-layer widths minimising the summed sensitivity with sum(params * bits) <= budget * sum(params).

    ``fixed`` layers keep their widths (they need no sensitivity). Raises ConfigError when even the
    smallest widths exceed the budget."""
    fixed = dict(fixed or {})
    names = list(params)
    total = sum(params.values())
    unit = total / RESOLUTION  # weight-bits per size unit
    capacity = int(math.floor(budget * RESOLUTION + 1e-9))
    options = []
    for n in names:
        if n in fixed:
            opts = [(fixed[n], 0.0)]
        else:
            opts = sorted(sensitivity[n].items())
        options.append([(b, int(math.ceil(params[n] * b / unit - 1e-9)), s) for b, s in opts])
    smallest = sum(min(c for _, c, _ in o) for o in options)
    if smallest > capacity:
        least = sum(params[n] * min(b for b, _, _ in o) for n, o in zip(names, options)) / total
        raise ConfigError(f"weight-bit budget {budget:g} cannot be met: the smallest allocation (every free layer at "
                          f"its smallest bit choice{', the rule-fixed layers as fixed' if fixed else ''}) averages "
                          f"{least:.3f} weight bits")
    inf = float("inf")
    best = torch.full((capacity + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for opts in options:
        new = torch.full_like(best, inf)
        pick = torch.full((capacity + 1,), -1, dtype=torch.int16)
        for k, (_, cost, s) in enumerate(opts):
            if cost > capacity:
                continue
            cand = torch.full_like(best, inf)
            cand[cost:] = best[: capacity + 1 - cost] + s
            better = cand < new
            new = torch.where(better, cand, new)
            pick = torch.where(better, torch.tensor(k, dtype=torch.int16), pick)
        best = new
        picks.append(pick)
    # Least objective, ties to the smaller size.
    end = int(torch.nonzero(best == best.min())[0])
    bits: Dict[str, int] = {}
    for n, opts, pick in zip(reversed(names), reversed(options), reversed(picks)):
        k = int(pick[end])
        bits[n] = opts[k][0]
        end -= opts[k][1]
    return {n: bits[n] for n in names}


def allocate_bits(model: nn.Module, images: Tensor, config: QuantConfig, budget: float,
                  choices: Sequence[int] = DEFAULT_CHOICES, example: Optional[Tensor] = None,
                  batch_size: int = 32, device: str = "cpu", progress: bool = True) -> Allocation:
    """Sensitivity on ``images``, then the allocation under ``budget`` average weight bits.

    Layers that ``config.layer_wbits`` rules name keep those widths (and are not measured)."""
    choices = sorted(set(choices))
    check_budget(budget, choices)
    fp = copy.deepcopy(model).eval()
    if config.fold_bn:
        fold_batchnorm(fp)
    example = (example if example is not None else images[:1]).to(device)
    order = execution_order(fp, example)
    if not order:
        raise ConfigError("the model has no Conv2d or Linear layer to quantize")
    fixed = rule_bits(fp, order, config.layer_wbits)
    params = {n: _weight_view(fp, n).numel() for n in order}
    free = [n for n in order if n not in fixed]
    # Impossible budgets are refused before the (minutes of) sensitivity passes.
    allocate({n: {min(choices): 0.0} for n in free}, params, budget, fixed)
    # fp is folded already; the sensitivity quantizes weights only, so the placement does not matter (and the
    # deploy placement, which needs fold_bn, would be refused)
    config = dataclasses.replace(config, fold_bn=False, act_placement="input")
    sensitivity = layer_sensitivity(fp, images, config, choices, example, batch_size, device, layers=free,
                                    progress=progress)
    bits = allocate(sensitivity, params, budget, fixed)
    for n, b in fixed.items():
        sensitivity[n] = {b: 0.0}
    return Allocation(budget=float(budget), bits=bits, params=params, sensitivity=sensitivity, fixed=list(fixed))
