"""Every kind of file we load, given a payload that runs code when loaded the unguarded way: refused
with a clear error, and the payload's marker file never appears. Where torch's own loader would run
the payload, the test first shows that it does (so the refusal is what keeps the marker away)."""

import io
import json
import logging
import subprocess
import sys
import warnings

import pytest
import torch
from payloads import PT2_PAYLOADS, exported_program, pickled

from dsg_ext.data import store
from dsg_ext.errors import DatasetError, ModelSourceError, QuantizedFileError
from dsg_ext.models import load_model
from dsg_ext.quantization import read_quantized

# Payloads torch.export.load (plus .module() and one forward) runs by itself.
LIVE_UNDER_TORCH = {"pickled-weight", "pickled-sample-inputs", "sympy-expression", "guard-code", "custom-object"}


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory):
    return exported_program(str(tmp_path_factory.mktemp("pt2") / "clean.pt2"))


def test_the_clean_program_loads(clean_pt2):
    loaded = load_model(clean_pt2)
    assert loaded.input.image_size == 8
    assert loaded.model(torch.zeros(2, 3, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("kind", sorted(PT2_PAYLOADS))
def test_malicious_pt2_is_refused_and_never_runs(tmp_path, clean_pt2, kind):
    marker = tmp_path / "ran"
    path = PT2_PAYLOADS[kind](clean_pt2, str(tmp_path / f"{kind}.pt2"), str(marker))
    if kind in LIVE_UNDER_TORCH:  # the payload is real: torch's own loader runs it
        logging.disable(logging.CRITICAL)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.export.load(path).module()(torch.zeros(2, 3, 8, 8))
        except Exception:
            pass
        finally:
            logging.disable(logging.NOTSET)
        assert marker.exists(), f"the {kind} payload should run under torch.export.load"
        marker.unlink()
    with pytest.raises(ModelSourceError, match="refused"):
        load_model(path)
    assert not marker.exists()


def test_malicious_pt2_on_the_command_line(tmp_path, clean_pt2):
    marker = tmp_path / "ran"
    path = PT2_PAYLOADS["pickled-weight"](clean_pt2, str(tmp_path / "evil.pt2"), str(marker))
    for args in (["generate", "--model", path, "--out", str(tmp_path / "data")],
                 ["quantize", "--model", path, "--real", "noise", "--out", str(tmp_path / "q.safetensors")],
                 ["eval", "--model", path, "--data", "skimage-photos"]):
        r = subprocess.run([sys.executable, "-m", "dsg_ext", *args], capture_output=True, text=True)
        assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not marker.exists() and not (tmp_path / "data").exists() and not (tmp_path / "q.safetensors").exists()


def test_torchscript_needs_trust(tmp_path):
    path = str(tmp_path / "m.pt")
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()).save(path)
    with pytest.raises(ModelSourceError, match="--trust-model-code"):
        load_model(path)
    assert load_model(path, image_size=8, trust_model_code=True).input.channels == 3


def test_pickled_weights_are_refused(tmp_path):
    marker = tmp_path / "ran"
    weights = tmp_path / "w.pt"
    weights.write_bytes(pickled(str(marker)))
    with pytest.raises(ModelSourceError, match="cannot read weights file"):
        load_model("torchvision:resnet18", weights=str(weights))
    assert not marker.exists()
    torch.load(io.BytesIO(weights.read_bytes()), weights_only=False)  # the payload is real
    assert marker.exists()


def test_a_pickle_posing_as_a_quantized_file_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "q.safetensors"
    path.write_bytes(pickled(str(marker)))
    with pytest.raises(QuantizedFileError, match="not a readable quantized-model file"):
        read_quantized(str(path))
    assert not marker.exists()


def test_a_pickle_posing_as_a_shard_is_refused(tmp_path):
    """A shard whose checksum matches its manifest but which is a pickle: never unpickled."""
    import hashlib

    marker = tmp_path / "ran"
    data = pickled(str(marker))
    (tmp_path / "shard_00000.safetensors").write_bytes(data)
    manifest = {"format": store.FORMAT, "complete": True, "image_shape": [3, 8, 8],
                "shards": [{"file": "shard_00000.safetensors", "num_samples": 2,
                            "sha256": hashlib.sha256(data).hexdigest()}]}
    (tmp_path / store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="not a safetensors file"):
        store.load_images(str(tmp_path))
    assert not marker.exists()
