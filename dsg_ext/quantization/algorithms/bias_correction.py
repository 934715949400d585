"""Empirical bias correction (Nagel et al., "Data-Free Quantization", ICCV 2019; AIMET's empirical
variant): quantization shifts the mean of every layer's output -- weight rounding is not zero-mean per
output channel, and the shift accumulates through the network. For each quantized layer in execution
order, the per-channel mean of its output on the calibration images is measured in the float model
and in the quantized model (with the corrections of all earlier layers already in place), and the
difference is added to the layer's bias (a layer without a bias gets one). Layer i's correction
sees the corrected outputs of layers < i, so one forward pass over the images does all layers.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import Tensor, nn

from ...errors import ConfigError, InvalidDataError
from ..capture import hooks
from ..prepare import float_reference


def _channel_dim(layer: nn.Module) -> int:
    """A convolution's output channels are dim 1 of (N, C, ...); a Linear's are its last dim (any rank)."""
    return -1 if isinstance(layer, nn.Linear) else 1


def _channel_mean(out: Tensor, layer: nn.Module, name: str) -> Tensor:
    if not isinstance(out, Tensor) or out.dim() < 2:
        raise ConfigError(f"layer {name!r} does not return a batch of channels: cannot correct its bias")
    c = _channel_dim(layer) % out.dim()
    return out.double().mean(dim=[d for d in range(out.dim()) if d != c])


def _broadcast(delta: Tensor, out: Tensor, layer: nn.Module) -> Tensor:
    return delta if _channel_dim(layer) == -1 else delta.view(1, -1, *([1] * (out.dim() - 2)))


@torch.no_grad()
def _float_means(fp_model: nn.Module, fp_modules: Dict[str, nn.Module], order: List[str],
                 x: Tensor) -> Dict[str, Tensor]:
    """{layer: its per-channel output mean} in the float model on ``x`` (a layer called twice: its first call)."""
    target: Dict[str, Tensor] = {}

    def record(name):
        def hook(m, _inputs, out):
            if name not in target:
                target[name] = _channel_mean(out, m, name)
        return hook

    with hooks([fp_modules[n].register_forward_hook(record(n)) for n in order]):
        fp_model(x)
    return target


@torch.no_grad()
def correct_bias(qmodel: nn.Module, fp_model: nn.Module, images: Tensor, max_images: int = 256,
                 device: str = "cpu") -> List[Dict[str, float]]:
    """Adds to every quantized layer's bias the mean output shift quantization caused, in place.

    Args:
        qmodel: a calibrated model from ``quantize_model`` (weights nearest-rounded, reconstructed or
            finalised: the correction is measured with the weights as they are).
        fp_model: the float model it was made from.
        images: calibration images, (N, C, H, W) in the model's input space; the first ``max_images``
            are used, in one forward pass (the corrections chain through the layers).
        device: where both models live.

    Returns:
        One record per layer: the largest and the mean absolute correction, and the latter relative to
        the mean absolute float output mean of the layer's channels.
    """
    if images.numel() == 0:
        raise InvalidDataError("no images to measure the bias correction on")
    if not torch.isfinite(images).all():
        raise InvalidDataError("bias-correction images contain NaN or Inf")
    if max_images <= 0:
        raise ConfigError(f"max_images must be positive, got {max_images}")
    fp_model = float_reference(qmodel, fp_model)
    x = images[:max_images].to(device)
    order = list(qmodel.dsg_quant_order)
    fp_modules = dict(fp_model.named_modules())
    missing = [n for n in order if n not in fp_modules]
    if missing:
        raise ConfigError(f"the float model has no layer {missing[0]!r}: it is not the model this one was made from")
    target = _float_means(fp_model, fp_modules, order, x)
    records: List[Dict[str, float]] = []
    done = set()

    def correct(name):
        def hook(layer, _inputs, out):
            if name not in target or name in done:
                return None
            mean = _channel_mean(out, layer, name)
            if mean.shape != target[name].shape:
                raise ConfigError(f"layer {name!r} has {mean.numel()} output channels here, {target[name].numel()} "
                                  "in the float model: not the model this one was made from")
            delta = (target[name] - mean).to(out.dtype)
            if not bool(torch.isfinite(delta).all()):
                raise InvalidDataError(f"layer {name!r}: the output mean is not finite; no bias corrected")
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros_like(delta), requires_grad=False)
            layer.bias.add_(delta.to(layer.bias.dtype))
            scale = float(target[name].abs().mean())
            done.add(name)
            records.append({"layer": name, "max_abs": float(delta.abs().max()), "mean_abs": float(delta.abs().mean()),
                            "relative": float(delta.abs().mean()) / scale if scale > 0 else 0.0})
            return out + _broadcast(delta, out, layer)
        return hook

    handles = [qmodel.get_submodule(n).register_forward_hook(correct(n)) for n in order]
    before = {n: (None if qmodel.get_submodule(n).bias is None else qmodel.get_submodule(n).bias.clone())
              for n in order}
    try:
        qmodel(x)
    except BaseException:  # leave the model as it was: no half-corrected network
        for n, b in before.items():
            layer = qmodel.get_submodule(n)
            if b is None:
                layer.bias = None
            else:
                layer.bias.copy_(b)
        raise
    finally:
        for h in handles:
            h.remove()
    return records
