"""The native quantized-model file: one safetensors file with the integer weights, their scales and
zero points, the activation ranges and biases; the JSON config, layer order, model identity and
calibration source in its metadata (key ``dsg_ext``). Reading it runs no code."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .._io import atomic_write_bytes
from ..errors import QuantizationError, QuantizedFileError
from .config import QuantConfig
from .prepare import act_quantizers, finalize_weights, float_weight, quantize_model, weight_quantizers
from .quantizers import WeightMode

FORMAT_VERSION = 1


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
            "config": qmodel.dsg_quant_config, "order": qmodel.dsg_quant_order, **(extra or {})}
    atomic_write_bytes(path, save({k: v.cpu() for k, v in tensors.items()}, metadata={"dsg_ext": json.dumps(meta)}))


def read_quantized(path: str) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """(tensors, metadata) of a quantized-model file."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("dsg_ext", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise QuantizedFileError(f"{path}: no such file") from None
    except Exception as e:
        raise QuantizedFileError(f"{path}: not a readable quantized-model file ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise QuantizedFileError(f"{path}: not a dsg_ext quantized-model file (format {FORMAT_VERSION})")
    return tensors, meta


def load_quantized(model: nn.Module, path: str, identity: str, example: Optional[Tensor] = None) -> nn.Module:
    """Rebuilds a quantized model from the float model it was made from and a saved file.

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
    qmodel = quantize_model(model, QuantConfig(**meta["config"]), example)
    if qmodel.dsg_quant_order != meta["order"] and set(qmodel.dsg_quant_order) != set(meta["order"]):
        raise QuantizedFileError(f"{path}: its layers do not match the model's")
    with torch.no_grad():
        for name, wq in weight_quantizers(qmodel).items():
            try:
                w_int = tensors[f"{name}.weight_int"]
                wq.scale.copy_(tensors[f"{name}.weight_scale"])
                wq.zero_point.copy_(tensors[f"{name}.weight_zero_point"])
            except KeyError as e:
                raise QuantizedFileError(f"{path}: missing {e.args[0]}") from e
            except RuntimeError as e:
                raise QuantizedFileError(f"{path}: layer {name!r} does not match the model: {e}") from e
            w = float_weight(qmodel, name)
            if tuple(w_int.shape) != tuple(w.shape):
                raise QuantizedFileError(
                    f"{path}: layer {name!r} has weights {tuple(w_int.shape)}, the model {tuple(w.shape)}")
            wq.w_int, wq.mode = w_int, WeightMode.INT
            layer = qmodel.get_submodule(name)
            if f"{name}.bias" in tensors:
                layer.bias.copy_(tensors[f"{name}.bias"])
        for name, aq in act_quantizers(qmodel).items():
            if f"{name}.act_scale" not in tensors:
                raise QuantizedFileError(f"{path}: missing activation range of {name!r}")
            aq.scale.copy_(tensors[f"{name}.act_scale"].reshape(()))
            aq.zero_point.copy_(tensors[f"{name}.act_zero_point"].reshape(()))
            aq.calibrated = True
    return qmodel
