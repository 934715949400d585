"""Range observers: each sees calibration batches (``observe``) and then gives the quantization
parameters of the range it chose (``compute_qparams``). One class per rule, registered by name with
``register_observer`` in ``OBSERVERS`` (the one registry: ``QuantConfig.observer`` / ``dsg quantize
--observer`` for activations; those that can also set a weight tensor's per-channel ranges, ``sets_weights``,
are the choices of ``QuantConfig.weight_observer`` and ``qparams.weight_qparams``).

Every observer is vectorised: one reduction per batch; the percentile and MSE observers keep a
bounded random sample of the values they saw.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..errors import InvalidDataError, QuantizationError
from .config import OBSERVERS, weight_observers
from .qparams import mse_search, range_to_qparams

__all__ = ["Observer", "MinMaxObserver", "EmaObserver", "PercentileObserver", "MseObserver", "OBSERVERS",
           "WEIGHT_OBSERVERS", "register_observer"]


def register_observer(name: str):
    """Class decorator: the observer answers to ``name`` in ``OBSERVERS`` (config and command line)."""
    def register(cls):
        if name in OBSERVERS:
            raise QuantizationError(f"an observer named {name!r} is already registered")
        OBSERVERS[name] = cls
        return cls

    return register


class Observer:
    """Base class: tracks the running min/max of what it sees; subclasses change the update or the
    range they derive from it. ``symmetric`` ranges are widened to [-m, m] before the qparams.
    ``sets_weights``: the rule also sets weight ranges, per row of a weight (``row_qparams``)."""

    sets_weights = False

    @classmethod
    def row_qparams(cls, rows: Tensor, lo: Tensor, hi: Tensor, qmin: int, qmax: int,
                    symmetric: bool) -> Tuple[Tensor, Tensor]:
        """(scale, zero_point) per row of ``rows`` (R, M) with min ``lo`` / max ``hi`` (R,): the
        weight form of the rule (classes with ``sets_weights``)."""
        raise QuantizationError(f"{cls.__name__} does not set weight ranges")

    def __init__(self, qmin: int, qmax: int, symmetric: bool):
        self.qmin, self.qmax, self.symmetric = qmin, qmax, symmetric
        self.lo: Optional[Tensor] = None
        self.hi: Optional[Tensor] = None

    @classmethod
    def from_config(cls, config, qmin: int, qmax: int) -> "Observer":
        """The observer a ``QuantConfig`` asks for (its activation symmetry and rule options)."""
        return cls(qmin, qmax, config.a_symmetric)

    def observe(self, x: Tensor) -> None:
        x = x.float()
        lo, hi = torch.aminmax(x)
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise InvalidDataError("calibration activations contain NaN or Inf")
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self._update(lo, hi)
        self._keep(x)

    def _update(self, lo: Tensor, hi: Tensor) -> None:
        self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def _keep(self, x: Tensor) -> None:
        """Hook for observers that need the values themselves."""

    def compute_range(self) -> Tuple[Tensor, Tensor]:
        return self.lo, self.hi

    def compute_qparams(self) -> Tuple[Tensor, Tensor]:
        """(scale, zero_point) of the observed range; refuses an observer that saw nothing."""
        if self.lo is None:
            raise QuantizationError("an activation quantizer saw no data during calibration (layer never reached)")
        lo, hi = self.compute_range()
        if self.symmetric:
            lo, hi = torch.minimum(lo, -hi), torch.maximum(hi, -lo)
        return self._qparams(lo, hi)

    def _qparams(self, lo: Tensor, hi: Tensor) -> Tuple[Tensor, Tensor]:
        return range_to_qparams(lo, hi, self.qmin, self.qmax, self.symmetric)


@register_observer("minmax")
class MinMaxObserver(Observer):
    """The smallest and largest value over all calibration batches (weights: each row's)."""

    sets_weights = True

    @classmethod
    def row_qparams(cls, rows, lo, hi, qmin, qmax, symmetric):
        return range_to_qparams(lo, hi, qmin, qmax, symmetric)


@register_observer("ema")
class EmaObserver(Observer):
    """Exponential moving averages of each batch's min and max (``momentum`` on the past)."""

    def __init__(self, qmin: int, qmax: int, symmetric: bool, momentum: float = 0.9):
        super().__init__(qmin, qmax, symmetric)
        self.momentum = momentum

    def _update(self, lo: Tensor, hi: Tensor) -> None:
        self.lo = self.momentum * self.lo + (1 - self.momentum) * lo
        self.hi = self.momentum * self.hi + (1 - self.momentum) * hi


class _SampledObserver(Observer):
    """Keeps a random sample of at most ``sample_size`` of the values seen (large batches are
    subsampled on arrival, the pool is thinned when it grows past twice the size). The sample is
    drawn from the observer's own generator (``seed``), so calibrating twice on the same images
    gives the same ranges, whatever else used torch's global random state."""

    def __init__(self, qmin: int, qmax: int, symmetric: bool, sample_size: int = 1 << 20, seed: int = 0):
        super().__init__(qmin, qmax, symmetric)
        self.sample_size, self.seed = sample_size, seed
        self._samples: List[Tensor] = []
        self._seen = 0
        self._gen: Optional[torch.Generator] = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device=device).manual_seed(self.seed)
        return self._gen

    def _keep(self, x: Tensor) -> None:
        flat = x.reshape(-1)
        take = max(4096, self.sample_size // 16)
        if flat.numel() > take:  # a random subset of large batches; small ones are kept whole
            pick = torch.randint(0, flat.numel(), (take,), device=flat.device, generator=self._generator(flat.device))
            flat = flat[pick]
        self._samples.append(flat)
        self._seen += flat.numel()
        if self._seen > 2 * self.sample_size:  # keep a bounded random subset
            values = torch.cat(self._samples)
            perm = torch.randperm(values.numel(), device=values.device, generator=self._generator(values.device))
            self._samples, self._seen = [values[perm[: self.sample_size]]], self.sample_size

    def samples(self) -> Tensor:
        return torch.cat(self._samples)


@register_observer("percentile")
class PercentileObserver(_SampledObserver):
    """The (100 - p)-th and p-th percentiles of the sampled values."""

    def __init__(self, qmin: int, qmax: int, symmetric: bool, percentile: float = 99.99, sample_size: int = 1 << 20):
        super().__init__(qmin, qmax, symmetric, sample_size)
        self.percentile = percentile

    @classmethod
    def from_config(cls, config, qmin: int, qmax: int) -> "Observer":
        return cls(qmin, qmax, config.a_symmetric, percentile=config.percentile)

    def compute_range(self) -> Tuple[Tensor, Tensor]:
        v = self.samples()
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], device=v.device, dtype=v.dtype)
        lo, hi = torch.quantile(v, q)
        return lo, hi


@register_observer("mse")
class MseObserver(_SampledObserver):
    """The shrinking of the min/max range that minimises the quantization MSE of the sampled values
    (weights: of each row's values)."""

    sets_weights = True

    @classmethod
    def row_qparams(cls, rows, lo, hi, qmin, qmax, symmetric):
        return mse_search(rows, lo, hi, qmin, qmax, symmetric)

    def _qparams(self, lo: Tensor, hi: Tensor) -> Tuple[Tensor, Tensor]:
        return mse_search(self.samples(), lo, hi, self.qmin, self.qmax, self.symmetric)


# Deprecated (before 2026-12-07 a tuple in qparams.py): the registered observers that set weight ranges.
WEIGHT_OBSERVERS = weight_observers()

