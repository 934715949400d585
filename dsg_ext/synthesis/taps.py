"""Taps on a network's BatchNorm layers: each BN layer's input statistics and its per-sample
slack loss (``dsg_ext.bn_stat_slack_loss`` / the fused ``dsg_ext.bn_eval_slack``), collected on every
forward pass while the taps are active."""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..errors import ConfigError, DsgError, NoBatchNormError, NonFiniteLossError, SynthesisError
from ..models.spec import probe_model
from ..ops import bn_eval_slack, bn_stat_slack_loss

FUSED_BN_DEVICES = ("cpu", "cuda")  # where bn_eval_slack has kernels


def batchnorm_layers(model: nn.Module, model_name: str = "model") -> List[Tuple[str, nn.BatchNorm2d]]:
    """The model's BatchNorm2d layers with running statistics, in forward-registration order."""
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None
    ]
    if not layers:
        raise NoBatchNormError(
            f"{model_name} has no BatchNorm2d layer with running statistics: DSG/ZeroQ synthesis needs them"
        )
    return layers


def _input_shapes(model: nn.Module, layers: Sequence[Tuple[str, nn.BatchNorm2d]], example: Tensor,
                  model_name: str) -> Dict[str, Tuple[int, ...]]:
    """Each BN layer's input shape in one eval-mode forward of ``example`` (a layer missing from the
    result is not reached); a model that rejects the input is named (``probe_model``)."""
    shapes: Dict[str, Tuple[int, ...]] = {}

    def record(name: str) -> Callable:
        def hook(_module, inputs) -> None:  # returns None: the inputs stay as they are
            shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    handles = [bn.register_forward_pre_hook(record(name)) for name, bn in layers]
    try:
        probe_model(model.eval(), example, model_name)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _pixels(shape: Tuple[int, ...]) -> int:
    return shape[2] * shape[3] if len(shape) == 4 else 2


def synthesis_layers(model: nn.Module, channels: int, image_size: int, device="cpu",
                     model_name: str = "model", warn: bool = True) -> List[Tuple[str, nn.BatchNorm2d]]:
    """The BN layers synthesis can match at this input size, found by one eval-mode forward pass (which is
    also the check, before long work, that the model takes the input: ModelSourceError names it otherwise).

    Skipped, with one warning that names them: layers the eval-mode forward never reaches (GoogLeNet's
    auxiliary heads run only in training) and layers that see 1x1 maps at every input size (a BN after a
    global pool, as in ReXNet's squeeze-excite), where per-sample statistics do not exist. A layer that
    sees 1x1 maps only because ``image_size`` is small is refused (ConfigError): a larger size keeps it.
    ``warn`` False: skip them silently (measurements of images already made).
    """
    layers = batchnorm_layers(model, model_name)
    shapes = _input_shapes(model, layers, torch.zeros(1, channels, image_size, image_size, device=device), model_name)
    unreached = [name for name, _ in layers if name not in shapes]
    single = [name for name in shapes if _pixels(shapes[name]) < 2]
    if single:
        try:
            larger = _input_shapes(model, layers, torch.zeros(1, channels, 2 * image_size, 2 * image_size,
                                                              device=device), model_name)
        except DsgError:  # a model that takes only this size: nothing a larger size could change
            larger = shapes
        grows = [name for name in single if name in larger and _pixels(larger[name]) >= 2]
        if grows:
            shape = shapes[grows[0]]
            raise ConfigError(
                f"BN layer {grows[0]!r} sees {shape[2]}x{shape[3]} feature maps at image_size={image_size}: "
                "per-sample statistics need at least 2 pixels per channel; use a larger image_size",
                parameter="image_size")
    skipped = {name: "not reached by the eval-mode forward" for name in unreached}
    skipped.update({name: "sees 1x1 maps at every input size" for name in single})
    kept = [(name, bn) for name, bn in layers if name not in skipped]
    if not kept:
        raise NoBatchNormError(f"{model_name}: no BatchNorm2d layer synthesis can match "
                               f"({len(unreached)} not reached by the eval-mode forward, {len(single)} see 1x1 maps)")
    if skipped and warn:
        warnings.warn(f"{model_name}: synthesis skips {len(skipped)} of {len(layers)} BN layers: "
                      + "; ".join(f"{reason}: {', '.join(n for n in skipped if skipped[n] == reason)}"
                                  for reason in dict.fromkeys(skipped.values())), stacklevel=2)
    return kept


class BatchNormTaps:
    """Taps each BN layer's input and computes its per-sample statistic loss there.

    While active, every forward pass fills ``losses`` (one (N) tensor per layer, in layer order)
    and, with ``record_stats``, ``stats`` (mean~, std~ per layer). A plain eval-mode nn.BatchNorm2d
    has its forward replaced by the fused ``bn_eval_slack`` op (the BN output and the loss -- per sample,
    or over the batch when only batch statistics are matched -- from one pass over the input, and one
    backward pass) when ``fused`` and on a device in ``FUSED_BN_DEVICES``;
    every other BN layer (subclasses such as timm's BatchNormAct2d) gets a
    forward pre-hook computing ``bn_stat_slack_loss``. A BN layer found in training mode during a
    forward pass is refused (SynthesisError) before it runs, so its running statistics stay as they were.
    """

    def __init__(self, layers: Sequence[Tuple[str, nn.BatchNorm2d]], unbiased: bool, fused: bool = True,
                 batch: bool = False, per_sample: bool = True):
        self.names = [name for name, _ in layers]
        # batch: also the batch-statistic loss of every layer (``batch_losses``, scalars);
        # per_sample False: the per-sample losses are not needed (not computed where BN runs unfused).
        self.batch, self.per_sample = batch, per_sample
        self.batch_delta: List[Tensor] = []
        self.batch_gamma: List[Tensor] = []
        self.batch_losses: List[Optional[Tensor]] = [None] * len(layers)
        self.layers = [bn for _, bn in layers]
        self.unbiased = unbiased
        self.fused = fused
        self.delta: List[Tensor] = []
        self.gamma: List[Tensor] = []
        self.losses: List[Optional[Tensor]] = [None] * len(layers)
        self.stats: List[Optional[Tuple[Tensor, Tensor]]] = [None] * len(layers)
        self.batch_stats: List[Optional[Tuple[Tensor, Tensor]]] = [None] * len(layers)
        self.record_stats = False
        self._handles = []
        self._patched: List[nn.BatchNorm2d] = []
        self._device_params: Dict[Tuple[int, torch.device], Tuple[Tensor, ...]] = {}
        self.targets = [
            (bn.running_mean.detach().float(), torch.sqrt(bn.running_var.detach().float() + bn.eps))
            for bn in self.layers
        ]
        for name, (mean, std) in zip(self.names, self.targets):
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                raise NonFiniteLossError(f"BN layer {name!r}: its running statistics contain NaN or Inf")

    def set_slack(self, delta: Sequence[Tensor], gamma: Sequence[Tensor]) -> None:
        self.delta, self.gamma = list(delta), list(gamma)

    def set_batch_slack(self, delta: Sequence[Tensor], gamma: Sequence[Tensor]) -> None:
        self.batch_delta, self.batch_gamma = list(delta), list(gamma)

    def _batch_loss(self, index: int, x: Tensor) -> None:
        if not self.batch:
            return
        mean, std = self._params(index, x.device)[:2]
        delta, gamma = self._batch_slack(index)
        loss, stat_mean, stat_std = bn_stat_slack_loss(x, mean, std, delta, gamma, eps=self.layers[index].eps,
                                                       unbiased=self.unbiased, mode="batch", return_stats=True)
        self._record_batch(index, loss, stat_mean, stat_std)

    def _batch_slack(self, index: int):
        return (self.batch_delta[index] if self.batch_delta else 0.0,
                self.batch_gamma[index] if self.batch_gamma else 0.0)

    def _record_batch(self, index: int, loss: Tensor, stat_mean: Tensor, stat_std: Tensor) -> None:
        self.batch_losses[index] = loss
        if self.record_stats:
            self.batch_stats[index] = (stat_mean, stat_std)

    def _params(self, index: int, device: torch.device) -> Tuple[Tensor, ...]:
        """(target mean, target std, bn_scale, bn_shift) of a layer on ``device``, made once (the model is
        frozen while tapped), so no host-to-device copy happens per iteration."""
        key = (index, device)
        if key not in self._device_params:
            bn = self.layers[index]
            mean, std = self.targets[index]
            with torch.no_grad():
                inv = 1.0 / torch.sqrt(bn.running_var.detach().float() + bn.eps)
                scale = inv * bn.weight.detach().float() if bn.weight is not None else inv
                shift = -bn.running_mean.detach().float() * scale
                if bn.bias is not None:
                    shift = shift + bn.bias.detach().float()
            self._device_params[key] = tuple(t.to(device) for t in (mean, std, scale, shift))
        return self._device_params[key]

    def _check_size(self, index: int, x: Tensor) -> None:
        if self.layers[index].training:
            raise SynthesisError(
                f"BN layer {self.names[index]!r} runs in training mode (the model's forward switches it, or the "
                "model was not put in eval mode): it would normalise with batch statistics and overwrite its "
                "running statistics, which are what synthesis matches; keep BatchNorm in eval mode")
        if x.dim() == 4 and x.shape[2] * x.shape[3] < 2:
            raise ConfigError(
                f"BN layer {self.names[index]!r} sees {x.shape[2]}x{x.shape[3]} feature maps at this image size: "
                "per-sample statistics need at least 2 pixels per channel; use a larger image_size",
                parameter="image_size")

    def _record(self, index: int, loss: Tensor, stat_mean: Tensor, stat_std: Tensor) -> None:
        self.losses[index] = loss
        if self.record_stats:
            self.stats[index] = (stat_mean, stat_std)

    def _hook(self, index: int) -> Callable:
        bn = self.layers[index]

        def hook(_module, inputs):
            x = inputs[0]
            self._check_size(index, x)
            self._batch_loss(index, x)
            if not self.per_sample:
                return
            mean, std = self._params(index, x.device)[:2]
            delta = self.delta[index] if self.delta else 0.0
            gamma = self.gamma[index] if self.gamma else 0.0
            loss, stat_mean, stat_std = bn_stat_slack_loss(
                x, mean, std, delta, gamma, eps=bn.eps, unbiased=self.unbiased, return_stats=True,
            )
            self._record(index, loss, stat_mean, stat_std)

        return hook

    def _fused_forward(self, index: int) -> Callable:
        bn = self.layers[index]
        plain_forward = bn.forward
        hook = self._hook(index)

        def forward(x: Tensor) -> Tensor:
            if x.dim() != 4 or x.device.type not in FUSED_BN_DEVICES or not (self.per_sample or self.batch):
                hook(bn, (x,))
                return plain_forward(x)
            self._check_size(index, x)
            mean, std, scale, shift = self._params(index, x.device)
            if not self.per_sample:  # batch statistics only: BN and the batch loss in one pass
                y, loss, stat_mean, stat_std = bn_eval_slack(x, scale, shift, mean, std, *self._batch_slack(index),
                                                             eps=bn.eps, unbiased=self.unbiased, mode="batch")
                self._record_batch(index, loss, stat_mean, stat_std)
                return y
            self._batch_loss(index, x)
            delta = self.delta[index] if self.delta else 0.0
            gamma = self.gamma[index] if self.gamma else 0.0
            y, loss, stat_mean, stat_std = bn_eval_slack(x, scale, shift, mean, std, delta, gamma, eps=bn.eps,
                                                         unbiased=self.unbiased)
            self._record(index, loss, stat_mean, stat_std)
            return y

        return forward

    def __enter__(self) -> "BatchNormTaps":
        for i, bn in enumerate(self.layers):
            if self.fused and type(bn) is nn.BatchNorm2d and bn.track_running_stats and "forward" not in bn.__dict__:
                bn.forward = self._fused_forward(i)  # an instance attribute: nn.Module.__call__ uses it
                self._patched.append(bn)
            else:
                self._handles.append(bn.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for bn in self._patched:
            del bn.forward
        self._handles, self._patched = [], []

    def collected(self) -> List[Tensor]:
        missing = [self.names[i] for i, l in enumerate(self.losses) if l is None]
        if missing:
            raise SynthesisError(f"BN layers not reached by the forward pass: {missing[:5]}")
        return list(self.losses)  # type: ignore[arg-type]

    def collected_batch(self) -> List[Tensor]:
        missing = [self.names[i] for i, l in enumerate(self.batch_losses) if l is None]
        if missing:
            raise SynthesisError(f"BN layers not reached by the forward pass: {missing[:5]}")
        return list(self.batch_losses)  # type: ignore[arg-type]

    def reset(self) -> None:
        self.losses = [None] * len(self.layers)
        self.stats = [None] * len(self.layers)
        self.batch_losses = [None] * len(self.layers)
        self.batch_stats: List[Optional[Tuple[Tensor, Tensor]]] = [None] * len(self.layers)
