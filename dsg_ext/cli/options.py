"""The option machinery every ``dsg`` command shares: options that set a config dataclass field
(``_option``), the config a parsed command line describes (``config_from_args``), the model options,
and the value types that refuse bad input at parse time (counts, devices, bit widths).

One parse, top down: an option that sets a config field has no argparse default (it is absent from
the namespace unless given), so the handler builds the config as defaults -> named preset (a
``--recipe`` / ``--reconstruction``) -> the options given, whatever their order on the line. The
``--help`` line shows the dataclass default."""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable, Optional

from ..errors import ConfigError

DEFAULT_DEVICE = "cpu"
TRUST_HELP = ("allow a TorchScript model file, whose loading runs the code it holds (.pt2 files are checked "
              "and need no trust)")
# Prefixes of the argparse destinations of each config's fields (a field may exist in two configs).
_DEST = {"SynthesisConfig": "synthesis_", "QuantConfig": "quant_", "AdaRoundConfig": "adaround_",
         "GptqConfig": "gptq_", "DemoConfig": "demo_"}


def _option(parser, flag: str, cls, field: str, help: str, toggle: bool = False, **kwargs) -> None:
    """An option that sets ``cls``'s ``field``, absent from the parsed namespace unless given (see the
    module docstring); its help shows the dataclass default. A boolean field becomes a switch that
    flips its default (``--per-tensor`` sets w_per_channel=False), or with ``toggle`` a --flag/--no-flag
    pair."""
    dest = _DEST[cls.__name__] + field
    default = getattr(cls(), field)
    shown = kwargs.pop("shown_default", default)
    if isinstance(default, bool) and toggle:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                            help=f"{help} (default: {shown})")
        return
    if isinstance(default, bool):
        action = "store_false" if default else "store_true"
        parser.add_argument(flag, dest=dest, action=action, default=argparse.SUPPRESS, help=help)
        return
    if "choices" not in kwargs:
        kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        if "type" not in kwargs and default is not None:
            kwargs["type"] = type(default)
    parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS,
                        help=help if shown in (None, "") else f"{help} (default: {shown})", **kwargs)


def config_from_args(args: argparse.Namespace, cls, base: Any = None, **overrides):
    """The ``cls`` instance the parsed options describe: ``base`` (default: ``cls()``; e.g. a named
    recipe) with the options given on the command line, then ``overrides``, applied over it."""
    prefix = _DEST[cls.__name__]
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls) if hasattr(args, prefix + f.name)}
    return dataclasses.replace(cls() if base is None else base, **{**values, **overrides})


def add_model_options(p, model_help: str = "model source, as for generate") -> None:
    """--model, --weights and --trust-model-code: where the network comes from (every command that loads one)."""
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--weights", help="state-dict file for torchvision:/timm:/module: sources")
    p.add_argument("--trust-model-code", action="store_true", help=TRUST_HELP)


def add_output_options(p, what: str) -> None:
    """--out and --force: the file a command writes, never replaced unless asked."""
    p.add_argument("--out", required=True, help=what)
    p.add_argument("--force", action="store_true", help="replace an existing --out")


def example_input(loaded):
    """One zero image of the model's input shape (probing and building the quantized model)."""
    import torch

    spec = loaded.input
    return torch.zeros(1, spec.channels, spec.image_size, spec.image_size)


def _optional_bits(off: int) -> Callable[[str], Optional[int]]:
    """A bit-width parser where ``off`` means None (float activations / the same width as the rest)."""
    def parse(text: str) -> Optional[int]:
        value = int(text)
        return None if value == off else value

    parse.__name__ = "bits"
    return parse


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of images or samples)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_positive_int.__name__ = "count"


def _device(text: str) -> str:
    """argparse type: a device torch can use on this machine."""
    from ..models.spec import check_device

    try:
        return check_device(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_device.__name__ = "device"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default (taken from the config dataclasses)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def _average_bits(text: str) -> float:
    """argparse type: average weight bits (a finite number)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bits: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of average weight bits, got {text!r}")
    return value


_average_bits.__name__ = "average bits"


def _bit_choices(text: str):
    """argparse type: a comma list of weight widths to choose from."""
    from ..errors import DsgError
    from ..quantization.algorithms.mixed_precision import parse_choices

    try:
        return parse_choices(text)
    except DsgError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_bit_choices.__name__ = "bit choices"
