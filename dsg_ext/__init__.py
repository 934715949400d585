"""dsg_ext: data-free quantization with Diverse Sample Generation (DSG, CVPR 2021).

The path a user walks, each step importable from here:

    images = dsg_ext.synthesize(model, dsg_ext.SynthesisConfig(...), num_samples=256)
    qmodel = dsg_ext.quantize_model(model, dsg_ext.QuantConfig(wbits=4, abits=4), example)
    dsg_ext.calibrate(qmodel, images)
    dsg_ext.gptq(qmodel, images)                                                        # optional, seconds
    dsg_ext.reconstruct(qmodel, model, images, dsg_ext.AdaRoundConfig(iterations=1000))   # optional
    dsg_ext.save_quantized(qmodel, "model.safetensors", source, dsg_ext.model_identity(model))

The hot paths are fused C++/CUDA torch ops (torch.ops.dsg_ext.*), wrapped in ``dsg_ext.ops`` and
exported here too (``bn_stat_slack_loss``, ``bn_eval_slack``, ``fake_quant``, ``adaround``).
Sub-packages: ``synthesis``, ``quantization``, ``data``, ``models``; ``evaluation``; ``errors``.
"""

from ._utils.memory import retain_freed_memory
from .data.interop import SyntheticDataset, calibration_batches, forward_loop, ort_calibration_reader
from .errors import (
    ConfigError,
    DatasetError,
    DataSourceError,
    DsgError,
    ExportError,
    InvalidDataError,
    ModelSourceError,
    NoBatchNormError,
    NonFiniteLossError,
    OutputError,
    QuantizationError,
    QuantizedFileError,
    ReportError,
    SynthesisError,
)
from .evaluation import fidelity, topk_accuracy
from .export import export_onnx
from .models import InputSpec, load_model, model_identity
from .ops import adaround, adaround_init, bn_eval_slack, bn_stat_slack_loss, fake_quant, reflect_shift
from .quantization import (
    AdaRoundConfig,
    Allocation,
    GptqConfig,
    QuantConfig,
    allocate_bits,
    calibrate,
    finalize_weights,
    gptq,
    load_quantized,
    quantize_model,
    reconstruct,
    save_quantized,
)
from .synthesis import SynthesisConfig, generate, synthesize

__version__ = "0.1.0"


def cuda_ops_built() -> bool:
    """Whether this build of the extension contains the CUDA kernels."""
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("dsg_ext::fake_quant", "CUDA")


__all__ = [
    # ops
    "adaround", "adaround_init", "bn_eval_slack", "bn_stat_slack_loss", "fake_quant", "reflect_shift", "cuda_ops_built",
    "retain_freed_memory",
    # synthesis
    "SynthesisConfig", "synthesize", "generate", "export_onnx",
    "SyntheticDataset", "calibration_batches", "forward_loop", "ort_calibration_reader",
    # quantization
    "QuantConfig", "AdaRoundConfig", "quantize_model", "calibrate", "gptq", "GptqConfig", "reconstruct",
    "allocate_bits", "Allocation",
    "finalize_weights",
    "save_quantized", "load_quantized",
    # models and evaluation
    "InputSpec", "load_model", "model_identity", "topk_accuracy", "fidelity",
    # errors
    "DsgError", "ConfigError", "ModelSourceError", "NoBatchNormError", "SynthesisError", "NonFiniteLossError",
    "DatasetError", "DataSourceError", "InvalidDataError", "QuantizationError", "QuantizedFileError", "OutputError",
    "ExportError", "ReportError",
    "__version__",
]
