"""The ``dsg`` command.

Options that set a config field take their default from the dataclass (``SynthesisConfig``,
``QuantConfig``, ``AdaRoundConfig``, ``DemoConfig``) and their choices from the module constants:
nothing is restated here, so the command and the Python API cannot drift apart. Any ``DsgError``
is reported as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from typing import Any, Dict, List, Optional

from .cli_options import (
    _device,
    _Formatter,
    _option,
    _positive_int,
    config_from_args,
    preset_in,
    recipe_in,
)
from .cli_parsers import TRUST_HELP, add_generate_parser, add_model_options, add_quantize_parser
from .errors import DsgError, QuantizationError

# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    import dsg_ext

    print(f"dsg_ext {dsg_ext.__version__}")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}), Python {platform.python_version()}")
    print(f"CPU ops: yes; CUDA ops built: {'yes' if dsg_ext.cuda_ops_built() else 'no'}; "
          f"GPU available: {'yes' if torch.cuda.is_available() else 'no'}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .synthesis import SynthesisConfig, generate

    base = SynthesisConfig.from_recipe(args.recipe) if args.recipe else SynthesisConfig()
    config = config_from_args(args, SynthesisConfig, base, image_size=args.model_image_size or base.image_size)
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


def _example(loaded):
    import torch

    spec = loaded.input
    return torch.zeros(1, spec.channels, spec.image_size, spec.image_size)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from . import quantization as quant
    from ._io import check_output_file
    from .data.calibration import calibration_images
    from .models import load_model
    from .models.spec import probe_model
    from .quantization.engine import resolve_engine

    check_output_file(args.out, "--out", force=args.force)
    config = config_from_args(args, quant.QuantConfig).validate()
    ada = None
    if args.adaround or args.reconstruction:
        base = quant.AdaRoundConfig.from_preset(args.reconstruction) if args.reconstruction else None
        ada = config_from_args(args, quant.AdaRoundConfig, base).validate()
        resolve_engine(ada.engine, args.device)  # a CUDA graph asked for off CUDA: refused before any work
    loaded = load_model(args.model, weights=args.weights, image_size=args.image_size,
                        trust_model_code=args.trust_model_code)
    images, described = calibration_images(loaded, args.calib, args.real, args.num_samples)
    fp = loaded.model.to(args.device)
    probe_model(fp, _example(loaded).to(args.device), args.model)
    qmodel = quant.quantize_model(fp, config, _example(loaded).to(args.device))
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
                          "bias_correction": corrections,
                          "bias_correction_failed": (str(error) or type(error).__name__) if error else None,
                          "adaround": dataclasses.asdict(ada) if ada else None,
                          "reconstruct": ada.unit if ada else None, "adaround_layers": records})
    print(f"{args.out}: {config.label()} {args.model}, calibrated on {images.shape[0]} images ({described})"
          + (f", AdaRound {ada.iterations} iterations per {ada.unit}" if ada else ""))
    if isinstance(error, KeyboardInterrupt):
        raise error
    if error:
        raise QuantizationError(f"bias correction failed ({error}); the reconstructed model was saved without it "
                                f"to {args.out}")
    return 0


def _bias_correction(args, qmodel, fp, images, keep: bool):
    """``--bias-correction``: (records, None), or -- when ``keep`` (a reconstruction finished before it) and
    the correction fails or is interrupted -- (None, the error), the model left uncorrected so that the
    finished reconstruction is still saved."""
    import torch

    from . import quantization as quant

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


def _cmd_eval(args: argparse.Namespace) -> int:
    from ._io import atomic_write_json, check_output_file
    from .evaluation import evaluate
    from .models import load_model
    from .models.spec import probe_model
    from .quantization import load_quantized

    if args.json:
        check_output_file(args.json, "--json")
    loaded = load_model(args.model, weights=args.weights, image_size=args.image_size,
                        trust_model_code=args.trust_model_code)
    fp = loaded.model
    probe_model(fp, _example(loaded), args.model)
    model, fp_ref = fp, None
    if args.quantized:
        model = load_quantized(fp, args.quantized, loaded.identity, _example(loaded))
        fp_ref = fp
    result = evaluate(model, loaded, args.data, args.max_images, fp_model=fp_ref)
    what = f"{args.model}" + (f" quantized ({args.quantized})" if args.quantized else " FP32")
    parts = [f"{result['images']} images"]
    if "top1" in result:
        parts.append(f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%")
    if "top1_agreement" in result:
        parts.append(f"agreement with FP32 {result['top1_agreement']:.2f}%, mean KL {result['mean_kl']:.4g}")
    print(f"{what} on {args.data}: " + "; ".join(parts))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from ._io import check_output_file
    from .export import export_onnx
    from .models import load_model
    from .models.spec import probe_model
    from .quantization import load_quantized

    check_output_file(args.out, "--out", force=args.force)
    loaded = load_model(args.model, weights=args.weights, image_size=args.image_size,
                        trust_model_code=args.trust_model_code)
    example = _example(loaded).expand(2, -1, -1, -1).contiguous()
    probe_model(loaded.model, example, args.model)
    qmodel = load_quantized(loaded.model, args.quantized, loaded.identity, _example(loaded))
    record = export_onnx(qmodel, example, args.out, opset=args.opset)
    nodes = record["nodes"]
    check = record.get("max_abs_diff_vs_ours")
    print(f"{args.out}: ONNX opset {record['opset']}, input {record['input']!r} (dynamic batch), "
          f"{nodes.get('QuantizeLinear', 0)} QuantizeLinear / {nodes.get('DequantizeLinear', 0)} DequantizeLinear, "
          f"{record['bytes'] / 1e6:.2f} MB"
          + (f"; onnxruntime vs dsg_ext max |logit diff| {check:.3g}" if check is not None else ""))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ._io import check_output_file
    from .report import write_report

    check_output_file(args.out, "--out", force=args.force)
    write_report(args.dirs, args.out, args.quantized or (), demo=args.demo, weights=args.weights,
                 trust_model_code=args.trust_model_code)
    print(f"wrote {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    run_demo(config_from_args(args, DemoConfig), progress=not args.quiet)
    return 0


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------


def _add_generate(sub, recipe: Optional[str] = None) -> None:
    add_generate_parser(sub, _cmd_generate, recipe)


def _add_quantize(sub, reconstruction: Optional[str] = None) -> None:
    add_quantize_parser(sub, _cmd_quantize, reconstruction)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", formatter_class=_Formatter,
                       help="accuracy (and fidelity to FP32) of a model or a quantized model")
    add_model_options(p)
    p.add_argument("--quantized", metavar="FILE", help="a file written by dsg quantize for this model")
    p.add_argument("--data", required=True, help="'fashion-mnist' (test split), 'skimage-photos', an image directory "
                   "(ImageFolder layout for accuracy; any images for fidelity) or a `dsg generate` directory made "
                   "for this model (fidelity on synthetic images)")
    p.add_argument("--max-images", type=_positive_int, default=None, help="evaluate only this many images")
    p.add_argument("--image-size", type=int, default=None, help="the model's input size (default: the source's own)")
    p.add_argument("--json", metavar="FILE")
    p.set_defaults(func=_cmd_eval)


def _add_export(sub) -> None:
    from .export.qdq import DEFAULT_OPSET

    p = sub.add_parser("export", formatter_class=_Formatter,
                       help="write a quantized model as standard ONNX with QuantizeLinear/DequantizeLinear")
    add_model_options(p, "the model source the quantized file was made from")
    p.add_argument("--quantized", required=True, metavar="FILE", help="a file written by dsg quantize for this model")
    p.add_argument("--image-size", type=int, default=None, help="the model's input size (default: the source's own)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (>= 13)")
    p.add_argument("--out", required=True, help="the .onnx file")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_export)


def _add_report(sub) -> None:
    p = sub.add_parser("report", formatter_class=_Formatter,
                       help="one HTML page: samples, BN alignment, homogenisation, quantization results")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="`dsg generate` directories (several are compared)")
    p.add_argument("--quantized", nargs="*", metavar="FILE", help="quantized files: fidelity to FP32 on the samples")
    p.add_argument("--demo", metavar="FILE", help="a `dsg demo` result (demo.json): accuracy bars")
    p.add_argument("--weights", help="state-dict file of the model the data were made from, when it needs one")
    p.add_argument("--trust-model-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--out", required=True, help="the .html file")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_report)


def _add_demo(sub) -> None:
    from .demo import DemoConfig as D
    from .demo import format_bits, parse_bits
    from .quantization.config import RECONSTRUCTION_PRESETS
    from .quantization.observers import OBSERVERS

    p = sub.add_parser("demo", formatter_class=_Formatter,
                       help="end to end on the shipped Fashion-MNIST network (CPU, about 10 minutes)")
    _option(p, "--out", D, "out", "directory for the synthetic data, demo.json and demo.png")
    _option(p, "--samples", D, "samples", "calibration images per source", type=_positive_int)
    _option(p, "--synth-iters", D, "synth_iterations", "synthesis iterations (the papers: 500)")
    _option(p, "--adaround-iters", D, "adaround_iterations", "reconstruction iterations per layer or block "
            "(the papers: 10000-20000)")
    _option(p, "--reconstruction", D, "reconstruction", "named reconstruction", choices=sorted(RECONSTRUCTION_PRESETS))
    _option(p, "--eval-samples", D, "eval_samples", "test images evaluated (10000 = all)", type=_positive_int)
    _option(p, "--bits", D, "bits", "bit settings", type=parse_bits, shown_default=format_bits(D().bits))
    _option(p, "--observer", D, "observer", "activation ranges (min/max shows the calibration data's influence most)",
            choices=tuple(OBSERVERS))
    _option(p, "--reconstruct-max-wbits", D, "reconstruct_max_wbits", "reconstruct only bit settings with at most "
            "this many weight bits (8 = all)")
    _option(p, "--device", D, "device", "where to run", type=_device)
    _option(p, "--bias-correction", D, "bias_correction", "also correct the biases (empirical bias correction) after "
            "calibration and after reconstruction")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def build_parser(recipe: Optional[str] = None, reconstruction: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``dsg`` parser; ``recipe`` / ``reconstruction``: the named presets whose values the options of
    ``generate`` / ``quantize`` default to."""
    parser = argparse.ArgumentParser(prog="dsg", description="Data-free quantization with Diverse Sample Generation")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions and which backends this build has")
    p.set_defaults(func=_cmd_info)
    _add_generate(sub, recipe)
    _add_quantize(sub, reconstruction)
    _add_eval(sub)
    _add_export(sub)
    _add_report(sub)
    _add_demo(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(recipe_in(words), preset_in(words, "quantize", "--reconstruction")).parse_args(argv)
    try:
        return args.func(args)
    except DsgError as e:  # every user-fixable problem: one line, exit code 2; other exceptions are our bugs
        print(f"dsg {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsg {args.command}: interrupted (finished work is kept; re-running resumes `dsg generate`)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
