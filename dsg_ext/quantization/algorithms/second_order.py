"""Second-order one-shot rounding (GPTQ, Frantar et al. 2023; OBQ's sequential form): each layer's
weight columns are rounded one at a time, and the error each rounding makes is compensated on the
columns not rounded yet through the inverse Hessian of the layer's inputs, minimising
||W X - W~ X||^2 + lambda ||W - W~||^2 (lambda: the dampening) in one pass, without iterations.

Layers are taken in execution order, each with the inputs it receives from the already-rounded
layers before it (activation quantizers included). Inside a block (``find_blocks``: a ResNet's
bottleneck, an inverted residual) the block's inputs are captured once and each layer's inputs come from
a forward of the block alone; a block fed by the previous block's output (checked on the first images)
takes that output, so a chain of blocks costs one forward of each block per layer, not a forward of
the whole prefix per layer. Per group of a grouped / depthwise convolution
the Hessian is its own (hessian.py). Dense linear algebra (Cholesky, inverse) is torch.linalg's;
columns are updated lazily in blocks, optionally in descending order of the Hessian's diagonal
(act-order).
"""

from __future__ import annotations

import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ...errors import ConfigError, InvalidDataError, QuantizationError
from ..capture import StopForward, batches, forward_until, hooks
from ..config import GptqConfig
from ..int16_pairs import pair_safe_scale
from ..prepare import float_weight, weight_quantizers
from ..qparams import weight_qparams
from ..quantizers import WeightMode, WeightQuantizer
from . import units
from .hessian import LayerHessian, grouped_weight, layer_groups

DAMPING_RETRIES = 4  # each retry multiplies the dampening by 10
# (groups, dim, dim) matrices alive at once while a layer is rounded: its Hessian, and while it is inverted
# the damped copy or its factor, the inverse, the inverse's factor (act-order: one more, the permuted Hessian).
PEAK_HESSIAN_COPIES = 4
MEMORY_SHARE = 0.7  # of the memory available when rounding starts, for one layer's matrices
CHAIN_CHECK_IMAGES = 4  # images a block's inputs are compared on with the previous block's outputs
CACHE_SHARE = 0.25  # of the memory available, for a block's captured inputs and outputs (else prefix replays)


def _inverse_cholesky(h: Tensor, damp: float) -> Tuple[Tensor, Tensor]:
    """Upper Cholesky factor U of (H + lambda I)^-1 per group (so that (H + lambda I)^-1 = U^T U), and
    lambda; the dampening grows tenfold until every group's matrix factorises.

    Without forming the inverse: with J the reversal permutation, the lower Cholesky factor of J (H + lambda I) J
    is J V J for the upper V with V V^T = H + lambda I, so U = V^-1 = J (J V J)^-1 J -- one Cholesky and one
    triangular solve (BLAS-3) instead of a Cholesky, LAPACK's cholesky_inverse (7x a Cholesky's time on our
    CPUs) and a second Cholesky. At most three (groups, dim, dim) matrices are alive at once besides ``h``
    (PEAK_HESSIAN_COPIES)."""
    groups, dim, _ = h.shape
    mean = h.diagonal(dim1=1, dim2=2).mean(1)
    mean = torch.where(mean > 0, mean, torch.ones_like(mean))  # an all-zero input: nearest rounding
    for attempt in range(DAMPING_RETRIES):
        lam = damp * 10.0 ** attempt * mean
        reversed_h = h.flip(1, 2)
        reversed_h.diagonal(dim1=1, dim2=2).add_(lam[:, None])
        low, info = torch.linalg.cholesky_ex(reversed_h)
        del reversed_h
        if bool((info == 0).all()):
            eye = torch.eye(dim, dtype=h.dtype, device=h.device).expand(groups, dim, dim)
            upper = torch.linalg.solve_triangular(low, eye, upper=False).flip(1, 2)
            del low
            if bool(torch.isfinite(upper).all()):
                return upper, lam
    raise QuantizationError(f"the input Hessian is singular even with dampening x{10 ** (DAMPING_RETRIES - 1)}")


def gptq_round(w: Tensor, h: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, damp: float = 0.01,
               block_size: int = 128, act_order: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rounds ``w`` (groups, rows, dim) against the Hessians ``h`` (groups, dim, dim).

    ``scale`` / ``zero_point``: (groups, rows), one per weight row. Returns the integers (as float64,
    same shape as ``w``), the objective per group -- sum over rows of (W - W~)(H + lambda I)(W - W~)^T,
    accumulated as GPTQ reports it --, lambda per group, and the compensated weights (each column as it
    was when rounded: the integers are its nearest rounding). The arithmetic is ``h``'s dtype: float64, or
    float32 for a Hessian too large for float64 (plan_precision)."""
    dtype = h.dtype if h.dtype in (torch.float32, torch.float64) else torch.float64
    w, h = w.to(dtype).clone(), h.to(dtype)
    scale, zp = scale.to(dtype), zero_point.to(dtype)
    groups, rows, dim = w.shape
    perm = None
    if act_order:
        perm = torch.argsort(h.diagonal(dim1=1, dim2=2), dim=1, descending=True, stable=True)
        w = torch.gather(w, 2, perm[:, None, :].expand(groups, rows, dim))
        h = torch.gather(torch.gather(h, 1, perm[:, :, None].expand(groups, dim, dim)), 2,
                         perm[:, None, :].expand(groups, dim, dim))
    upper, lam = _inverse_cholesky(h, damp)
    q_all, comp_all = torch.empty_like(w), torch.empty_like(w)
    error = torch.zeros(groups, dtype=dtype, device=w.device)
    for b0 in range(0, dim, block_size):
        b1 = min(dim, b0 + block_size)
        block = w[:, :, b0:b1].clone()
        errors = torch.empty_like(block)
        u = upper[:, b0:b1, b0:b1]
        for i in range(b1 - b0):
            col, d = block[:, :, i], u[:, i, i]
            q = torch.clamp(torch.round(col / scale) + zp, qmin, qmax)
            diff = col - (q - zp) * scale
            q_all[:, :, b0 + i], comp_all[:, :, b0 + i] = q, col
            error += (diff ** 2).sum(1) / d ** 2
            e = diff / d[:, None]
            block[:, :, i:] -= e[:, :, None] * u[:, None, i, i:]
            errors[:, :, i] = e
        w[:, :, b1:] -= errors @ upper[:, b0:b1, b1:]
    if perm is not None:
        index = perm[:, None, :].expand(groups, rows, dim)
        q_all = torch.empty_like(q_all).scatter_(2, index, q_all)
        comp_all = torch.empty_like(comp_all).scatter_(2, index, comp_all)
    return q_all, error, lam, comp_all


def quadratic_error(w: Tensor, q_w: Tensor, h: Tensor) -> Tensor:
    """sum over rows of (W - W~) H (W - W~)^T per group: ||W X - W~ X||^2 for H = X X^T (in ``h``'s dtype,
    returned as float64)."""
    d = (w - q_w).to(h.dtype)
    return torch.einsum("grd,gde,gre->g", d, h, d).to(torch.float64)


def _collect(qmodel: nn.Module, name: str, images: Tensor, batch_size: int, device: str,
             dtype: torch.dtype = torch.float64) -> LayerHessian:
    """The Hessian of what layer ``name`` receives (after its activation quantizer) for all images."""
    layer = qmodel.get_submodule(name)
    hessian = LayerHessian(layer, device, dtype)

    def grab(_m, inputs):
        hessian.add(inputs[0].detach())
        raise StopForward

    forward_until(qmodel, layer, grab, images, batch_size, device)  # after the activation quantizer's pre-hook
    return hessian


def _unit_hessian(unit: nn.Module, inputs: Tensor, kwargs: Dict[str, Any], layer: nn.Module, batch_size: int,
                  device: str, dtype: torch.dtype) -> LayerHessian:
    """The Hessian of what ``layer`` receives when its block ``unit`` runs on its captured ``inputs``."""
    hessian = LayerHessian(layer, device, dtype)

    def grab(_m, layer_inputs):
        hessian.add(layer_inputs[0].detach())
        raise StopForward

    with hooks([layer.register_forward_pre_hook(grab)]), torch.no_grad():
        for x in batches(inputs, batch_size):
            try:
                unit(x.to(device), **kwargs)
            except StopForward:
                pass
    return hessian


def _block_inputs(qmodel: nn.Module, unit_name: str, images: Tensor, batch_size: int, device: str,
                  carry: Optional[Tensor]) -> Optional[Tuple[Tensor, Dict[str, Any]]]:
    """(inputs for all images, keyword arguments) of block ``unit_name``: the previous block's outputs where
    they are its inputs (checked on the first images), else captured by one forward; None where they cannot be
    (a block taking several tensors, one the forward never reaches) or would not fit in CACHE_SHARE of the
    memory: its layers then take their inputs by replaying the prefix."""
    from ..._utils.memory import available_memory

    kw: Dict[str, Any] = {}  # the block's non-tensor keyword arguments, the same in every capture
    try:
        if carry is not None:
            k = min(CHAIN_CHECK_IMAGES, images.shape[0])
            if units.same(units.unit_inputs(qmodel, unit_name, images[:k], k, device, kw), carry[:k]):
                return carry, kw
        one = units.unit_inputs(qmodel, unit_name, images[:1], 1, device, kw)
        with torch.no_grad():
            out = qmodel.get_submodule(unit_name)(one, **kw)
        per_image = one.numel() * one.element_size()
        if isinstance(out, Tensor):
            per_image += out.numel() * out.element_size()
        available = available_memory(device)
        if available is not None and per_image * images.shape[0] > CACHE_SHARE * available:  # inputs and outputs
            return None
        return units.unit_inputs(qmodel, unit_name, images, batch_size, device), kw
    except QuantizationError:  # several tensor inputs, or never reached
        return None


def _row_qparams(wq: WeightQuantizer, groups: int, rows: int) -> Tuple[Tensor, Tensor]:
    scale = wq.scale.to(torch.float64).reshape(-1)
    zp = wq.zero_point.to(torch.float64).reshape(-1)
    if scale.numel() == 1:
        scale, zp = scale.expand(groups * rows), zp.expand(groups * rows)
    return scale.reshape(groups, rows), zp.reshape(groups, rows)


def hessian_bytes(layer: nn.Module, dtype: torch.dtype, act_order: bool = False) -> int:
    """Peak bytes of the (groups, dim, dim) matrices second-order rounding of ``layer`` holds in ``dtype``."""
    groups, dim = layer_groups(layer)
    copies = PEAK_HESSIAN_COPIES + int(act_order)
    return copies * groups * dim * dim * (torch.finfo(dtype).bits // 8)


def plan_precision(qmodel: nn.Module, names: Sequence[str], config: GptqConfig, device: str,
                   available: Optional[int] = None) -> Dict[str, Optional[torch.dtype]]:
    """Per layer, before any is rounded: the dtype of its Hessian and linear algebra -- float64 where its
    matrices fit in MEMORY_SHARE of ``available`` (default: the memory available now on ``device``), else
    float32 (GPTQ's own precision), else None: the layer is rounded to nearest, with a warning naming it and
    the memory it would need (VGG's 25088-input classifier: 10 GB in float32)."""
    from ..._utils.memory import available_memory

    available = available_memory(device) if available is None else available
    budget = None if available is None else MEMORY_SHARE * available
    plan: Dict[str, Optional[torch.dtype]] = {}
    for name in names:
        layer = qmodel.get_submodule(name)
        need64, need32 = (hessian_bytes(layer, dtype, config.act_order) for dtype in (torch.float64, torch.float32))
        if budget is None or need64 <= budget:
            plan[name] = torch.float64
        elif need32 <= budget:
            plan[name] = torch.float32
        else:
            plan[name] = None
            groups, dim = layer_groups(layer)
            warnings.warn(f"GPTQ: layer {name!r} is rounded to nearest: its input Hessian ({groups} x {dim} x {dim}) "
                          f"needs {need32 / 2**30:.1f} GiB in float32, more than {budget / 2**30:.1f} GiB "
                          f"({100 * MEMORY_SHARE:.0f}% of the memory available on {device})", stacklevel=3)
    return plan


def _searched_qparams(w: Tensor, wq: WeightQuantizer) -> None:
    """Per-channel weight scales by MSE search (``GptqConfig.search_scales``), limited for int16 pairs."""
    scale, zp = weight_qparams(w, wq.qmin, wq.qmax, wq.per_channel, wq.symmetric, "mse")
    if wq.pair_range is not None:  # the int16 pair limit's scale, from the searched one (int16_pairs.py)
        scale = pair_safe_scale(w, scale, wq.qmin, wq.qmax, *wq.pair_range)
    wq.scale.copy_(scale)
    wq.zero_point.copy_(zp)


@torch.no_grad()
def round_nearest(qmodel: nn.Module, name: str, config: GptqConfig, why: str) -> Dict[str, Any]:
    """Layer ``name`` rounded to nearest, with the scales GPTQ would use (a layer whose Hessian does not fit,
    or that the forward never reaches: ``why``)."""
    layer, wq = qmodel.get_submodule(name), weight_quantizers(qmodel)[name]
    w = float_weight(qmodel, name).detach()
    if config.search_scales:
        _searched_qparams(w, wq)
    wq.set_start_weight(None)
    wq.finalize(w)
    groups, dim = layer_groups(layer)
    return {"layer": name, "groups": groups, "input_dim": dim, "vectors": 0, "kept": "nearest",
            "precision": f"none ({why})", "error": None, "gptq_error": None, "nearest_error": None,
            "reported_error": None, "damping": None, "changed": 0.0}


@torch.no_grad()
def round_layer(qmodel: nn.Module, name: str, hessian: LayerHessian, config: GptqConfig) -> Dict[str, Any]:
    """Rounds layer ``name`` by GPTQ against ``hessian`` and stores its integers in its quantizer."""
    layer, wq = qmodel.get_submodule(name), weight_quantizers(qmodel)[name]
    w = float_weight(qmodel, name).detach()
    if config.search_scales:
        _searched_qparams(w, wq)
    wg = grouped_weight(layer, w.to(torch.float64))
    groups, rows, dim = wg.shape
    scale, zp = _row_qparams(wq, groups, rows)
    q, reported, lam, compensated = gptq_round(wg, hessian.h, scale, zp, wq.qmin, wq.qmax, config.damp,
                                               config.block_size, config.act_order)
    nearest = torch.clamp(torch.round(wg / scale[..., None]) + zp[..., None], wq.qmin, wq.qmax)
    deq = lambda ints: (ints - zp[..., None]) * scale[..., None]  # noqa: E731
    if not bool(torch.isfinite(q).all()):
        raise QuantizationError(f"second-order rounding of {name!r} produced non-finite weights")
    error = float(quadratic_error(wg, deq(q), hessian.h).sum())
    nearest_error = float(quadratic_error(wg, deq(nearest), hessian.h).sum())
    # GPTQ is greedy and minimises the damped objective: on a layer where its rounding measures worse than
    # nearest rounding (rare; rank-deficient Hessians), nearest rounding is kept and the record says so.
    kept = "gptq" if error <= nearest_error else "nearest"
    ints = q if kept == "gptq" else nearest
    wq.store_int(ints.reshape(w.shape).to(w.device), (wg / scale[..., None] + zp[..., None]).reshape(w.shape))
    wq.set_start_weight(compensated.reshape(w.shape).to(w.dtype).to(w.device) if kept == "gptq" else None)
    return {
        "layer": name, "groups": groups, "input_dim": dim, "vectors": hessian.vectors, "kept": kept,
        "precision": str(hessian.h.dtype).replace("torch.", ""),
        "error": min(error, nearest_error), "gptq_error": error, "nearest_error": nearest_error,
        "reported_error": float(reported.sum()), "damping": float(lam.max()),
        "changed": float((ints != nearest).to(torch.float64).mean()),
    }


def gptq(qmodel: nn.Module, images: Tensor, config: Optional[GptqConfig] = None, device: str = "cpu",
         layers: Optional[Sequence[str]] = None, progress: bool = True,
         log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> List[Dict[str, Any]]:
    """Second-order one-shot rounding of every quantized layer not rounded yet, in execution order.

    Args:
        qmodel: a model from ``quantize_model``, calibrated (its activation quantizers shape the inputs
            each layer's Hessian is built from).
        images: (N, C, H, W) calibration images in the model's normalised input space.
        config: the options (default ``GptqConfig()``).
        device: where ``qmodel`` lives.
        layers: names of the layers to round (default: every quantized layer).
        progress: print one line per layer to ``log``.
        log: where warnings and progress lines go (stderr by default).

    Returns:
        One record per layer: groups, input dimension, input vectors, which rounding was kept ("gptq",
        or "nearest" where GPTQ's measured worse), the quadratic error ||(W - W~) X||^2 on the Hessian
        of the kept rounding, of GPTQ's and of nearest rounding, the error GPTQ reported, the dampening
        used, the fraction of weights rounded otherwise than nearest, the precision of its linear algebra
        (float64; float32, or nearest rounding with a warning, where the Hessian would not fit in memory:
        ``plan_precision``, decided for every layer before the first is rounded), seconds.
    """
    config = (config or GptqConfig()).validate()
    if images.numel() == 0:
        raise InvalidDataError("no calibration images")
    if not torch.isfinite(images).all():
        raise InvalidDataError("calibration images contain NaN or Inf")
    quantizers = weight_quantizers(qmodel)
    names = list(layers) if layers is not None else list(quantizers)
    unknown = [n for n in names if n not in quantizers]
    if unknown:
        raise ConfigError(f"not quantized layers of this model: {unknown}")
    for name in names:  # every layer's kind checked before any is rounded
        layer_groups(qmodel.get_submodule(name))
    names = [n for n in names if quantizers[n].mode is WeightMode.FAKE]  # not rounded yet
    plan = plan_precision(qmodel, names, config, device)
    records = []
    carry: Optional[Tensor] = None  # the last block's outputs for all images: the next block's inputs?
    blocks = units.find_blocks(qmodel)
    plan_units = units.units(qmodel, names, blocks)
    for position, (unit_name, unit_layers) in enumerate(plan_units):
        source = None
        if unit_layers != [unit_name]:
            source = _block_inputs(qmodel, unit_name, images, config.batch_size, device, carry)
        carry = None
        for name in unit_layers:
            records.append(_round_one(qmodel, name, images, config, device, plan[name], log, progress,
                                      None if source is None else (qmodel.get_submodule(unit_name), *source)))
        following = next((u for u, _ in plan_units[position + 1:]), None)
        if source is not None and following is not None and following in blocks:  # what the next block may take
            unit, (x, kw) = qmodel.get_submodule(unit_name), source
            with torch.no_grad():
                outputs = [unit(b.to(device), **kw) for b in batches(x, config.batch_size)]
            if all(isinstance(o, Tensor) for o in outputs):  # a block returning a tuple: no chain
                carry = torch.cat(outputs)
    return records


def _round_one(qmodel: nn.Module, name: str, images: Tensor, config: GptqConfig, device: str,
               precision: Optional[torch.dtype], log: Callable[[str], None], progress: bool,
               block: Optional[Tuple[nn.Module, Tensor, Dict[str, Any]]]) -> Dict[str, Any]:
    """One layer's record: rounded by GPTQ on the inputs it receives (from its ``block``'s captured inputs, or
    a forward of the model's prefix), or to nearest where its Hessian does not fit or it is never reached."""
    start = time.perf_counter()
    if precision is None:
        return {**round_nearest(qmodel, name, config, "Hessian too large"), "seconds": time.perf_counter() - start}
    hessian = None
    if block is not None:
        hessian = _unit_hessian(block[0], block[1], block[2], qmodel.get_submodule(name), config.batch_size,
                                device, precision)
    if hessian is None or hessian.vectors == 0:  # (a layer its block's own forward does not run: the model's may)
        hessian = _collect(qmodel, name, images, config.batch_size, device, precision)
    if hessian.vectors == 0:  # not run by the eval-mode forward (a training-only head): nothing to compensate
        warnings.warn(f"GPTQ: layer {name!r} is not reached by the forward pass: rounded to nearest", stacklevel=3)
        return {**round_nearest(qmodel, name, config, "not reached"), "seconds": time.perf_counter() - start}
    if hessian.vectors < hessian.dim:
        log(f"warning: {name}: {hessian.vectors} input vectors for an input dimension of {hessian.dim}: "
            "its Hessian is rank-deficient (more calibration images help)")
    record = round_layer(qmodel, name, hessian, config)
    record["seconds"] = time.perf_counter() - start
    if progress:
        log(f"gptq {name}: {record['vectors']} vectors x {record['input_dim']} (groups {record['groups']}), "
            f"error {record['gptq_error']:.4g} vs nearest {record['nearest_error']:.4g}"
            + (" (nearest kept)" if record["kept"] == "nearest" else "") + ", "
            f"{100 * record['changed']:.1f}% rounded otherwise, {record['seconds']:.2f} s")
    return record
