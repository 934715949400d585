"""``dsg export``: a quantized file as standard ONNX with QuantizeLinear/DequantizeLinear, checked
against our own model in onnxruntime."""

from __future__ import annotations

import argparse
import os
import sys

from .options import _Formatter, _positive_int, add_model_options, add_output_options, example_input


def add_parser(sub) -> None:
    from ..export.qdq import DEFAULT_OPSET, MIN_OPSET

    p = sub.add_parser("export", formatter_class=_Formatter,
                       help="write a quantized model as standard ONNX with QuantizeLinear/DequantizeLinear")
    add_model_options(p, "the model source the quantized file was made from")
    p.add_argument("--quantized", required=True, metavar="FILE", help="a file written by dsg quantize for this model")
    p.add_argument("--image-size", type=int, default=None, help="the model's input size (default: the source's own)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset ({MIN_OPSET}..the newest the "
                   "installed onnx knows)")
    p.add_argument("--check-data", metavar="DATA", default=None,
                   help="images the file is verified on in onnxruntime, as dsg eval --data takes them (default: the "
                        "quantized file's calibration images, where they can still be read)")
    p.add_argument("--check-images", type=_positive_int, default=256, metavar="N",
                   help="verify on at most this many images")
    p.add_argument("--json", metavar="FILE", help="also write the export record: node counts, onnxruntime's "
                   "optimised graph (integer kernels, the nodes left in float)")
    add_output_options(p, "the .onnx file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._utils.io import atomic_write_json, check_output_file
    from ..export import export_onnx
    from ..export.qdq import INTEGER_OPS_PREFIXES, check_opset
    from ..export.verify import verification_lines
    from ..models import load_model
    from ..models.spec import probe_model
    from ..quantization import load_quantized

    check_output_file(args.out, "--out", force=args.force)
    if args.json:
        check_output_file(args.json, "--json")
    check_opset(args.opset)  # before any work
    loaded = load_model(args.model, weights=args.weights, image_size=args.image_size,
                        trust_model_code=args.trust_model_code)
    example = example_input(loaded).expand(2, -1, -1, -1).contiguous()
    probe_model(loaded.model, example, args.model)
    qmodel = load_quantized(loaded.model, args.quantized, loaded.identity, example_input(loaded))
    images, what = _check_images(args, loaded)
    record = export_onnx(qmodel, example, args.out, opset=args.opset, check_images=images, check_data=what)
    nodes = record["nodes"]
    check = record.get("max_abs_diff_vs_ours")
    print(f"{args.out}: ONNX opset {record['opset']}, input {record['input']!r} (dynamic batch), "
          f"{nodes.get('QuantizeLinear', 0)} QuantizeLinear / {nodes.get('DequantizeLinear', 0)} DequantizeLinear, "
          f"{record['bytes'] / 1e6:.2f} MB"
          + (f"; onnxruntime vs dsg_ext max |logit diff| {check:.3g}" if check is not None else ""))
    runtime = record.get("runtime")
    if runtime:
        kernels = ", ".join(f"{op} {n}" for op, n in runtime["nodes"].items() if op.startswith(INTEGER_OPS_PREFIXES))
        floats = runtime["float_nodes"]
        print(f"onnxruntime (CPU, optimised graph): {runtime['integer_nodes']} integer kernels ({kernels or 'none'}); "
              f"{len(floats)} compute nodes in float" + (f": {', '.join(floats[:8])}" if floats else "")
              + (f" and {len(floats) - 8} more" if len(floats) > 8 else "")
              + ("" if qmodel.dsg_quant_config.get("act_placement") == "deploy" or not floats else
                 " (quantize with --target onnxruntime for a file onnxruntime runs in integer kernels)"))
        if floats and qmodel.dsg_quant_config.get("act_placement") == "deploy":
            import onnxruntime

            print(f"warning: onnxruntime {onnxruntime.__version__} runs {len(floats)} compute nodes of this "
                  f"deployment file in float (an op without an integer form, activations below 8 bits, or an "
                  f"onnxruntime without the fused kernel); the --json record names them", file=sys.stderr)
    if "verify" in record:
        line, warning = verification_lines(record["verify"])
        print(line)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        atomic_write_json(args.json, record)
    return 0


def _check_images(args: argparse.Namespace, loaded):
    """(images, what they are) the file is verified on: --check-data, else the calibration images the
    quantized file records (a `dsg generate` directory or a real source), else the example input."""
    from ..data.calibration import NAMED_REAL_SOURCES, calibration_images, evaluation_images
    from ..errors import DsgError
    from ..quantization import read_quantized

    if args.check_data:
        return evaluation_images(loaded, args.check_data, args.check_images)[0], args.check_data
    source = read_quantized(args.quantized)[1].get("calibration_source")
    source = source if isinstance(source, dict) else {}
    calib, real = source.get("calib"), source.get("real")
    home = os.path.dirname(os.path.realpath(args.quantized))
    inside = lambda path: isinstance(path, str) and os.path.realpath(path).startswith(home + os.sep)  # noqa: E731
    path = calib if calib is not None else (real if real not in NAMED_REAL_SOURCES else None)
    if path is not None and not inside(path):  # a path named in a file we read: followed only inside its directory
        print(f"note: the calibration images ({path}) lie outside the quantized file's directory and are not read; "
              "verifying on the example input only (--check-data DATA for more)", file=sys.stderr)
    elif calib is not None or isinstance(real, str):
        try:
            recorded = source.get("num_samples")
            valid = isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0
            count = min(args.check_images, recorded) if valid else args.check_images
            images, described = calibration_images(loaded, calib, None if calib is not None else real, count)
            return images[:args.check_images], f"calibration images: {described}"
        except DsgError as e:
            print(f"note: the calibration images cannot be read now ({e}); verifying on the example input only "
                  "(--check-data DATA for more)", file=sys.stderr)
    return example_input(loaded), "the example input"
