"""`dsg report`: one HTML page from dataset directories and quantized files (dsg_ext.report)."""

from __future__ import annotations

import argparse

from .._utils.io import check_output_file
from ..report import write_report
from .options import TRUST_HELP, _Formatter, add_output_options

__all__ = ["add_parser", "run", "write_report"]


def add_parser(sub) -> None:
    p = sub.add_parser("report", formatter_class=_Formatter,
                       help="one HTML page: samples, BN alignment, homogenisation, quantization results")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="`dsg generate` directories (several are compared)")
    p.add_argument("--quantized", nargs="*", metavar="FILE", help="quantized files: fidelity to FP32 on the samples")
    p.add_argument("--demo", metavar="FILE", help="a `dsg demo` result (demo.json): accuracy bars")
    p.add_argument("--weights", help="state-dict file of the model the data were made from, when it needs one")
    p.add_argument("--trust-model-code", action="store_true", help=TRUST_HELP)
    add_output_options(p, "the .html file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_file(args.out, "--out", force=args.force)
    write_report(args.dirs, args.out, args.quantized or (), demo=args.demo, weights=args.weights,
                 trust_model_code=args.trust_model_code)
    print(f"wrote {args.out}")
    return 0
