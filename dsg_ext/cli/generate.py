"""The option sets of ``dsg generate`` and ``dsg quantize`` (the two commands whose options are
whole config classes, with named presets), and the model options every model-loading command
shares. Handlers live in ``cli``."""

from __future__ import annotations

from typing import Callable, Optional

from .cli_options import DEFAULT_DEVICE, _device, _Formatter, _option, _optional_bits, _positive_int
from .cli_options import _option as _config_option

TRUST_HELP = ("allow a TorchScript model file, whose loading runs the code it holds (.pt2 files are checked "
               "and need no trust)")


def add_model_options(p, model_help: str = "model source, as for generate") -> None:
    """--model, --weights and --trust-model-code: where the network comes from (every command that loads one)."""
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--weights", help="state-dict file for torchvision:/timm:/module: sources")
    p.add_argument("--trust-model-code", action="store_true", help=TRUST_HELP)


def add_generate_parser(sub, handler: Callable, recipe: Optional[str] = None) -> None:
    """``dsg generate``'s options; ``recipe``: the named recipe whose values they default to."""
    from .synthesis.config import CE_LABELS, INITS, LAYER_WEIGHTINGS, METHODS, RECIPES
    from .synthesis.config import SynthesisConfig as S
    from .synthesis.writer import DEFAULT_NUM_SAMPLES

    base = S.from_recipe(recipe) if recipe in RECIPES else S()

    def _option(p, flag, cls, field, help, **kw):  # defaults: the named recipe's values
        _config_option(p, flag, cls, field, help, defaults=base, **kw)

    p = sub.add_parser("generate", formatter_class=_Formatter,
                       help="synthesise calibration images from a model's BatchNorm statistics")
    add_model_options(p, "torchvision:NAME, timm:NAME, efficientnet-lite0, fashion-mnist-resnet20, module:function, "
                          "a torch.export .pt2 or a TorchScript file")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="a named preset that sets the options below (given options override it); "
                        "'recommended' is the README's")
    _option(p, "--method", S, "method", "zeroq: ZeroQ; dsg: DSG (slack + layerwise enhancement); batch: batch "
            "statistics (Genie, MCT); batch-dsg: batch statistics + DSG's slack and enhancement", choices=METHODS)
    p.add_argument("--num-samples", type=_positive_int, default=DEFAULT_NUM_SAMPLES, help="images in all")
    _option(p, "--batch-size", S, "batch_size", "images optimised together")
    _option(p, "--iterations", S, "iterations", "optimisation steps per batch")
    _option(p, "--lr", S, "lr", "Adam learning rate on the pixels (on the latent with --generator)")
    _option(p, "--epsilon", S, "epsilon", "slack quantile, in (0, 1] (dsg)")
    _option(p, "--enhancement", S, "enhancement", "weight of each sample's own layer (dsg)")
    _option(p, "--init", S, "init", "starting images", choices=INITS)
    p.add_argument("--image-size", dest="model_image_size", metavar="IMAGE_SIZE", type=int, default=None,
                   help="default: the model's (224 for ImageNet models)")
    _option(p, "--seed", S, "seed", "batch b starts from seed (seed, b)")
    _option(p, "--tv", S, "tv_weight", "total-variation prior weight (0 = off)")
    _option(p, "--l2", S, "l2_weight", "l2 prior weight (0 = off)")
    _option(p, "--jitter", S, "jitter", "random shift in pixels (0 = off)")
    _option(p, "--ce", S, "ce_weight", "weight of a random-label cross-entropy prior (each sample towards a random "
            "class; 0 = off)")
    _option(p, "--layer-weighting", S, "layer_weighting", "'initial' divides each BN layer's loss by its value on the "
            "initial batch (not in the paper)", choices=LAYER_WEIGHTINGS)
    _option(p, "--ce-labels", S, "ce_labels", "targets of the cross-entropy prior: random classes, or balanced "
            "(sample n -> class n mod classes)", choices=CE_LABELS)
    _option(p, "--clamp-pixels", S, "clamp_pixels",
            "keep images inside the model's valid input range (not in the paper)", toggle=True)
    _option(p, "--crop-pad", S, "crop_pad", "augmentation: optimise images this many pixels larger on every side "
            "and show the network a random crop each step (0 = off)")
    _option(p, "--flip", S, "flip", "augmentation: random horizontal flips", toggle=True)
    _option(p, "--smoothing", S, "smoothing", "augmentation: sigma of a 3x3 Gaussian smoothing of what the network "
            "sees and of the result (0 = off)")
    _option(p, "--swing", S, "swing", "swing convolution: a random 1-pixel shift before every strided convolution",
            toggle=True)
    _option(p, "--generator", S, "generator", "Genie's generator: render each batch from a fresh small generator and "
            "per-sample latents, both optimised (--lr then acts on the latent)", toggle=True)
    _option(p, "--generator-lr", S, "generator_lr", "Adam learning rate of the generator (x0.95 every 100 iterations)")
    _option(p, "--latent-dim", S, "latent_dim", "latent size of the generator")
    _option(p, "--channels-last", S, "channels_last", "run the network in channels_last (GPU speed)")
    _option(p, "--bf16", S, "autocast_bf16", "run the network under bf16 autocast; statistics stay fp32")
    _option(p, "--cuda-graph", S, "cuda_graph",
            "capture one whole iteration in a CUDA graph and replay it (GPU; removes launch overhead)")
    p.add_argument("--device", type=_device, default=DEFAULT_DEVICE)
    p.add_argument("--out", required=True, help="dataset directory (re-running the same command resumes it)")
    p.add_argument("--preview", help="also write a PNG grid of the samples")
    p.add_argument("--compare-zeroq", action="store_true",
                   help="also synthesise batch 0 with ZeroQ and report both methods' sample spread")
    p.set_defaults(func=handler)


def add_quantize_parser(sub, handler: Callable, reconstruction: Optional[str] = None) -> None:
    """``dsg quantize``'s options; ``reconstruction``: the named reconstruction whose values they default to."""
    from .data.calibration import DEFAULT_CALIBRATION_IMAGES
    from .quantization.config import PLACEMENTS, RECONSTRUCTION_PRESETS, RECONSTRUCTION_UNITS
    from .quantization.config import AdaRoundConfig as A
    from .quantization.config import QuantConfig as Q
    from .quantization.engine import ENGINES
    from .quantization.observers import OBSERVERS
    from .quantization.qparams import WEIGHT_OBSERVERS

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
    _option(p, "--per-tensor", Q, "w_per_channel", "one weight scale per layer instead of per output channel")
    _option(p, "--asymmetric-weights", Q, "w_symmetric", "asymmetric (unsigned, with a zero point) weight ranges")
    _option(p, "--placement", Q, "act_placement",
            "activation quantizers at every layer input, or after each ReLU (ZeroQ)", choices=PLACEMENTS)
    _option(p, "--observer", Q, "observer", "activation ranges", choices=tuple(OBSERVERS))
    _option(p, "--percentile", Q, "percentile", "percentile of the 'percentile' observer")
    _option(p, "--weight-observer", Q, "weight_observer", "weight ranges per channel", choices=WEIGHT_OBSERVERS)
    _option(p, "--fold-bn", Q, "fold_bn", "fold BatchNorm into the preceding convolution first")
    p.add_argument("--bias-correction", action="store_true",
                   help="last, add to each layer's bias the mean output shift quantization causes on the "
                        "calibration images (empirical bias correction; first 256 images). Measured: helps "
                        "after plain calibration; after a reconstruction it can hurt (README)")
    p.add_argument("--adaround", action="store_true", help="learn the weight rounding (AdaRound, Nagel et al. 2020)")
    p.add_argument("--reconstruction", choices=sorted(RECONSTRUCTION_PRESETS), default=None,
                   help="a named reconstruction (implies --adaround) that sets the options below; given options "
                        "override it. brecq: blocks; qdrop: blocks + QDrop 0.5; genie: Genie's full schedule")
    base = A.from_preset(reconstruction) if reconstruction in RECONSTRUCTION_PRESETS else A()

    def _option_a(p, flag, field, help, **kw):  # defaults: the named reconstruction's values
        _config_option(p, flag, A, field, help, defaults=base, **kw)

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
    _option_a(p, "--recon-engine", "engine", "how the iterations run: graph = one CUDA-graph replay per iteration "
              "(CUDA), device = no host sync per iteration, loop = the plain PyTorch loop; auto = graph on CUDA, "
              "device elsewhere (same schedule and batches whichever runs)", choices=ENGINES)
    p.add_argument("--device", type=_device, default=DEFAULT_DEVICE)
    p.add_argument("--out", required=True, help="quantized model file (.safetensors)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=handler)
