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
from torch.nn.utils import parametrize

from ..errors import ExportError, OutputError
from ..quantization.deploy import QuantPoint, int32_bias
from ..quantization.prepare import act_quantizers, weight_quantizers
from ..quantization.quantizers import ActQuantizer, WeightMode

DEFAULT_OPSET = 20
# torch.onnx's dynamo exporter writes opset 18 and newer; asked for less, its down-conversion fails on our graphs
# (ReduceMean's axes) and it writes 18 anyway. Per-channel DequantizeLinear needs 13.
MIN_OPSET = 18


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


class HardSigmoidQDQ(nn.Module):
    """A "hardsigmoid" point of the deployment placement as ops onnxruntime runs in integers: QLinearAdd of
    its (quantized) input and a quantized constant 3, quantized at 6 times the point's step, read back at the
    point's step: round((x + 3) / (6 s)) = round(hardsigmoid(x) / s) wherever hardsigmoid does not clip, and
    the quantizer's range does the clipping where it starts at 0 and ends below 1 or within half a step above
    it (hard-sigmoid's own range: what calibration gives). Any other range gets a Clip to [0, 6] between the
    addition and the quantization, which onnxruntime runs in float."""

    def __init__(self, aq: ActQuantizer):
        super().__init__()
        self.qdq = ActQDQ(aq)
        # hardsigmoid's 1 lands on the top level where the range ends at most half a step above 1
        self.exact = int(aq.zero_point) == aq.qmin and (aq.qmax - int(aq.zero_point) - 0.5) * float(aq.scale) <= 1.0
        self.register_buffer("three", torch.ones((), dtype=torch.uint8))  # 1 at step 3: the constant exactly

    def forward(self, x: Tensor) -> Tensor:
        qd, a = torch.ops.quantized_decomposed, self.qdq
        y = x + qd.dequantize_per_tensor(self.three, 3.0, 0, 0, 255, torch.uint8)
        if not self.exact:
            y = torch.clamp(y, 0.0, 6.0)
        q = qd.quantize_per_tensor(y, 6.0 * a.scale, a.zero_point, a.full[0], a.full[1], a.dtype)
        if a.clip:
            q = torch.clamp(q, a.qmin, a.qmax)
        return qd.dequantize_per_tensor(q, a.scale, a.zero_point, a.full[0], a.full[1], a.dtype)


class DQWeight(nn.Module):
    """A weight parametrization that ignores the float weight and returns DequantizeLinear of the
    integer weights (per output channel or per tensor)."""

    def __init__(self, wq):
        super().__init__()
        dtype, _, _ = _storage(wq.qmin, wq.qmax)
        ints, zero_point, qmin, qmax = wq.w_int, wq.zero_point.detach(), wq.qmin, wq.qmax
        if wq.export_uint8 and dtype == torch.int8:  # the same values as uint8 - 128: onnxruntime's exact U8U8 kernels
            ints, zero_point = ints.to(torch.int16) + 128, zero_point + 128
            dtype, qmin, qmax = torch.uint8, qmin + 128, qmax + 128
        self.register_buffer("weight_int", ints.to(dtype).contiguous())
        self.register_buffer("weight_scale", wq.scale.detach().float().reshape(-1).contiguous())
        self.register_buffer("weight_zero_point", zero_point.reshape(-1).long().contiguous())
        self.qmin, self.qmax, self.dtype, self.per_channel = qmin, qmax, dtype, wq.per_channel
        # per tensor: Python numbers, so the exported graph holds constants (not a data-dependent item())
        self.tensor_qparams = (float(self.weight_scale[0]), int(self.weight_zero_point[0]))

    def forward(self, _float_weight: Tensor) -> Tensor:
        qd = torch.ops.quantized_decomposed
        if self.per_channel:
            return qd.dequantize_per_channel(self.weight_int, self.weight_scale, self.weight_zero_point, 0,
                                             self.qmin, self.qmax, self.dtype)
        return qd.dequantize_per_tensor(self.weight_int, *self.tensor_qparams, self.qmin, self.qmax, self.dtype)


class DQBias(nn.Module):
    """A bias parametrization that returns DequantizeLinear of its int32 integers at scale
    s_input * s_weight per output channel (what onnxruntime's QLinearConv / QGemm take)."""

    def __init__(self, integers: Tensor, scale: Tensor):
        super().__init__()
        self.register_buffer("bias_int", integers.to(torch.int32).contiguous())
        self.register_buffer("bias_scale", scale.detach().float().contiguous())
        self.register_buffer("bias_zero_point", torch.zeros_like(self.bias_int))

    def forward(self, _float_bias: Tensor) -> Tensor:
        return torch.ops.quantized_decomposed.dequantize_per_channel(
            self.bias_int, self.bias_scale, self.bias_zero_point, 0, -2**31, 2**31 - 1, torch.int32)


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
    for name in wqs:  # deployment placement: the int32 bias (computed before the ranges are swapped)
        layer = model.get_submodule(name)
        got = int32_bias(layer)
        if got is not None:
            object.__setattr__(layer, "_dsg_bias_input", None)  # the bias is now its int32 grid exactly
            # parametrize puts its property on the class, which the copy shares with qmodel: a class of its own
            layer.__class__ = type(type(layer).__name__, (type(layer),), {})
            parametrize.register_parametrization(layer, "bias", DQBias(*got), unsafe=True)
    for module in model.modules():  # a mirror repeats its source's range as a Q/DQ pair of its own
        if isinstance(module, QuantPoint) and module.mode == "mirror" and module.source is not None:
            module.export_qdq = ActQDQ(module.source.act_quant)
        elif isinstance(module, QuantPoint) and module.kind == "hardsigmoid" and module.mode == "quant":
            module.export_qdq = HardSigmoidQDQ(module.act_quant)
    for name in wqs:
        plist = model.get_submodule(name).parametrizations.weight
        plist[0] = DQWeight(plist[0])
    for _name, module in model.named_modules():  # an unreached one (a training-only head) passes values on
        if isinstance(getattr(module, "act_quant", None), ActQuantizer):
            module.act_quant = nn.Identity() if module.act_quant.unreached else ActQDQ(module.act_quant)
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


def max_opset() -> int:
    """The newest ONNX opset the installed onnx package (and so the exporter's writer) knows."""
    import onnx

    return int(onnx.defs.onnx_opset_version())


def check_opset(opset: Any, name: Optional[str] = None) -> None:
    """Refuses an opset the installed exporter cannot write (``name``: deprecated and unused; the error
    names the parameter, and ``dsg`` shows it as ``--opset``)."""
    top = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= top:
        raise ExportError(f"opset must lie in {MIN_OPSET}..{top} (the opsets the installed exporter writes: "
                          f"torch.onnx's oldest, onnx's newest), got {opset!r}", parameter="opset")


def _same_as_ours(qmodel: nn.Module, deploy: nn.Module, example: Tensor) -> Tensor:
    """Our model's output on ``example``, after checking the QDQ module computes it too."""
    with torch.no_grad():
        ours = qmodel(example)
        mine = deploy(example)
    gap, size = (ours - mine).abs(), float(ours.abs().max().clamp_min(1))
    if qmodel.dsg_quant_config.get("act_placement") != "deploy":
        bad = not torch.allclose(ours, mine, rtol=1e-4, atol=1e-4 * size)
    else:
        # Our model adds the int32 bias's rounding to the float bias's output, the QDQ module convolves with
        # the rounded bias: outputs an ulp apart, so a value at a rounding tie of the next quantizer may land
        # one step away, and the step travels on through the later quantizers (EfficientNet-Lite0: mean
        # difference 3% of the mean logit; a MobileNetV3 with random weights, whose logits reach 230: 2.5%, and
        # 22% of the largest logit at one output). A wrong quantizer moves them far more (tested: one range ten
        # times too narrow in the ResNet-20 moves the mean by 16-50%).
        bad = float(gap.max()) > 0.5 * size or float(gap.mean()) > 0.05 * float(ours.abs().mean())
    if bad:
        raise ExportError(f"internal: the QDQ module differs from the quantized model by {float(gap.max()):.3g}")
    return ours


def export_onnx(qmodel: nn.Module, example: Tensor, path: str, *, opset: int = DEFAULT_OPSET,
                name: Optional[str] = None, check: bool = True, check_images: Optional[Tensor] = None,
                check_data: str = "the example input") -> Dict[str, Any]:
    """Writes a quantized model as an ONNX QDQ file.

    Args:
        qmodel: a quantized model with integer weights and calibrated ranges (``load_quantized``).
        example: one input batch (its batch dimension is exported as dynamic).
        path: the ``.onnx`` file; written to a temporary file and renamed, so an existing file is
            replaced only by a complete one.
        opset: the ONNX opset (MIN_OPSET..``max_opset()``).
        name: the graph input's name (default: the model's forward argument name).
        check: run the file in onnxruntime (when installed, every graph optimisation on) and compare with
            our model, on this CPU and emulated on the other class of x86 CPU (``verify.verify_file``).
        check_images: the images of that check (default ``example``), named by ``check_data``.

    Returns:
        A record: input name, opset, node counts, file size, and (with ``check``) the largest logit
        difference between onnxruntime and the quantized model on ``example``.
    """
    import onnx

    check_opset(opset)
    deploy = deploy_module(qmodel)
    name = name or input_name(qmodel)
    ours = _same_as_ours(qmodel, deploy, example)
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
        _global_pools(model_proto)
        for node in model_proto.graph.node:  # the exporter's per-node stack traces: half the file, and our paths
            del node.metadata_props[:]
        onnx.save(model_proto, tmp)
        onnx.checker.check_model(model_proto)
        written = max((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), default=None)
        if written != opset:
            raise ExportError(f"the exporter wrote opset {written} where opset {opset} was asked for: choose "
                              f"another (opset {MIN_OPSET}..{max_opset()})", parameter="opset")
        record: Dict[str, Any] = {
            "input": name, "opset": opset, "bytes": os.path.getsize(tmp),
            "nodes": {op: sum(n.op_type == op for n in model_proto.graph.node)
                      for op in sorted({n.op_type for n in model_proto.graph.node})},
        }
        if check:
            record["max_abs_diff_vs_ours"] = _check_runtime(tmp, name, example, ours)
            record["runtime"] = runtime_report(tmp)
            if record["runtime"] is not None:
                from .verify import verify_file

                images = example if check_images is None else check_images
                record["verify"] = verify_file(tmp, qmodel, images, check_data)
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


def _global_pools(model_proto) -> int:
    """Rewrites each ReduceMean over the two spatial axes of a 4-D tensor (keepdims) -- how torch.onnx
    writes adaptive_avg_pool2d(x, 1) -- as GlobalAveragePool, the same function, which onnxruntime runs
    as QLinearGlobalAveragePool between Q/DQ. Returns how many."""
    import onnx
    from onnx import numpy_helper

    graph = model_proto.graph
    inferred = onnx.shape_inference.infer_shapes(model_proto).graph
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in (*inferred.value_info, *inferred.input)
            if v.type.tensor_type.HasField("shape")}
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    count = 0
    for i, n in enumerate(graph.node):
        if n.op_type != "ReduceMean" or rank.get(n.input[0]) != 4:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        axes = attrs.get("axes") if len(n.input) < 2 else consts.get(n.input[1])
        if axes is None or attrs.get("keepdims", 1) != 1 or sorted(int(a) % 4 for a in list(axes)) != [2, 3]:
            continue
        graph.node[i].CopyFrom(onnx.helper.make_node("GlobalAveragePool", [n.input[0]], list(n.output), name=n.name))
        count += 1
    used = {name for n in graph.node for name in n.input}
    for init in [i for i in graph.initializer if i.name not in used and i.name not in {g.name for g in graph.input}]:
        graph.initializer.remove(init)  # the axes of the rewritten ReduceMeans
    return count


# What onnxruntime runs in integer kernels, and the data-movement ops that are neither compute nor float.
INTEGER_OPS_PREFIXES = ("QLinear", "QGemm", "ConvInteger", "MatMulInteger", "DynamicQuantize")
_MOVEMENT_OPS = {"QuantizeLinear", "DequantizeLinear", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
                 "Shape", "Gather", "Constant", "Identity", "Cast", "Slice", "Split"}


# Ops that commute with a monotone affine map, so onnxruntime runs them on the stored integers when fed integers
# (its NHWC max pool on uint8): integer compute, not float.
_ORDER_OPS = {"MaxPool", "NhwcMaxPool"}


def _integer_fed(nodes) -> set:
    """Indices of the order ops whose input is an integer tensor: produced by QuantizeLinear, a QLinear op, a
    QGemm with an output scale, or a data-movement op or order op fed one (the graph is topologically sorted)."""
    integer, fed = set(), set()
    for i, n in enumerate(nodes):
        quantized_out = (n.op_type == "QuantizeLinear" or n.op_type.startswith("QLinear")
                         or (n.op_type == "QGemm" and len(n.input) >= 8 and n.input[7]))
        passes = (n.op_type in _ORDER_OPS or n.op_type in _MOVEMENT_OPS - {"DequantizeLinear", "Shape", "Cast"})
        if quantized_out:
            integer.update(n.output)
        elif passes and n.input and n.input[0] in integer:
            integer.update(n.output[:1])
            if n.op_type in _ORDER_OPS:
                fed.add(i)
    return fed


def runtime_report(path: str, threads: int = 1) -> Optional[Dict[str, Any]]:
    """What onnxruntime makes of an ONNX file: the node counts of its optimised graph (all
    optimisations on, CPU), the compute nodes left in float (name and op; a max pool fed integers runs on
    them and counts as integer), and Q/DQ nodes left. None without onnxruntime."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # the "hardware-specific optimisations" note of a saved optimised graph
        ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        nodes = list(onnx.load(options.optimized_model_filepath).graph.node)
    counts: Dict[str, int] = {}
    for n in nodes:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    on_integers = _integer_fed(nodes)
    floats = [f"{n.op_type} {n.name}" for i, n in enumerate(nodes)
              if not n.op_type.startswith(INTEGER_OPS_PREFIXES) and n.op_type not in _MOVEMENT_OPS
              and i not in on_integers]
    return {"nodes": dict(sorted(counts.items())), "float_nodes": floats,
            "integer_nodes": sum(v for k, v in counts.items() if k.startswith(INTEGER_OPS_PREFIXES)) + len(on_integers),
            "qdq_left": counts.get("QuantizeLinear", 0) + counts.get("DequantizeLinear", 0)}
