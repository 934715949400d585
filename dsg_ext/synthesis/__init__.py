"""Diverse Sample Generation: calibration images synthesised from a network's BatchNorm statistics.

Reads top-down like the paper: ``taps`` on the BN layers -> ``dsg``'s slack margins (Slack
Distribution Alignment) and layerwise enhancement weights (Layerwise Sample Enhancement) ->
the optimisation ``loop`` -> ``writer`` (``generate``: a resumable dataset on disk). Options live
in ``config``.
"""

from .config import INITS, LAYER_WEIGHTINGS, METHODS, RECIPES, SynthesisConfig
from .dsg import enhancement_weights, slack_margins
from .loop import BatchResult, SynthesisLoop, init_images, per_sample_statistics, synthesize, synthesize_batch
from .taps import FUSED_BN_DEVICES, BatchNormTaps, batchnorm_layers
from .writer import generate, homogenization_summary

__all__ = [
    "INITS", "LAYER_WEIGHTINGS", "METHODS", "RECIPES", "SynthesisConfig", "enhancement_weights", "slack_margins",
    "generate", "homogenization_summary", "BatchResult", "SynthesisLoop", "init_images", "per_sample_statistics",
    "synthesize", "synthesize_batch", "FUSED_BN_DEVICES", "BatchNormTaps", "batchnorm_layers",
]
