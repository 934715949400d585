"""What changes a quantized model's weights or bit widths, each technique in its module; they import
the quantization core (the model's parts), never the reverse.

- ``second_order``: second-order one-shot rounding (GPTQ), with the input Hessians of ``hessian``;
- ``reconstruct``: learned rounding by reconstruction (AdaRound per layer, BRECQ per block, QDrop,
  LSQ step sizes, learned weight scales), its iterations run by one of the ``engine``s;
- ``bias_correction``: empirical bias correction;
- ``mixed_precision``: per-layer weight bits under an average-bits budget (sensitivity + allocation).
"""

from .bias_correction import correct_bias
from .mixed_precision import Allocation, allocate_bits
from .reconstruct import find_blocks, reconstruct, reconstruction_loss, reconstruction_summary
from .second_order import gptq

__all__ = ["gptq", "reconstruct", "find_blocks", "reconstruction_loss", "reconstruction_summary", "correct_bias",
           "Allocation", "allocate_bits"]
