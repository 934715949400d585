"""Checks of the ops' scalar arguments in Python, before they reach the schemas: integers that fit
int64 (the schema's own message for 2**63 is "Expected a value of type 'int' ... found type 'int'"),
finite floats, and BN target stds (on the CPU, where checking costs no device sync)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _int_arg(op: str, name: str, value) -> int:
    """An integer argument as the op schemas take it (int64), refused with a message naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        elif isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise TypeError(f"{op}: {name} must be an integer, got {value!r}")
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"{op}: {name} = {value} does not fit in 64 bits")
    return int(value)


def _float_arg(op: str, name: str, value, low: float = float("-inf"), low_inclusive: bool = True) -> float:
    """A finite float argument of at least (or above) ``low``, refused with a message naming it."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < low or (value == low and not low_inclusive):
        bound = f" and {'>=' if low_inclusive else '>'} {low}" if low != float("-inf") else ""
        raise ValueError(f"{op}: {name} must be finite{bound}, got {value}")
    return value


def _check_target_std(op: str, std: Tensor) -> None:
    """The BN target std must be finite and > 0; checked where that costs no device sync (CPU)."""
    if torch.compiler.is_compiling():
        return  # traced: a data-dependent check cannot be compiled; the kernels see the same values
    if isinstance(std, Tensor) and std.device.type == "cpu" and std.is_floating_point() and std.numel():
        if not bool((std > 0).all()) or not bool(torch.isfinite(std).all()):
            raise ValueError(f"{op}: the target std must be finite and > 0 (sqrt(running_var + eps)), "
                             f"got values in [{float(std.min())}, {float(std.max())}]")


def _zero_point_arg(op: str, value, device, float_dtype: torch.dtype) -> Tensor:
    """A Python zero point as the tensor the kernels take: int32 for an integer (refused, naming the
    op, when it does not fit), ``float_dtype`` for a float; tensors pass through."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: zero_point must be a number or a tensor, got {value!r}")
    if isinstance(value, int):
        if not -(2 ** 31) <= value < 2 ** 31:
            raise ValueError(f"{op}: zero_point {value} does not fit in int32")
        return torch.tensor(value, dtype=torch.int32, device=device)
    return torch.tensor(value, dtype=float_dtype, device=device)
