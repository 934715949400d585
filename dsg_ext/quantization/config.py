"""What a quantized model is made of (``QuantConfig``) and how its rounding is learned
(``AdaRoundConfig``, ``GptqConfig``): the options of ``dsg quantize`` and of the Python API, defaults
and presets in one place. Every config checks itself when it is built or ``dataclasses.replace``d
(a ``ConfigError`` naming the field), so a bad value never reaches the work.

This module imports nothing of the package but its errors and field checks: the implementations
import it. The observer names it accepts are those ``observers.py`` registers in ``OBSERVERS``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .._utils.validation import field_problems
from ..errors import ConfigError

# Range observers by name (``QuantConfig.observer`` / ``weight_observer``): filled by observers.py's
# ``register_observer`` when the package is imported; each class says whether it can set weight ranges.
OBSERVERS: Dict[str, Any] = {}
# How the reconstruction iterations run (algorithms/engine.py): "loop" (plain PyTorch, BRECQ's way),
# "device" (no host sync per iteration), "graph" (device's step replayed from a CUDA graph), "auto" (graph
# on CUDA, device elsewhere).
ENGINES = ("auto", "loop", "device", "graph")


def weight_observers() -> Tuple[str, ...]:
    """The registered observers that also set weight ranges (``QuantConfig.weight_observer``)."""
    return tuple(n for n, c in OBSERVERS.items() if c.sets_weights)

# "input": a quantizer before every quantized layer (the paper's); "relu": after each ReLU/ReLU6 (ZeroQ's);
# "deploy": where an integer runtime needs them (every conv/linear output after its activation, residual
# adds, pooling; deploy.py), with BN folded and int32 biases, so that onnxruntime fuses every layer.
PLACEMENTS = ("input", "relu", "deploy")
# Deployment presets (``dsg quantize --target NAME``): QuantConfig fields that make the file run in the
# named runtime's integer kernels (onnxruntime's QLinearConv: uint8 asymmetric activations, int8 symmetric
# per-channel weights, BN folded).
# "onnxruntime" is exact on every CPU (int16_pairs.py: no pair of adjacent products can saturate in the
# kernels of x86 CPUs without VNNI); "onnxruntime-vnni" lifts that limit, for x86 CPUs with AVX-512 VNNI /
# AVX-VNNI and ARM only.
_ORT = {"act_placement": "deploy", "fold_bn": True, "a_symmetric": False, "w_symmetric": True, "w_per_channel": True}
TARGETS = {"onnxruntime": {**_ORT, "vnni_only": False}, "onnxruntime-vnni": {**_ORT, "vnni_only": True}}
RECONSTRUCTION_UNITS = ("layer", "block")
# Where the learned rounding starts: nearest rounding (AdaRound's frac(W/s)), or the second-order
# one-shot rounding (GPTQ, algorithms/second_order.py), which then also runs first.
ROUNDING_STARTS = ("nearest", "gptq")
# Named reconstructions (``dsg quantize --reconstruction NAME``): AdaRoundConfig fields on top of the defaults.
RECONSTRUCTION_PRESETS = {
    "adaround": {"unit": "layer"},
    "brecq": {"unit": "block"},
    "qdrop": {"unit": "block", "qdrop": 0.5},
    # Genie (CVPR'23): 20k iterations per block, batch 32, QDrop 0.5, rounding lr 1e-3, weight scales
    # lr 1e-4 and LSQ activation step sizes lr 4e-5 learned together.
    # BRECQ blocks: as good as layer-wise AdaRound within the evaluation noise and faster; QDrop, LSQ and
    # learned weight scales did not help at the CPU schedule (docs/quantization.md, Reconstruction variants).
    "recommended": {"unit": "block"},
    # GPTQ alone: second-order one-shot rounding, no learned rounding (iterations 0); gptq-brecq: BRECQ's
    # blocks started from GPTQ's decision, so that a short schedule refines it.
    "gptq": {"start": "gptq", "iterations": 0},
    "gptq-brecq": {"start": "gptq", "unit": "block"},
    "genie": {"unit": "block", "iterations": 20000, "batch_size": 32, "lr": 1e-3, "qdrop": 0.5,
              "learn_act_scale": True, "act_scale_lr": 4e-5, "learn_weight_scale": True, "weight_scale_lr": 1e-4},
}
MIN_BITS, MAX_BITS = 2, 8
# Selectors of a per-layer weight-bit rule ("SELECTOR=BITS"); anything else is a glob on the layer name.
RULE_KINDS = ("depthwise", "first", "last")


def parse_bit_rules(text: str) -> List[Tuple[str, int]]:
    """``"depthwise=8,first=8,blocks.1.*=6"`` -> [(selector, bits), ...], later rules winning. A
    selector is ``depthwise`` (a Conv2d with one input channel per group), ``first`` / ``last`` (in
    execution order) or a glob on the layer name (``fnmatch``)."""
    rules = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        selector, sep, bits = part.rpartition("=")
        if not sep or not selector.strip() or not bits.strip().isdigit():
            raise ConfigError(f"weight-bit rule {part!r} is not SELECTOR=BITS (e.g. depthwise=8, first=8, "
                              "'blocks.1.*=6')")
        if not MIN_BITS <= int(bits) <= MAX_BITS:
            raise ConfigError(f"weight-bit rule {part!r}: bits must be an integer in {MIN_BITS}..{MAX_BITS}")
        rules.append((selector.strip(), int(bits)))
    return rules


def format_bits(bits: Sequence[Tuple[int, int]]) -> str:
    """((8, 8), (4, 4)) -> "W8A8,W4A4" (the form ``dsg demo --bits`` takes)."""
    return ",".join(f"W{w}A{a}" for w, a in bits)


def parse_bits(text: str) -> Tuple[Tuple[int, int], ...]:
    """"W8A8,W4A4" -> ((8, 8), (4, 4))."""
    try:
        bits = tuple(tuple(int(v) for v in b.strip().upper().lstrip("W").split("A")) for b in text.split(","))
    except ValueError:
        bits = ()
    if not bits or any(len(b) != 2 for b in bits):
        raise ConfigError(f"bit settings must look like W8A8,W4A4; got {text!r}")
    return bits


@dataclasses.dataclass
class GptqConfig:
    """Options of the second-order one-shot rounding (GPTQ; algorithms/second_order.py)."""

    damp: float = 0.01  # lambda = damp x mean(diag H), per group
    block_size: int = 128  # columns updated together (lazy batch updates); the result does not depend on it
    act_order: bool = False  # round the columns in descending order of diag(H)
    search_scales: bool = True  # per-channel weight scales by MSE search first (else the quantizer's own)
    batch_size: int = 32  # images per forward pass while collecting a layer's inputs

    def __post_init__(self):
        self.validate()

    def validate(self) -> "GptqConfig":
        problems = field_problems(self)
        if not problems and not self.damp > 0:
            problems.append(f"damp must be a positive number, got {self.damp!r}")
        for name in ("block_size", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if problems:
            raise ConfigError("invalid second-order rounding options: " + "; ".join(problems))
        return self


@dataclasses.dataclass
class QuantConfig:
    """A fake-quantized model: integer weights and activations of the given widths.

    The defaults are the recommended recipe: 4-bit weights per output channel (symmetric, min/max)
    and 4-bit activations per tensor at every layer input with MSE-searched ranges, first and last
    layer at 8 bits. MSE ranges are the default because they measured best at W4A4 on every
    calibration source (docs/results.md: ResNet-20 DSG data 92.53% vs 90.52% with min/max).
    """

    wbits: int = 4
    abits: Optional[int] = 4  # None: activations stay float
    w_per_channel: bool = True
    w_symmetric: bool = True
    a_symmetric: bool = False
    act_placement: str = "input"  # one of PLACEMENTS
    first_last_bits: Optional[int] = 8  # weight and activation bits of the first and last layer (None: same)
    observer: str = "mse"  # activation ranges: a name of observers.OBSERVERS
    percentile: float = 99.99  # of the "percentile" observer
    weight_observer: str = "minmax"
    fold_bn: bool = False
    # Mixed precision by rule: per-layer weight bits, "SELECTOR=BITS,..." (parse_bit_rules), applied after
    # wbits / first_last_bits, later rules winning; a rule that matches no layer is an error.
    layer_wbits: str = ""
    # False (default): 8-bit weights are kept such that no pair of adjacent products leaves int16 for the
    # layer's activation range, so onnxruntime's integer kernels compute the file exactly on x86 CPUs
    # without VNNI too (int16_pairs.py). True: no such limit; the file is exact only on CPUs with VNNI / ARM.
    vnni_only: bool = False

    def __post_init__(self):
        self.validate()

    @classmethod
    def for_target(cls, name: str, **fields) -> "QuantConfig":
        """The config whose file runs in the named runtime's integer kernels (``TARGETS``), with
        ``fields`` on top of it (the bit widths, observers, ...)."""
        if name not in TARGETS:
            raise ConfigError(f"unknown deployment target {name!r}; choose from {sorted(TARGETS)}")
        return cls(**{**TARGETS[name], **fields})

    def validate(self) -> "QuantConfig":
        problems = field_problems(self)
        if problems:
            raise ConfigError("invalid quantization options: " + "; ".join(problems))
        for name in ("wbits", "abits", "first_last_bits"):
            b = getattr(self, name)
            if b is None and name != "wbits":
                continue
            if not isinstance(b, int) or isinstance(b, bool) or not MIN_BITS <= b <= MAX_BITS:
                problems.append(f"{name} must be an integer in {MIN_BITS}..{MAX_BITS}, got {b!r}")
        if self.observer not in OBSERVERS:
            problems.append(f"observer must be one of {tuple(OBSERVERS)}, got {self.observer!r}")
        if self.weight_observer not in weight_observers():
            problems.append(f"weight observer must be one of {weight_observers()}, got {self.weight_observer!r}")
        if self.act_placement not in PLACEMENTS:
            problems.append(f"activation placement must be one of {PLACEMENTS}, got {self.act_placement!r}")
        if self.act_placement == "deploy" and not self.fold_bn:
            problems.append("the deploy placement needs fold_bn (onnxruntime fuses no BatchNorm behind a "
                            "quantized weight)")
        if not 50.0 < self.percentile <= 100.0:
            problems.append(f"percentile must lie in (50, 100], got {self.percentile}")
        if problems:
            raise ConfigError("invalid quantization options: " + "; ".join(problems))
        parse_bit_rules(self.layer_wbits)  # its own message, naming the rule
        return self

    def label(self) -> str:
        rules = parse_bit_rules(self.layer_wbits)
        shown = "" if not rules else (f"[{self.layer_wbits}]" if len(rules) <= 4 else f"[{len(rules)} per-layer rules]")
        return f"W{self.wbits}A{self.abits if self.abits else 32}" + shown


@dataclasses.dataclass
class AdaRoundConfig:
    """AdaRound (Nagel et al., ICML 2020), or BRECQ's block-wise variant with ``unit="block"``."""

    iterations: int = 10000  # per layer (or block)
    batch_size: int = 32
    lr: float = 1e-3
    reg_weight: float = 0.01  # lambda
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of iterations without the regularizer
    seed: int = 0
    # Keep nearest rounding for a layer whose hard AdaRound rounding reconstructs the calibration data
    # worse than nearest rounding does (happens with schedules far shorter than the paper's 10k).
    keep_better: bool = True
    # "layer": each layer's output (AdaRound); "block" (default): the layers of each residual block
    # rounded jointly against the block's output (BRECQ), other layers layer-wise.
    unit: str = "block"
    # Beyond the rounding (all off by default = AdaRound / BRECQ as published):
    qdrop: float = 0.0  # QDrop: each activation quantizer of the unit keeps an element in float with this probability
    learn_act_scale: bool = False  # LSQ: the unit's activation step sizes learned jointly (lr act_scale_lr)
    act_scale_lr: float = 4e-5
    learn_weight_scale: bool = False  # the unit's weight scales learned jointly (lr weight_scale_lr)
    weight_scale_lr: float = 1e-4
    # How the iterations run: one of ENGINES (same schedule and batches whichever runs).
    engine: str = "auto"
    # "gptq": the second-order rounding runs first (algorithms/second_order.py, with the options ``gptq``) and the
    # learned rounding starts from its decision, the keep-better guard comparing against it; iterations 0
    # then keeps GPTQ's rounding alone.
    start: str = "nearest"
    gptq: GptqConfig = dataclasses.field(default_factory=GptqConfig)
    # Deprecated spellings of gptq.damp / gptq.act_order (before 2026-12-07), folded into ``gptq`` when given;
    # read ``gptq.damp`` / ``gptq.act_order`` (these attributes read None, so that replace() keeps ``gptq``).
    gptq_damp: dataclasses.InitVar[Optional[float]] = None
    gptq_act_order: dataclasses.InitVar[Optional[bool]] = None

    def __post_init__(self, gptq_damp: Optional[float] = None, gptq_act_order: Optional[bool] = None):
        if isinstance(self.gptq, dict):  # a recorded config (asdict) read back
            self.gptq = GptqConfig(**self.gptq)
        if not isinstance(self.gptq, GptqConfig):
            raise ConfigError(f"invalid AdaRound options: gptq must be a GptqConfig, got {self.gptq!r}")
        folded = {k: v for k, v in (("damp", gptq_damp), ("act_order", gptq_act_order)) if v is not None}
        self.gptq = dataclasses.replace(self.gptq, **folded)  # a copy: replace() never shares it between configs
        self.validate()

    @classmethod
    def from_preset(cls, name: str, **fields) -> "AdaRoundConfig":
        """A named reconstruction (RECONSTRUCTION_PRESETS), with ``fields`` on top of it."""
        if name not in RECONSTRUCTION_PRESETS:
            raise ConfigError(f"unknown reconstruction preset {name!r}; choose from {sorted(RECONSTRUCTION_PRESETS)}")
        return cls(**{**RECONSTRUCTION_PRESETS[name], **fields})

    def validate(self) -> "AdaRoundConfig":
        problems = field_problems(self)
        if problems:
            raise ConfigError("invalid AdaRound options: " + "; ".join(problems))
        if self.start not in ROUNDING_STARTS:
            problems.append(f"start must be one of {ROUNDING_STARTS}, got {self.start!r}")
        least = 0 if self.start == "gptq" else 1  # 0 iterations: GPTQ's rounding alone
        if not isinstance(self.iterations, int) or self.iterations < least:
            problems.append(f"iterations must be an integer >= {least}"
                            + (" (0 only with start='gptq')" if least else "") + f", got {self.iterations!r}")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            problems.append(f"batch size must be a positive integer, got {self.batch_size!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"learning rate must be positive and finite, got {self.lr}")
        if not 0 <= self.warmup < 1:
            problems.append(f"warm-up fraction must lie in [0, 1), got {self.warmup}")
        if self.reg_weight < 0 or not 0 < self.beta_end <= self.beta_start:
            problems.append(f"need reg_weight >= 0 and 0 < beta_end <= beta_start, got {self.reg_weight}, "
                            f"{self.beta_end}, {self.beta_start}")
        if self.unit not in RECONSTRUCTION_UNITS:
            problems.append(f"unit must be one of {RECONSTRUCTION_UNITS}, got {self.unit!r}")
        if self.engine not in ENGINES:
            problems.append(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if not 0 <= self.qdrop < 1:
            problems.append(f"qdrop must lie in [0, 1), got {self.qdrop}")
        if not (self.act_scale_lr > 0 and self.weight_scale_lr > 0):
            problems.append(f"scale learning rates must be positive, got {self.act_scale_lr}, {self.weight_scale_lr}")
        if problems:
            raise ConfigError("invalid AdaRound options: " + "; ".join(problems))
        return self
