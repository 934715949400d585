"""The ``dsg`` command: one module per subcommand (its parser and its handler together), the shared
option helpers in ``options``.

``main`` parses the command line once: each subcommand's module adds its parser, the parse picks the
handler, and the handler builds its config (defaults -> named preset -> options given; see
``options``). Options that set a config field take their default from the dataclass (``SynthesisConfig``,
``QuantConfig``, ``AdaRoundConfig``, ``DemoConfig``) and their choices from the module constants:
nothing is restated here, so the command and the Python API cannot drift apart. Any ``DsgError`` is
reported as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional

from .._utils.memory import retain_freed_memory
from ..errors import DsgError
from . import demo, evaluate, export, generate, info, quantize, report
from .options import config_from_args

__all__ = ["build_parser", "config_from_args", "main"]

COMMANDS = (info, generate, quantize, evaluate, export, report, demo)  # in the order `dsg --help` lists them


def build_parser() -> argparse.ArgumentParser:
    """The ``dsg`` parser, every subcommand's options on it."""
    parser = argparse.ArgumentParser(prog="dsg", description="Data-free quantization with Diverse Sample Generation")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_line_warnings(command: str):
    """A ``warnings.showwarning`` that prints dsg_ext's own warnings as one line, ``dsg <command>: warning:
    ...`` (the source line Python adds says nothing to a command-line user); other packages' keep Python's
    format."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not os.path.abspath(filename).startswith(PACKAGE_DIR + os.sep):
            return default(message, category, filename, lineno, file, line)
        from tqdm import tqdm

        tqdm.write(f"dsg {command}: warning: {message}", file=file or sys.stderr)  # below any progress bar

    return show


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    retain_freed_memory()  # large CPU tensors reused instead of page-faulted in each iteration (_utils/memory.py)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warnings(args.command)
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except DsgError as e:  # every user-fixable problem: one line, exit code 2; other exceptions are our bugs
        print(f"dsg {args.command}: {e.for_command_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dsg {args.command}: interrupted (finished work is kept; re-running resumes `dsg generate`)",
              file=sys.stderr)
        return 130
