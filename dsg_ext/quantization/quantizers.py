"""The quantizer modules a quantized model is made of, both through the fused ops:

- ``WeightQuantizer``: the parametrization of a Conv2d/Linear weight -- fake quantization per output
  channel (or per tensor) with ``dsg_ext.fake_quant``; during AdaRound the soft rounding of
  ``dsg_ext.adaround``; once finalised, the stored integer weights dequantized;
- ``ActQuantizer``: per-tensor activation fake quantization, its range set by an observer during
  calibration.
"""

from __future__ import annotations

import enum
import math
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import QuantizationError
from .int16_pairs import limit_pairs
from .observers import Observer
from .qparams import quant_range, weight_qparams

# The signature of dsg_ext.adaround: (w, v, scale, zero_point, quant_min, quant_max, axis, *, beta) -> (w~, R)
RoundingFn = Callable[..., Tuple[Tensor, Tensor]]


class WeightMode(enum.Enum):
    FAKE = "fake"  # nearest rounding, recomputed from the float weight
    ADAROUND = "adaround"  # soft rounding with learnable rounding variables V
    INT = "int"  # the stored integers, dequantized


class WeightQuantizer(nn.Module):
    """Parametrization of a Conv2d/Linear weight: fake quantization, AdaRound, or finalised integers.

    ``rounding`` is the AdaRound rounding function (``dsg_ext.adaround``); a benchmark may replace
    it with another implementation of the same signature."""

    def __init__(self, weight: Tensor, bits: int, per_channel: bool, symmetric: bool, observer: str):
        super().__init__()
        self.bits, self.per_channel, self.symmetric = bits, per_channel, symmetric
        self.qmin, self.qmax = quant_range(bits, symmetric)
        scale, zp = weight_qparams(weight, self.qmin, self.qmax, per_channel, symmetric, observer)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp)
        self.register_buffer("w_int", torch.empty(0, dtype=torch.int8))  # set by finalize()
        self.mode = WeightMode.FAKE
        self.v: Optional[nn.Parameter] = None
        self.beta: "float | Tensor" = 20.0  # a 0-dim tensor when the reconstruction anneals it on the device
        self.last_reg: Optional[Tensor] = None
        self.rounding: RoundingFn = ops.adaround
        self.scale_param: Optional[nn.Parameter] = None  # learned jointly with the rounding (reconstruction)
        # Set by the second-order rounding (algorithms/second_order.py, through set_start_weight): the weight
        # after its error compensation, whose nearest rounding is that step's decision. A reconstruction
        # started from that decision learns the rounding of this weight instead of the layer's own (its
        # up/down choices are the compensated weight's neighbours on the grid). Not saved.
        self.start_weight: Optional[Tensor] = None
        # The raw uint8 input range (lo, hi) for which every pair of adjacent integer products must fit int16
        # (int16_pairs.py: onnxruntime's kernels on x86 CPUs without VNNI); None: no limit. Set by
        # quantize_model; ``pairs_moved`` counts the weights the limit moved at the last store.
        self.pair_range: Optional[Tuple[int, int]] = None
        self.pairs_moved = 0
        # Instead of the limit: the exported file stores this layer's weights as uint8 with zero point 128 (the
        # same values), which onnxruntime runs in its U8U8 kernels, exact on every CPU (the first layer:
        # the most sensitive to the limit, and the cheapest to run so).
        self.export_uint8 = False

    @property
    def axis(self) -> Optional[int]:
        return 0 if self.per_channel else None

    def broadcast_shape(self, w: Tensor) -> List[int]:
        """The shape that makes ``scale`` / ``zero_point`` broadcast against ``w``."""
        return [-1] + [1] * (w.dim() - 1) if self.per_channel else [1] * w.dim()

    def forward(self, w: Tensor) -> Tensor:
        if self.mode is WeightMode.INT:
            shape = self.broadcast_shape(w)
            return ((self.w_int.float() - self.zero_point.view(shape).float()) * self.scale.view(shape)).to(w.dtype)
        if self.mode is WeightMode.ADAROUND:
            if self.start_weight is not None:
                w = self.start_weight.to(w.dtype)
            scale = self.scale if self.scale_param is None else self.scale_param
            if isinstance(self.beta, Tensor):  # beta on the device (reconstruction engines "device"/"graph")
                w_q, _ = self.rounding(w, self.v, scale, self.zero_point, self.qmin, self.qmax, self.axis)
                self.last_reg = ops.rounding_regularizer(self.v, self.beta)
                return w_q
            w_q, self.last_reg = self.rounding(w, self.v, scale, self.zero_point, self.qmin, self.qmax,
                                               self.axis, beta=self.beta)
            return w_q
        if self.pair_range is not None:  # nearest rounding with the int16 pair limit: what store_int will store
            s = self.scale.view(self.broadcast_shape(w))
            target = w.detach().float() / s
            q, _ = limit_pairs(torch.round(target).clamp(self.qmin, self.qmax), target, *self.pair_range)
            return w + ((q * s).to(w.dtype) - w).detach()  # straight-through (the fused op's gradient in range)
        return ops.fake_quant(w, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)

    def use(self, mode: WeightMode) -> None:
        """Switches what the forward computes: FAKE (nearest rounding of the float weight), ADAROUND (the
        soft rounding; needs ``start_adaround``) or INT (the stored integers; needs ``store_int``)."""
        if mode is WeightMode.ADAROUND and self.v is None:
            raise QuantizationError("AdaRound mode without rounding variables: call start_adaround() first")
        if mode is WeightMode.INT and self.w_int.numel() == 0:
            raise QuantizationError("integer mode without stored integers: call store_int() first")
        self.mode = WeightMode(mode)

    def set_start_weight(self, w: Optional[Tensor]) -> None:
        """The weight whose rounding the reconstruction learns instead of the layer's (the second-order
        rounding's compensated weight), or None for the layer's own."""
        self.start_weight = None if w is None else w.detach()

    def set_beta(self, beta: "float | Tensor") -> None:
        """AdaRound's annealed exponent for the next forwards (a 0-dim device tensor under the device engines)."""
        self.beta = beta

    def limit_pairs_for(self, lo: int, hi: int) -> None:
        """Keeps every pair of adjacent integer products inside int16 for uint8 inputs in [lo, hi]
        (int16_pairs.py), from the next nearest rounding or ``store_int`` on."""
        self.pair_range = (int(lo), int(hi))

    def export_as_uint8(self) -> None:
        """The exported file stores these weights as uint8 with zero point 128 (same values, exact kernels)."""
        self.export_uint8 = True

    def start_adaround(self, w: Tensor) -> None:
        """Rounding variables that start at frac(w / s) (``start_weight``'s where set)."""
        w = w if self.start_weight is None else self.start_weight
        self.v = nn.Parameter(ops.adaround_init(w.detach().float(), self.scale, axis=self.axis))
        self.mode = WeightMode.ADAROUND

    def learn_scale(self) -> nn.Parameter:
        """Makes the scale a parameter of the soft rounding until ``freeze_scale()``."""
        self.scale_param = nn.Parameter(self.scale.detach().clone())
        return self.scale_param

    @torch.no_grad()
    def freeze_scale(self, keep: bool = True) -> None:
        """Stores the learned scale (``keep``, and only if every entry stayed finite and > 0)."""
        if self.scale_param is not None and keep:
            value = self.scale_param.detach()
            if bool(torch.isfinite(value).all()) and bool((value > 0).all()):
                self.scale.copy_(value)
        self.scale_param = None

    def rounded_up(self) -> Tensor:
        """AdaRound's hard rounding decision per weight (V >= 0: round up)."""
        return self.v.detach() >= 0

    @torch.no_grad()
    def finalize(self, w: Tensor) -> None:
        """Stores the integer weights: nearest rounding, or AdaRound's hard rounding (v >= 0) of ``w``
        (of ``start_weight`` where set, which is then dropped)."""
        shape = self.broadcast_shape(w)
        s, z = self.scale.view(shape), self.zero_point.view(shape).float()
        if self.mode is WeightMode.ADAROUND and self.start_weight is not None:
            w = self.start_weight
        self.start_weight = None
        w = w.detach().float()
        if self.mode is WeightMode.ADAROUND:
            q = torch.floor(w / s) + self.rounded_up().float() + z
        else:
            q = torch.round(w / s) + z
        self.store_int(q, w / s + z)

    @torch.no_grad()
    def load_int(self, q: Tensor) -> None:
        """Switches to integers ``q`` as they are (read from a file, or a decision kept earlier): no
        clamping and no pair limit, which the caller has checked."""
        self.w_int = q
        self.mode, self.v, self.last_reg = WeightMode.INT, None, None

    @torch.no_grad()
    def store_int(self, q: Tensor, target: Optional[Tensor] = None) -> None:
        """Stores integer weights ``q`` (clamped to the range; with ``pair_range``, every pair of adjacent
        products kept inside int16, moving the weights that stray least from ``target``, the unrounded
        weights in integer units) and switches to them."""
        dtype = torch.int8 if self.qmin >= -128 and self.qmax <= 127 else torch.uint8
        q = q.clamp(self.qmin, self.qmax).to(dtype)
        self.pairs_moved = 0
        if self.pair_range is not None:
            q, self.pairs_moved = limit_pairs(q, target, *self.pair_range)
        self.load_int(q)


class ActQuantizer(nn.Module):
    """Per-tensor activation fake quantization. Between ``start_calibration()`` and
    ``finish_calibration()`` it passes activations through unchanged and shows them to a fresh
    observer made by ``make_observer``; afterwards it quantizes with the range the observer chose."""

    def __init__(self, bits: int, symmetric: bool, make_observer: Callable[[int, int], Observer]):
        super().__init__()
        self.bits, self.symmetric = bits, symmetric
        self.qmin, self.qmax = quant_range(bits, symmetric)
        self.make_observer = make_observer
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("zero_point", torch.zeros((), dtype=torch.int32))
        self.observer: Optional[Observer] = None
        self.calibrated = False
        self.unreached = False  # calibration never reached it (a training-only head): it passes values on in float
        # Reconstruction only: QDrop (each element keeps its float value with probability drop_prob,
        # drawn from drop_generator) and LSQ (the step size learned as scale_param).
        self.drop_prob = 0.0
        self.drop_generator: Optional[torch.Generator] = None
        self.scale_param: Optional[nn.Parameter] = None

    @property
    def calibrating(self) -> bool:
        return self.observer is not None

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer.observe(x.detach())
            return x
        if not self.calibrated:
            raise QuantizationError("activation quantizer used before calibration: run calibrate() first")
        if self.unreached:
            return x
        if self.scale_param is None:
            q = ops.fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax)
        else:  # LSQ: gradient of the step size scaled by 1 / sqrt(features * qmax)
            factor = 1.0 / math.sqrt(max(1, x[0].numel()) * max(1, self.qmax))
            q = ops.fake_quant(x, self.scale_param, self.zero_point, self.qmin, self.qmax, grad_factor=factor)
        if self.drop_prob > 0:
            keep_float = torch.rand(x.shape, generator=self.drop_generator, device=x.device) < self.drop_prob
            q = torch.where(keep_float, x, q)
        return q

    def set_drop(self, prob: float, generator: Optional[torch.Generator] = None) -> None:
        """QDrop during reconstruction: each element keeps its float value with probability ``prob``
        (drawn from ``generator``); ``set_drop(0.0)`` ends it."""
        self.drop_prob, self.drop_generator = float(prob), generator if prob else None

    @torch.no_grad()
    def load_range(self, scale: Tensor, zero_point: Tensor) -> None:
        """Sets the quantization range directly (a saved file) and marks the quantizer calibrated."""
        self.scale.copy_(scale.reshape(()))
        self.zero_point.copy_(zero_point.reshape(()))
        self.calibrated, self.unreached = True, False

    def learn_scale(self) -> nn.Parameter:
        """Makes the step size a parameter (LSQ) until ``freeze_scale()``."""
        self.scale_param = nn.Parameter(self.scale.detach().clone())
        return self.scale_param

    @torch.no_grad()
    def freeze_scale(self, keep: bool = True) -> None:
        """Stores the learned step size (``keep``; a step that went non-positive or non-finite keeps the
        calibrated one) and ends learning."""
        if self.scale_param is not None and keep:
            value = self.scale_param.detach()
            if bool(torch.isfinite(value).all()) and bool((value > 0).all()):
                self.scale.copy_(value)
        self.scale_param = None

    def start_calibration(self) -> None:
        self.observer = self.make_observer(self.qmin, self.qmax)

    def abort_calibration(self) -> None:
        self.observer = None

    @property
    def saw_data(self) -> bool:
        """Whether the calibration running now has shown it any value."""
        return self.observer is not None and self.observer.lo is not None

    def mark_unreached(self) -> None:
        """Ends calibration for a quantizer no calibration image reached (a layer the eval-mode forward never
        runs, such as GoogLeNet's auxiliary heads): calibrated, with no range; it passes values on in float."""
        self.observer, self.calibrated, self.unreached = None, True, True

    def finish_calibration(self) -> None:
        if self.observer is None:
            raise QuantizationError("finish_calibration() without start_calibration()")
        scale, zp = self.observer.compute_qparams()
        self.scale.copy_(scale)
        self.zero_point.copy_(zp)
        self.observer, self.calibrated = None, True
