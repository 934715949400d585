"""The ``dsg`` command."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import List, Optional


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import dsg_ext

    print(f"dsg_ext {dsg_ext.__version__}")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}), Python {platform.python_version()}")
    print(f"CPU ops: yes; CUDA ops built: {'yes' if dsg_ext.cuda_ops_built() else 'no'}; "
          f"GPU available: {'yes' if torch.cuda.is_available() else 'no'}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from . import benchmarks

    if args.device == "cuda" and not torch.cuda.is_available():
        print("dsg bench: --device cuda but no GPU is available", file=sys.stderr)
        return 2
    size = args.size or ("gpu" if args.device == "cuda" else "cpu")
    workloads = benchmarks.make_workloads(args.device, size, compile_plain=not args.no_compile)
    workloads += benchmarks.synthesis_workloads(args.device, size)
    workloads += benchmarks.adaround_layer_workloads(args.device, size)
    timer = benchmarks.time_cuda if args.device == "cuda" else benchmarks.time_cpu
    bandwidth = benchmarks.copy_bandwidth(args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"device: {args.device} ({device_name}), threads: {torch.get_num_threads()}, "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    header = f"{'workload':42s} {'shape':20s} {'impl':15s} {'median ms':>10s} {'vs dsg_ext':>10s} {'x floor':>8s}"
    print(header)
    print("-" * len(header))
    rows = []
    for wl in workloads:
        floor = wl.bytes_moved / bandwidth
        times = {name: timer(fn) for name, fn in wl.impls.items()}
        for name, t in times.items():
            to_floor = t / floor if floor else None
            rows.append({"workload": wl.name, "shape": wl.description, "impl": name, "median_s": t,
                         "ratio_to_dsg_ext": t / times["dsg_ext"], "ratio_to_floor": to_floor})
            print(f"{wl.name:42s} {wl.description:20s} {name:15s} {t * 1e3:10.3f} "
                  f"{t / times['dsg_ext']:9.2f}x " + (f"{to_floor:7.2f}x" if to_floor else "      -"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "device_name": device_name, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "copy_bandwidth_Bps": bandwidth, "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .dataset import DatasetError
    from .generate import generate
    from .models import ModelSourceError
    from .synthesis import NoBatchNormError, NonFiniteLossError, SynthesisConfig

    try:
        config = SynthesisConfig(
            method=args.method, iterations=args.iterations, lr=args.lr, batch_size=args.batch_size,
            image_size=args.image_size or 224, epsilon=args.epsilon, enhancement=args.enhancement, init=args.init,
            seed=args.seed, tv_weight=args.tv, l2_weight=args.l2, jitter=args.jitter, ce_weight=args.ce,
            layer_weighting=args.layer_weighting, clamp_pixels=args.clamp_pixels,
            channels_last=args.channels_last, autocast_bf16=args.bf16, cuda_graph=args.cuda_graph,
        ).validate()
        manifest = generate(args.model, args.out, config, args.num_samples, device=args.device, weights=args.weights,
                            preview=args.preview, image_size=args.image_size, compare_zeroq=args.compare_zeroq)
    except (ValueError, DatasetError, ModelSourceError, NoBatchNormError, NonFiniteLossError) as e:
        print(f"dsg generate: {e}", file=sys.stderr)
        return 2
    if manifest:
        s = manifest.get("summary", {})
        print(f"{args.out}: {sum(r['num_samples'] for r in manifest['shards'])} samples in {len(manifest['shards'])} shards"
              + (f"; mean per-layer loss {s['layer_loss_initial_mean']:.4g} -> {s['layer_loss_final_mean']:.4g}" if s else ""))
        if s:
            worst = sorted(s["per_layer"], key=lambda r: -r["final"])[:5]
            print(f"  {'BN layer (worst 5 at the end)':36s} {'start':>10s} {'end':>10s} {'sample spread':>14s}")
            for r in worst:
                print(f"  {r['layer']:36s} {r['initial']:10.4g} {r['final']:10.4g} {r['sample_spread']:14.4g}")
            cmp = s.get("zeroq_comparison")
            if cmp:
                ours = next(v for k, v in cmp.items() if k.endswith("_mean_sample_spread") and not k.startswith("zeroq"))
                print(f"  sample spread over BN layers (batch 0): {args.method} {ours:.4g} vs ZeroQ "
                      f"{cmp['zeroq_mean_sample_spread']:.4g} (higher = more diverse samples)")
    return 0


def _quant_errors():
    from .dataset import DatasetError
    from .fashion_mnist import DataError
    from .models import ModelSourceError
    from .pipeline import DataSourceError
    from .quantize import QuantConfigError, QuantizedFileError

    return (ValueError, DatasetError, DataError, ModelSourceError, DataSourceError, QuantConfigError, QuantizedFileError)


def _example(loaded):
    import torch

    spec = loaded.input
    return torch.zeros(1, spec.channels, spec.image_size, spec.image_size)


def _cmd_quantize(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from . import pipeline, quantize
    from .models import load_model

    try:
        if os.path.exists(args.out) and not args.force:
            raise ValueError(f"{args.out} exists; use --force to replace it (it is replaced only once the new file is complete)")
        config = quantize.QuantConfig(
            wbits=args.wbits, abits=None if args.abits == 32 else args.abits, w_per_channel=not args.per_tensor,
            w_symmetric=not args.asymmetric_weights, act_placement=args.placement,
            first_last_bits=None if args.first_last_bits == 0 else args.first_last_bits, observer=args.observer,
            weight_observer=args.weight_observer, fold_bn=args.fold_bn).validate()
        loaded = load_model(args.model, weights=args.weights, image_size=args.image_size)
        images, described = pipeline.calibration_images(loaded, args.calib, args.real, args.num_samples)
        fp = loaded.model.to(args.device)
        qmodel = quantize.quantize_model(fp, config, _example(loaded).to(args.device))
        quantize.calibrate(qmodel, images, device=args.device)
        records = []
        ada = None
        if args.adaround:
            ada = quantize.AdaRoundConfig(iterations=args.adaround_iters, batch_size=args.adaround_batch, lr=args.adaround_lr)
            blocks = quantize.find_blocks(qmodel) if args.reconstruct == "block" else None
            records = quantize.adaround(qmodel, fp, images, ada, device=args.device, blocks=blocks)
            line, warning = quantize.adaround_summary(records)
            print(line)
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
        quantize.save_quantized(qmodel, args.out, args.model, loaded.identity,
                                {"calibration": described, "calibration_images": int(images.shape[0]),
                                 "adaround": dataclasses.asdict(ada) if args.adaround else None,
                                 "reconstruct": args.reconstruct if args.adaround else None,
                                 "adaround_layers": records})
    except _quant_errors() as e:
        print(f"dsg quantize: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {config.label()} {args.model}, calibrated on {images.shape[0]} images ({described})"
          + (f", AdaRound {args.adaround_iters} iterations per layer" if args.adaround else ""))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import pipeline, quantize
    from .models import load_model

    try:
        loaded = load_model(args.model, weights=args.weights, image_size=args.image_size)
        fp = loaded.model
        model, fp_ref = fp, None
        if args.quantized:
            model = quantize.load_quantized(fp, args.quantized, loaded.identity, _example(loaded))
            fp_ref = fp
        result = pipeline.evaluate(model, loaded, args.data, args.max_images, fp_model=fp_ref)
    except _quant_errors() as e:
        print(f"dsg eval: {e}", file=sys.stderr)
        return 2
    what = f"{args.model}" + (f" quantized ({args.quantized})" if args.quantized else " FP32")
    parts = [f"{result['images']} images"]
    if "top1" in result:
        parts.append(f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%")
    if "top1_agreement" in result:
        parts.append(f"agreement with FP32 {result['top1_agreement']:.2f}%, mean KL {result['mean_kl']:.4g}")
    print(f"{what} on {args.data}: " + "; ".join(parts))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    bits = [tuple(int(v) for v in b.upper().lstrip("W").split("A")) for b in args.bits.split(",")]
    cfg = DemoConfig(out=args.out, samples=args.samples, synth_iterations=args.synth_iters,
                     adaround_iterations=args.adaround_iters, eval_samples=args.eval_samples, bits=bits,
                     device=args.device, observer=args.observer)
    try:
        run_demo(cfg, progress=not args.quiet)
    except _quant_errors() as e:
        print(f"dsg demo: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsg", description="Data-free quantization with Diverse Sample Generation")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions and which backends this build has")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("bench", help="time the fused ops against plain PyTorch (and torch.compile of it)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", choices=("cpu", "gpu", "tiny"), default=None,
                   help="problem sizes: 'gpu' = the issue's H100 goal shapes (default on cuda), 'cpu' = smaller")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines (faster)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("generate", help="synthesise calibration images from a model's BatchNorm statistics")
    p.add_argument("--model", required=True, help="torchvision:NAME, timm:NAME, efficientnet-lite0, module:function or a TorchScript file")
    p.add_argument("--weights", help="state-dict file for torchvision:/timm:/module: sources")
    p.add_argument("--method", choices=("dsg", "zeroq"), default="dsg")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--epsilon", type=float, default=0.9, help="slack quantile, in (0, 1] (dsg)")
    p.add_argument("--enhancement", type=float, default=2.0, help="weight of each sample's own layer (dsg)")
    p.add_argument("--init", choices=("gaussian", "uniform"), default="gaussian")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's (224 for ImageNet models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tv", type=float, default=0.0, help="total-variation prior weight (off by default)")
    p.add_argument("--l2", type=float, default=0.0, help="l2 prior weight (off by default)")
    p.add_argument("--jitter", type=int, default=0, help="random shift in pixels (off by default)")
    p.add_argument("--ce", type=float, default=0.0,
                   help="weight of a random-label cross-entropy prior (each sample towards a random class; off by default)")
    p.add_argument("--layer-weighting", choices=("equal", "initial"), default="equal",
                   help="'initial' divides each BN layer's loss by its value on the initial batch (not in the paper)")
    p.add_argument("--clamp-pixels", action="store_true",
                   help="keep images inside the model's valid input range (not in the paper)")
    p.add_argument("--channels-last", action="store_true", help="run the network in channels_last (GPU speed)")
    p.add_argument("--bf16", action="store_true", help="run the network under bf16 autocast; statistics stay fp32")
    p.add_argument("--cuda-graph", action="store_true",
                   help="capture one whole iteration in a CUDA graph and replay it (GPU; removes launch overhead)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="dataset directory (re-running the same command resumes it)")
    p.add_argument("--preview", help="also write a PNG grid of the samples")
    p.add_argument("--compare-zeroq", action="store_true",
                   help="also synthesise batch 0 with ZeroQ and report both methods' sample spread")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("quantize", help="fake-quantize a model, calibrated on synthetic or real images")
    p.add_argument("--model", required=True, help="model source, as for generate")
    p.add_argument("--weights", help="state-dict file for torchvision:/timm:/module: sources")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--calib", metavar="DIR", help="a dataset directory written by dsg generate for this model")
    src.add_argument("--real", metavar="DIR", help="a directory of real images, 'fashion-mnist' (training split) or 'noise'")
    p.add_argument("--num-samples", type=int, default=256, help="calibration images used")
    p.add_argument("--image-size", type=int, default=None, help="the model's input size (default: the source's own)")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--abits", type=int, default=4, help="32 = activations stay float")
    p.add_argument("--first-last-bits", type=int, default=8, help="bits of the first and last layer (0 = same as the rest)")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per layer instead of per output channel")
    p.add_argument("--asymmetric-weights", action="store_true")
    p.add_argument("--placement", choices=("input", "relu"), default="input",
                   help="activation quantizers at every layer input, or after each ReLU (ZeroQ)")
    p.add_argument("--observer", choices=("minmax", "ema", "percentile", "mse"), default="mse")
    p.add_argument("--weight-observer", choices=("minmax", "mse"), default="minmax")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into the preceding convolution first")
    p.add_argument("--adaround", action="store_true", help="AdaRound every layer (Nagel et al. 2020)")
    p.add_argument("--adaround-iters", type=int, default=10000, help="iterations per layer")
    p.add_argument("--adaround-batch", type=int, default=32)
    p.add_argument("--adaround-lr", type=float, default=1e-3,
                   help="Adam learning rate of the rounding variables (the paper's 1e-3 assumes ~10k iterations; "
                        "shorter schedules leave most variables undecided unless it is raised)")
    p.add_argument("--reconstruct", choices=("layer", "block"), default="layer",
                   help="AdaRound target: each layer's output (AdaRound) or each residual block's output, its "
                        "layers rounded jointly (BRECQ); layers outside blocks stay layer-wise")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="quantized model file (.safetensors)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("eval", help="accuracy (and fidelity to FP32) of a model or a quantized model")
    p.add_argument("--model", required=True)
    p.add_argument("--weights")
    p.add_argument("--quantized", metavar="FILE", help="a file written by dsg quantize for this model")
    p.add_argument("--data", required=True, help="'fashion-mnist' (test split), 'skimage-photos', an image directory "
                   "(ImageFolder layout for accuracy; any images for fidelity) or a `dsg generate` directory made "
                   "for this model (fidelity on synthetic images)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="the model's input size (default: the source's own)")
    p.add_argument("--json", metavar="FILE")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="end to end on the shipped Fashion-MNIST network (CPU, about 10 minutes)")
    p.add_argument("--out", default="dsg_demo", help="directory for the synthetic data, demo.json and demo.png")
    p.add_argument("--samples", type=int, default=256, help="calibration images per source")
    p.add_argument("--synth-iters", type=int, default=150, help="synthesis iterations (the papers: 500)")
    p.add_argument("--adaround-iters", type=int, default=80, help="AdaRound iterations per layer (the paper: 10000)")
    p.add_argument("--eval-samples", type=int, default=2000, help="test images evaluated (10000 = all)")
    p.add_argument("--bits", default="W8A8,W6A6,W4A8,W4A4")
    p.add_argument("--observer", choices=("minmax", "ema", "percentile", "mse"), default="minmax",
                   help="activation ranges (min/max shows the calibration data's influence most)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
