"""The units of block-wise algorithms: the blocks of a model (``find_blocks``), its quantized layers grouped
into them in execution order (``units``), what a unit receives (``unit_inputs``), and whether two captures are
the same tensor up to float rounding (``same``). Reconstruction and GPTQ both walk a model this way."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...errors import QuantizationError
from ..capture import StopForward, forward_until


class Unreached(QuantizationError):
    """A unit the forward pass never runs (a training-only head): nothing to reconstruct it on."""


def unit_inputs(model: nn.Module, unit_name: str, images: Tensor, batch_size: int, device: str,
                 kwargs_out: Optional[Dict[str, Any]] = None) -> Tensor:
    """The inputs the layer (or block) receives (before its activation quantizer) for all images, kept
    on ``device`` (computed once per unit; the reconstruction loop indexes them there); the
    forward stops there. Its other keyword arguments (non-tensors, e.g. a drop-connect rate) go to
    ``kwargs_out``; a module taking more than one tensor cannot be reconstructed on its own."""
    unit = model.get_submodule(unit_name)
    got: List[Tensor] = []

    def grab(_m, inputs, kwargs):
        if len(inputs) != 1 or not isinstance(inputs[0], Tensor) or any(isinstance(v, Tensor) for v in kwargs.values()):
            raise QuantizationError(
                f"{unit_name!r} takes more than one tensor input: it cannot be reconstructed on its own")
        got.append(inputs[0].detach())
        if kwargs_out is not None:
            kwargs_out.update(kwargs)
        raise StopForward

    # prepend, so that the capture sees the raw input even when an activation quantizer hook exists
    forward_until(model, unit, grab, images, batch_size, device, prepend=True, with_kwargs=True)
    if not got:
        raise Unreached(f"{unit_name!r} is never reached by the forward pass")
    return torch.cat(got)


def find_blocks(qmodel: nn.Module) -> List[str]:
    """Residual-style blocks for block-wise reconstruction (BRECQ): the innermost modules that are
    elements of an nn.Sequential / nn.ModuleList and hold at least two quantized layers (torchvision
    BasicBlock / Bottleneck / InvertedResidual, EfficientNet's MBConv blocks, our ResNet-20's blocks)."""
    quantized = set(qmodel.dsg_quant_order)
    candidates = []
    for parent_name, parent in qmodel.named_modules():
        if not isinstance(parent, (nn.Sequential, nn.ModuleList)):
            continue
        for child_name, _child in parent.named_children():
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            inside = [n for n in quantized if n == name or n.startswith(name + ".")]
            if len(inside) >= 2:
                candidates.append(name)
    return [c for c in candidates if not any(o != c and o.startswith(c + ".") for o in candidates)]


def units(qmodel: nn.Module, layers: Optional[Sequence[str]],
           blocks: Optional[Sequence[str]]) -> List[Tuple[str, List[str]]]:
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


def same(a: Tensor, b: Tensor) -> bool:
    """The same tensor up to float rounding (batch sizes change the summation order), not a different
    computation (a module or a quantizer between the two units differs far more)."""
    if a.shape != b.shape:
        return False
    scale = float(a.abs().max()) if a.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale))
