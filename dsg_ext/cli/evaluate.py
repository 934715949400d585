"""``dsg eval``: accuracy of a model or a quantized model on labelled data, and its fidelity to FP32
(top-1 agreement, KL) on any images."""

from __future__ import annotations

import argparse

from .options import _Formatter, _positive_int, add_model_options, example_input


def add_parser(sub) -> None:
    p = sub.add_parser("eval", formatter_class=_Formatter,
                       help="accuracy (and fidelity to FP32) of a model or a quantized model")
    add_model_options(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--quantized", metavar="FILE", help="a file written by dsg quantize for this model")
    which.add_argument("--onnx", metavar="FILE", help="an ONNX file (dsg export's) of this model, run in onnxruntime "
                       "on this CPU with every graph optimisation on (its integer kernels)")
    p.add_argument("--data", required=True, help="'fashion-mnist' (test split), 'skimage-photos', an image directory "
                   "(ImageFolder layout for accuracy; any images for fidelity) or a `dsg generate` directory made "
                   "for this model (fidelity on synthetic images)")
    p.add_argument("--max-images", type=_positive_int, default=None, help="evaluate only this many images")
    p.add_argument("--image-size", type=int, default=None, help="the model's input size (default: the source's own)")
    p.add_argument("--json", metavar="FILE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._utils.io import atomic_write_json, check_output_file
    from ..evaluation import evaluate
    from ..models import load_model
    from ..models.spec import probe_model
    from ..quantization import load_quantized

    if args.json:
        check_output_file(args.json, "--json")
    loaded = load_model(args.model, weights=args.weights, image_size=args.image_size,
                        trust_model_code=args.trust_model_code)
    fp = loaded.model
    probe_model(fp, example_input(loaded), args.model)
    model, fp_ref = fp, None
    if args.quantized:
        model = load_quantized(fp, args.quantized, loaded.identity, example_input(loaded))
        fp_ref = fp
    elif args.onnx:
        from ..errors import ExportError
        from ..export.verify import OnnxModel

        model, fp_ref = OnnxModel(args.onnx), fp
        import torch

        example = example_input(loaded).expand(2, -1, -1, -1).contiguous()
        with torch.no_grad():
            theirs, ours = tuple(model(example).shape), tuple(fp(example).shape)
        if theirs != ours:
            raise ExportError(f"{args.onnx} gives outputs of shape {theirs} where {args.model} gives {ours}: "
                              "a file of another model?")
    result = evaluate(model, loaded, args.data, args.max_images, fp_model=fp_ref)
    what = f"{args.model}" + (f" quantized ({args.quantized})" if args.quantized else
                              f" ONNX ({args.onnx}, onnxruntime)" if args.onnx else " FP32")
    parts = [f"{result['images']} images"]
    if "top1" in result:
        parts.append(f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}%")
    if "top1_agreement" in result:
        parts.append(f"agreement with FP32 {result['top1_agreement']:.2f}%, mean KL {result['mean_kl']:.4g}")
    print(f"{what} on {args.data}: " + "; ".join(parts))
    if args.json:
        atomic_write_json(args.json, result)
    return 0
