"""The option machinery of the ``dsg`` command: options that take their default from a config
dataclass field (``_option``), the config a parsed command line describes (``config_from_args``),
and the value types that refuse bad input at parse time (counts, devices, bit widths)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Optional

from .errors import ConfigError

DEFAULT_DEVICE = "cpu"
# Prefixes of the argparse destinations of each config's fields (a field may exist in two configs).
_DEST = {"SynthesisConfig": "synthesis_", "QuantConfig": "quant_", "AdaRoundConfig": "adaround_",
         "DemoConfig": "demo_"}


def _default(cls, field: str) -> Any:
    return getattr(cls(), field)


def _option(parser, flag: str, cls, field: str, help: str, **kwargs) -> None:
    """An option that sets ``cls``'s ``field``: the default comes from the dataclass. A boolean
    field becomes a switch that flips its default (``--per-tensor`` sets w_per_channel=False)."""
    dest = _DEST[cls.__name__] + field
    default = _default(cls, field)
    if isinstance(default, bool):
        action = "store_false" if default else "store_true"
        parser.add_argument(flag, dest=dest, action=action, default=default, help=help)
        return
    if "choices" not in kwargs:
        kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        if "type" not in kwargs and default is not None:
            kwargs["type"] = type(default)
    parser.add_argument(flag, dest=dest, default=kwargs.pop("shown_default", default), help=help, **kwargs)


def config_from_args(args: argparse.Namespace, cls, **overrides):
    """The ``cls`` instance the parsed options describe; fields without an option keep the default."""
    prefix = _DEST[cls.__name__]
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls) if hasattr(args, prefix + f.name)}
    return cls(**{**values, **overrides})


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
    from .models.spec import check_device

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
