"""Checks a torch.export archive (``.pt2``) before ``torch.export.load`` reads it, so that loading it
runs no code of the file's.

``torch.export.load`` is not safe on an untrusted file: it unpickles pickled weights, constants and
custom objects without restriction (and falls back to an unrestricted unpickle when the safe one
fails), passes the symbolic-shape strings to ``sympy.sympify`` (which evaluates them), compiles the
program's guard code, and resolves every node target by attribute lookup on ``torch`` (so a node can
name ``torch.os.system``). ``check_pt2`` refuses each of these unless it is harmless:

- every pickled payload must load with ``torch.load(weights_only=True)``; pickled Python objects
  (torchbind / opaque constants) are refused;
- symbolic-shape expressions may only use numbers, arithmetic and the sympy names export writes;
- guard code must be empty, and compiled code (AOTInductor, ExecuTorch payloads) is refused;
- nodes may only call aten operators (except the few that touch files), a small set of
  higher-order operators, ``_operator`` / ``math`` arithmetic and ``torch.sym_*``.

A file that passes is then loaded by torch, which can only take the paths checked here.
"""

from __future__ import annotations

import io
import json
import re
import tokenize
import zipfile
from typing import Iterator, List

from ..errors import ModelSourceError

_ATEN_REFUSED = frozenset({"from_file", "save", "_print", "warn", "load"})
_HIGHER_ORDER = frozenset({"cond", "while_loop", "map_impl", "scan", "wrap_with_set_grad_enabled",
                           "wrap_with_autocast"})
_OPERATOR = frozenset({"getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "pow", "abs",
                       "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift",
                       "rshift"})
_MATH = frozenset({"ceil", "floor", "trunc", "sqrt", "exp", "log", "log2", "log10", "pow", "fabs", "isnan",
                   "isinf", "isfinite", "copysign", "fmod", "gcd", "lcm", "sin", "cos", "tan", "tanh"})
_NATIVE_DIRS = ("data/aotinductor", "data/executorch", "data/mtia")
_NATIVE_SUFFIXES = (".so", ".dll", ".dylib", ".pyd")
_SYM = frozenset({"sym_max", "sym_min", "sym_int", "sym_float", "sym_not", "sym_ite", "sym_sqrt", "sym_sum"})
# Names a symbolic-shape expression may use: sympy's constructors and relations, export's own sympy
# functions (torch.utils._sympy.functions) and sympy's assumption keywords.
_SYMPY_NAMES = frozenset(
    "Symbol Integer Rational Float Max Min Mod Abs floor ceiling sqrt Eq Ne Lt Le Gt Ge StrictLessThan "
    "StrictGreaterThan LessThan GreaterThan And Or Not Piecewise ITE oo zoo nan pi E I true false True False "
    "None FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift "
    "PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt "
    "RoundToInt RoundDecimal ToFloat Identity OpaqueUnaryFn_log2 OpaqueUnaryFn_sqrt BitwiseFn_bitwise_and "
    "BitwiseFn_bitwise_or BitwiseFn_bitwise_xor "
    "algebraic commutative complex even finite infinite integer irrational negative noninteger nonnegative "
    "nonpositive nonzero odd positive prime rational real zero extended_real extended_positive "
    "extended_negative extended_nonnegative extended_nonpositive extended_nonzero".split())
_SYMBOL_NAME = re.compile(r"[a-z]+[0-9]+")  # export's symbols: s0, s77, u3, zuf0, ...
_SYMBOL_STRING = re.compile(r"'[A-Za-z][A-Za-z0-9_]*'|\"[A-Za-z][A-Za-z0-9_]*\"")
_EXPR_OPS = frozenset("+ - * / // % ** ( ) , = == != < <= > >= & | ~ ^".split())


def _refuse(path: str, why: str) -> ModelSourceError:
    return ModelSourceError(
        f"{path}: refused: {why}. dsg_ext loads .pt2 files only when that runs no code of the file's; "
        "export the model from the eager module again (torch.export.save), or give module:function")


def allowed_target(target: str) -> bool:
    """Whether a graph node (or operator argument) may call ``target`` (its serialised name)."""
    parts = target.split(".")
    if target.startswith("torch.ops.aten.") and len(parts) >= 4:
        return parts[3] not in _ATEN_REFUSED
    if target.startswith("torch.ops.higher_order.") and len(parts) == 4:
        return parts[3] in _HIGHER_ORDER
    if len(parts) == 2:
        module, name = parts
        return ((module == "_operator" and name in _OPERATOR) or (module == "math" and name in _MATH)
                or (module == "torch" and name in _SYM))
    return False


def check_expression(expr: str) -> bool:
    """Whether a serialised symbolic-shape expression is plain arithmetic over shape symbols (it is
    evaluated by sympy.sympify when the program is loaded)."""
    if len(expr) > 10000:
        return False
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(expr).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return False
    for tok in tokens:
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            continue
        if tok.type == tokenize.NUMBER:
            continue
        if tok.type == tokenize.NAME and (tok.string in _SYMPY_NAMES or _SYMBOL_NAME.fullmatch(tok.string)):
            continue
        if tok.type == tokenize.OP and tok.string in _EXPR_OPS:
            continue
        if tok.type == tokenize.STRING and _SYMBOL_STRING.fullmatch(tok.string):
            continue
        return False
    return True


def _walk(obj) -> Iterator[tuple]:
    """(key, value, the dict holding it) of every dict entry in a JSON document, nested ones included."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v, obj
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def _check_program(path: str, name: str, doc) -> None:
    for key, value, parent in _walk(doc):
        if key == "target" and isinstance(parent, dict) and "inputs" in parent:
            if not isinstance(value, str) or not allowed_target(value):
                raise _refuse(path, f"its graph calls {value!r} ({name}), which a file may not name")
        elif key == "as_operator":
            if not isinstance(value, str) or not allowed_target(value):
                raise _refuse(path, f"its graph passes the operator {value!r} ({name}), which a file may not name")
        elif key == "expr_str":
            if not isinstance(value, str) or not check_expression(value):
                raise _refuse(path, f"its symbolic-shape expression {str(value)[:80]!r} ({name}) is not plain "
                                    "arithmetic (torch evaluates these strings as Python)")
        elif key == "guards_code" and value:
            raise _refuse(path, f"it holds guard code ({name}), Python source that torch would compile and run")


def _check_pickle(path: str, archive: zipfile.ZipFile, member: str) -> None:
    import torch

    try:
        torch.load(io.BytesIO(archive.read(member)), map_location="cpu", weights_only=True)
    except Exception as e:
        raise _refuse(path, f"{member} is a pickle that does not load as plain tensors ({type(e).__name__}: "
                            f"{str(e)[:200]})") from None


def check_pt2(path: str, data: bytes) -> None:
    """Raises ModelSourceError unless ``torch.export.load`` can read this archive (``data``, the bytes
    of ``path``) without running code of the file's (see the module docstring)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members: List[str] = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ModelSourceError(f"{path} is not a torch.export program file (not a zip archive: {e})") from None
    if len(set(members)) != len(members):
        raise _refuse(path, "it holds two members of the same name (readers disagree on which one counts)")
    with archive:
        for member in members:
            base, inner = member.rsplit("/", 1)[-1], member.split("/", 1)[-1]
            if inner.startswith(_NATIVE_DIRS) or base.endswith(_NATIVE_SUFFIXES):
                raise _refuse(path, f"it holds compiled code ({member}), which torch would load and run")
            if member.endswith(".json"):
                try:
                    doc = json.loads(archive.read(member))
                except (ValueError, UnicodeDecodeError) as e:
                    raise _refuse(path, f"{member} is not JSON ({e})") from None
                _check_program(path, member, doc)
                if base.endswith("_config.json") and isinstance(doc, dict):
                    _check_payloads(path, archive, member, doc)
            elif member.endswith((".pt", ".pkl", ".pickle")):
                _check_pickle(path, archive, member)


def _check_payloads(path: str, archive: zipfile.ZipFile, config_member: str, doc) -> None:
    """Weights and constants listed in a payload config: pickled tensors must load weights-only,
    pickled Python objects are refused."""
    folder, names = config_member.rsplit("/", 1)[0], set(archive.namelist())
    entries = doc.get("config", {})
    if not isinstance(entries, dict):
        raise _refuse(path, f"{config_member} has no payload table")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise _refuse(path, f"{config_member}: entry {fqn!r} names no payload")
        name = meta["path_name"]
        if name.startswith(("custom_obj", "opaque_obj")) or not name.startswith(("weight_", "tensor_")):
            raise _refuse(path, f"{fqn!r} is a pickled Python object ({name}), not a tensor")
        if meta.get("use_pickle"):
            member = f"{folder}/{name}"
            if member not in names:
                raise _refuse(path, f"{config_member}: payload {name!r} is missing")
            _check_pickle(path, archive, member)
