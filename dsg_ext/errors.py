"""The errors dsg_ext raises for problems a user can fix: every one derives from ``DsgError``.

Each class also derives from the built-in exception a caller would expect (``ValueError`` for an
option out of range, ``RuntimeError`` for a file that cannot be used, ...), so code written against
the built-ins keeps working. ``dsg`` reports any ``DsgError`` as one line and exit code 2; anything
else is a bug and keeps its traceback. The fused ops raise torch's own errors (``RuntimeError`` /
``ValueError`` with a message naming the problem), as every torch operator does.
"""

from __future__ import annotations

import re

__all__ = [
    "DsgError",
    "ConfigError",
    "ModelSourceError",
    "NoBatchNormError",
    "SynthesisError",
    "NonFiniteLossError",
    "DatasetError",
    "DataSourceError",
    "InvalidDataError",
    "QuantizationError",
    "QuantizedFileError",
    "OutputError",
    "ExportError",
    "ReportError",
]


class DsgError(Exception):
    """Base class of every error dsg_ext raises for a problem the user can fix.

    ``parameter``: the argument of the Python API the message names (written ``name=value``, or else as
    the bare word ``name``, in the message); ``dsg`` shows it as the matching option (``--name``), so an API
    user reads the parameter they passed and a command-line user the flag they typed."""

    def __init__(self, *args, parameter: "str | None" = None):
        super().__init__(*args)
        self.parameter = parameter

    def for_command_line(self) -> str:
        """The message with the parameter it names written as its option: ``force=True`` -> ``--force``,
        ``num_samples=0`` -> ``--num-samples 0``, ``opset`` -> ``--opset``."""
        message = str(self)
        if not self.parameter:
            return message
        flag = "--" + self.parameter.replace("_", "-")
        name = re.escape(self.parameter)
        if re.search(rf"\b{name}=", message):  # the parameter written as name=value: only those
            message = re.sub(rf"\b{name}=True\b", flag, message)
            return re.sub(rf"\b{name}=", flag + " ", message)
        return re.sub(rf"(?<![-\w]){name}\b", flag, message)


class ConfigError(DsgError, ValueError):
    """Options out of range: synthesis, quantization or reconstruction settings, command-line values."""


class ModelSourceError(DsgError, ValueError):
    """A model source string, or its weights, that cannot be turned into a model."""


class NoBatchNormError(DsgError, ValueError):
    """The model has no BatchNorm2d layer, so there are no statistics to synthesise from."""


class SynthesisError(DsgError, RuntimeError):
    """Synthesis cannot go on with this model (a BN layer never reached, ...)."""


class NonFiniteLossError(SynthesisError, FloatingPointError):
    """The synthesis loss became NaN or Inf; names the first layer where it did."""


class DatasetError(DsgError, RuntimeError):
    """An unreadable, foreign or inconsistent synthetic-dataset directory."""


class DataSourceError(DsgError, RuntimeError):
    """A calibration or evaluation source that cannot be used: missing or corrupt files (image files,
    the Fashion-MNIST IDX files), or data made for another model."""


class InvalidDataError(DsgError, ValueError):
    """Input values that cannot be used: no images at all, NaN or Inf in images or activations."""


class QuantizationError(DsgError, RuntimeError):
    """Quantizing this model failed: a layer never reached, a quantizer used before calibration."""


class QuantizedFileError(DsgError, RuntimeError):
    """A quantized-model file that cannot be read or does not belong to the model."""


class OutputError(DsgError, OSError):
    """An output file or directory that cannot be written (missing or read-only directory, a full
    disk, a directory where a file belongs); checked before long work starts wherever possible."""


class ExportError(DsgError, RuntimeError):
    """A quantized model that cannot be written as ONNX: an operation ONNX export cannot express
    (named), a layer not finalised, an opset too old."""


class ReportError(DsgError, RuntimeError):
    """A report that cannot be made from what it was given (no dataset directory, a foreign file)."""
