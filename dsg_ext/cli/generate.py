"""``dsg generate``: synthesise calibration images from a model's BatchNorm statistics into a
resumable dataset directory."""

from __future__ import annotations

import argparse
from typing import Any, Dict

from .options import DEFAULT_DEVICE, _device, _Formatter, _option, _positive_int, add_model_options, config_from_args


def add_parser(sub) -> None:
    from ..synthesis.config import AUGMENT_RNGS, CE_LABELS, INITS, LAYER_WEIGHTINGS, METHODS, RECIPES
    from ..synthesis.config import SynthesisConfig as S
    from ..synthesis.writer import DEFAULT_NUM_SAMPLES

    p = sub.add_parser("generate", formatter_class=_Formatter,
                       help="synthesise calibration images from a model's BatchNorm statistics")
    add_model_options(p, "torchvision:NAME, timm:NAME, efficientnet-lite0, fashion-mnist-resnet20, module:function, "
                          "a torch.export .pt2 or a TorchScript file")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="a named preset that sets the options below (the defaults shown are SynthesisConfig's; "
                        "given options override the preset's); 'recommended' is the one docs/synthesis.md chose")
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
    _option(p, "--augment-rng", S, "augment_rng", "where the augmentation's random draws live: 'device' (a table "
            "per batch read on the device: no host sync, CUDA-graph capturable) or 'host' (the earlier per-step "
            "draws, to resume datasets written before the table)", choices=AUGMENT_RNGS)
    _option(p, "--generator", S, "generator", "Genie's generator: render each batch from a fresh small generator and "
            "per-sample latents, both optimised (--lr then acts on the latent)", toggle=True)
    _option(p, "--generator-lr", S, "generator_lr", "Adam learning rate of the generator (x0.95 every 100 iterations)")
    _option(p, "--latent-dim", S, "latent_dim", "latent size of the generator")
    _option(p, "--channels-last", S, "channels_last", "run the network in channels_last (faster on CPUs and GPUs; "
            "the recommended recipe sets it)", toggle=True)
    _option(p, "--bf16", S, "autocast_bf16", "run the network under bf16 autocast; statistics stay fp32")
    _option(p, "--cuda-graph", S, "cuda_graph",
            "capture one whole iteration in a CUDA graph and replay it (GPU; removes launch overhead)")
    p.add_argument("--device", type=_device, default=DEFAULT_DEVICE)
    p.add_argument("--out", required=True, help="dataset directory (re-running the same command resumes it)")
    p.add_argument("--preview", help="also write a PNG grid of the samples")
    p.add_argument("--compare-zeroq", action="store_true",
                   help="also synthesise batch 0 with ZeroQ and report both methods' sample spread")
    p.set_defaults(func=run)


def synthesis_config(args: argparse.Namespace):
    """The SynthesisConfig a parsed ``dsg generate`` line describes: defaults, then its ``--recipe``,
    then the options given."""
    from ..synthesis import SynthesisConfig

    base = SynthesisConfig.from_recipe(args.recipe) if args.recipe else SynthesisConfig()
    return config_from_args(args, SynthesisConfig, base, image_size=args.model_image_size or base.image_size)


def run(args: argparse.Namespace) -> int:
    from ..synthesis import generate

    config = synthesis_config(args)
    manifest = generate(args.model, args.out, config.validate(), args.num_samples, device=args.device,
                        weights=args.weights, preview=args.preview, image_size=args.model_image_size,
                        compare_zeroq=args.compare_zeroq, trust_model_code=args.trust_model_code)
    if manifest:
        _print_generation_summary(args, manifest)
    return 0


def _print_generation_summary(args: argparse.Namespace, manifest: Dict[str, Any]) -> None:
    s = manifest.get("summary", {})
    count = sum(r["num_samples"] for r in manifest["shards"])
    print(f"{args.out}: {count} samples in {len(manifest['shards'])} shards"
          + (f"; mean per-layer loss {s['layer_loss_initial_mean']:.4g} -> {s['layer_loss_final_mean']:.4g}"
             if s else ""))
    if not s:
        return
    d = s.get("diversity")
    if d:
        classes = f"{d['classes_predicted']} of {d['num_classes']}" if d.get("num_classes") else "n/a"
        print(f"  diversity on {d['images_measured']} samples: relative spread {d['relative_sample_spread_mean']:.3g}, "
              f"classes predicted {classes}, pixels {d['pixel_min']:.2f}..{d['pixel_max']:.2f} "
              f"({100 * d['pixels_outside_valid_range']:.1f}% outside the valid 0..1)")
    worst = sorted(s["per_layer"], key=lambda r: -r["final"])[:5]
    print(f"  {'BN layer (worst 5 at the end)':36s} {'start':>10s} {'end':>10s} {'sample spread':>14s}")
    for r in worst:
        print(f"  {r['layer']:36s} {r['initial']:10.4g} {r['final']:10.4g} {r['sample_spread']:14.4g}")
    cmp = s.get("zeroq_comparison")
    if cmp:
        ours = next(v for k, v in cmp.items() if k.endswith("_mean_sample_spread") and not k.startswith("zeroq"))
        print(f"  sample spread over BN layers (batch 0): {manifest['method']} {ours:.4g} vs ZeroQ "
              f"{cmp['zeroq_mean_sample_spread']:.4g} (higher = more diverse samples)")
