"""Malicious files for the hardening tests: each would create ``marker`` when loaded by the
unguarded loader (``torch.export.load``, ``torch.load(weights_only=False)``, ``torch.jit.load``).
``live_*`` helpers prove a payload really runs there, so a test that sees it refused by us means
something."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import torch
from torch import nn


class RunsCode:
    """Unpickling it runs ``touch marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled(marker: str) -> bytes:
    buf = io.BytesIO()
    torch.save(RunsCode(marker), buf)
    return buf.getvalue()


def exported_program(path: str) -> str:
    """A clean .pt2 of a small BN network with a dynamic batch dimension."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval()
    ep = torch.export.export(model, (torch.zeros(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, path)
    return path


def rewrite(src: str, dst: str, edit) -> str:
    """Copies the zip ``src`` to ``dst`` with ``edit(name, data) -> data | None`` applied to every
    member (None drops it); ``edit.extra`` (if set) adds members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        prefix = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            data = edit(info.filename.split("/", 1)[1], zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in getattr(edit, "extra", {}).items():
            zout.writestr(f"{prefix}/{name}", data)
    return dst


def _json_edit(member: str, change):
    def edit(name, data):
        if name == member:
            doc = json.loads(data)
            change(doc)
            return json.dumps(doc).encode()
        return data
    return edit


def pt2_pickled_weight(clean: str, dst: str, marker: str) -> str:
    """Weight 0 stored "pickled": torch.export.load unpickles it with weights_only=False."""
    def change(doc):
        first = next(iter(doc["config"].values()))
        first["use_pickle"] = True
    edit_cfg = _json_edit("data/weights/model_weights_config.json", change)
    with zipfile.ZipFile(clean) as z:
        cfg = json.loads(z.read(f"{z.namelist()[0].split('/')[0]}/data/weights/model_weights_config.json"))
    target = next(iter(cfg["config"].values()))["path_name"]

    def edit(name, data):
        if name == f"data/weights/{target}":
            return pickled(marker)
        return edit_cfg(name, data)
    return rewrite(clean, dst, edit)


def pt2_pickled_sample_inputs(clean: str, dst: str, marker: str) -> str:
    """Example inputs that fail the safe load, so torch falls back to an unrestricted unpickle."""
    return rewrite(clean, dst, lambda name, data: pickled(marker) if name.startswith("data/sample_inputs/") else data)


def _walk_set(doc, key, value):
    """Sets every ``key`` in a JSON document to ``value``."""
    if isinstance(doc, dict):
        for k in list(doc):
            if k == key:
                doc[k] = value
            else:
                _walk_set(doc[k], key, value)
    elif isinstance(doc, list):
        for v in doc:
            _walk_set(v, key, value)


def pt2_sympy_code(clean: str, dst: str, marker: str) -> str:
    """A symbolic-shape string that sympy.sympify evaluates as Python."""
    code = f"__import__('os').system('touch {marker}') + Symbol('s0', positive=True, integer=True)"
    return rewrite(clean, dst, _json_edit("models/model.json", lambda doc: _walk_set(doc, "expr_str", code)))


def pt2_guard_code(clean: str, dst: str, marker: str) -> str:
    """Guard code: Python source torch compiles into the module's input check."""
    code = f"__import__('os').system('touch {marker}')"
    return rewrite(clean, dst, _json_edit("models/model.json", lambda doc: doc.__setitem__("guards_code", [code])))


def pt2_foreign_target(clean: str, dst: str, marker: str) -> str:
    """A node that calls torch.os.system (resolved by attribute lookup on torch)."""
    def change(doc):
        nodes = doc["graph_module"]["graph"]["nodes"]
        nodes[0]["target"] = "torch.os.system"
    return rewrite(clean, dst, _json_edit("models/model.json", change))


def pt2_custom_object(clean: str, dst: str, marker: str) -> str:
    """A constant stored as a pickled Python object (opaque_obj_*: torch uses pickle.loads)."""
    def change(doc):
        doc["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                 "tensor_meta": None}
    edit = _json_edit("data/constants/model_constants_config.json", change)
    edit.extra = {"data/constants/opaque_obj_0": pickle.dumps(RunsCode(marker))}
    return rewrite(clean, dst, edit)


def pt2_native_code(clean: str, dst: str, marker: str) -> str:
    """An AOTInductor payload: a shared library torch would load."""
    def edit(name, data):
        return data
    edit.extra = {"data/aotinductor/model/model.so": b"\x7fELF not really"}
    return rewrite(clean, dst, edit)


PT2_PAYLOADS = {
    "pickled-weight": pt2_pickled_weight,
    "pickled-sample-inputs": pt2_pickled_sample_inputs,
    "sympy-expression": pt2_sympy_code,
    "guard-code": pt2_guard_code,
    "foreign-target": pt2_foreign_target,
    "custom-object": pt2_custom_object,
    "native-code": pt2_native_code,
}
