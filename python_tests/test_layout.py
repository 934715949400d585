"""Rules of the package's layout: functions of a readable length, no import cycle, the quantization
core apart from its algorithms, every error a user can fix raised as a DsgError, no environment read on
a product path, and the public names of 2026-12-07 still importing."""

from __future__ import annotations

import ast
import inspect
import os

import dsg_ext
from dsg_ext import errors

PACKAGE = os.path.dirname(os.path.abspath(dsg_ext.__file__))
# Lines of a function's body, its docstring excluded: a longer one is split by step. The exceptions, each
# with its reason (a new entry needs one as good):
MAX_FUNCTION_LINES = 60
LONG_FUNCTIONS_ALLOWED = {
    "cli/quantize.py:add_parser": "the option table of dsg quantize: one add_argument per option, read as a list",
    "synthesis/writer.py:generate": "the resumable, distributed write loop; to split by step next (issue 39's note)",
    "models/graph.py:modularise": "one torch.fx graph walk that rewrites functional calls into modules",
    "synthesis/loop.py:synthesize_batch": "the synthesis loop, its per-iteration steps inline for speed reading",
}
# Modules that import nothing of the package (leaves every module may use).
LEAVES = {"dsg_ext.errors", "dsg_ext._utils.validation"}
# Where reading the environment is configuration or start-up, not a product path:
ENVIRON_ALLOWED = {
    "data/fashion_mnist.py": "DSG_FASHION_MNIST names the IDX directory (configuration)",
    "models/zoo.py": "DSG_ZOO_DIR names the trained-zoo cache directory (configuration)",
    "synthesis/writer.py": "torchrun's WORLD_SIZE / LOCAL_RANK at start-up",
    "_utils/memory.py": "DSG_EXT_RETAIN_MEMORY=0 leaves the C allocator alone (start-up, once per process)",
}
# The ops raise torch's own error types, as every torch operator does.
BUILTIN_RAISES_ALLOWED = {"ops/wrappers.py", "ops/arg_checks.py", "ops/adaround_math.py"}
# argparse's own error for a bad option value: argparse prints it with the usage and exits with code 2.
CLI_RAISES_ALLOWED = {"ArgumentTypeError"}
# Protocols that name their exception: a torch Dataset (sequence protocol) ends with IndexError, a module
# __getattr__ (deprecated names) answers AttributeError.
PROTOCOL_RAISES_ALLOWED = {("data/interop.py", "IndexError"), ("quantization/qparams.py", "AttributeError")}


def _sources():
    for root, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                yield os.path.relpath(path, PACKAGE).replace(os.sep, "/"), path


def _function_lengths():
    for rel, path in _sources():
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                        and isinstance(body[0].value.value, str):
                    body = body[1:]
                yield f"{rel}:{node.name}", node.end_lineno - body[0].lineno + 1


def test_no_function_is_over_the_length_limit():
    long = {name: n for name, n in _function_lengths() if n > MAX_FUNCTION_LINES}
    assert set(long) - set(LONG_FUNCTIONS_ALLOWED) == set(), long
    assert set(LONG_FUNCTIONS_ALLOWED) - set(long) == set(), "allowed but no longer long: drop from the list"


def _import_graph():
    """{module: modules of the package it imports}, every import counted (function-level ones too)."""
    modules = {}
    for rel, path in _sources():
        name = "dsg_ext." + rel[:-3].replace("/", ".")
        modules[name.removesuffix(".__init__")] = (path, rel.endswith("__init__.py"))
    graph = {}
    for name, (path, is_package) in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                elif (node.module or "").startswith("dsg_ext"):
                    base = node.module
                else:
                    continue
                for alias in node.names:
                    if alias.name != "_C":  # the compiled library: a leaf
                        targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("dsg_ext")}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_the_package_has_no_import_cycle():
    graph = _import_graph()
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_quantization_core_never_imports_its_algorithms_and_config_imports_no_implementation():
    graph = _import_graph()
    core = [m for m in graph if m.startswith("dsg_ext.quantization.") and ".algorithms" not in m]
    assert core and {m: sorted(t for t in graph[m] if ".algorithms" in t) for m in core} == {m: [] for m in core}
    assert graph["dsg_ext.quantization.config"] <= LEAVES
    assert all(graph[leaf] == set() for leaf in LEAVES)
    assert not any(t.startswith("dsg_ext.cli") for m, ts in graph.items()
                   if not m.startswith(("dsg_ext.cli", "dsg_ext.__main__"))
                   for t in ts), "the library imports the command line"


def test_the_public_names_of_2026_12_07_still_import():
    """Every name the package's public modules offered on 2026-12-07 (public_names.txt: module:name,
    from ``__all__`` or the classes and functions a module defined) still imports from there."""
    import importlib

    missing = []
    with open(os.path.join(os.path.dirname(__file__), "public_names.txt")) as f:
        for line in filter(None, (raw.strip() for raw in f)):
            module, name = line.split(":")
            if not hasattr(importlib.import_module(module), name):
                missing.append(line)
    assert len(missing) == 0, missing


def test_the_environment_is_read_only_in_configuration_code():
    readers = {rel for rel, path in _sources() if "os.environ" in open(path).read() or "getenv" in open(path).read()}
    assert readers <= set(ENVIRON_ALLOWED), readers - set(ENVIRON_ALLOWED)


def test_every_error_class_derives_from_dsg_error():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) >= 8 and all(issubclass(c, errors.DsgError) for c in classes)
    assert set(errors.__all__) == {c.__name__ for c in classes}


def test_the_package_raises_only_its_own_errors():
    """Outside the ops, a raise names a class of dsg_ext.errors (or re-raises): so `except DsgError`
    catches every mistake a user can make, and cli.py needs no hand-kept tuple (reconstruct.Unreached is a
    QuantizationError the reconstruction loop catches)."""
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
                if name not in ours and name not in ("StopForward", "Unreached", "error", "e", "_refuse"):
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
