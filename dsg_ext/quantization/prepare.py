"""Building a fake-quantized model and calibrating it.

A quantized model is the float model with these additions, all through the fused ops:
- every Conv2d/Linear weight gets a parametrization (``WeightQuantizer``);
- an activation quantizer (``ActQuantizer``, per tensor) at the input of every quantized layer, or
  after every ReLU/ReLU6 module (ZeroQ's placement), or where an integer runtime needs one (deploy.py);
- optionally BatchNorm folded into the convolution before it.

``quantize_model`` builds it, ``calibrate`` sets the activation ranges from images, and
``finalize_weights`` stores the integer weights (what is saved and evaluated).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import warnings
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, InvalidDataError, QuantizationError
from .capture import batches
from .config import QuantConfig, parse_bit_rules
from .deploy import place
from .folding import QUANT_TYPES, batchnorm_as_convolution, edge_layers, fold_batchnorm
from .int16_pairs import could_need_limit, kernel_pairs, pair_safe_scale, uint8_range
from .observers import OBSERVERS
from .quantizers import ActQuantizer, WeightMode, WeightQuantizer


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


def rule_bits(model: nn.Module, order: List[str], text: str) -> Dict[str, int]:
    """{layer: weight bits} the rules of ``QuantConfig.layer_wbits`` give (later rules winning)."""
    bits: Dict[str, int] = {}
    for selector, b in parse_bit_rules(text):
        if selector == "depthwise":
            hit = [n for n in order if isinstance(model.get_submodule(n), nn.Conv2d)
                   and model.get_submodule(n).groups > 1
                   and model.get_submodule(n).groups == model.get_submodule(n).in_channels]
        elif selector in ("first", "last"):
            hit = [order[0] if selector == "first" else order[-1]]
        else:
            hit = [n for n in order if fnmatch.fnmatchcase(n, selector)]
        if not hit:
            raise ConfigError(f"weight-bit rule {selector}={b} matches no quantized layer of this model "
                              f"(layers: {', '.join(order[:6])}{', ...' if len(order) > 6 else ''})")
        bits.update({n: b for n in hit})
    return bits


def quantize_model(model: nn.Module, config: Optional[QuantConfig] = None,
                   example: Optional[Tensor] = None, *, fit_pair_scales: bool = True) -> nn.Module:
    """A fake-quantized copy of ``model``; the original is untouched.

    Args:
        model: the float network (any nn.Module with Conv2d / Linear layers).
        config: bit widths, granularity, observers (default: ``QuantConfig()``, the recommended recipe).
        example: one input batch; fixes which layers run first and last (otherwise registration order).
        fit_pair_scales: search the weight scales the int16 pair limit errs least with (int16_pairs.py);
            False where the scales are set next anyway (loading a file).

    Returns:
        The quantized model, in eval mode. Its activation quantizers still need ``calibrate``.
    """
    config = (config or QuantConfig()).validate()
    qmodel = copy.deepcopy(model).eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    if config.fold_bn:
        fold_batchnorm(qmodel)
        if config.act_placement == "deploy":  # what is left: a per-channel scale and shift the runtime runs in integers
            batchnorm_as_convolution(qmodel)
    order = execution_order(qmodel, example)
    if not order:
        raise ConfigError("the model has no Conv2d or Linear layer to quantize")
    make_observer = functools.partial(OBSERVERS[config.observer].from_config, config)
    edge = set(edge_layers(qmodel, order))
    layer_wbits = rule_bits(qmodel, order, config.layer_wbits)
    for name in order:
        layer = qmodel.get_submodule(name)
        edge_bits = config.first_last_bits if (name in edge and config.first_last_bits) else None
        wbits = layer_wbits.get(name) or edge_bits or config.wbits
        parametrize.register_parametrization(
            layer, "weight", WeightQuantizer(layer.weight, wbits, config.w_per_channel, config.w_symmetric,
                                             config.weight_observer), unsafe=True)
        if config.abits and config.act_placement == "input":
            layer.act_quant = ActQuantizer(edge_bits or config.abits, config.a_symmetric, make_observer)
            layer.register_forward_pre_hook(_act_pre_hook)
    if config.abits and config.act_placement == "deploy":

        def bits_for(edge: bool) -> int:
            return config.first_last_bits if edge and config.first_last_bits else config.abits

        qmodel.dsg_deploy = place(qmodel, example, order, bits_for,
                                  lambda bits: ActQuantizer(bits, config.a_symmetric, make_observer))
    if config.abits and config.act_placement == "relu":
        relus = [m for m in qmodel.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
        if not relus:
            raise ConfigError("act_placement='relu' needs nn.ReLU/nn.ReLU6 modules; this model has none "
                              "(it may call F.relu): use act_placement='input'")
        for m in relus:
            m.act_quant = ActQuantizer(config.abits, config.a_symmetric, make_observer)
            m.register_forward_hook(_act_post_hook)
    if config.abits and not config.vnni_only:
        _limit_pairs(qmodel, order, fit_pair_scales)
    qmodel.dsg_quant_config = dataclasses.asdict(config)
    qmodel.dsg_quant_order = order
    return qmodel


def layer_input_quantizer(layer: nn.Module) -> Optional[ActQuantizer]:
    """The activation quantizer whose grid ``layer``'s input is on (deployment or input placement), if any."""
    holder = getattr(layer, "_dsg_bias_input", None)
    if holder is not None and isinstance(getattr(holder, "act_quant", None), ActQuantizer):
        return holder.act_quant
    aq = getattr(layer, "act_quant", None)
    return aq if isinstance(aq, ActQuantizer) else None


def _limit_pairs(qmodel: nn.Module, order: List[str], fit_scales: bool) -> None:
    """Sets each int8 weight quantizer's ``pair_range`` (and its scale) where a pair of its products could
    saturate int16 in onnxruntime's x86 kernels without VNNI (int16_pairs.py); an input of unknown range
    counts as 0..255. The first layer is exported as uint8 weights instead (``export_uint8``)."""
    for name in order:
        layer = qmodel.get_submodule(name)
        wq = layer.parametrizations.weight[0]
        if wq.qmin >= 0 or not kernel_pairs(layer):  # uint8 weights, depthwise: exact kernels
            continue
        aq = layer_input_quantizer(layer)
        lo, hi = uint8_range(aq.qmin, aq.qmax) if aq is not None else (0, 255)
        if not could_need_limit(wq.qmin, wq.qmax, lo, hi):
            continue
        if name == order[0]:  # EfficientNet-Lite0: the limit on the stem alone took KL to FP32 0.038 -> 0.144
            wq.export_as_uint8()
        else:
            wq.limit_pairs_for(lo, hi)
            if fit_scales:
                wq.scale.copy_(pair_safe_scale(float_weight(qmodel, name), wq.scale, wq.qmin, wq.qmax, lo, hi))


def float_reference(qmodel: nn.Module, fp_model: nn.Module) -> nn.Module:
    """The float model whose layers correspond to ``qmodel``'s one to one: ``fp_model`` itself, or a
    BN-folded copy of it when ``qmodel`` was built with ``fold_bn`` (an unfolded convolution's output
    is its BatchNorm's input, not the folded layer's output; the deployment placement's BNs left unfolded are
    depthwise convolutions there too)."""
    if not getattr(qmodel, "dsg_quant_config", {}).get("fold_bn"):
        return fp_model
    folded = copy.deepcopy(fp_model).eval()
    fold_batchnorm(folded)
    if qmodel.dsg_quant_config.get("act_placement") == "deploy":
        batchnorm_as_convolution(folded)
    return folded


def weight_quantizers(qmodel: nn.Module) -> Dict[str, WeightQuantizer]:
    return {name: qmodel.get_submodule(name).parametrizations.weight[0] for name in qmodel.dsg_quant_order}


def act_quantizers(qmodel: nn.Module) -> Dict[str, ActQuantizer]:
    return {n: m.act_quant for n, m in qmodel.named_modules()
            if isinstance(getattr(m, "act_quant", None), ActQuantizer)}


def float_weight(qmodel: nn.Module, name: str) -> Tensor:
    """The float weight under layer ``name``'s quantizer."""
    return qmodel.get_submodule(name).parametrizations.weight.original


@torch.no_grad()
def calibrate(qmodel: nn.Module, images: Tensor, batch_size: int = 64, device: str = "cpu") -> None:
    """Sets every activation quantizer's range from calibration images.

    Args:
        qmodel: a model from ``quantize_model``.
        images: (N, C, H, W) in the model's normalised input space (synthetic or real).
        batch_size: images per forward pass.
        device: where ``qmodel`` lives.

    The ranges are observed with the weights already quantized. A quantizer no image reached (a layer the
    eval-mode forward never runs: GoogLeNet's auxiliary heads) is marked unreached and passes values on in
    float; one warning names them.
    """
    if images.numel() == 0:
        raise InvalidDataError("no calibration images")
    if not torch.isfinite(images).all():
        raise InvalidDataError("calibration images contain NaN or Inf")
    quantizers = act_quantizers(qmodel)
    for q in quantizers.values():
        q.start_calibration()
    try:
        for x in batches(images, batch_size):
            qmodel(x.to(device))
        unreached = [name for name, q in quantizers.items() if not q.saw_data]
        if quantizers and len(unreached) == len(quantizers):
            raise QuantizationError("no activation quantizer saw data during calibration (the model's forward "
                                    "reaches none of its quantized layers)")
        for name, q in quantizers.items():
            q.mark_unreached() if name in unreached else q.finish_calibration()
        if unreached:
            warnings.warn(f"{len(unreached)} activation quantizers saw no calibration data (their layers are not "
                          f"run by the eval-mode forward) and stay float: {', '.join(n or 'input' for n in unreached)}",
                          stacklevel=2)
    finally:
        for q in quantizers.values():
            q.abort_calibration()


@torch.no_grad()
def finalize_weights(qmodel: nn.Module) -> None:
    """Nearest-rounds every weight not rounded yet and stores its integers (what is saved/evaluated)."""
    for name, wq in weight_quantizers(qmodel).items():
        if wq.mode is not WeightMode.INT:
            wq.finalize(float_weight(qmodel, name))
