"""Outputs that cannot be written: refused before any work with a message naming the problem and
exit code 2, never a traceback, never losing what is finished. Read-only and full file systems are
real tmpfs mounts where the machine allows them (root in a container that may mount), skipped with
the reason where not."""

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from dsg_ext import cli
from dsg_ext.synthesis import SynthesisConfig, generate

MODEL = "tiny_models:tiny_bn_net"
GEN = ["generate", "--model", MODEL, "--method", "zeroq", "--iterations", "2", "--batch-size", "2",
       "--image-size", "8", "--num-samples", "4"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                   os.environ.get("PYTHONPATH", "")]))


def dsg(*args):
    return subprocess.run([sys.executable, "-m", "dsg_ext", *args], capture_output=True, text=True, env=ENV)


def refused(r, message):
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts a small tmpfs; yields (path, remount(options))."""
    point = tmp_path / f"mnt-{uuid.uuid4().hex[:6]}"
    point.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(point)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'})")

    def remount(options):
        subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True)

    try:
        yield point, remount
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_generate_out_that_cannot_be_a_directory(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    refused(dsg(*GEN, "--out", str(a_file)), "exists and is not a directory")
    refused(dsg(*GEN, "--out", str(a_file / "below")), "is not a directory")
    refused(dsg(*GEN, "--out", ""), "name is empty")
    refused(dsg(*GEN, "--out", str(tmp_path / "d"), "--preview", str(tmp_path / "missing" / "p.png")),
            "does not exist")
    assert not (tmp_path / "d").exists()  # refused before anything was made


def test_generate_in_an_unwritable_directory(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: the read-only mount test covers this case")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    refused(dsg(*GEN, "--out", str(locked / "d")), "not writable")


def test_generate_on_a_read_only_file_system(tmp_path, tmpfs):
    point, remount = tmpfs
    done = str(point / "done")
    assert dsg(*GEN, "--out", done).returncode == 0
    remount("ro")
    r = dsg(*GEN, "--out", done)  # complete: nothing to write, so it works on read-only media
    assert r.returncode == 0 and "4 samples" in r.stdout, r.stderr
    refused(dsg(*GEN, "--out", str(point / "new")), "not writable")  # a new one cannot be made there
    r = dsg("quantize", "--model", MODEL, "--image-size", "8", "--calib", done, "--out",
            str(tmp_path / "q.safetensors"))
    assert r.returncode == 0, r.stderr  # and it calibrates


def test_generate_on_a_full_disk_keeps_finished_shards(tmp_path, tmpfs):
    point, remount = tmpfs
    out = str(point / "d")
    big = point / "filler"
    big.write_bytes(b"\0" * (256 * 1024 - 48 * 1024))  # leaves room for the manifest and a few shards
    args = ["generate", "--model", MODEL, "--method", "zeroq", "--iterations", "2", "--batch-size", "1",
            "--image-size", "16", "--num-samples", "16", "--out", out]
    r = dsg(*args)
    refused(r, "No space left on device")
    finished = sorted(n for n in os.listdir(out) if n.startswith("shard_") and n.endswith(".json"))
    assert finished, "some shards fit before the disk was full"
    big.unlink()
    r = dsg(*args)  # resumes: the finished shards are kept
    assert r.returncode == 0 and "16 samples" in r.stdout, r.stderr


def test_quantize_out_is_checked_before_calibration(tmp_path, monkeypatch, capsys):
    from dsg_ext import quantization

    def must_not_run(*a, **k):
        raise AssertionError("calibration ran although --out cannot be written")

    monkeypatch.setattr(quantization, "calibrate", must_not_run)
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(__file__)))
    base = ["quantize", "--model", MODEL, "--image-size", "8", "--real", "noise"]
    (tmp_path / "adir").mkdir()
    for out, message in ((tmp_path / "missing" / "q.safetensors", "does not exist"),
                         (tmp_path / "adir", "is a directory"), ("", "name is empty")):
        assert cli.main([*base, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    existing = tmp_path / "q.safetensors"
    existing.write_bytes(b"finished work")
    assert cli.main([*base, "--out", str(existing)]) == 2
    assert "use --force" in capsys.readouterr().err
    assert existing.read_bytes() == b"finished work"


def test_eval_json_is_checked_before_evaluation(tmp_path, monkeypatch, capsys):
    import dsg_ext.evaluation

    monkeypatch.setattr(dsg_ext.evaluation, "evaluate", lambda *a, **k: (_ for _ in ()).throw(
        AssertionError("evaluation ran although --json cannot be written")))
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(__file__)))
    (tmp_path / "adir").mkdir()
    for target, message in ((tmp_path / "missing" / "r.json", "does not exist"), (tmp_path / "adir", "directory")):
        assert cli.main(["eval", "--model", MODEL, "--image-size", "8", "--data", "skimage-photos",
                         "--json", str(target)]) == 2
        assert message in capsys.readouterr().err


def test_library_generate_refuses_like_the_command(tmp_path):
    from dsg_ext.errors import OutputError

    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        generate(MODEL, str(tmp_path / "f"), SynthesisConfig(iterations=1, batch_size=2, image_size=8), 2,
                 show_progress=False)
    shutil.rmtree(tmp_path)
