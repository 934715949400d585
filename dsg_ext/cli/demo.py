"""`dsg demo`: the whole product on the shipped Fashion-MNIST network (dsg_ext.demo)."""

from __future__ import annotations

import argparse

from ..demo import DemoConfig, format_table, run_demo, write_chart
from ..quantization.config import format_bits, parse_bits
from .options import _device, _Formatter, _option, _positive_int, config_from_args

__all__ = ["add_parser", "run", "DemoConfig", "run_demo", "format_table", "write_chart", "format_bits", "parse_bits"]


def add_parser(sub) -> None:
    from ..quantization.config import OBSERVERS, RECONSTRUCTION_PRESETS

    D = DemoConfig

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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    run_demo(config_from_args(args, DemoConfig), progress=not args.quiet)
    return 0
