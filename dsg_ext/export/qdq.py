"""A quantized model as standard ONNX with QuantizeLinear / DequantizeLinear (QDQ).

``deploy_module`` turns a quantized model (``quantize_model`` + ``calibrate`` / ``load_quantized``)
into a plain torch module that computes the same function with PyTorch's decomposed quantization
ops, which torch.onnx (the dynamo exporter) writes as ONNX QuantizeLinear / DequantizeLinear:

- weights: the integers of the quantized model (AdaRound's rounding kept, not recomputed) as int8
  (uint8 for asymmetric weights) initializers, each with a DequantizeLinear, per output channel
  (axis 0) or per tensor;
- activations: QuantizeLinear -> DequantizeLinear per tensor where our quantizers sit (every layer
  input, or after each ReLU). ONNX's 8-bit types carry every width from 2 to 8 bits: for a width
  below 8 the input is first clipped in float to the width's range [(qmin - zp) * s, (qmax - zp) * s],
  so QuantizeLinear only ever produces integers inside it (exactly our fake quantization; the
  Q -> DQ pair stays adjacent, so runtimes still fuse it). ONNX INT4/UINT4 would need opset 21 and
  are not used.
"""

from __future__ import annotations

import copy
import inspect
import os
import tempfile
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..errors import ExportError, OutputError
from ..quantization.prepare import act_quantizers, weight_quantizers
from ..quantization.quantizers import ActQuantizer, WeightMode

DEFAULT_OPSET = 20
MIN_OPSET = 13  # per-channel DequantizeLinear


def _storage(qmin: int, qmax: int) -> Tuple[torch.dtype, int, int]:
    """The 8-bit ONNX type that carries [qmin, qmax], and its full range."""
    if qmin >= 0 and qmax <= 255:
        return torch.uint8, 0, 255
    if qmin >= -128 and qmax <= 127:
        return torch.int8, -128, 127
    raise ExportError(f"an integer range {qmin}..{qmax} does not fit ONNX's 8-bit types")


class ActQDQ(nn.Module):
    """QuantizeLinear -> DequantizeLinear with one of our activation ranges (clipped first below 8 bits)."""

    def __init__(self, aq: ActQuantizer):
        super().__init__()
        self.scale, self.zero_point = float(aq.scale), int(aq.zero_point)
        self.qmin, self.qmax = aq.qmin, aq.qmax
        self.dtype, lo, hi = _storage(aq.qmin, aq.qmax)
        self.full = (lo, hi)
        self.clip = (aq.qmin, aq.qmax) != (lo, hi)

    def forward(self, x: Tensor) -> Tensor:
        qd = torch.ops.quantized_decomposed
        q = qd.quantize_per_tensor(x, self.scale, self.zero_point, self.full[0], self.full[1], self.dtype)
        if self.clip:  # the width's range, on the integers
            q = torch.clamp(q, self.qmin, self.qmax)
        return qd.dequantize_per_tensor(q, self.scale, self.zero_point, self.full[0], self.full[1], self.dtype)


class DQWeight(nn.Module):
    """A weight parametrization that ignores the float weight and returns DequantizeLinear of the
    integer weights (per output channel or per tensor)."""

    def __init__(self, wq):
        super().__init__()
        dtype, _, _ = _storage(wq.qmin, wq.qmax)
        self.register_buffer("weight_int", wq.w_int.to(dtype).contiguous())
        self.register_buffer("weight_scale", wq.scale.detach().float().reshape(-1).contiguous())
        self.register_buffer("weight_zero_point", wq.zero_point.detach().reshape(-1).long().contiguous())
        self.qmin, self.qmax, self.dtype, self.per_channel = wq.qmin, wq.qmax, dtype, wq.per_channel
        # per tensor: Python numbers, so the exported graph holds constants (not a data-dependent item())
        self.tensor_qparams = (float(self.weight_scale[0]), int(self.weight_zero_point[0]))

    def forward(self, _float_weight: Tensor) -> Tensor:
        qd = torch.ops.quantized_decomposed
        if self.per_channel:
            return qd.dequantize_per_channel(self.weight_int, self.weight_scale, self.weight_zero_point, 0,
                                             self.qmin, self.qmax, self.dtype)
        return qd.dequantize_per_tensor(self.weight_int, *self.tensor_qparams, self.qmin, self.qmax, self.dtype)


def deploy_module(qmodel: nn.Module) -> nn.Module:
    """The quantized model as a module of QDQ ops (see the module docstring); ``qmodel`` is
    untouched. Every weight must be finalised (integers) and every activation range calibrated.

    It is a copy of ``qmodel`` with each weight quantizer swapped for ``DQWeight`` and each
    activation quantizer for ``ActQDQ``, so every layer keeps its own forward (custom padding,
    subclasses) and the hooks that place the activation quantizers."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)

    wqs, aqs = weight_quantizers(qmodel), act_quantizers(qmodel)
    for name, wq in wqs.items():
        if wq.mode is not WeightMode.INT:
            raise ExportError(f"layer {name!r} has no integer weights yet (finalize_weights / load_quantized first)")
    for name, aq in aqs.items():
        if not aq.calibrated:
            raise ExportError(f"activation quantizer {name or 'of the input'!r} is not calibrated")
    model = copy.deepcopy(qmodel)
    for name in wqs:
        plist = model.get_submodule(name).parametrizations.weight
        plist[0] = DQWeight(plist[0])
    for _name, module in model.named_modules():
        if isinstance(getattr(module, "act_quant", None), ActQuantizer):
            module.act_quant = ActQDQ(module.act_quant)
    return model.eval()


def input_name(model: nn.Module) -> str:
    """The name of the model's (first) forward argument, the ONNX graph's input name."""
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return params[0].name if params else "input"


def _unsupported(e: Exception) -> str:
    """The operation an exporter error is about, named as torch names it, where it can be found."""
    import re

    text = str(e)
    found = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", text)
    if found:
        return f"{found.group(1)}.{found.group(2)} (no ONNX translation)"
    found = re.search(r"call_function\[target=([^\]]+)\]", text) or re.search(r"Unsupported FX nodes: ([^\n]+)", text)
    if found:
        return found.group(1)
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def export_onnx(qmodel: nn.Module, example: Tensor, path: str, *, opset: int = DEFAULT_OPSET,
                name: Optional[str] = None, check: bool = True) -> Dict[str, Any]:
    """Writes a quantized model as an ONNX QDQ file.

    Args:
        qmodel: a quantized model with integer weights and calibrated ranges (``load_quantized``).
        example: one input batch (its batch dimension is exported as dynamic).
        path: the ``.onnx`` file; written to a temporary file and renamed, so an existing file is
            replaced only by a complete one.
        opset: the ONNX opset (>= 13, per-channel DequantizeLinear).
        name: the graph input's name (default: the model's forward argument name).
        check: run the file in onnxruntime (when installed) on ``example`` and compare with our model.

    Returns:
        A record: input name, opset, node counts, file size, and (with ``check``) the largest logit
        difference between onnxruntime and the quantized model on ``example``.
    """
    import onnx

    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(f"--opset must be an integer >= {MIN_OPSET} (per-channel DequantizeLinear), got {opset!r}")
    deploy = deploy_module(qmodel)
    name = name or input_name(qmodel)
    with torch.no_grad():
        ours = qmodel(example)
        mine = deploy(example)
    if not torch.allclose(ours, mine, rtol=1e-4, atol=1e-4 * float(ours.abs().max().clamp_min(1))):
        raise ExportError(f"internal: the QDQ module differs from the quantized model by "
                          f"{float((ours - mine).abs().max()):.3g}")
    batch = torch.export.Dim("batch", min=1)
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(deploy, (example,), None, dynamo=True, opset_version=opset,
                                        input_names=[name], output_names=["output"],
                                        dynamic_shapes=({0: batch},), verbose=False)
    except Exception as e:
        raise ExportError(f"the model holds an operation ONNX export cannot express: {_unsupported(e)}") from e
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=directory)
    os.close(fd)
    try:
        program.save(tmp)
        model_proto = onnx.load(tmp)
        onnx.checker.check_model(model_proto)
        record: Dict[str, Any] = {
            "input": name, "opset": opset, "bytes": os.path.getsize(tmp),
            "nodes": {op: sum(n.op_type == op for n in model_proto.graph.node)
                      for op in sorted({n.op_type for n in model_proto.graph.node})},
        }
        if check:
            record["max_abs_diff_vs_ours"] = _check_runtime(tmp, name, example, ours)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return record


def _check_runtime(path: str, name: str, example: Tensor, ours: Tensor) -> Optional[float]:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = session.run(None, {name: example.detach().cpu().numpy()})[0]
    return float((torch.from_numpy(out) - ours.detach().cpu()).abs().max())
