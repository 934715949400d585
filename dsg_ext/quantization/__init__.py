"""Quantization, in the order a user applies it: ``quantize_model`` (build a fake-quantized copy) ->
``calibrate`` (activation ranges from images) -> ``gptq`` (second-order one-shot rounding, optional)
-> ``reconstruct`` (AdaRound / BRECQ rounding, optional, started from nearest or GPTQ's rounding)
-> ``correct_bias`` (optional) -> ``save_quantized`` / ``load_quantized`` (the native safetensors file).

Rooms. The quantized model's parts (the core): ``config`` (options, presets, checked when built),
``qparams`` (scale / zero-point math), ``observers`` (the range rules, one registry), ``quantizers``
(the weight and activation quantizer modules and their state changes), ``prepare`` (the builder and
calibration), ``folding`` (BN folding and its tracers), ``deploy`` (the deployment placement),
``int16_pairs`` (onnxruntime's pair limit), ``capture`` (hooks and forwards stopped at a module),
``serialization`` (the file format). ``algorithms/`` changes a model: GPTQ, reconstruction, bias
correction, mixed precision; it imports the core, never the reverse.
"""

import sys as _sys

from . import algorithms
from .algorithms import (
    Allocation,
    allocate_bits,
    correct_bias,
    find_blocks,
    gptq,
    reconstruct,
    reconstruction_loss,
    reconstruction_summary,
)
from .config import (
    PLACEMENTS,
    RECONSTRUCTION_PRESETS,
    RECONSTRUCTION_UNITS,
    ROUNDING_STARTS,
    TARGETS,
    AdaRoundConfig,
    GptqConfig,
    QuantConfig,
    format_bits,
    parse_bits,
)
from .folding import fold_batchnorm
from .observers import (
    OBSERVERS,
    WEIGHT_OBSERVERS,
    EmaObserver,
    MinMaxObserver,
    MseObserver,
    Observer,
    PercentileObserver,
)
from .prepare import (
    act_quantizers,
    batches,
    calibrate,
    execution_order,
    finalize_weights,
    float_reference,
    float_weight,
    quantize_model,
    weight_quantizers,
)
from .qparams import mse_search, quant_range, range_to_qparams, weight_qparams
from .quantizers import ActQuantizer, WeightMode, WeightQuantizer
from .serialization import FORMAT_VERSION, load_quantized, read_quantized, save_quantized

# Deprecated module paths (before 2026-12-07 the algorithms sat beside the core): the old names import
# the modules' new homes, e.g. ``dsg_ext.quantization.allocation`` is ``algorithms.mixed_precision``.
for _old, _new in (("allocation", "mixed_precision"), ("bias_correction", "bias_correction"), ("engine", "engine"),
                   ("hessian", "hessian"), ("reconstruct", "reconstruct"), ("second_order", "second_order")):
    _sys.modules[f"{__name__}.{_old}"] = _sys.modules[f"{algorithms.__name__}.{_new}"]
    globals().setdefault(_old, _sys.modules[f"{algorithms.__name__}.{_new}"])

__all__ = [
    "PLACEMENTS", "RECONSTRUCTION_PRESETS", "RECONSTRUCTION_UNITS", "ROUNDING_STARTS", "TARGETS", "AdaRoundConfig",
    "QuantConfig", "parse_bits", "format_bits",
    "GptqConfig", "gptq", "Allocation", "allocate_bits",
    "OBSERVERS", "WEIGHT_OBSERVERS", "Observer", "MinMaxObserver", "EmaObserver", "PercentileObserver", "MseObserver",
    "correct_bias", "act_quantizers", "batches", "calibrate", "execution_order", "finalize_weights", "float_weight",
    "float_reference", "fold_batchnorm", "quantize_model", "weight_quantizers",
    "mse_search", "quant_range", "range_to_qparams", "weight_qparams",
    "ActQuantizer", "WeightMode", "WeightQuantizer",
    "find_blocks", "reconstruct", "reconstruction_loss", "reconstruction_summary",
    "FORMAT_VERSION", "load_quantized", "read_quantized", "save_quantized", "algorithms",
]
