"""A `dsg generate` directory tampered with, damaged or left unfinished: every use of it (resume,
calibration, evaluation) refuses with a message naming the problem; nothing outside the directory
is read; a FIFO or a device never blocks."""

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from dsg_ext.data import store
from dsg_ext.data.calibration import synthetic_calibration
from dsg_ext.errors import DatasetError, DsgError
from dsg_ext.models import load_model
from dsg_ext.synthesis import SynthesisConfig, generate

MODEL = "tiny_models:tiny_bn_net"
CONFIG = SynthesisConfig(method="zeroq", iterations=2, batch_size=2, image_size=8, lr=0.1)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("made") / "data")
    generate(MODEL, out, CONFIG, 4, show_progress=False)
    return out


@pytest.fixture
def data(made, tmp_path):
    out = str(tmp_path / "data")
    shutil.copytree(made, out)
    return out


def _manifest(directory):
    with open(os.path.join(directory, store.MANIFEST)) as f:
        return json.load(f)


def _write_manifest(directory, manifest):
    with open(os.path.join(directory, store.MANIFEST), "w") as f:
        json.dump(manifest, f)


def _use(directory):
    return synthetic_calibration(directory, load_model(MODEL, image_size=8))


def _within(seconds, fn):
    """fn() run in a thread; fails (instead of hanging the suite) if it does not return in time."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_the_intact_dataset_is_used(data):
    assert _use(data).shape == (4, 3, 8, 8)


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/shard.safetensors", "..", ".",
                                  "", 7, None, "a\\b"])
def test_a_manifest_cannot_name_files_outside_its_directory(data, tmp_path, name):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(os.path.join(data, "shard_00000.safetensors"), outside)
    manifest = _manifest(data)
    manifest["shards"][0]["file"] = name
    _write_manifest(data, manifest)
    with pytest.raises(DatasetError, match="only plain file names"):
        _use(data)


@pytest.mark.parametrize("make", ["fifo", "dev-zero", "symlink", "directory"])
def test_a_shard_that_is_not_a_regular_file_is_refused_at_once(data, tmp_path, make):
    shard = os.path.join(data, "shard_00001.safetensors")
    os.unlink(shard)
    if make == "fifo":
        os.mkfifo(shard)
    elif make == "dev-zero":
        os.symlink("/dev/zero", shard)
    elif make == "symlink":
        shutil.copy(os.path.join(data, "shard_00000.safetensors"), tmp_path / "elsewhere")
        os.symlink(tmp_path / "elsewhere", shard)
    else:
        os.mkdir(shard)
    with pytest.raises(DatasetError, match="symbolic link|FIFO|directory|not a regular file"):
        _within(20, lambda: _use(data))
    with pytest.raises(DatasetError, match="symbolic link|FIFO|directory|not a regular file"):  # resuming it
        _within(20, lambda: generate(MODEL, data, CONFIG, 4, show_progress=False))


def test_a_fifo_manifest_does_not_block(data):
    os.unlink(os.path.join(data, store.MANIFEST))
    os.mkfifo(os.path.join(data, store.MANIFEST))
    with pytest.raises(DatasetError, match="FIFO"):
        _within(20, lambda: _use(data))


@pytest.mark.parametrize("damage,message", [
    (lambda d, m: open(os.path.join(d, store.MANIFEST), "wb").write(bytes(range(256)) * 4), "manifest .* not readable JSON"),
    (lambda d, m: _write_manifest(d, {k: v for k, v in m.items() if k != "shards"}), "no list of shards"),
    (lambda d, m: _write_manifest(d, dict(m, shards=[{k: v for k, v in m["shards"][0].items() if k != "file"}])),
     "only plain file names"),
    (lambda d, m: _write_manifest(d, dict(m, shards=["shard_00000.safetensors"])), "not a record"),
    (lambda d, m: _write_manifest(d, dict(m, shards=[dict(m["shards"][0], sha256=None)])), "no checksum"),
    (lambda d, m: os.unlink(os.path.join(d, "shard_00001.safetensors")), "does not exist"),
    (lambda d, m: open(os.path.join(d, "shard_00001.safetensors"), "ab").write(b"x"), "checksum mismatch"),
    (lambda d, m: _write_manifest(d, dict(m, complete=False)), "unfinished dataset"),
    (lambda d, m: _write_manifest(d, dict(m, format="something else")), "not a dsg_ext synthetic-dataset"),
])
def test_damaged_datasets_are_refused_by_name(data, damage, message):
    damage(data, _manifest(data))
    with pytest.raises(DatasetError, match=message):
        _use(data)


def _replace_shard(directory, tensors=None, raw=None):
    """Shard 0 replaced (and its checksum updated, as a careful forger would)."""
    import hashlib

    from safetensors.torch import save

    data = raw if raw is not None else save(tensors)
    with open(os.path.join(directory, "shard_00000.safetensors"), "wb") as f:
        f.write(data)
    manifest = _manifest(directory)
    manifest["shards"][0]["sha256"] = hashlib.sha256(data).hexdigest()
    _write_manifest(directory, manifest)


@pytest.mark.parametrize("tensors,raw,message", [
    ({"images": torch.zeros(2, 3, 9, 8)}, None, r"expected float32 \[2, 3, 8, 8\]"),
    ({"images": torch.zeros(3, 3, 8, 8)}, None, r"expected float32 \[2, 3, 8, 8\]"),
    ({"images": torch.zeros(2, 3, 8, 8, dtype=torch.float64)}, None, "float64"),
    ({"pixels": torch.zeros(2, 3, 8, 8)}, None, "no 'images' tensor"),
    ({"images": torch.full((2, 3, 8, 8), float("nan"))}, None, "NaN or infinite"),
    (None, b"\x00" * 64, "not a safetensors file"),
    (None, b"", "not a safetensors file"),
])
def test_forged_shards_are_refused(data, tensors, raw, message):
    _replace_shard(data, tensors, raw)
    with pytest.raises(DatasetError, match=message):
        _use(data)


def test_command_line_reports_damage_without_a_traceback(data, tmp_path):
    manifest = _manifest(data)
    manifest["shards"][0]["file"] = "../../etc/passwd"
    _write_manifest(data, manifest)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                       os.environ.get("PYTHONPATH", "")]))
    for args in (["quantize", "--model", MODEL, "--image-size", "8", "--calib", data, "--out",
                  str(tmp_path / "q.safetensors")],
                 ["eval", "--model", MODEL, "--image-size", "8", "--data", data]):
        r = subprocess.run([sys.executable, "-m", "dsg_ext", *args], capture_output=True, text=True, env=env)
        assert r.returncode == 2 and "only plain file names" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "q.safetensors").exists()


def test_a_finished_dataset_on_read_only_media_is_usable(made, tmp_path):
    """Re-running the command of a complete dataset writes nothing (so read-only media work)."""
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions; the read-only mount test below covers this")
    data = str(tmp_path / "data")
    shutil.copytree(made, data)
    for name in os.listdir(data):
        os.chmod(os.path.join(data, name), 0o444)
    os.chmod(data, 0o555)
    try:
        manifest = generate(MODEL, data, CONFIG, 4, show_progress=False)
        assert manifest["complete"] and _use(data).shape[0] == 4
    finally:
        os.chmod(data, 0o755)


def test_errors_are_dsg_errors():
    assert issubclass(DatasetError, DsgError)
