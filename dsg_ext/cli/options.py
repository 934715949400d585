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


def _default(cls, field: str, defaults: Any = None) -> Any:
    return getattr(cls() if defaults is None else defaults, field)


def _option(parser, flag: str, cls, field: str, help: str, defaults: Any = None, toggle: bool = False,
            **kwargs) -> None:
    """An option that sets ``cls``'s ``field``: the default comes from the dataclass (or from the
    instance ``defaults``, e.g. a named recipe). A boolean field becomes a switch that flips its
    default (``--per-tensor`` sets w_per_channel=False), or with ``toggle`` a --flag/--no-flag pair."""
    dest = _DEST[cls.__name__] + field
    default = _default(cls, field, defaults)
    if isinstance(default, bool) and toggle:
        parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help)
        return
    if isinstance(default, bool):
        action = "store_false" if default else "store_true"
        parser.add_argument(flag, dest=dest, action=action, default=default, help=help)
        return
    if "choices" not in kwargs:
        kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        if "type" not in kwargs and default is not None:
            kwargs["type"] = type(default)
    parser.add_argument(flag, dest=dest, default=kwargs.pop("shown_default", default), help=help, **kwargs)


def config_from_args(args: argparse.Namespace, cls, base: Any = None, **overrides):
    """The ``cls`` instance the parsed options describe; fields without an option keep the default
    (``base``'s value where given, e.g. a named recipe's)."""
    prefix = _DEST[cls.__name__]
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls) if hasattr(args, prefix + f.name)}
    return dataclasses.replace(cls() if base is None else base, **{**values, **overrides})


def preset_in(argv, command: str, flag: str) -> Optional[str]:
    """The preset a ``dsg COMMAND`` command line names with ``flag`` (``generate --recipe``, ``quantize
    --reconstruction``; None if none), read before the full parse so that the preset's values
    become the options' defaults."""
    if not argv or argv[0] != command:
        return None
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument(flag, dest="preset")
    known, _ = pre.parse_known_args(argv[1:])
    return known.preset


def recipe_in(argv) -> Optional[str]:
    """The ``--recipe`` of a ``dsg generate`` command line."""
    return preset_in(argv, "generate", "--recipe")


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
