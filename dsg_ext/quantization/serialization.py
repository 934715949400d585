"""The native quantized-model file: one safetensors file with the integer weights, their scales and
zero points, the activation ranges and biases; the JSON config, layer order, model identity and
calibration source in its metadata (key ``dsg_ext``). Reading it runs no code, and
every value is checked before it is used (``load_quantized``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .._utils.io import atomic_write_bytes, read_regular
from ..errors import ConfigError, QuantizationError, QuantizedFileError
from .config import QuantConfig
from .int16_pairs import can_saturate
from .prepare import act_quantizers, finalize_weights, float_weight, quantize_model, weight_quantizers

# 2: the metadata holds a checksum of the tensors and the metadata (format 1 files had none).
FORMAT_VERSION = 2


def content_checksum(tensors: Dict[str, Tensor], meta: Dict[str, Any]) -> str:
    """SHA-256 over the metadata (canonical JSON, without its own "checksum") and every tensor's name,
    dtype, shape and bytes, in name order: any edit of a bit width, a range or one weight byte changes
    it. (It detects edits and damage, not a forger who recomputes it: every value is checked on load
    too.)"""
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def save_quantized(qmodel: nn.Module, path: str, source: str, identity: str,
                   extra: Optional[Dict[str, Any]] = None) -> None:
    """Writes a calibrated quantized model (nearest-rounding the weights not rounded yet).

    Args:
        qmodel: from ``quantize_model``, calibrated (and optionally reconstructed).
        path: the ``.safetensors`` file; written atomically, so an existing file is replaced only by a
            complete one.
        source: the model source it was made from (recorded, shown in messages).
        identity: the float model's identity (``dsg_ext.models.model_identity``): a file is refused
            for any other model.
        extra: more JSON-serialisable metadata (calibration source, AdaRound records, ...).
    """
    from safetensors.torch import save

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
            raise QuantizationError(f"activation quantizer {name!r} is not calibrated: nothing to save")
        tensors[f"{name}.act_scale"] = aq.scale.reshape(1).contiguous()
        tensors[f"{name}.act_zero_point"] = aq.zero_point.reshape(1).contiguous()
    meta = {"format": FORMAT_VERSION, "source": source, "model_identity": identity,
            "config": qmodel.dsg_quant_config, "order": qmodel.dsg_quant_order,
            "weight_bits": {name: wq.bits for name, wq in weight_quantizers(qmodel).items()},
            "unreached": [name for name, aq in act_quantizers(qmodel).items() if aq.unreached], **(extra or {})}
    tensors = {k: v.cpu() for k, v in tensors.items()}
    meta["checksum"] = content_checksum(tensors, meta)
    atomic_write_bytes(path, save(tensors, metadata={"dsg_ext": json.dumps(meta)}))


def read_quantized(path: str) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """(tensors, metadata) of a quantized-model file: a regular safetensors file whose metadata
    holds our JSON record with the model identity, a known config, and the layer order."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = read_regular(path, QuantizedFileError, "quantized-model file")
    header_len = int.from_bytes(data[:8], "little")
    if len(data) < 8 or header_len > len(data) - 8:
        raise QuantizedFileError(f"{path}: not a readable quantized-model file (truncated safetensors header)")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
        meta = json.loads(((header.get("__metadata__") or {}).get("dsg_ext")) or "null")
        tensors = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError, TypeError) as e:
        raise QuantizedFileError(f"{path}: not a readable quantized-model file ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("format"), int):
        raise QuantizedFileError(f"{path}: not a dsg_ext quantized-model file (format {FORMAT_VERSION})")
    if meta["format"] != FORMAT_VERSION:
        raise QuantizedFileError(f"{path}: written in quantized-file format {meta['format']}, this dsg_ext reads "
                                 f"format {FORMAT_VERSION} (re-run dsg quantize to write it anew)")
    if meta.get("checksum") != content_checksum(tensors, meta):
        raise QuantizedFileError(f"{path}: its checksum does not match its contents (the file was edited or "
                                 "damaged after dsg quantize wrote it)")
    if not isinstance(meta.get("model_identity"), str):
        raise QuantizedFileError(f"{path}: its metadata names no model identity")
    config = meta.get("config")
    known = {f.name for f in dataclasses.fields(QuantConfig)}
    if not isinstance(config, dict) or set(config) - known:
        raise QuantizedFileError(f"{path}: its quantization config is missing or has unknown keys "
                                 f"{sorted(set(config) - known) if isinstance(config, dict) else ''}")
    # Files written before the int16 pair limit existed have no such limit: they are for VNNI CPUs only.
    config.setdefault("vnni_only", True)
    try:
        QuantConfig(**config).validate()
    except ConfigError as e:
        raise QuantizedFileError(f"{path}: {e}") from None
    order = meta.get("order")
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
        raise QuantizedFileError(f"{path}: its metadata has no layer order")
    return tensors, meta


# A file whose layers or activation quantizers the model does not have where the file has them.
_EARLIER = ("Written for another variant of the model, or by a dsg_ext that placed them otherwise (the deployment "
            "placement of 2026-12-08 gained integer forms for SiLU, hard-swish, squeeze-excite, spatial means, "
            "channel splits and unfolded BatchNorm): quantize the model again")


def _tensor(tensors: Dict[str, Tensor], key: str, path: str) -> Tensor:
    if key not in tensors:
        raise QuantizedFileError(f"{path}: missing tensor {key!r}")
    return tensors[key]


def _check_qparams(path: str, what: str, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> None:
    if scale.is_complex() or not scale.is_floating_point() or not bool(torch.isfinite(scale).all()) \
            or not bool((scale > 0).all()):
        raise QuantizedFileError(f"{path}: {what} has scales that are not finite and > 0")
    if zero_point.is_floating_point() or zero_point.is_complex() or \
            not bool(((zero_point >= qmin) & (zero_point <= qmax)).all()):
        raise QuantizedFileError(f"{path}: {what} has zero points outside {qmin}..{qmax} (or not integers)")


def load_quantized(model: nn.Module, path: str, identity: str, example: Optional[Tensor] = None) -> nn.Module:
    """Rebuilds a quantized model from the float model it was made from and a saved file.

    Everything in the file is checked before it is used: the model identity, the config, every
    layer's integer weights (integers inside the layer's bit range, the model's shape), scales
    (finite, > 0), zero points (in range) and biases (finite); a file failing any check is refused.

    Args:
        model: the float model (untouched).
        path: a file written by ``save_quantized`` / ``dsg quantize``.
        identity: ``model``'s identity; a file made from another model is refused.
        example: one input batch, as given to ``quantize_model`` (fixes the first and last layer).

    Returns:
        The quantized model with the stored integer weights and activation ranges, in eval mode.
    """
    tensors, meta = read_quantized(path)
    if meta["model_identity"] != identity:
        raise QuantizedFileError(
            f"{path} was made from another model (identity {meta['model_identity'][:12]}..., this model "
            f"{identity[:12]}...; source {meta.get('source')!r})")
    qmodel = quantize_model(model, QuantConfig(**meta["config"]), example, fit_pair_scales=False)  # the file's scales
    if qmodel.dsg_quant_order != meta["order"] and set(qmodel.dsg_quant_order) != set(meta["order"]):
        lacks = sorted(set(qmodel.dsg_quant_order) - set(meta["order"]))
        unknown = sorted(set(meta["order"]) - set(qmodel.dsg_quant_order))
        named = [f"{len(names)} {what}, e.g. {names[0]!r}" for names, what in
                 ((lacks, "the file lacks"), (unknown, "the model lacks")) if names]
        raise QuantizedFileError(f"{path}: its layers do not match the model's ({'; '.join(named)}). {_EARLIER}")
    rebuilt = {name: wq.bits for name, wq in weight_quantizers(qmodel).items()}
    if "weight_bits" in meta and meta["weight_bits"] != rebuilt:
        differ = sorted(n for n in set(rebuilt) | set(meta["weight_bits"])
                        if meta["weight_bits"].get(n) != rebuilt.get(n))
        raise QuantizedFileError(f"{path}: its per-layer weight bits do not follow from its config (layer "
                                 f"{differ[0]!r}: file {meta['weight_bits'].get(differ[0])}, config "
                                 f"{rebuilt.get(differ[0])})")
    with torch.no_grad():
        for name, wq in weight_quantizers(qmodel).items():
            w_int = _tensor(tensors, f"{name}.weight_int", path)
            scale = _tensor(tensors, f"{name}.weight_scale", path)
            zero_point = _tensor(tensors, f"{name}.weight_zero_point", path)
            w = float_weight(qmodel, name)
            if tuple(w_int.shape) != tuple(w.shape) or scale.shape != wq.scale.shape \
                    or zero_point.shape != wq.zero_point.shape:
                raise QuantizedFileError(
                    f"{path}: layer {name!r} has weights {tuple(w_int.shape)} (scales {tuple(scale.shape)}), the "
                    f"model {tuple(w.shape)} (scales {tuple(wq.scale.shape)})")
            if w_int.is_floating_point() or w_int.is_complex() or w_int.dtype == torch.bool or \
                    not bool(((w_int >= wq.qmin) & (w_int <= wq.qmax)).all()):
                raise QuantizedFileError(f"{path}: layer {name!r} has weights that are not integers in "
                                         f"{wq.qmin}..{wq.qmax} ({wq.bits} bits)")
            _check_qparams(path, f"layer {name!r}", scale, zero_point, wq.qmin, wq.qmax)
            if wq.pair_range is not None and bool(can_saturate(w_int, *wq.pair_range).any()):
                raise QuantizedFileError(f"{path}: layer {name!r} has weight pairs whose products can leave int16 "
                                         "on x86 CPUs without VNNI, though its config says they cannot")
            wq.scale.copy_(scale)
            wq.zero_point.copy_(zero_point)
            wq.load_int(w_int)
            layer = qmodel.get_submodule(name)
            if f"{name}.bias" in tensors:
                bias = tensors[f"{name}.bias"]
                expected = (w.shape[0],) if layer.bias is None else tuple(layer.bias.shape)
                if tuple(bias.shape) != expected or not bias.is_floating_point() \
                        or not bool(torch.isfinite(bias).all()):
                    raise QuantizedFileError(f"{path}: layer {name!r} has a bias that does not fit or is not finite")
                if layer.bias is None:  # added by the bias correction
                    layer.bias = nn.Parameter(torch.zeros(expected, dtype=w.dtype, device=w.device),
                                              requires_grad=False)
                layer.bias.copy_(bias)
        _load_act_ranges(qmodel, tensors, meta, path)
    return qmodel


def _load_act_ranges(qmodel: nn.Module, tensors: Dict[str, Tensor], meta: Dict[str, Any], path: str) -> None:
    """Each activation quantizer's range from the file, checked; the ones the file names unreached are marked so."""
    unreached = meta.get("unreached") or []
    if not isinstance(unreached, list) or not all(isinstance(n, str) for n in unreached):
        raise QuantizedFileError(f"{path}: its list of unreached activation quantizers is not a list of names")
    unreached = set(unreached)
    placed = act_quantizers(qmodel)
    stored = {key[: -len(".act_scale")] for key in tensors if key.endswith(".act_scale")}
    for name, aq in placed.items():
        if f"{name}.act_scale" not in tensors and stored - set(placed):  # quantizers placed elsewhere, not one lost
            raise QuantizedFileError(f"{path}: missing tensor {name + '.act_scale'!r}: the file's activation "
                                     f"quantizers sit elsewhere in the model. {_EARLIER}")
        scale = _tensor(tensors, f"{name}.act_scale", path)
        zero_point = _tensor(tensors, f"{name}.act_zero_point", path)
        if scale.numel() != 1 or zero_point.numel() != 1:
            raise QuantizedFileError(f"{path}: activation range of {name!r} is not one scale and zero point")
        _check_qparams(path, f"the activation range of {name!r}", scale, zero_point, aq.qmin, aq.qmax)
        aq.load_range(scale, zero_point)
        if name in unreached:
            aq.mark_unreached()
