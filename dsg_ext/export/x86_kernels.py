"""What onnxruntime's integer kernels compute on each class of x86 CPU, emulated in PyTorch, and which
class this machine is.

Two classes give different results for the same file (quantization/int16_pairs.py): CPUs with VNNI
(AVX-512 VNNI, AVX-VNNI) or AMX, and ARM, add every uint8 x int8 product exactly; x86 CPUs without
them (AVX2, AVX-512 without VNNI) add adjacent pairs of products into a saturating int16 first.
``onnxruntime_kernels(qmodel, vnni=False)`` makes a quantized model compute what the second class
computes (the model unchanged outside the ``with``), so a test or ``dsg export`` can say what a file
gives on either class whatever CPU runs it. Every Conv2d (depthwise excepted) and Linear with int8
weights whose input is on a known uint8 grid is emulated as an integer kernel -- what the deployment
placement makes of every layer; with the ``input`` placement onnxruntime runs some convolutions in
float, so there the emulation's difference is an upper bound.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ExportError
from ..quantization.int16_pairs import INT16_MAX, INT16_MIN, kernel_pairs, pair_excess, pair_view, uint8_range
from ..quantization.prepare import layer_input_quantizer, weight_quantizers
from ..quantization.quantizers import WeightMode

_CHUNK = 1 << 24  # products of saturating pairs computed at once (elements)


def cpu_info() -> Dict[str, Any]:
    """This machine's CPU: model name, the flags that choose onnxruntime's int8 kernels, and whether
    its kernels add products exactly (``exact_pairs``: VNNI / AMX, or not x86)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True, timeout=10).stdout
        pairs = (line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in pairs}
        model, flags = fields.get("Model name", model), set(fields.get("Flags", "").split())
    except (OSError, subprocess.SubprocessError):
        pass
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    shown = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "avx_vnni", "fma"))
    return {"model": model, "cpus": os.cpu_count(), "x86": x86, "vnni": vnni, "flags": shown,
            "exact_pairs": vnni or not x86}


def describe_cpu(info: Dict[str, Any]) -> str:
    """One line: the model, and which kernel class it runs."""
    if not info["x86"]:
        kind = "not x86: exact integer kernels"
    elif info["vnni"]:
        kind = "VNNI: exact integer kernels"
    else:
        kind = "no VNNI: int16 pair saturation"
    return f"{info['model']} ({info['cpus']} CPUs; {kind})"


def _emulated_layers(qmodel: nn.Module) -> List[Dict[str, Any]]:
    layers = []
    for name, wq in weight_quantizers(qmodel).items():
        layer = qmodel.get_submodule(name)
        aq = layer_input_quantizer(layer)
        if wq.mode is not WeightMode.INT or wq.qmin >= 0 or wq.export_uint8 or not kernel_pairs(layer) \
                or aq is None:
            continue
        if getattr(layer, "padding_mode", "zeros") != "zeros":
            warnings.warn(f"layer {name!r} ({layer.padding_mode} padding) is not emulated as an x86 integer kernel",
                          stacklevel=3)
            continue
        lo, hi = uint8_range(aq.qmin, aq.qmax)
        pairs = pair_view(wq.w_int.to(torch.int64))
        over, under = pair_excess(pairs, lo, hi)
        rows, cols = ((over > 0) | (under > 0)).nonzero(as_tuple=True)
        if rows.numel():
            layers.append({"name": name, "layer": layer, "aq": aq, "shift": 128 if aq.qmin < 0 else 0, "rows": rows,
                           "first": _input_index(layer, rows, 2 * cols),
                           "second": _input_index(layer, rows, 2 * cols + 1),
                           "w": pairs[rows, cols].to(torch.float32), "scale": wq.scale.detach().float().reshape(-1)})
    return layers


def _input_index(layer: nn.Module, rows: Tensor, k: Tensor) -> Tensor:
    """Where reduction entry ``k`` (the kernels' order) of output channel ``rows`` sits in our unfolded
    input (F.unfold's order: channel, kernel row, kernel column; Linear: the feature); past the end: the
    extra zero entry."""
    if isinstance(layer, nn.Linear):
        return torch.where(k < layer.in_features, k, torch.full_like(k, layer.in_features))
    cin = layer.in_channels // layer.groups
    taps = layer.kernel_size[0] * layer.kernel_size[1]
    group = rows // (layer.out_channels // layer.groups)
    index = (group * cin + k % cin) * taps + k // cin
    return torch.where(k < taps * cin, index, torch.full_like(k, layer.in_channels * taps))


def _raw_input(entry: Dict[str, Any], x: Tensor) -> Tensor:
    """The uint8 values the kernel multiplies, unfolded (N, K + 1, L); padding holds the zero point."""
    layer, aq = entry["layer"], entry["aq"]
    centred = torch.round(x.float() / aq.scale.float())  # x sits on the input grid: integer - zero point
    if isinstance(layer, nn.Linear):
        flat = centred.reshape(-1, centred.shape[-1], 1)
    else:
        pad = getattr(layer, "static_padding", None)  # EfficientNet's Conv2dStaticSamePadding pads first
        if isinstance(pad, nn.Module):
            centred = pad(centred)
        padding = layer.padding
        if padding == "same":  # PyTorch puts an odd total's extra row / column after
            total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
            centred = F.pad(centred, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
            padding = 0
        elif padding == "valid":
            padding = 0
        flat = F.unfold(centred, layer.kernel_size, layer.dilation, padding, layer.stride)
    raw = flat + (aq.zero_point.float() + entry["shift"])
    return torch.cat([raw, torch.zeros_like(raw[:, :1])], 1)


def _saturation_hook(entry: Dict[str, Any]):
    def hook(_layer, inputs, out: Tensor) -> Tensor:
        raw = _raw_input(entry, inputs[0])
        n, _, positions = raw.shape
        channels = out.shape[-1] if isinstance(entry["layer"], nn.Linear) else out.shape[1]
        if n * channels * positions != out.numel():  # padding done inside the layer's own forward (timm's
            if not entry.get("warned"):              # Conv2dSame): not emulated, said once
                warnings.warn(f"layer {entry['name']!r} pads inside its forward: not emulated as an x86 integer "
                              "kernel", stacklevel=2)
                entry["warned"] = True
            return out
        acc = torch.zeros(n, channels, positions, device=raw.device)
        step = max(1, _CHUNK // max(1, n * positions))
        for i in range(0, entry["rows"].numel(), step):
            sl = slice(i, i + step)
            w = entry["w"][sl].to(raw.device)
            p = raw[:, entry["first"][sl]] * w[:, 0, None] + raw[:, entry["second"][sl]] * w[:, 1, None]
            acc.index_add_(1, entry["rows"][sl].to(raw.device), p.clamp(INT16_MIN, INT16_MAX) - p)
        step_size = entry["aq"].scale.float() * entry["scale"].to(raw.device)
        return out + (acc * step_size.view(1, -1, 1)).reshape(out.shape).to(out.dtype)
    return hook


@contextlib.contextmanager
def onnxruntime_kernels(qmodel: nn.Module, vnni: bool) -> Iterator[int]:
    """Inside the ``with``, ``qmodel`` (integer weights, calibrated) computes what onnxruntime's x86
    integer kernels compute: exactly (``vnni=True``: VNNI / AMX CPUs, and ARM) or with each pair of
    adjacent products saturated to int16 (``vnni=False``: AVX2, AVX-512 without VNNI). Yields how many
    weight pairs can saturate (0 for a file made with the pair limit: it computes the same everywhere)."""
    layers = [] if vnni else _emulated_layers(qmodel)
    handles = [e["layer"].register_forward_hook(_saturation_hook(e)) for e in layers]
    try:
        yield sum(int(e["rows"].numel()) for e in layers)
    finally:
        for h in handles:
            h.remove()


# QEMU's user-mode emulation of a Haswell: AVX2 and FMA, no AVX-512, no VNNI. onnxruntime's MLAS picks its
# kernels from the (emulated) CPUID, so under it a file runs the int16-saturating kernels on any x86 host.
AVX2_CPU = "Haswell-noTSX"
_RUN = r"""
import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions()
o.intra_op_num_threads = 2
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
np.save(sys.argv[3], np.concatenate([s.run(None, {s.get_inputs()[0].name: x[i:i + 100]})[0]
                                     for i in range(0, len(x), 100)]))
"""


def qemu() -> Optional[str]:
    """The path of qemu-x86_64 (Debian's qemu-user) on an x86-64 host, else None."""
    return shutil.which("qemu-x86_64") if platform.machine().lower() in ("x86_64", "amd64") else None


def run_as_cpu(path: str, images: Tensor, cpu: str = AVX2_CPU, timeout: float = 1800) -> Tensor:
    """The ONNX file's outputs on ``images`` in onnxruntime (every graph optimisation on, 2 threads) on
    an emulated CPU (QEMU user mode; minutes for what takes a second natively: for checks, not timing)."""
    binary = qemu()
    if binary is None:
        raise ExportError("running as another CPU needs qemu-x86_64 (Debian package qemu-user) on an x86-64 host")
    with tempfile.TemporaryDirectory() as tmp:
        script, xin, xout = (os.path.join(tmp, n) for n in ("run.py", "x.npy", "y.npy"))
        with open(script, "w") as f:
            f.write(_RUN)
        np.save(xin, images.detach().cpu().float().numpy())
        r = subprocess.run([binary, "-cpu", cpu, sys.executable, script, path, xin, xout], capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode != 0:
            raise ExportError(f"onnxruntime under qemu-x86_64 -cpu {cpu} failed: {r.stderr[-2000:]}")
        return torch.from_numpy(np.load(xout))
