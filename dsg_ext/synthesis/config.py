"""Everything that determines the generated images (``SynthesisConfig``, saved in the dataset
manifest): the options of ``dsg generate`` and of ``dsg_ext.synthesize``, defaults in one place."""

from __future__ import annotations

import dataclasses
import math

from .._utils.validation import field_problems
from ..errors import ConfigError

METHODS = ("zeroq", "dsg", "batch", "batch-dsg")
BATCH_METHODS = ("batch", "batch-dsg")  # statistics over the whole batch (N*H*W), as Genie and MCT
INITS = ("gaussian", "uniform")
LAYER_WEIGHTINGS = ("equal", "initial")
CE_LABELS = ("random", "balanced")
AUGMENT_RNGS = ("device", "host")  # synthesis/augment.py

# Named presets (``dsg generate --recipe NAME``, ``SynthesisConfig.from_recipe``): SynthesisConfig fields
# on top of the defaults. "paper-dsg" and "zeroq" are the papers' recipes.
# Fields added after datasets were first written, with the value that reproduces the images made before
# they existed (checked: byte-identical shards): a dataset whose manifest lacks one of them resumes when
# the requested config has that value (synthesis/writer.py).
LATER_FIELDS = {"crop_pad": 0, "flip": False, "smoothing": 0.0, "swing": False, "ce_labels": "random",
                "generator": False, "generator_lr": 0.01, "latent_dim": 256, "augment_rng": "host"}
# The augmentations with random draws, and the fields that change no image unless one of them is on (left
# out of a dataset's identity otherwise, so that datasets without augmentation resume whatever their value).
RANDOM_AUGMENTATIONS = ("crop_pad", "flip", "swing")
AUGMENT_ONLY_FIELDS = ("augment_rng",)
_BATCH_AUG = {"method": "batch", "crop_pad": 2, "flip": True, "smoothing": 0.5, "swing": True, "clamp_pixels": True}
RECIPES = {
    "paper-dsg": {"method": "dsg"},
    "zeroq": {"method": "zeroq"},
    # batch statistics + augmentation + swing convolution + valid pixels (studies/synthesis_recipes.py)
    "batch-aug": dict(_BATCH_AUG),
    # ... run in channels_last: faster on CPUs (oneDNN) and GPUs alike (docs/synthesis.md, measured)
    "recommended": {**_BATCH_AUG, "channels_last": True},
    # Genie's synthesis as published: a generator + latent per batch of 128, batch statistics, swing
    # convolution, 4000 iterations (latent lr 0.1, generator lr 0.01); a GPU schedule.
    "genie": {"method": "batch", "generator": True, "lr": 0.1, "swing": True, "batch_size": 128, "iterations": 4000},
}


@dataclasses.dataclass
class SynthesisConfig:
    """The synthesis recipe. ``method="dsg"`` with the other defaults is the paper's method;
    ``"zeroq"`` is ZeroQ (no slack, equal layer weights). ``"batch"`` matches the statistics of the
    whole batch (mean/var over N*H*W) instead of each sample's; ``"batch-dsg"`` adds DSG on top: slack
    on the batch statistics (the epsilon-quantile of the initial batch's channel gaps) and each
    sample's enhanced layer as an extra per-sample term, weighted ``enhancement - 1``."""

    method: str = "dsg"
    iterations: int = 500
    lr: float = 0.5
    batch_size: int = 32
    image_size: int = 224
    channels: int = 3
    epsilon: float = 0.9  # slack quantile (dsg)
    enhancement: float = 2.0  # weight of each sample's own layer (dsg; the paper's I + 11^T)
    init: str = "gaussian"
    seed: int = 0
    unbiased: bool = True  # ZeroQ's statistics use torch.var (unbiased)
    # Optional image priors, off by default so that "dsg" is the paper's method.
    tv_weight: float = 0.0
    l2_weight: float = 0.0
    jitter: int = 0
    ce_weight: float = 0.0  # random-label cross-entropy prior (each sample pushed towards a random class)
    plateau_patience: int = 100
    min_lr: float = 1e-4
    # Recipe options beyond the paper (off by default): "initial" divides each layer's loss by its
    # value on the initial batch, so that a few layers cannot dominate; clamp_pixels keeps images
    # inside the model's valid input range (pixels in [0, 1] before normalisation).
    layer_weighting: str = "equal"
    clamp_pixels: bool = False
    # Augmentation during synthesis (see synthesis/augment.py): random crop from images crop_pad pixels
    # larger on every side, random horizontal flips, 3x3 Gaussian smoothing of sigma `smoothing`, and
    # swing convolution (a random 1-pixel shift before every strided convolution).
    crop_pad: int = 0
    flip: bool = False
    smoothing: float = 0.0
    swing: bool = False
    # Where the augmentation's random draws live: "device" (a table made before the first iteration,
    # read through a device counter: no host sync, CUDA-graph capturable) or "host" (a Python draw per
    # step, the path of datasets written before the table; resumes them with the same draws).
    augment_rng: str = "device"
    # Targets of the cross-entropy prior: "random" classes, or "balanced" (sample n -> class n mod K).
    ce_labels: str = "random"
    # Genie's generator (synthesis/generator.py): the images are rendered each step by a fresh generator
    # per batch from the batch's latent vectors; Adam on the latent at `lr` (with the plateau schedule)
    # and on the generator at `generator_lr` (x0.95 every 100 iterations).
    generator: bool = False
    generator_lr: float = 0.01
    latent_dim: int = 256
    # Speed: the network in channels_last and/or under bf16 autocast (statistics stay fp32).
    channels_last: bool = False
    autocast_bf16: bool = False
    # Capture one whole iteration (forward, losses, backward, Adam, clamp) in a CUDA graph after a
    # few eager warm-up iterations, and replay it: removes the launch overhead that dominates small
    # batches on a GPU. CUDA only; not with jitter (its random shift is drawn on the host).
    cuda_graph: bool = False
    # Plain eval-mode BatchNorm2d layers run as the fused bn_eval_slack op (BN output and statistic
    # loss in one pass) on devices with its kernels (CPU, CUDA); False taps them with forward
    # pre-hooks and leaves BatchNorm to torch (the path benchmarks compare with).
    fused_bn: bool = True

    def __post_init__(self):
        self.validate()  # when built and on dataclasses.replace: a bad value never reaches the work

    def batch_seed(self, batch_index: int) -> int:
        """The seed of batch ``batch_index``'s starting point (pixels, or generator and latent): from
        (seed, batch index) only, so that a batch does not depend on rank or world size."""
        return self.seed * 1_000_003 + batch_index

    @classmethod
    def from_recipe(cls, name: str, **fields) -> "SynthesisConfig":
        """The preset ``name`` (RECIPES), with ``fields`` on top of it."""
        if name not in RECIPES:
            raise ConfigError(f"unknown synthesis recipe {name!r}; choose from {sorted(RECIPES)}")
        return cls(**{**RECIPES[name], **fields})

    def validate(self) -> "SynthesisConfig":
        problems = field_problems(self)
        if problems:  # the range checks below assume numbers
            raise ConfigError("invalid synthesis options: " + "; ".join(problems))
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}, got {self.method!r}")
        if self.init not in INITS:
            problems.append(f"init must be one of {INITS}, got {self.init!r}")
        if not (0.0 < self.epsilon <= 1.0):
            problems.append(f"epsilon must lie in (0, 1], got {self.epsilon}")
        if self.iterations <= 0:
            problems.append(f"iterations must be > 0, got {self.iterations}")
        if self.batch_size <= 0:
            problems.append(f"batch size must be > 0, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"learning rate must be positive, got {self.lr}")
        if self.image_size <= 0 or self.channels <= 0:
            problems.append(f"image size and channels must be > 0, got {self.image_size}, {self.channels}")
        if self.layer_weighting not in LAYER_WEIGHTINGS:
            problems.append(f"layer weighting must be one of {LAYER_WEIGHTINGS}, got {self.layer_weighting!r}")
        if self.enhancement < 1.0:
            problems.append(f"enhancement weight must be >= 1, got {self.enhancement}")
        if self.ce_labels not in CE_LABELS:
            problems.append(f"ce_labels must be one of {CE_LABELS}, got {self.ce_labels!r}")
        for name in ("tv_weight", "l2_weight", "jitter", "ce_weight", "crop_pad", "smoothing"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.plateau_patience <= 0 or not self.min_lr >= 0:
            problems.append(f"plateau patience must be > 0 and min_lr >= 0, got {self.plateau_patience}, {self.min_lr}")
        if self.crop_pad >= self.image_size:
            problems.append(f"crop_pad must be smaller than the image size, got {self.crop_pad} for {self.image_size}")
        if self.augment_rng not in AUGMENT_RNGS:
            problems.append(f"augment_rng must be one of {AUGMENT_RNGS}, got {self.augment_rng!r}")
        if self.cuda_graph and self.jitter:
            problems.append("cuda_graph cannot be combined with jitter "
                            "(its random shift is drawn on the host each step)")
        if self.cuda_graph and self.augment_rng == "host" and any(getattr(self, k) for k in RANDOM_AUGMENTATIONS):
            problems.append("cuda_graph cannot be combined with crop_pad, flip or swing when augment_rng='host' "
                            "(their random shifts are then drawn on the host each step); use augment_rng='device'")
        if self.cuda_graph and self.generator:
            problems.append("cuda_graph cannot be combined with generator (its learning-rate schedule steps on "
                            "the host)")
        if not (self.generator_lr > 0 and math.isfinite(self.generator_lr)):
            problems.append(f"generator_lr must be positive, got {self.generator_lr}")
        if self.generator and self.init != "gaussian":
            problems.append(f"init={self.init!r} sets free pixels; with generator the latent is always Gaussian")
        if self.latent_dim <= 0:
            problems.append(f"latent_dim must be > 0, got {self.latent_dim}")
        if problems:
            raise ConfigError("invalid synthesis options: " + "; ".join(problems))
        return self
