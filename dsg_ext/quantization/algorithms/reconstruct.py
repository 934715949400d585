"""Reconstruction: AdaRound (Nagel et al., ICML 2020) layer by layer, or BRECQ (Li et al., 2021)
block by block -- the rounding of each unit's weights learned to reconstruct its float output,
||W x - W~ x^||^2 + lambda R(V, beta), with the fused ``dsg_ext.adaround`` op."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ... import ops
from ..capture import batches, forward_until  # noqa: F401 (a public name here since 2026-12-07)
from ..config import AdaRoundConfig
from ..prepare import act_quantizers, float_reference, float_weight, weight_quantizers
from ..quantizers import ActQuantizer, WeightMode, WeightQuantizer
from .engine import optimise_device, optimise_loop, reconstruction_loss, resolve_engine, scale_group
from .second_order import gptq
from .units import Unreached, find_blocks, unit_inputs
from .units import same as _same
from .units import units as _units


def _chained_inputs(qmodel: nn.Module, fp_model: nn.Module, unit_name: str, images: Tensor, device: str,
                    prev: Optional["_Carry"]) -> Optional[Tuple[Tensor, Tensor, Dict[str, Any]]]:
    """(x_fp, x_q, keyword arguments) of ``unit_name`` from the previous unit's outputs -- its float
    output (the previous target) and its quantized output on its quantized inputs, one unit forward
    instead of the whole prefix -- when ``unit_name``'s input is the previous unit's output (a chain of
    blocks), checked on the first images against the full forward of both models; else None."""
    if prev is None:
        return None
    k = min(CHAIN_CHECK_IMAGES, images.shape[0])
    kw: Dict[str, Any] = {}
    head_fp = unit_inputs(fp_model, unit_name, images[:k], k, device, kw)
    if not _same(head_fp, prev.target[:k]):
        return None
    q_prev = qmodel.get_submodule(prev.name)
    with torch.no_grad():
        x_q = torch.cat([prev.run(q_prev, x) for x in batches(prev.x_q, 64)])
    if not _same(unit_inputs(qmodel, unit_name, images[:k], k, device), x_q[:k]):
        return None
    return prev.target, x_q, kw


CHAIN_CHECK_IMAGES = 16


class _Carry(NamedTuple):
    """What the next unit may take its inputs from (engines other than the plain loop)."""

    name: str
    run: Callable
    target: Tensor
    x_q: Tensor


def _loss_batched(unit: Callable[[Tensor], Tensor], x: Tensor, target: Tensor, batch_size: int = 64) -> float:
    """reconstruction_loss over all of x, in batches (the value of one big batch; bounded memory)."""
    total, n = 0.0, x.shape[0]
    for i in range(0, n, batch_size):
        loss = reconstruction_loss(unit(x[i : i + batch_size]), target[i : i + batch_size])
        total += float(loss) * min(batch_size, n - i)
    return total / n


def _unit_act_quantizers(qmodel: nn.Module, unit_name: str) -> List[ActQuantizer]:
    """The activation quantizers inside a unit (a layer's own input quantizer included)."""
    return [aq for name, aq in act_quantizers(qmodel).items() if name == unit_name or name.startswith(unit_name + ".")]


def _learned(q) -> Tensor:
    """A quantizer's learned scale if it is usable (finite, > 0), else its current one."""
    value = q.scale if q.scale_param is None else q.scale_param.detach()
    ok = bool(torch.isfinite(value).all()) and bool((value > 0).all())
    return (value if ok else q.scale).clone()


def _rounding_state(quantizers: Sequence[WeightQuantizer], weights: Sequence[Tensor]) -> Tuple[float, float]:
    """(fraction of rounding variables not settled at 0 or 1 yet, fraction rounded unlike nearest)."""
    undecided = changed = 0.0
    total = sum(w.numel() for w in weights)
    for wq, w in zip(quantizers, weights):
        h = ops.rectified_sigmoid(wq.v.detach().float())
        undecided += float(((h > 0.01) & (h < 0.99)).sum()) / total
        ws = w.detach().float() / wq.scale.view(wq.broadcast_shape(w))
        changed += float((wq.rounded_up() != (ws - torch.floor(ws) >= 0.5)).sum()) / total
    return undecided, changed


def _unit_data(qmodel: nn.Module, fp_model: nn.Module, unit_name: str, images: Tensor, device: str,
               prev: Optional[_Carry]) -> Tuple[Callable, Tensor, Tensor, bool]:
    """Step 1: (run, x_q, target, chained) of a unit -- how to call it, its quantized inputs and its
    float outputs on the float inputs, from the previous unit's outputs where the units form a chain."""
    fp_unit = fp_model.get_submodule(unit_name)
    chained = _chained_inputs(qmodel, fp_model, unit_name, images, device, prev)
    if chained is not None:
        x_fp, x_q, kw = chained
    else:
        kw = {}
        x_fp = unit_inputs(fp_model, unit_name, images, 64, device, kw)
    run = (lambda m, x: m(x, **kw)) if kw else (lambda m, x: m(x))
    with torch.no_grad():
        target = torch.cat([run(fp_unit, x) for x in batches(x_fp, 64)])
    del x_fp
    if chained is None:
        x_q = unit_inputs(qmodel, unit_name, images, 64, device)
    return run, x_q, target, chained is not None


def _start_learning(quantizers: List[WeightQuantizer], originals: List[Tensor], acts: List[ActQuantizer],
                    config: AdaRoundConfig, gen: torch.Generator, device: str) -> List[Dict[str, Any]]:
    """Step 2: rounding variables at the starting decision (GPTQ's where it ran, else nearest), the
    learned scales and QDrop switched on; returns the optimiser's parameter groups."""
    for wq, w in zip(quantizers, originals):
        wq.start_adaround(w)
    groups = [{"params": [wq.v for wq in quantizers], "lr": config.lr}]
    if config.learn_weight_scale:
        groups.append(scale_group([wq.learn_scale() for wq in quantizers], config.weight_scale_lr))
    if config.learn_act_scale and acts:
        groups.append(scale_group([aq.learn_scale() for aq in acts], config.act_scale_lr))
    if config.qdrop:  # drawn only when used, so that the schedule without QDrop is unchanged
        drop_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        for aq in acts:
            aq.set_drop(config.qdrop, drop_gen)
    return groups


def _optimise(unit: nn.Module, run: Callable, quantizers: List[WeightQuantizer], acts: List[ActQuantizer],
              groups: List[Dict[str, Any]], x_q: Tensor, target: Tensor, config: AdaRoundConfig,
              gen: torch.Generator, device: str, step: Callable[[], None], engine: str) -> Tuple[float, float, str]:
    """Step 3: the iterations, by ``engine``; (first batch loss, seconds, engine that ran). QDrop ends
    whatever happens; a failure also drops the learned scales."""
    try:
        if engine == "loop":
            return optimise_loop(unit, run, quantizers, groups, x_q, target, config, gen, device, step)
        return optimise_device(unit, run, quantizers, groups, x_q, target, config, gen, device, step,
                               graph=engine == "graph", fallback=config.engine == "auto")
    except BaseException:
        for q in (*quantizers, *acts):
            q.freeze_scale(keep=False)
        raise
    finally:
        for aq in acts:
            aq.set_drop(0.0)


@torch.no_grad()
def _decide(unit: nn.Module, run: Callable, quantizers: List[WeightQuantizer], acts: List[ActQuantizer],
            originals: List[Tensor], starting: List[Tensor], gptq_ints: List[Optional[Tensor]], x_q: Tensor,
            target: Tensor, keep_better: bool) -> Dict[str, Any]:
    """Step 4: the learned rounding made hard and compared with the starting decision on the unit's
    data; with ``keep_better`` the better of the two is kept (its scales too)."""
    from_gptq = [ints is not None for ints in gptq_ints]
    start_scales = [wq.scale.clone() for wq in quantizers]
    start_steps = [aq.scale.clone() for aq in acts]
    learned_scales = [_learned(wq) for wq in quantizers]
    learned_steps = [_learned(aq) for aq in acts]
    for q in (*quantizers, *acts):
        q.freeze_scale(keep=False)  # the starting scales and steps, for the nearest-rounding comparison
    for wq, g in zip(quantizers, from_gptq):
        wq.use(WeightMode.INT if g else WeightMode.FAKE)  # the starting decision: GPTQ's or nearest
    nearest = _loss_batched(lambda x: run(unit, x), x_q, target)
    for q, learned in zip((*quantizers, *acts), (*learned_scales, *learned_steps)):
        q.scale.copy_(learned)
    undecided, changed = _rounding_state(quantizers, starting)
    for wq, w in zip(quantizers, originals):
        wq.use(WeightMode.ADAROUND)
        wq.finalize(w)
    end_loss = _loss_batched(lambda x: run(unit, x), x_q, target)
    kept = "adaround"
    if keep_better and not end_loss <= nearest:
        for q, start in zip((*quantizers, *acts), (*start_scales, *start_steps)):
            q.scale.copy_(start)
        for wq, w, ints in zip(quantizers, originals, gptq_ints):  # back to the start, its scales too
            if ints is not None:
                wq.load_int(ints)
            else:
                wq.use(WeightMode.FAKE)
                wq.finalize(w)
        kept = "gptq" if any(from_gptq) else "nearest"
    return {"rec_loss_nearest": nearest, "rec_loss_adaround": end_loss, "kept": kept, "undecided": undecided,
            "changed_vs_nearest": changed}


def _reconstruct_unit(qmodel: nn.Module, fp_model: nn.Module, unit_name: str, unit_layers: List[str],
                      images: Tensor, config: AdaRoundConfig, device: str, gen: torch.Generator,
                      step: Callable[[], None], engine: str,
                      prev: Optional[_Carry] = None) -> Tuple[Dict[str, Any], _Carry]:
    """One unit reconstructed, step by step (its data, the start, the iterations, the decision); with
    ``prev`` (the previous unit's outputs) its inputs come from them where the units form a chain.
    Returns the record and what the next unit may take its inputs from."""
    unit = qmodel.get_submodule(unit_name)
    wqs = weight_quantizers(qmodel)
    quantizers = [wqs[n] for n in unit_layers]
    originals = [float_weight(qmodel, n) for n in unit_layers]
    run, x_q, target, chained = _unit_data(qmodel, fp_model, unit_name, images, device, prev)
    acts = _unit_act_quantizers(qmodel, unit_name)
    # Layers the second-order rounding decided start from that decision (and are compared against it).
    gptq_ints = [wq.w_int.clone() if wq.start_weight is not None else None for wq in quantizers]
    starting = [wq.start_weight if ints is not None else w for wq, w, ints in zip(quantizers, originals, gptq_ints)]
    groups = _start_learning(quantizers, originals, acts, config, gen, device)
    start_loss, seconds, ran = _optimise(unit, run, quantizers, acts, groups, x_q, target, config, gen, device,
                                         step, engine)
    decision = _decide(unit, run, quantizers, acts, originals, starting, gptq_ints, x_q, target, config.keep_better)
    record = {"layer": unit_name, "layers": unit_layers, "kind": "block" if unit_layers != [unit_name] else "layer",
              **decision, "start": "gptq" if any(i is not None for i in gptq_ints) else "nearest",
              "first_batch_loss": start_loss, "seconds": seconds, "engine": ran,
              "inputs": "chained" if chained else "forward"}
    return record, _Carry(unit_name, run, target, x_q)


def reconstruct(qmodel: nn.Module, fp_model: nn.Module, images: Tensor, config: Optional[AdaRoundConfig] = None,
                device: str = "cpu", progress: bool = True, layers: Optional[Sequence[str]] = None,
                blocks: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Learns the rounding of every quantized layer (AdaRound) or block (BRECQ) in execution order.

    Rounding variables V are optimised with Adam on the calibration images, beta annealed after the
    warm-up, then rounded hard. Activations are quantized during reconstruction (x^ comes from the
    already quantized model, through the unit's own activation quantizers).

    Args:
        qmodel: a calibrated model from ``quantize_model``; its weights are rounded in place.
        fp_model: the float model it was made from (the reconstruction targets; folded like ``qmodel``
            when that was built with ``fold_bn``).
        images: calibration images, (N, C, H, W) in the model's normalised input space.
        config: the schedule (default ``AdaRoundConfig()``: the paper's 10k iterations per layer);
            ``config.unit == "block"`` reconstructs the blocks ``find_blocks`` detects.
        device: where both models live.
        progress: show a tqdm bar.
        layers: only these quantized layers (default: all).
        blocks: module names to reconstruct jointly (overrides ``config.unit``'s detection).

    Each unit's inputs (float and quantized) and targets are computed once and kept on ``device``. With
    ``config.engine`` other than "loop" (BRECQ's way: the whole prefix of the model run again for every
    unit), a unit whose input is the previous unit's output takes it from there (checked per unit).

    Returns:
        One record per layer or block: reconstruction loss with nearest and with learned rounding,
        which was kept, the fraction of undecided rounding variables, seconds.
    """
    config = (config or AdaRoundConfig()).validate()
    fp_model = float_reference(qmodel, fp_model)
    records: List[Dict[str, Any]] = []
    if config.start == "gptq":
        records = [{**r, "kind": "gptq"} for r in gptq(
            qmodel, images, config.gptq, device=device,
            layers=layers, progress=progress)]
        if config.iterations == 0:
            for wq in weight_quantizers(qmodel).values():
                wq.set_start_weight(None)
            return records
    if blocks is None and config.unit == "block":
        blocks = find_blocks(qmodel)
    engine = resolve_engine(config.engine, device)
    gen = torch.Generator().manual_seed(config.seed)
    units = _units(qmodel, layers, blocks)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(units) * config.iterations, desc="AdaRound", unit="it", leave=False)
    carry = None
    for number, (unit_name, unit_layers) in enumerate(units, 1):
        if bar is not None:
            bar.set_postfix_str(f"{number}/{len(units)} {unit_name}")
        step = (lambda: bar.update(1)) if bar is not None else (lambda: None)
        try:
            record, carry = _reconstruct_unit(qmodel, fp_model, unit_name, unit_layers, images, config, device, gen,
                                              step, engine, carry if engine != "loop" else None)
        except Unreached:  # a training-only head: its weights keep their start (nearest or GPTQ's)
            warnings.warn(f"reconstruction: {unit_name!r} is not reached by the forward pass; its rounding is kept",
                          stacklevel=2)
            record, carry = {"unit": unit_name, "layers": unit_layers, "kind": "unreached"}, None
        records.append(record)
    if bar is not None:
        bar.close()
    for wq in weight_quantizers(qmodel).values():  # a GPTQ start outside every unit: not carried further
        wq.set_start_weight(None)
    return records


def reconstruction_summary(records: Sequence[Dict[str, Any]]) -> Tuple[str, Optional[str]]:
    """One line on what the reconstruction did -- the second-order step (layers, quadratic error against
    nearest rounding) and the learned rounding (units improved, kept at their start, reconstruction
    gain) -- and a warning when the rounding variables had not settled (a schedule too short), else None."""
    if not records:
        return "AdaRound: no layer", None
    one_shot = [r for r in records if r.get("kind") == "gptq"]
    learned = [r for r in records if r.get("kind") not in ("gptq", "unreached")]
    parts = []
    if one_shot:
        ratios = sorted(r["error"] / r["nearest_error"] for r in one_shot if (r["nearest_error"] or 0) > 0)
        median = ratios[len(ratios) // 2] if ratios else 1.0
        parts.append(f"GPTQ: {len(one_shot)} layers rounded in {sum(r['seconds'] for r in one_shot):.1f} s, median "
                     f"layer output error {100 * median:.1f}% of nearest rounding's")
    if not learned:
        return "; ".join(parts), None
    records = learned
    start = "GPTQ's rounding" if any(r.get("start") == "gptq" for r in records) else "nearest rounding"
    improved = [r for r in records if r.get("kept") == "adaround" and r["rec_loss_adaround"] < r["rec_loss_nearest"]]
    kept_start = sum(r.get("kept") != "adaround" for r in records)
    worse = sum(r["rec_loss_adaround"] > r["rec_loss_nearest"] for r in records)

    def kept_loss(r):
        return r["rec_loss_nearest"] if r.get("kept") != "adaround" else r["rec_loss_adaround"]

    gains = sorted(1 - kept_loss(r) / r["rec_loss_nearest"] for r in records if r["rec_loss_nearest"] > 0)
    median = gains[len(gains) // 2] if gains else 0.0
    undecided = sum(r.get("undecided", 0.0) for r in records) / len(records)
    units = "layers" if all(r.get("kind", "layer") == "layer" for r in records) else "blocks and layers"
    parts.append(f"AdaRound: {len(improved)}/{len(records)} {units} reconstruct better than {start}, "
                 f"{kept_start} kept {start} (AdaRound was worse on the calibration data); median "
                 f"reconstruction-error reduction {100 * median:.1f}%; {100 * undecided:.1f}% of rounding variables "
                 "undecided at the end")
    warning = None
    if undecided > 0.2 or worse > len(records) // 4:
        warning = ("AdaRound's schedule looks too short for these layers (rounding variables still undecided or "
                   "worse than its starting rounding): raise the iterations per layer (the paper uses 10000) or "
                   "the learning rate (the paper's 1e-3 moves a variable by at most ~1e-3 per iteration)")
    return "; ".join(parts), warning
