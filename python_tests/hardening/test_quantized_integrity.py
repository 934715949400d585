"""A quantized-model file edited by hand or by an attacker: an edit that leaves the checksum stale is
refused for that, and a forged file whose checksum was recomputed still has every value checked on
load; a file failing any check is refused naming the problem (not used, not reported like a result)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save
from tiny_models import tiny_bn_net

from dsg_ext import quantization as Q
from dsg_ext.errors import QuantizedFileError
from dsg_ext.models import model_identity


def _images(n=16):
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_bn_net()
    q = Q.quantize_model(model, Q.QuantConfig(wbits=4, abits=4), _images()[:2])
    Q.calibrate(q, _images())
    path = str(tmp_path_factory.mktemp("q") / "q.safetensors")
    Q.save_quantized(q, path, "tiny_models:tiny_bn_net", model_identity(model))
    return path


def _read(path):
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["dsg_ext"])


def _forge(src, dst, tensors=None, meta=None, resign=True):
    """``src`` with ``tensors`` replaced (None: removed) and ``meta`` applied to its metadata; with
    ``resign`` the checksum recomputed, as a forger who read our code would."""
    from dsg_ext.quantization.serialization import content_checksum

    t, m = _read(src)
    t.update(tensors or {})
    t = {k: v for k, v in t.items() if v is not None}
    m = meta(m) if meta else m
    if resign and isinstance(m, dict):
        m["checksum"] = content_checksum(t, m)
    with open(dst, "wb") as f:
        f.write(save(t, metadata={"dsg_ext": json.dumps(m)}))
    return dst


def _load(path):
    model = tiny_bn_net()
    return Q.load_quantized(model, path, model_identity(model), _images()[:2])


def test_the_intact_file_loads(saved):
    q = _load(saved)
    assert q(_images(4)).shape == (4, 10)


def _first(tensors, suffix):
    return next(k for k in tensors if k.endswith(suffix))


def _weight_edit(saved, suffix, fn, middle=False):
    """``fn`` applied to the first tensor named ``*suffix`` (with ``middle``: of a 4-bit layer, not
    the first or last, which are 8-bit)."""
    t, m = _read(saved)
    key = f"{m['order'][1]}{suffix}" if middle else _first(t, suffix)
    return {key: fn(t[key].clone())}


EDITS = {
    "bit width lowered in the config": (lambda s: {}, lambda m: dict(m, config=dict(m["config"], wbits=2)),
                                        "per-layer weight bits do not follow from its config"),
    "bit width lowered in the config and the per-layer bits": (
        lambda s: {}, lambda m: dict(m, config=dict(m["config"], wbits=2),
                                     weight_bits={k: 2 if v == 4 else v for k, v in m["weight_bits"].items()}),
        "not integers in -2..1"),
    "bit width out of range": (lambda s: {}, lambda m: dict(m, config=dict(m["config"], wbits=17)), "wbits"),
    "unknown config key": (lambda s: {}, lambda m: dict(m, config=dict(m["config"], turbo=True)), "unknown keys"),
    "no model identity": (lambda s: {}, lambda m: {k: v for k, v in m.items() if k != "model_identity"},
                          "no model identity"),
    "another model": (lambda s: {}, lambda m: dict(m, model_identity="0" * 64), "another model"),
    "no layer order": (lambda s: {}, lambda m: dict(m, order="conv"), "no layer order"),
    "weights outside the range": (lambda s: _weight_edit(s, ".weight_int", lambda t: t.fill_(100), True), None,
                                  "not integers in -8..7"),
    "float weights": (lambda s: _weight_edit(s, ".weight_int", lambda t: t.float() + 0.5), None, "not integers"),
    "weights of another shape": (lambda s: _weight_edit(s, ".weight_int", lambda t: t[:1]), None, "has weights"),
    "NaN weight scale": (lambda s: _weight_edit(s, ".weight_scale", lambda t: t.fill_(float("nan"))), None,
                         "not finite and > 0"),
    "negative weight scale": (lambda s: _weight_edit(s, ".weight_scale", lambda t: -t), None, "not finite and > 0"),
    "zero activation scale": (lambda s: _weight_edit(s, ".act_scale", lambda t: t.zero_()), None,
                              "not finite and > 0"),
    "infinite activation scale": (lambda s: _weight_edit(s, ".act_scale", lambda t: t.fill_(float("inf"))), None,
                                  "not finite and > 0"),
    "activation zero point out of range": (lambda s: _weight_edit(s, ".act_zero_point", lambda t: t.fill_(300)),
                                           None, "zero points outside"),
    "NaN bias": (lambda s: _weight_edit(s, ".bias", lambda t: t.fill_(float("nan"))), None, "bias"),
    "missing activation range": (lambda s: {_first(_read(s)[0], ".act_scale"): None}, None, "missing tensor"),
    "missing weights": (lambda s: {_first(_read(s)[0], ".weight_int"): None}, None, "missing tensor"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_edited_files_are_refused(saved, tmp_path, edit):
    tensors, meta, message = EDITS[edit]
    path = _forge(saved, str(tmp_path / "edited.safetensors"), tensors(saved), meta)
    with pytest.raises(QuantizedFileError, match=message):
        _load(path)


@pytest.mark.parametrize("data", [b"", b"\x01" * 7, (2 ** 40).to_bytes(8, "little") + b"{}", b"\x10\0\0\0\0\0\0\0garbage!garbage!"])
def test_truncated_or_garbage_files_are_refused(tmp_path, data):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(QuantizedFileError, match="not a readable|not a dsg_ext"):
        _load(str(path))


def test_command_line_refuses_an_edited_file_without_a_traceback(saved, tmp_path):
    path = _forge(saved, str(tmp_path / "nan.safetensors"),
                  _weight_edit(saved, ".act_scale", lambda t: t.fill_(float("nan"))))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    r = subprocess.run([sys.executable, "-m", "dsg_ext", "eval", "--model", "tiny_models:tiny_bn_net",
                        "--image-size", "12", "--quantized", path, "--data", "skimage-photos"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "not finite and > 0" in r.stderr and "mean KL" not in r.stdout, r.stderr


@pytest.mark.parametrize("edit", ["bits in the metadata 4 -> 8", "one weight byte, inside the range", "a bias",
                                  "the checksum removed"])
def test_an_edit_without_a_recomputed_checksum_is_refused(saved, tmp_path, edit):
    t, m = _read(saved)
    middle = f"{m['order'][1]}.weight_int"
    flipped = t[middle].clone()
    flipped.view(-1)[0] = 1 if int(flipped.view(-1)[0]) != 1 else 2  # still a valid 4-bit integer
    change = {"bits in the metadata 4 -> 8": ({}, lambda m: dict(m, config=dict(m["config"], wbits=8, abits=8))),
              "one weight byte, inside the range": ({middle: flipped}, None),
              "a bias": ({_first(t, ".bias"): t[_first(t, ".bias")] + 1e-3}, None),
              "the checksum removed": ({}, lambda m: {k: v for k, v in m.items() if k != "checksum"})}[edit]
    path = _forge(saved, str(tmp_path / "edited.safetensors"), *change, resign=False)
    with pytest.raises(QuantizedFileError, match="checksum does not match"):
        _load(path)
    # the same edit with the checksum recomputed passes the checksum (then the value checks decide)
    if edit == "one weight byte, inside the range":
        _load(_forge(saved, str(tmp_path / "resigned.safetensors"), *change))


def test_a_file_of_the_previous_format_is_refused_with_what_to_do(saved, tmp_path):
    path = _forge(saved, str(tmp_path / "old.safetensors"), meta=lambda m: dict(m, format=1))
    with pytest.raises(QuantizedFileError, match="format 1, this dsg_ext reads format 2 .re-run dsg quantize"):
        _load(path)
