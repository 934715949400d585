"""The fused dsg_ext ops (torch.ops.dsg_ext.*) as typed Python functions with autograd.

Each op is declared once in C++ (csrc/ops.cpp) and implemented for CPU and CUDA. Importing this
package loads the compiled library (``dsg_ext._C``) and registers what the dispatcher needs from
Python: fake (meta) kernels so the ops trace under torch.compile (``fake_kernels``, which checks
shapes with ``shape_checks``) and autograd formulas that call the fused backward ops (``wrappers``,
whose arguments ``arg_checks`` validates). ``adaround_math`` holds AdaRound's formulas in plain torch.
"""

from .. import _C  # noqa: F401  (the op schemas, CPU and CUDA kernels)
from . import fake_kernels  # noqa: F401  (registers the fake kernels)
from .adaround_math import ADAROUND_GAMMA, ADAROUND_ZETA, adaround_init, rectified_sigmoid, rounding_regularizer
from .wrappers import adaround, bn_eval_slack, bn_stat_slack_loss, fake_quant, grad_scale, reflect_shift

__all__ = [
    "bn_stat_slack_loss", "bn_eval_slack", "fake_quant", "adaround", "adaround_init", "rectified_sigmoid",
    "rounding_regularizer", "grad_scale", "reflect_shift", "ADAROUND_ZETA", "ADAROUND_GAMMA",
]
