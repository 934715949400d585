"""Quantization, in the order a user applies it: ``quantize_model`` (build a fake-quantized copy) ->
``calibrate`` (activation ranges from images) -> ``gptq`` (second-order one-shot rounding, optional)
-> ``reconstruct`` (AdaRound / BRECQ rounding, optional, started from nearest or GPTQ's rounding)
-> ``correct_bias`` (optional) -> ``save_quantized`` / ``load_quantized`` (the native safetensors file).

Rooms: config (options), qparams (scale / zero-point math), observers (activation range rules),
quantizers (the weight and activation quantizer modules), prepare (builder, BN folding,
calibration), hessian + second_order (GPTQ rounding), reconstruct (AdaRound, BRECQ),
bias_correction, serialization (the file format).
"""

from .allocation import Allocation, allocate_bits
from .bias_correction import correct_bias
from .config import (
    PLACEMENTS,
    RECONSTRUCTION_PRESETS,
    RECONSTRUCTION_UNITS,
    ROUNDING_STARTS,
    TARGETS,
    AdaRoundConfig,
    QuantConfig,
)
from .observers import OBSERVERS, EmaObserver, MinMaxObserver, MseObserver, Observer, PercentileObserver
from .prepare import (
    act_quantizers,
    batches,
    calibrate,
    execution_order,
    finalize_weights,
    float_reference,
    float_weight,
    fold_batchnorm,
    quantize_model,
    weight_quantizers,
)
from .qparams import WEIGHT_OBSERVERS, mse_search, quant_range, range_to_qparams, weight_qparams
from .quantizers import ActQuantizer, WeightMode, WeightQuantizer
from .reconstruct import find_blocks, reconstruct, reconstruction_loss, reconstruction_summary
from .second_order import GptqConfig, gptq
from .serialization import FORMAT_VERSION, load_quantized, read_quantized, save_quantized

__all__ = [
    "PLACEMENTS", "RECONSTRUCTION_PRESETS", "RECONSTRUCTION_UNITS", "ROUNDING_STARTS", "TARGETS", "AdaRoundConfig",
    "QuantConfig",
    "GptqConfig", "gptq", "Allocation", "allocate_bits",
    "OBSERVERS", "WEIGHT_OBSERVERS", "Observer", "MinMaxObserver", "EmaObserver", "PercentileObserver", "MseObserver",
    "correct_bias", "act_quantizers", "batches", "calibrate", "execution_order", "finalize_weights", "float_weight",
    "float_reference", "fold_batchnorm", "quantize_model", "weight_quantizers",
    "mse_search", "quant_range", "range_to_qparams", "weight_qparams",
    "ActQuantizer", "WeightMode", "WeightQuantizer",
    "find_blocks", "reconstruct", "reconstruction_loss", "reconstruction_summary",
    "FORMAT_VERSION", "load_quantized", "read_quantized", "save_quantized",
]
