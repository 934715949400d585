"""``dsg quantize``: fake-quantize a model, calibrate it on synthetic or real images, optionally
reconstruct the rounding and correct the biases, and write the quantized file."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from ..errors import ConfigError, DsgError, QuantizationError
from .options import (
    DEFAULT_DEVICE,
    _average_bits,
    _bit_choices,
    _device,
    _Formatter,
    _option,
    _optional_bits,
    _positive_int,
    add_model_options,
    add_output_options,
    config_from_args,
    example_input,
)


def add_parser(sub) -> None:
    from ..data.calibration import DEFAULT_CALIBRATION_IMAGES
    from ..quantization.config import (
        ENGINES,
        PLACEMENTS,
        RECONSTRUCTION_PRESETS,
        RECONSTRUCTION_UNITS,
        ROUNDING_STARTS,
        TARGETS,
        GptqConfig,
    )
    from ..quantization.config import AdaRoundConfig as A
    from ..quantization.config import QuantConfig as Q
    from ..quantization.observers import OBSERVERS, WEIGHT_OBSERVERS

    p = sub.add_parser("quantize", formatter_class=_Formatter,
                       help="fake-quantize a model, calibrated on synthetic or real images")
    add_model_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--calib", metavar="DIR", help="a dataset directory written by dsg generate for this model")
    src.add_argument("--real", metavar="DIR",
                     help="a directory of real images, 'fashion-mnist' (training split), 'skimage-photos' or 'noise'")
    p.add_argument("--num-samples", type=_positive_int, default=DEFAULT_CALIBRATION_IMAGES,
                   help="calibration images used")
    p.add_argument("--image-size", type=int, default=None, help="the model's input size (default: the source's own)")
    _option(p, "--wbits", Q, "wbits", "weight bits")
    _option(p, "--abits", Q, "abits", "activation bits (32 = activations stay float)", type=_optional_bits(32))
    _option(p, "--first-last-bits", Q, "first_last_bits", "bits of the first and last layer (0 = same as the rest)",
            type=_optional_bits(0))
    _option(p, "--layer-wbits", Q, "layer_wbits", "mixed precision by rule: per-layer weight bits, "
            "'SELECTOR=BITS,...' with SELECTOR depthwise, first, last or a glob on the layer name (later rules win), "
            "e.g. 'depthwise=8'", metavar="RULES")
    p.add_argument("--wbits-budget", type=_average_bits, default=None, metavar="BITS",
                   help="automatic mixed precision: per-layer weight bits chosen to minimise the summed "
                        "single-layer KL on the calibration images with the file's weights averaging at most "
                        "BITS bits (ZeroQ's Pareto allocation); --layer-wbits rules fix their layers; overrides "
                        "--wbits and the first/last layer's weight bits")
    p.add_argument("--bit-choices", type=_bit_choices, default=None, metavar="LIST",
                   help="widths the allocation picks from (default 2,3,4,5,6,8)")
    p.add_argument("--sensitivity-images", type=_positive_int, default=None, metavar="N",
                   help="calibration images the per-layer sensitivity is measured on (default 32)")
    _option(p, "--per-tensor", Q, "w_per_channel", "one weight scale per layer instead of per output channel")
    _option(p, "--asymmetric-weights", Q, "w_symmetric", "asymmetric (unsigned, with a zero point) weight ranges")
    p.add_argument("--target", choices=sorted(TARGETS), default=None,
                   help="quantize for a runtime's integer kernels: onnxruntime = --placement deploy, --fold-bn, "
                        "uint8 asymmetric activations, int8 symmetric per-channel weights, exact on every CPU (no "
                        "pair of weight products can saturate int16 in the kernels of x86 CPUs without VNNI); "
                        "onnxruntime-vnni = the same without that limit, for x86 CPUs with VNNI / AMX and ARM only "
                        "(options given override it)")
    _option(p, "--placement", Q, "act_placement",
            "activation quantizers at every layer input (the paper's), after each ReLU (ZeroQ's), or where an "
            "integer runtime needs them (deploy: conv/linear outputs after their activation, residual adds, "
            "pooling; needs --fold-bn)", choices=PLACEMENTS)
    _option(p, "--observer", Q, "observer", "activation ranges", choices=tuple(OBSERVERS))
    _option(p, "--percentile", Q, "percentile", "percentile of the 'percentile' observer")
    _option(p, "--weight-observer", Q, "weight_observer", "weight ranges per channel", choices=WEIGHT_OBSERVERS)
    _option(p, "--fold-bn", Q, "fold_bn", "fold BatchNorm into the preceding convolution first")
    p.add_argument("--bias-correction", action="store_true",
                   help="last, add to each layer's bias the mean output shift quantization causes on the "
                        "calibration images (empirical bias correction; first 256 images). Measured: helps "
                        "after plain calibration; after a reconstruction it can hurt (docs/quantization.md)")
    p.add_argument("--adaround", action="store_true", help="learn the weight rounding (AdaRound, Nagel et al. 2020)")
    p.add_argument("--reconstruction", choices=sorted(RECONSTRUCTION_PRESETS), default=None,
                   help="a named reconstruction (implies --adaround) that sets the options below; given options "
                        "override the preset's. brecq: blocks; qdrop: blocks + QDrop 0.5; genie: Genie's full "
                        "schedule; gptq: second-order one-shot rounding alone; gptq-brecq: BRECQ started from it")

    def _option_a(p, flag, field, help, **kw):
        _option(p, flag, A, field, help, **kw)

    _option_a(p, "--adaround-iters", "iterations", "AdaRound iterations per layer (or block)")
    _option_a(p, "--adaround-batch", "batch_size", "AdaRound batch size")
    _option_a(p, "--adaround-lr", "lr",
            "Adam learning rate of the rounding variables (the paper's 1e-3 assumes ~10k iterations; shorter "
            "schedules leave most variables undecided unless it is raised)")
    _option_a(p, "--reconstruct", "unit", "AdaRound target: each layer's output (AdaRound) or each residual block's "
              "output, its layers rounded jointly (BRECQ); layers outside blocks stay layer-wise",
              choices=RECONSTRUCTION_UNITS)
    _option_a(p, "--qdrop", "qdrop", "QDrop: probability that an activation element stays float during "
              "reconstruction (0 = off; the paper uses 0.5)")
    _option_a(p, "--learn-act-scale", "learn_act_scale", "learn the activation step sizes with the rounding (LSQ)",
              toggle=True)
    _option_a(p, "--act-scale-lr", "act_scale_lr", "learning rate of the activation step sizes")
    _option_a(p, "--learn-weight-scale", "learn_weight_scale", "learn the weight scales with the rounding",
              toggle=True)
    _option_a(p, "--weight-scale-lr", "weight_scale_lr", "learning rate of the weight scales")
    _option_a(p, "--start", "start", "where the learned rounding starts: nearest rounding, or the second-order "
              "one-shot rounding (GPTQ), which then runs first (with --adaround-iters 0: GPTQ alone)",
              choices=ROUNDING_STARTS)
    G = GptqConfig  # every GPTQ option (with --start gptq or --reconstruction gptq / gptq-brecq)
    _option(p, "--gptq-damp", G, "damp", "GPTQ dampening, a fraction of the Hessian's mean diagonal")
    _option(p, "--gptq-act-order", G, "act_order", "GPTQ rounds the input columns in descending order of "
            "the Hessian's diagonal", toggle=True)
    _option(p, "--gptq-block-size", G, "block_size", "GPTQ columns updated together (speed only)",
            type=_positive_int)
    _option(p, "--gptq-search-scales", G, "search_scales", "GPTQ first searches each channel's weight scale "
            "(MSE)", toggle=True)
    _option(p, "--gptq-batch", G, "batch_size", "images per forward while GPTQ collects a layer's inputs",
            type=_positive_int)
    _option_a(p, "--recon-engine", "engine", "how the iterations run: graph = one CUDA-graph replay per iteration "
              "(CUDA), device = no host sync per iteration, loop = the plain PyTorch loop; auto = graph on CUDA, "
              "device elsewhere (same schedule and batches whichever runs)", choices=ENGINES)
    p.add_argument("--device", type=_device, default=DEFAULT_DEVICE)
    add_output_options(p, "quantized model file (.safetensors)")
    p.set_defaults(func=run)


def reconstruction_config(args: argparse.Namespace):
    """The AdaRoundConfig a parsed ``dsg quantize`` line describes (defaults, then its
    ``--reconstruction``, then the options given), or None without --adaround / --reconstruction."""
    from ..quantization import AdaRoundConfig, GptqConfig

    if not (args.adaround or args.reconstruction):
        return None
    base = AdaRoundConfig.from_preset(args.reconstruction) if args.reconstruction else AdaRoundConfig()
    return config_from_args(args, AdaRoundConfig, base, gptq=config_from_args(args, GptqConfig, base.gptq))


def run(args: argparse.Namespace) -> int:
    from .. import quantization as quant
    from .._utils.io import check_output_file
    from ..data.calibration import calibration_images
    from ..models import load_model
    from ..models.spec import probe_model
    from ..quantization.algorithms.engine import resolve_engine

    check_output_file(args.out, "--out", force=args.force)

    base = quant.QuantConfig.for_target(args.target) if args.target else None
    config = config_from_args(args, quant.QuantConfig, base).validate()
    allocation_args = _allocation_args(args)
    ada = reconstruction_config(args)
    if ada is not None:
        ada = ada.validate()
        resolve_engine(ada.engine, args.device)  # a CUDA graph asked for off CUDA: refused before any work
    loaded = load_model(args.model, weights=args.weights, image_size=args.image_size,
                        trust_model_code=args.trust_model_code)
    images, described = calibration_images(loaded, args.calib, args.real, args.num_samples)
    fp = loaded.model.to(args.device)
    probe_model(fp, example_input(loaded).to(args.device), args.model)
    allocation = None
    if allocation_args is not None:
        allocation = _allocate(fp, images, config, example_input(loaded).to(args.device), args.device,
                               *allocation_args)
        config = dataclasses.replace(config, layer_wbits=allocation.rules())
    qmodel = quant.quantize_model(fp, config, example_input(loaded).to(args.device))
    _report_placement(qmodel)
    quant.calibrate(qmodel, images, device=args.device)
    records = []
    if ada is not None:
        records = quant.reconstruct(qmodel, fp, images, ada, device=args.device)
        line, warning = quant.reconstruction_summary(records)
        print(line)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    corrections, error = _bias_correction(args, qmodel, fp, images, keep=ada is not None)
    quant.save_quantized(qmodel, args.out, args.model, loaded.identity,
                         {"calibration": described, "calibration_images": int(images.shape[0]),
                          "calibration_source": {"calib": os.path.abspath(args.calib) if args.calib else None,
                                                 "real": _recorded_real(args.real),
                                                 "num_samples": args.num_samples},
                          "bias_correction": corrections,
                          "bias_correction_failed": (str(error) or type(error).__name__) if error else None,
                          "adaround": dataclasses.asdict(ada) if ada else None,
                          "reconstruct": ada.unit if ada else None, "adaround_layers": records,
                          "bit_allocation": allocation.summary() if allocation else None})
    print(f"{args.out}: {config.label()} {args.model}, calibrated on {images.shape[0]} images ({described})"
          + (f", {_reconstruction_label(ada)}" if ada else ""))
    if isinstance(error, KeyboardInterrupt):
        raise error
    if error:
        raise QuantizationError(f"bias correction failed ({error}); the reconstructed model was saved without it "
                                f"to {args.out}")
    return 0


def _report_placement(qmodel) -> None:
    """What the deployment placement could not give an integer form, said before the long work starts."""
    done = getattr(qmodel, "dsg_deploy", None)
    if not done:
        return
    if done["untraced"]:
        print(f"warning: deploy placement: {len(done['untraced'])} modules do not trace with torch.fx and keep "
              f"their forward (their internal tensors get no quantizer): {'; '.join(done['untraced'][:4])}",
              file=sys.stderr)
    if done["own_input"]:
        print(f"warning: deploy placement: {len(done['own_input'])} layers take an input no integer op produces "
              f"and get their own input quantizer (the op before them stays float in the file): "
              f"{', '.join(done['own_input'][:8])}", file=sys.stderr)


def _allocation_args(args):
    """(budget, choices, images) of --wbits-budget, checked before any work; None without it."""
    from ..quantization.algorithms.mixed_precision import DEFAULT_CHOICES, DEFAULT_SENSITIVITY_IMAGES, check_budget

    if args.wbits_budget is None:
        if args.bit_choices is not None or args.sensitivity_images is not None:
            raise ConfigError("--bit-choices and --sensitivity-images need --wbits-budget")
        return None
    choices = args.bit_choices or list(DEFAULT_CHOICES)
    check_budget(args.wbits_budget, choices)
    return args.wbits_budget, choices, args.sensitivity_images or DEFAULT_SENSITIVITY_IMAGES


def _allocate(fp, images, config, example, device, budget, choices, count):
    import time

    from ..quantization.algorithms.mixed_precision import allocate_bits

    start = time.perf_counter()
    allocation = allocate_bits(fp, images[:count], config, budget, choices, example=example, device=device)
    measured = len(allocation.params) - len(allocation.fixed)
    print(f"bit allocation: {allocation.average_bits:.3f} average weight bits (budget {budget:g}); layers per "
          f"width {', '.join(f'{b}: {n}' for b, n in allocation.histogram().items())}; sensitivity of {measured} "
          f"layers x {len(choices)} widths on {min(count, images.shape[0])} calibration images, "
          f"{time.perf_counter() - start:.0f} s")
    uniform = [f"uniform {b} bits {allocation.uniform_predicted(b):.4g}" for b in choices
               if abs(b - budget) <= 1.0]
    print(f"  summed single-layer KL: this allocation {allocation.predicted:.4g}"
          + (f"; {'; '.join(uniform)}" if uniform else ""))
    return allocation


def _bias_correction(args, qmodel, fp, images, keep: bool):
    """``--bias-correction``: (records, None), or -- when ``keep`` (a reconstruction finished before it) and
    the correction fails or is interrupted -- (None, the error), the model left uncorrected so that the
    finished reconstruction is still saved."""
    import torch

    from .. import quantization as quant

    if not args.bias_correction:
        return None, None
    try:
        corrections = quant.correct_bias(qmodel, fp, images, device=args.device)
    except (DsgError, torch.OutOfMemoryError, KeyboardInterrupt) as e:
        if not keep:
            raise
        return None, e
    print(f"bias correction: {len(corrections)} layers, mean shift "
          f"{sum(r['relative'] for r in corrections) / len(corrections):.1%} of the float output means")
    return corrections, None


def _reconstruction_label(ada) -> str:
    learned = f"AdaRound {ada.iterations} iterations per {ada.unit}" if ada.iterations else ""
    if ada.start != "gptq":
        return learned
    return "GPTQ rounding" + (f", then {learned} from it" if learned else "")


def _recorded_real(real):
    """A --real source as the quantized file records it: a name as given, a directory as an absolute path."""
    from ..data.calibration import NAMED_REAL_SOURCES

    if real is None or real in NAMED_REAL_SOURCES:
        return real
    return os.path.abspath(real)
