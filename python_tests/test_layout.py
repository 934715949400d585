"""Rules of the package's layout: files of one job and a readable size, every error a user can fix
raised as a DsgError, and no environment read on a product path."""

from __future__ import annotations

import ast
import inspect
import os

import dsg_ext
from dsg_ext import errors

PACKAGE = os.path.dirname(os.path.abspath(dsg_ext.__file__))
MAX_LINES = 400
# Where reading the environment is configuration or start-up, not a product path:
ENVIRON_ALLOWED = {
    "data/fashion_mnist.py": "DSG_FASHION_MNIST names the IDX directory (configuration)",
    "synthesis/writer.py": "torchrun's WORLD_SIZE / LOCAL_RANK at start-up",
    "_utils/memory.py": "DSG_EXT_RETAIN_MEMORY=0 leaves the C allocator alone (start-up, once per process)",
}
# The ops raise torch's own error types, as every torch operator does.
BUILTIN_RAISES_ALLOWED = {"ops/wrappers.py", "ops/arg_checks.py", "ops/adaround_math.py"}
# argparse's own error for a bad option value: argparse prints it with the usage and exits with code 2.
CLI_RAISES_ALLOWED = {"ArgumentTypeError"}
# Protocols that name their exception: a torch Dataset (sequence protocol) ends with IndexError.
PROTOCOL_RAISES_ALLOWED = {("data/interop.py", "IndexError")}


def _sources():
    for root, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                yield os.path.relpath(path, PACKAGE).replace(os.sep, "/"), path


def test_no_file_is_over_the_size_limit():
    sizes = {rel: sum(1 for _ in open(path)) for rel, path in _sources()}
    assert {rel: n for rel, n in sizes.items() if n > MAX_LINES} == {}


def test_the_environment_is_read_only_in_configuration_code():
    readers = {rel for rel, path in _sources() if "os.environ" in open(path).read() or "getenv" in open(path).read()}
    assert readers <= set(ENVIRON_ALLOWED), readers - set(ENVIRON_ALLOWED)


def test_every_error_class_derives_from_dsg_error():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) >= 8 and all(issubclass(c, errors.DsgError) for c in classes)
    assert set(errors.__all__) == {c.__name__ for c in classes}


def test_the_package_raises_only_its_own_errors():
    """Outside the ops, a raise names a class of dsg_ext.errors (or re-raises): so `except DsgError`
    catches every mistake a user can make, and cli.py needs no hand-kept tuple."""
    ours = set(errors.__all__)
    bad = []
    for rel, path in _sources():
        if rel in BUILTIN_RAISES_ALLOWED:
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                name = exc.id if isinstance(exc, ast.Name) else getattr(exc, "attr", None)
                if (rel, name) in PROTOCOL_RAISES_ALLOWED or (rel == "cli/options.py" and name in CLI_RAISES_ALLOWED):
                    continue
                if name not in ours and name not in ("_Stop", "error", "e", "_refuse"):
                    bad.append(f"{rel}:{node.lineno} raises {name}")
    assert bad == []


def test_the_public_api_is_importable_from_the_top():
    for name in ("synthesize", "generate", "quantize_model", "calibrate", "reconstruct", "save_quantized",
                 "load_quantized", "fidelity", "SynthesisConfig", "QuantConfig", "AdaRoundConfig", "DsgError",
                 "bn_stat_slack_loss", "bn_eval_slack", "fake_quant", "adaround"):
        assert name in dsg_ext.__all__ and getattr(dsg_ext, name) is not None
    for name in ("synthesize", "generate", "quantize_model", "calibrate", "reconstruct", "save_quantized",
                 "load_quantized"):
        doc = inspect.getdoc(getattr(dsg_ext, name))
        returns_something = inspect.signature(getattr(dsg_ext, name)).return_annotation not in ("None", None)
        assert "Args:" in doc and ("Returns:" in doc or not returns_something), name
