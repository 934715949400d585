"""Fake-quantized models: the builder, activation observers, calibration, AdaRound, save and load.

A quantized model is the float model with three kinds of additions, all through the fused ops:
- every Conv2d/Linear weight gets a parametrization (``WeightQuantizer``): fake quantization per
  output channel (or per tensor) with ``dsg_ext.fake_quant``; during AdaRound the soft rounding of
  ``dsg_ext.adaround``; once finalised, the stored integer weights dequantized;
- an activation quantizer (``ActQuantizer``, per tensor) at the input of every quantized layer, or
  after every ReLU/ReLU6 module (ZeroQ's placement);
- optionally BatchNorm folded into the convolution before it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import ops

OBSERVERS = ("minmax", "ema", "percentile", "mse")
WEIGHT_OBSERVERS = ("minmax", "mse")
PLACEMENTS = ("input", "relu")
FORMAT_VERSION = 1


class QuantConfigError(ValueError):
    """Quantization options out of range (bit widths, observer names, ...)."""


class QuantizedFileError(RuntimeError):
    """A quantized-model file that cannot be read or does not belong to the model."""


@dataclasses.dataclass
class QuantConfig:
    wbits: int = 4
    abits: Optional[int] = 4  # None: activations stay float
    w_per_channel: bool = True
    w_symmetric: bool = True
    a_symmetric: bool = False
    act_placement: str = "input"  # "input": before every quantized layer; "relu": after each ReLU/ReLU6
    first_last_bits: Optional[int] = 8  # weight and activation bits of the first and last layer (None: same)
    observer: str = "minmax"  # activation ranges
    percentile: float = 99.99
    weight_observer: str = "minmax"
    fold_bn: bool = False

    def validate(self) -> "QuantConfig":
        problems = []
        for name in ("wbits", "abits", "first_last_bits"):
            b = getattr(self, name)
            if b is None and name != "wbits":
                continue
            if not isinstance(b, int) or not 2 <= b <= 8:
                problems.append(f"{name} must be an integer in 2..8, got {b!r}")
        if self.observer not in OBSERVERS:
            problems.append(f"observer must be one of {OBSERVERS}, got {self.observer!r}")
        if self.weight_observer not in WEIGHT_OBSERVERS:
            problems.append(f"weight observer must be one of {WEIGHT_OBSERVERS}, got {self.weight_observer!r}")
        if self.act_placement not in PLACEMENTS:
            problems.append(f"activation placement must be one of {PLACEMENTS}, got {self.act_placement!r}")
        if not 50.0 < self.percentile <= 100.0:
            problems.append(f"percentile must lie in (50, 100], got {self.percentile}")
        if problems:
            raise QuantConfigError("invalid quantization options: " + "; ".join(problems))
        return self

    def label(self) -> str:
        return f"W{self.wbits}A{self.abits if self.abits else 32}"


def quant_range(bits: int, symmetric: bool) -> Tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def range_to_qparams(lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool) -> Tuple[Tensor, Tensor]:
    """Scale and integer zero point covering [lo, hi] (elementwise, any shape); the range always holds 0."""
    lo = torch.minimum(lo, torch.zeros_like(lo)).double()
    hi = torch.maximum(hi, torch.zeros_like(hi)).double()
    if symmetric:
        scale = torch.maximum(hi, -lo) / qmax
        zp = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = (qmin - torch.round(lo / scale.clamp_min(1e-30))).clamp(qmin, qmax)
    scale = torch.where(scale > 1e-30, scale, torch.ones_like(scale) * 1e-8)
    return scale.float(), zp.to(torch.int32)


def _fq_reference(x: Tensor, scale: Tensor, zp: Tensor, qmin: int, qmax: int) -> Tensor:
    """Plain fake quantization for the vectorised range searches (broadcasting, no autograd)."""
    return (torch.clamp(torch.round(x / scale) + zp, qmin, qmax) - zp) * scale


def mse_search(values: Tensor, lo: Tensor, hi: Tensor, qmin: int, qmax: int, symmetric: bool,
               candidates: int = 50, reduce_dims: Tuple[int, ...] = (-1,)) -> Tuple[Tensor, Tensor]:
    """Shrinks [lo, hi] by the factor among ``candidates`` in [0.2, 1] that minimises the quantization
    MSE of ``values`` -- all candidates at once (chunked over candidates to bound memory).

    values: (..., M) with lo/hi of shape (...); returns (scale, zero_point) of shape (...)."""
    alphas = torch.linspace(0.2, 1.0, candidates, dtype=torch.float32, device=values.device)
    best_err, best_alpha = None, None
    chunk = max(1, int(2e7 // max(1, values.numel())))
    for i in range(0, candidates, chunk):
        a = alphas[i : i + chunk].view(-1, *([1] * lo.dim()))  # (K, ...)
        s, z = range_to_qparams(lo.unsqueeze(0) * a, hi.unsqueeze(0) * a, qmin, qmax, symmetric)
        err = (_fq_reference(values.unsqueeze(0), s.unsqueeze(-1), z.unsqueeze(-1).float(), qmin, qmax)
               - values.unsqueeze(0)).pow(2).mean(-1)  # (K, ...)
        e, k = err.min(0)
        if best_err is None:
            best_err, best_alpha = e, alphas[i + k]
        else:
            better = e < best_err
            best_err = torch.where(better, e, best_err)
            best_alpha = torch.where(better, alphas[i + k], best_alpha)
    return range_to_qparams(lo * best_alpha, hi * best_alpha, qmin, qmax, symmetric)


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


class WeightQuantizer(nn.Module):
    """Parametrization of a Conv2d/Linear weight: fake quantization, AdaRound, or finalised integers."""

    def __init__(self, weight: Tensor, bits: int, per_channel: bool, symmetric: bool, observer: str):
        super().__init__()
        self.bits, self.per_channel, self.symmetric = bits, per_channel, symmetric
        self.qmin, self.qmax = quant_range(bits, symmetric)
        w = weight.detach().float()
        flat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
        lo, hi = flat.amin(1), flat.amax(1)
        if symmetric:
            lo, hi = torch.minimum(lo, -hi), torch.maximum(hi, -lo)
        if observer == "mse":
            scale, zp = mse_search(flat, lo, hi, self.qmin, self.qmax, symmetric)
        else:
            scale, zp = range_to_qparams(lo, hi, self.qmin, self.qmax, symmetric)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp)
        self.register_buffer("w_int", torch.empty(0, dtype=torch.int8))  # set by finalize()
        self.mode = "fake"  # "fake" | "adaround" | "int"
        self.v: Optional[nn.Parameter] = None
        self.beta = 20.0
        self.last_reg: Optional[Tensor] = None
        self.use_plain_adaround = False  # the peers' 8-op chain, for timing comparisons only

    @property
    def axis(self) -> Optional[int]:
        return 0 if self.per_channel else None

    def _bshape(self, w: Tensor) -> List[int]:
        return [-1] + [1] * (w.dim() - 1) if self.per_channel else [1] * w.dim()

    def forward(self, w: Tensor) -> Tensor:
        if self.mode == "int":
            shape = self._bshape(w)
            return ((self.w_int.float() - self.zero_point.view(shape).float()) * self.scale.view(shape)).to(w.dtype)
        if self.mode == "adaround":
            if self.use_plain_adaround:
                from . import plain

                shape = self._bshape(w)
                w_q, self.last_reg = plain.adaround(w, self.v, self.scale.view(shape), self.zero_point.view(shape).float(),
                                                    self.qmin, self.qmax, beta=self.beta)
                return w_q
            w_q, self.last_reg = ops.adaround(w, self.v, self.scale, self.zero_point, self.qmin, self.qmax, self.axis,
                                              beta=self.beta)
            return w_q
        return ops.fake_quant(w, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)

    def start_adaround(self, w: Tensor) -> None:
        self.v = nn.Parameter(ops.adaround_init(w.detach().float(), self.scale, axis=self.axis))
        self.mode = "adaround"

    @torch.no_grad()
    def finalize(self, w: Tensor) -> None:
        """Stores the integer weights: nearest rounding, or AdaRound's hard rounding (v >= 0)."""
        shape = self._bshape(w)
        s, z = self.scale.view(shape), self.zero_point.view(shape).float()
        w = w.detach().float()
        if self.mode == "adaround":
            q = torch.floor(w / s) + (self.v.detach() >= 0).float() + z
        else:
            q = torch.round(w / s) + z
        dtype = torch.int8 if self.qmin >= -128 and self.qmax <= 127 else torch.uint8
        self.w_int = q.clamp(self.qmin, self.qmax).to(dtype)
        self.mode, self.v, self.last_reg = "int", None, None


# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


class ActQuantizer(nn.Module):
    """Per-tensor activation fake quantization with a range observer (vectorised: one reduction per
    batch; percentile and MSE keep a random sample of at most ``sample_size`` values)."""

    def __init__(self, bits: int, symmetric: bool, observer: str, percentile: float = 99.99,
                 ema_momentum: float = 0.9, sample_size: int = 1 << 20):
        super().__init__()
        self.bits, self.symmetric, self.observer = bits, symmetric, observer
        self.percentile, self.momentum, self.sample_size = percentile, ema_momentum, sample_size
        self.qmin, self.qmax = quant_range(bits, symmetric)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.calibrating = False
        self.enabled = True
        self.calibrated = False
        self._lo: Optional[Tensor] = None
        self._hi: Optional[Tensor] = None
        self._samples: List[Tensor] = []
        self._seen = 0

    def forward(self, x: Tensor) -> Tensor:
        if self.calibrating:
            self._observe(x.detach())
            return x
        if not self.enabled:
            return x
        if not self.calibrated:
            raise RuntimeError("activation quantizer used before calibration: run calibrate() first")
        return ops.fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def _observe(self, x: Tensor) -> None:
        x = x.float()
        lo, hi = torch.aminmax(x)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise ValueError("calibration activations contain NaN or Inf")
        if self._lo is None:
            self._lo, self._hi = lo, hi
        elif self.observer == "ema":
            self._lo = self.momentum * self._lo + (1 - self.momentum) * lo
            self._hi = self.momentum * self._hi + (1 - self.momentum) * hi
        else:
            self._lo, self._hi = torch.minimum(self._lo, lo), torch.maximum(self._hi, hi)
        if self.observer in ("percentile", "mse"):
            flat = x.reshape(-1)
            take = max(4096, self.sample_size // 16)
            if flat.numel() > take:  # a random subset of large batches; small ones are kept whole
                flat = flat[torch.randint(0, flat.numel(), (take,), device=flat.device)]
            self._samples.append(flat)
            self._seen += flat.numel()
            if self._seen > 2 * self.sample_size:  # keep a bounded random subset
                allv = torch.cat(self._samples)
                keep = torch.randperm(allv.numel(), device=allv.device)[: self.sample_size]
                self._samples, self._seen = [allv[keep]], self.sample_size

    def finish_calibration(self) -> None:
        if self._lo is None:
            raise RuntimeError("an activation quantizer saw no data during calibration (layer never reached)")
        lo, hi = self._lo, self._hi
        if self.observer == "percentile":
            v = torch.cat(self._samples)
            q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], device=v.device, dtype=v.dtype)
            lo, hi = torch.quantile(v, q)
        if self.symmetric:
            lo, hi = torch.minimum(lo, -hi), torch.maximum(hi, -lo)
        if self.observer == "mse":
            scale, zp = mse_search(torch.cat(self._samples), lo, hi, self.qmin, self.qmax, self.symmetric)
        else:
            scale, zp = range_to_qparams(lo, hi, self.qmin, self.qmax, self.symmetric)
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self.calibrating, self.calibrated = False, True
        self._lo = self._hi = None
        self._samples, self._seen = [], 0


# --------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------

QUANT_TYPES = (nn.Conv2d, nn.Linear)


def _act_pre_hook(module: nn.Module, inputs):
    return (module.act_quant(inputs[0]),) + tuple(inputs[1:])


def _act_post_hook(module: nn.Module, _inputs, output):
    return module.act_quant(output)


def execution_order(model: nn.Module, example: Optional[Tensor], types=QUANT_TYPES) -> List[str]:
    """Names of the modules of ``types`` in the order the forward pass calls them (registration order
    without an example input); modules never called come last."""
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, types)]
    if example is None:
        return [n for n, _ in named]
    order: List[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, inp, _n=n: order.append(_n) if _n not in order else None)
               for n, m in named]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order + [n for n, _ in named if n not in order]


def fold_batchnorm(model: nn.Module) -> List[Tuple[str, str]]:
    """Folds each BatchNorm2d that directly follows a Conv2d (its only user) into that convolution,
    in place; the BN becomes Identity. Needs a torch.fx-traceable model. Returns (conv, bn) pairs."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:
        raise QuantConfigError(f"BN folding needs a torch.fx-traceable model: {type(e).__name__}: {e}") from e
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and isinstance(modules.get(src.target), nn.Conv2d)
                and len(src.users) == 1):
            pairs.append((src.target, node.target))
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            conv, bn = modules[conv_name], modules[bn_name]
            std = torch.sqrt(bn.running_var + bn.eps)
            gamma = bn.weight if bn.affine else torch.ones_like(std)
            beta = bn.bias if bn.affine else torch.zeros_like(std)
            k = gamma / std
            conv.weight.mul_(k.view(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
            new_bias = beta + (bias - bn.running_mean) * k
            conv.bias = nn.Parameter(new_bias)
            parent_name, _, attr = bn_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, nn.Identity())
    return pairs


def quantize_model(model: nn.Module, config: QuantConfig, example: Optional[Tensor] = None) -> nn.Module:
    """A fake-quantized copy of ``model`` (the original is untouched). Activation quantizers still need
    ``calibrate``. ``example`` (one input batch) fixes which layers are first and last in execution."""
    config.validate()
    qmodel = copy.deepcopy(model).eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    if config.fold_bn:
        fold_batchnorm(qmodel)
    order = execution_order(qmodel, example)
    if not order:
        raise QuantConfigError("the model has no Conv2d or Linear layer to quantize")
    edge = {order[0], order[-1]}
    for name in order:
        layer = qmodel.get_submodule(name)
        edge_bits = config.first_last_bits if (name in edge and config.first_last_bits) else None
        wbits = edge_bits or config.wbits
        parametrize.register_parametrization(
            layer, "weight", WeightQuantizer(layer.weight, wbits, config.w_per_channel, config.w_symmetric,
                                             config.weight_observer), unsafe=True)
        if config.abits and config.act_placement == "input":
            layer.act_quant = ActQuantizer(edge_bits or config.abits, config.a_symmetric, config.observer,
                                           config.percentile)
            layer.register_forward_pre_hook(_act_pre_hook)
    if config.abits and config.act_placement == "relu":
        relus = [m for m in qmodel.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
        if not relus:
            raise QuantConfigError("act_placement='relu' needs nn.ReLU/nn.ReLU6 modules; this model has none "
                                   "(it may call F.relu): use act_placement='input'")
        for m in relus:
            m.act_quant = ActQuantizer(config.abits, config.a_symmetric, config.observer, config.percentile)
            m.register_forward_hook(_act_post_hook)
    qmodel.dsg_quant_config = dataclasses.asdict(config)
    qmodel.dsg_quant_order = order
    return qmodel


def weight_quantizers(qmodel: nn.Module) -> Dict[str, WeightQuantizer]:
    return {name: qmodel.get_submodule(name).parametrizations.weight[0] for name in qmodel.dsg_quant_order}


def act_quantizers(qmodel: nn.Module) -> Dict[str, ActQuantizer]:
    return {n: m.act_quant for n, m in qmodel.named_modules() if isinstance(getattr(m, "act_quant", None), ActQuantizer)}


def set_act_quant(qmodel: nn.Module, enabled: bool) -> None:
    for q in act_quantizers(qmodel).values():
        q.enabled = enabled


def batches(images: Tensor, batch_size: int) -> Iterable[Tensor]:
    for i in range(0, images.shape[0], batch_size):
        yield images[i : i + batch_size]


@torch.no_grad()
def calibrate(qmodel: nn.Module, images: Tensor, batch_size: int = 64, device: str = "cpu") -> None:
    """Sets every activation quantizer's range from ``images`` (the model's normalised input space),
    observed with the weights already quantized."""
    if images.numel() == 0:
        raise ValueError("no calibration images")
    if not torch.isfinite(images).all():
        raise ValueError("calibration images contain NaN or Inf")
    quantizers = act_quantizers(qmodel)
    for q in quantizers.values():
        q.calibrating = True
    try:
        for x in batches(images, batch_size):
            qmodel(x.to(device))
    finally:
        for q in quantizers.values():
            q.calibrating = False
    for q in quantizers.values():
        q.finish_calibration()


@torch.no_grad()
def finalize_weights(qmodel: nn.Module) -> None:
    """Nearest-rounds every weight not rounded yet and stores its integers (what is saved/evaluated)."""
    for name, wq in weight_quantizers(qmodel).items():
        if wq.mode != "int":
            wq.finalize(qmodel.get_submodule(name).parametrizations.weight.original)


# --------------------------------------------------------------------------------------------
# AdaRound (Nagel et al., ICML 2020): layer by layer, ||W x - W~ x^||^2 + lambda R(V, beta)
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AdaRoundConfig:
    iterations: int = 10000
    batch_size: int = 32
    lr: float = 1e-3
    reg_weight: float = 0.01  # lambda
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of iterations without the regularizer
    seed: int = 0
    # Keep nearest rounding for a layer whose hard AdaRound rounding reconstructs the calibration data
    # worse than nearest rounding does (happens with schedules far shorter than the paper's 10k).
    keep_better: bool = True

    def validate(self) -> "AdaRoundConfig":
        if self.iterations <= 0 or self.batch_size <= 0 or not self.lr > 0 or not 0 <= self.warmup < 1:
            raise QuantConfigError(f"invalid AdaRound options: {self}")
        return self


class _Stop(Exception):
    pass


def _layer_inputs(model: nn.Module, layer_name: str, images: Tensor, batch_size: int, device: str,
                  kwargs_out: Optional[Dict[str, Any]] = None) -> Tensor:
    """The inputs the layer (or block) receives (before its activation quantizer) for all images; the
    forward stops there. Its other keyword arguments (non-tensors, e.g. a drop-connect rate) go to
    ``kwargs_out``; a module taking more than one tensor cannot be reconstructed on its own."""
    layer = model.get_submodule(layer_name)
    got: List[Tensor] = []

    def grab(_m, inputs, kwargs):
        if len(inputs) != 1 or not isinstance(inputs[0], Tensor) or any(isinstance(v, Tensor) for v in kwargs.values()):
            raise QuantConfigError(f"{layer_name!r} takes more than one tensor input: it cannot be reconstructed on its own")
        got.append(inputs[0].detach().cpu())
        if kwargs_out is not None:
            kwargs_out.update(kwargs)
        raise _Stop

    # prepend, so that the capture sees the raw input even when an activation quantizer hook exists
    h = layer.register_forward_pre_hook(grab, prepend=True, with_kwargs=True)
    try:
        with torch.no_grad():
            for x in batches(images, batch_size):
                try:
                    model(x.to(device))
                except _Stop:
                    pass
    finally:
        h.remove()
    if not got:
        raise RuntimeError(f"{layer_name!r} is never reached by the forward pass")
    return torch.cat(got)


def _rec_loss_batched(layer: Callable[[Tensor], Tensor], x: Tensor, target: Tensor, batch_size: int = 64) -> float:
    """_rec_loss over all of x, in batches (the same value as one big batch; bounded memory)."""
    total, n = 0.0, x.shape[0]
    for i in range(0, n, batch_size):
        total += float(_rec_loss(layer(x[i : i + batch_size]), target[i : i + batch_size])) * min(batch_size, n - i)
    return total / n


def _rec_loss(out: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over channels (dim 1), mean over the rest (AdaRound/BRECQ)."""
    d = (out - target).pow(2)
    return d.sum(1).mean() if d.dim() > 1 else d.mean()


def find_blocks(qmodel: nn.Module) -> List[str]:
    """Residual-style blocks for block-wise reconstruction (BRECQ): the innermost modules that are
    elements of an nn.Sequential / nn.ModuleList and hold at least two quantized layers (torchvision
    BasicBlock / Bottleneck / InvertedResidual, EfficientNet's MBConv blocks, our ResNet-20's blocks)."""
    quantized = set(qmodel.dsg_quant_order)
    candidates = []
    for parent_name, parent in qmodel.named_modules():
        if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            continue
        for child_name, child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            inside = [n for n in quantized if n == name or n.startswith(name + ".")]
            if len(inside) >= 2:
                candidates.append(name)
    return [c for c in candidates if not any(o != c and o.startswith(c + ".") for o in candidates)]


def _units(qmodel: nn.Module, layers: Optional[Sequence[str]], blocks: Optional[Sequence[str]]) -> List[Tuple[str, List[str]]]:
    """(module name, quantized layers inside) in execution order: each block once, other layers alone."""
    names = list(layers) if layers is not None else list(qmodel.dsg_quant_order)
    units: List[Tuple[str, List[str]]] = []
    seen = set()
    for name in names:
        block = next((b for b in (blocks or ()) if name.startswith(b + ".")), None)
        if block is None:
            units.append((name, [name]))
        elif block not in seen:
            seen.add(block)
            units.append((block, [n for n in names if n.startswith(block + ".")]))
    return units


def adaround(qmodel: nn.Module, fp_model: nn.Module, images: Tensor, config: AdaRoundConfig,
             device: str = "cpu", progress: bool = True, plain: bool = False,
             layers: Optional[Sequence[str]] = None, blocks: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """AdaRound every quantized layer in execution order (or only ``layers``): V optimised with Adam on
    the calibration images, beta annealed after the warm-up, then hard rounding. Activations are
    quantized during reconstruction (x^ comes from the already quantized model, through this
    layer's own activation quantizer). With ``blocks`` (module names, e.g. ``find_blocks(qmodel)``)
    the layers inside each block are rounded jointly to reconstruct the block's output (BRECQ);
    layers outside every block stay layer-wise. Returns one record per layer or block (losses,
    seconds, what was kept)."""
    config.validate()
    gen = torch.Generator().manual_seed(config.seed)
    records = []
    units = _units(qmodel, layers, blocks)
    wqs = weight_quantizers(qmodel)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(units) * config.iterations, desc="AdaRound", unit="it", leave=False)
    for unit_name, unit_layers in units:
        unit, fp_unit = qmodel.get_submodule(unit_name), fp_model.get_submodule(unit_name)
        quantizers = [wqs[n] for n in unit_layers]
        originals = [qmodel.get_submodule(n).parametrizations.weight.original for n in unit_layers]
        if bar is not None:
            bar.set_postfix_str(f"{len(records) + 1}/{len(units)} {unit_name}")
        kw: Dict[str, Any] = {}
        x_fp = _layer_inputs(fp_model, unit_name, images, 64, device, kw)
        x_q = _layer_inputs(qmodel, unit_name, images, 64, device)
        run = (lambda m, x: m(x, **kw)) if kw else (lambda m, x: m(x))
        with torch.no_grad():
            target = torch.cat([run(fp_unit, x.to(device)).cpu() for x in batches(x_fp, 64)])
        for wq, w in zip(quantizers, originals):
            wq.use_plain_adaround = plain
            wq.start_adaround(w)
        opt = torch.optim.Adam([wq.v for wq in quantizers], lr=config.lr)
        x_q, target = x_q.to(device), target.to(device)
        warm = int(config.warmup * config.iterations)
        start_loss = None
        t0 = time.perf_counter()
        for it in range(config.iterations):
            idx = torch.randint(0, x_q.shape[0], (min(config.batch_size, x_q.shape[0]),), generator=gen).to(device)
            if it < warm:
                beta, lam = config.beta_start, 0.0
            else:
                frac = (it - warm) / max(1, config.iterations - warm)
                beta, lam = config.beta_start + (config.beta_end - config.beta_start) * frac, config.reg_weight
            for wq in quantizers:
                wq.beta = beta
            opt.zero_grad(set_to_none=True)
            rec = _rec_loss(run(unit, x_q[idx]), target[idx])
            loss = rec + lam * sum(wq.last_reg for wq in quantizers) if lam else rec
            loss.backward()
            opt.step()
            if it == 0:
                start_loss = float(rec.detach())
            if bar is not None:
                bar.update(1)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            undecided = changed = 0.0
            total = sum(w.numel() for w in originals)
            for wq, w in zip(quantizers, originals):
                v = wq.v.detach().float()
                h = torch.clamp(torch.sigmoid(v) * (ops.ADAROUND_ZETA - ops.ADAROUND_GAMMA) + ops.ADAROUND_GAMMA,
                                0, 1)  # the soft rounding of ops.adaround
                undecided += float(((h > 0.01) & (h < 0.99)).sum()) / total  # not settled at 0 or 1 yet
                ws = w.detach().float() / wq.scale.view(wq._bshape(w))
                changed += float(((v >= 0) != (ws - torch.floor(ws) >= 0.5)).sum()) / total  # vs nearest rounding
            for wq in quantizers:
                wq.mode = "fake"
            nearest = _rec_loss_batched(lambda x: run(unit, x), x_q, target)
            for wq, w in zip(quantizers, originals):
                wq.mode = "adaround"
                wq.finalize(w)
            end_loss = _rec_loss_batched(lambda x: run(unit, x), x_q, target)
            kept = "adaround"
            if config.keep_better and not end_loss <= nearest:
                for wq, w in zip(quantizers, originals):  # back to nearest rounding, then store those integers
                    wq.mode = "fake"
                    wq.finalize(w)
                kept = "nearest"
        records.append({"layer": unit_name, "layers": unit_layers, "kind": "block" if unit_layers != [unit_name] else "layer",
                        "rec_loss_nearest": nearest, "rec_loss_adaround": end_loss, "kept": kept,
                        "undecided": undecided, "changed_vs_nearest": changed, "first_batch_loss": start_loss,
                        "seconds": seconds, "plain": plain})
    if bar is not None:
        bar.close()
    return records


def adaround_summary(records: Sequence[Dict[str, Any]]) -> Tuple[str, Optional[str]]:
    """One line on what AdaRound did (layers improved, kept at nearest rounding, reconstruction gain)
    and a warning when the rounding variables had not settled (a schedule too short), else None."""
    if not records:
        return "AdaRound: no layer", None
    improved = [r for r in records if r.get("kept") == "adaround" and r["rec_loss_adaround"] < r["rec_loss_nearest"]]
    kept_nearest = sum(r.get("kept") == "nearest" for r in records)
    worse = sum(r["rec_loss_adaround"] > r["rec_loss_nearest"] for r in records)
    kept_loss = lambda r: r["rec_loss_nearest"] if r.get("kept") == "nearest" else r["rec_loss_adaround"]  # noqa: E731
    gains = sorted(1 - kept_loss(r) / r["rec_loss_nearest"] for r in records if r["rec_loss_nearest"] > 0)
    median = gains[len(gains) // 2] if gains else 0.0
    undecided = sum(r.get("undecided", 0.0) for r in records) / len(records)
    units = "layers" if all(r.get("kind", "layer") == "layer" for r in records) else "blocks and layers"
    line = (f"AdaRound: {len(improved)}/{len(records)} {units} reconstruct better than nearest rounding, "
            f"{kept_nearest} kept nearest rounding (AdaRound was worse on the calibration data); median "
            f"reconstruction-error reduction {100 * median:.1f}%; {100 * undecided:.1f}% of rounding variables "
            "undecided at the end")
    warning = None
    if undecided > 0.2 or worse > len(records) // 4:
        warning = ("AdaRound's schedule looks too short for these layers (rounding variables still undecided or "
                   "worse than nearest rounding): raise the iterations per layer (the paper uses 10000) or the "
                   "learning rate (the paper's 1e-3 moves a variable by at most ~1e-3 per iteration)")
    return line, warning


# --------------------------------------------------------------------------------------------
# Evaluation helpers
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def fidelity(fp_model: nn.Module, qmodel: nn.Module, images: Tensor, batch_size: int = 100,
             device: str = "cpu") -> Dict[str, float]:
    """Agreement of the quantized model with FP32 on any images: top-1 agreement (%) and the mean
    KL(p_fp32 || p_quant) of the softmax outputs."""
    agree = 0
    kl = 0.0
    for x in batches(images, batch_size):
        x = x.to(device)
        a, b = fp_model(x).double(), qmodel(x).double()
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        kl += float(F.kl_div(F.log_softmax(b, 1), F.log_softmax(a, 1), log_target=True, reduction="sum"))
    n = images.shape[0]
    return {"top1_agreement": 100.0 * agree / n, "mean_kl": kl / n}


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def save_quantized(qmodel: nn.Module, path: str, source: str, identity: str, extra: Optional[Dict[str, Any]] = None) -> None:
    """Integer weights, scales and zero points (safetensors) + the JSON config in the file's metadata.
    Written atomically: an existing file is replaced only by a complete one."""
    from safetensors.torch import save

    from .dataset import atomic_write_bytes

    finalize_weights(qmodel)
    tensors: Dict[str, Tensor] = {}
    for name, wq in weight_quantizers(qmodel).items():
        tensors[f"{name}.weight_int"] = wq.w_int.contiguous()
        tensors[f"{name}.weight_scale"] = wq.scale.contiguous()
        tensors[f"{name}.weight_zero_point"] = wq.zero_point.contiguous()
        bias = getattr(qmodel.get_submodule(name), "bias", None)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    for name, aq in act_quantizers(qmodel).items():
        if not aq.calibrated:
            raise RuntimeError(f"activation quantizer {name!r} is not calibrated: nothing to save")
        tensors[f"{name}.act_scale"] = aq.scale.reshape(1).contiguous()
        tensors[f"{name}.act_zero_point"] = aq.zero_point.reshape(1).contiguous()
    meta = {"format": FORMAT_VERSION, "source": source, "model_identity": identity,
            "config": qmodel.dsg_quant_config, "order": qmodel.dsg_quant_order, **(extra or {})}
    atomic_write_bytes(path, save({k: v.cpu() for k, v in tensors.items()}, metadata={"dsg_ext": json.dumps(meta)}))


def read_quantized(path: str) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("dsg_ext", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise QuantizedFileError(f"{path}: no such file")
    except Exception as e:
        raise QuantizedFileError(f"{path}: not a readable quantized-model file ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise QuantizedFileError(f"{path}: not a dsg_ext quantized-model file (format {FORMAT_VERSION})")
    return tensors, meta


def load_quantized(model: nn.Module, path: str, identity: str, example: Optional[Tensor] = None) -> nn.Module:
    """Rebuilds the quantized model from the float ``model`` it was made from and the saved file."""
    tensors, meta = read_quantized(path)
    if meta["model_identity"] != identity:
        raise QuantizedFileError(
            f"{path} was made from another model (identity {meta['model_identity'][:12]}..., this model "
            f"{identity[:12]}...; source {meta.get('source')!r})")
    qmodel = quantize_model(model, QuantConfig(**meta["config"]), example)
    if qmodel.dsg_quant_order != meta["order"] and set(qmodel.dsg_quant_order) != set(meta["order"]):
        raise QuantizedFileError(f"{path}: its layers do not match the model's")
    with torch.no_grad():
        for name, wq in weight_quantizers(qmodel).items():
            try:
                w_int = tensors[f"{name}.weight_int"]
                wq.scale.copy_(tensors[f"{name}.weight_scale"])
                wq.zero_point.copy_(tensors[f"{name}.weight_zero_point"])
            except KeyError as e:
                raise QuantizedFileError(f"{path}: missing {e.args[0]}") from e
            except RuntimeError as e:
                raise QuantizedFileError(f"{path}: layer {name!r} does not match the model: {e}") from e
            w = qmodel.get_submodule(name).parametrizations.weight.original
            if tuple(w_int.shape) != tuple(w.shape):
                raise QuantizedFileError(f"{path}: layer {name!r} has weights {tuple(w_int.shape)}, the model {tuple(w.shape)}")
            wq.w_int, wq.mode = w_int, "int"
            layer = qmodel.get_submodule(name)
            if f"{name}.bias" in tensors:
                layer.bias.copy_(tensors[f"{name}.bias"])
        for name, aq in act_quantizers(qmodel).items():
            if f"{name}.act_scale" not in tensors:
                raise QuantizedFileError(f"{path}: missing activation range of {name!r}")
            aq.scale.copy_(tensors[f"{name}.act_scale"].reshape(()))
            aq.zero_point.copy_(tensors[f"{name}.act_zero_point"].reshape(()))
            aq.calibrated = True
    return qmodel
