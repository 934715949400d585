"""dsg_ext: data-free quantization with Diverse Sample Generation (DSG, CVPR 2021).

The hot paths are fused C++/CUDA torch ops (torch.ops.dsg_ext.*), wrapped in dsg_ext.ops.
"""

from .ops import adaround, adaround_init, bn_eval_slack, bn_stat_slack_loss, fake_quant

__version__ = "0.1.0"


def cuda_ops_built() -> bool:
    """Whether this build of the extension contains the CUDA kernels."""
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("dsg_ext::fake_quant", "CUDA")


__all__ = ["adaround", "adaround_init", "bn_eval_slack", "bn_stat_slack_loss", "fake_quant", "cuda_ops_built", "__version__"]
