"""Does an exported file compute what our quantized model computes, on real inputs, on this CPU and on
the other class of x86 CPU (x86_kernels.py)? ``verify_file`` answers for ``dsg export``; ``OnnxModel``
lets ``dsg eval --onnx`` evaluate a file like a model."""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import Tensor, nn

from .._utils.io import read_regular
from ..errors import ExportError
from .x86_kernels import cpu_info, describe_cpu, onnxruntime_kernels

AGREEMENT_WARNING = 99.9  # % of images with the same top-1 below which dsg export warns


class OnnxModel(nn.Module):
    """An ONNX file in onnxruntime (CPU, every graph optimisation on: the integer kernels) as a module
    taking and returning tensors."""

    def __init__(self, path: str, threads: Optional[int] = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError("running an ONNX file needs onnxruntime (pip install onnxruntime)") from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        data = read_regular(path, ExportError, "ONNX file")  # a regular file (no FIFO, no device), read once
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 -- onnxruntime's own error types: a file it cannot load
            raise ExportError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0][:300]}") from None
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        try:
            out = self.session.run(None, {self.input_name: x.detach().cpu().float().contiguous().numpy()})[0]
        except Exception as e:  # noqa: BLE001 -- onnxruntime's own error types: inputs the file does not take
            raise ExportError(f"onnxruntime cannot run the file on inputs of shape {tuple(x.shape)}: "
                              f"{str(e).splitlines()[0][:300]}") from None
        return torch.from_numpy(np.asarray(out))


def _batched(model: nn.Module, images: Tensor, batch: int = 50) -> Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch]).float() for i in range(0, images.shape[0], batch)])


def _compare(ours: Tensor, theirs: Tensor) -> Dict[str, float]:
    same = (ours.argmax(1) == theirs.argmax(1)).double().mean() if ours.dim() > 1 else torch.tensor(1.0)
    return {"top1_agreement": 100.0 * float(same), "max_abs_diff": float((ours - theirs).abs().max())}


def verify_file(path: str, qmodel: nn.Module, images: Tensor, what: str) -> Dict[str, Any]:
    """Runs the file in onnxruntime (optimisations on) on ``images`` and compares with ``qmodel``; also
    what the file gives on the other class of x86 CPU (emulated). ``what`` names the images."""
    info = cpu_info()
    ours = _batched(qmodel, images)
    record: Dict[str, Any] = {"images": int(images.shape[0]), "data": what, "cpu": describe_cpu(info),
                              "cpu_vnni": info["vnni"], "cpu_exact_pairs": info["exact_pairs"]}
    record.update(_compare(ours, _batched(OnnxModel(path), images)))
    other = not info["exact_pairs"]  # emulate the class this CPU is not
    with onnxruntime_kernels(qmodel, vnni=other) as pairs:
        emulated = _batched(qmodel, images)
    record["other_cpus"] = {"class": "VNNI / AMX / ARM" if other else "x86 without VNNI (AVX2, AVX-512 without VNNI)",
                            "saturating_pairs": pairs, **_compare(ours, emulated)}
    return record


def verification_lines(record: Dict[str, Any]) -> list:
    """(stdout line, warning or None) for a ``verify_file`` record."""
    o = record["other_cpus"]
    line = (f"onnxruntime on this CPU ({record['cpu']}), {record['images']} images ({record['data']}): same top-1 as "
            f"dsg_ext on {record['top1_agreement']:.2f}%, max |logit diff| {record['max_abs_diff']:.3g}; "
            f"on {o['class']} (emulated): {o['top1_agreement']:.2f}%, {o['max_abs_diff']:.3g}")
    low = [f"this CPU ({record['top1_agreement']:.2f}%)"] if record["top1_agreement"] < AGREEMENT_WARNING else []
    if o["top1_agreement"] < AGREEMENT_WARNING:
        low.append(f"{o['class']} ({o['top1_agreement']:.2f}%, {o['saturating_pairs']} weight pairs can saturate "
                   "int16 there: quantize with --target onnxruntime for a file exact on every CPU)")
    warning = (f"the file predicts as dsg_ext's model on fewer than {AGREEMENT_WARNING}% of the images on "
               + " and on ".join(low)) if low else None
    return [line, warning]
