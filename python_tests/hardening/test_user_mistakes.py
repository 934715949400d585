"""User mistakes on the command line and in the user's own model code: each gets a message naming
the problem and exit code 2 (never a traceback), and is caught before any long work or any file."""

import os
import subprocess
import sys

import pytest
import torch

from dsg_ext.errors import ModelSourceError, SynthesisError
from dsg_ext.models import load_model
from dsg_ext.synthesis import SynthesisConfig, generate

TESTS = os.path.dirname(os.path.dirname(__file__))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
GEN = ["generate", "--model", "tiny_models:tiny_bn_net", "--iterations", "2", "--batch-size", "2",
       "--image-size", "8", "--num-samples", "2"]


def dsg(*args):
    return subprocess.run([sys.executable, "-m", "dsg_ext", *args], capture_output=True, text=True, env=ENV)


def main(capsys, *args):
    """``dsg ARGS`` in this process (fast): its exit code and stderr."""
    from dsg_ext import cli

    try:
        code = cli.main(list(args))
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)


def refused(r, *messages):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for m in messages:
        assert m in r.stderr, r.stderr


@pytest.mark.parametrize("option", ["--enhancement", "--l2", "--tv", "--ce", "--lr", "--epsilon"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_synthesis_options_leave_no_directory(tmp_path, capsys, option, value):
    out = tmp_path / "d"
    refused(main(capsys, *GEN, f"{option}={value}", "--out", str(out)), "finite")
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--num-samples", "0"], "must be at least 1"),
    (["--num-samples", "-5"], "must be at least 1"),
    (["--batch-size", "0"], "batch size"),
    (["--iterations", "-1"], "iterations"),
    (["--device", "bogus"], "is not a device"),
    (["--device", "cuda:99"], "cuda:99"),
])
def test_bad_generate_options(tmp_path, capsys, args, message):
    refused(main(capsys, *GEN, *args, "--out", str(tmp_path / "d")), message)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("value", ["0", "-9990", "ten"])
def test_bad_image_counts_in_eval_and_quantize(tmp_path, capsys, value):
    refused(main(capsys, "eval", "--model", "fashion-mnist-resnet20", "--data", "fashion-mnist", "--max-images", value),
            "--max-images")
    refused(main(capsys, "quantize", "--model", "tiny_models:tiny_bn_net", "--real", "noise", "--num-samples", value,
                "--out", str(tmp_path / "q.safetensors")), "--num-samples")


def test_the_library_refuses_negative_counts_too():
    from dsg_ext.data.calibration import evaluation_images
    from dsg_ext.errors import ConfigError

    loaded = load_model("fashion-mnist-resnet20")
    with pytest.raises(ConfigError, match="--max-images"):
        evaluation_images(loaded, "fashion-mnist", -9990)


def test_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    refused(dsg(*GEN, "--device", "cuda", "--out", "/nonexistent/never"), "no CUDA GPU")


def test_a_constructor_that_fails_is_named():
    with pytest.raises(ModelSourceError, match="rejected its construction: RuntimeError: weights for this variant"):
        load_model("tiny_models:raising_constructor")
    refused(dsg("eval", "--model", "tiny_models:raising_constructor", "--data", "skimage-photos"),
            "rejected its construction", "weights for this variant are not configured")


def test_a_forward_assert_is_named_before_any_work(tmp_path):
    model = "tiny_models:asserting_forward_net"
    refused(dsg("generate", "--model", model, "--image-size", "8", "--out", str(tmp_path / "d")),
            "rejected a 1x3x8x8 input", "this network takes 12x12 images")
    refused(dsg("quantize", "--model", model, "--image-size", "8", "--real", "noise", "--out",
                str(tmp_path / "q.safetensors")), "rejected a 1x3x8x8 input")
    refused(dsg("eval", "--model", model, "--image-size", "8", "--data", "skimage-photos"), "rejected a 1x3x8x8")
    assert not os.listdir(tmp_path)
    r = dsg("generate", "--model", model, "--image-size", "12", "--iterations", "2", "--batch-size", "2",
            "--num-samples", "2", "--out", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr


def test_a_forward_that_switches_bn_to_training_is_refused(tmp_path):
    loaded = load_model("tiny_models:bn_training_net")
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    with pytest.raises(SynthesisError, match="runs in training mode"):
        generate("tiny_models:bn_training_net", str(tmp_path / "d"), SynthesisConfig(iterations=2, batch_size=2,
                 image_size=8), 2, show_progress=False)
    assert not any(n.startswith("shard_") for n in os.listdir(tmp_path / "d"))
    refused(dsg("generate", "--model", "tiny_models:bn_training_net", "--image-size", "8", "--iterations", "2",
                "--out", str(tmp_path / "e")), "runs in training mode")
    assert all(torch.equal(before[k], v) for k, v in loaded.model.state_dict().items())


def test_huge_integers_in_ops_name_the_argument():
    import dsg_ext

    x = torch.randn(4)
    with pytest.raises(ValueError, match="quant_max = 9223372036854775808 does not fit in 64 bits"):
        dsg_ext.fake_quant(x, 0.1, 0, 0, 2 ** 63)
    with pytest.raises(ValueError, match="quant_min"):
        dsg_ext.adaround(x, torch.zeros(4), 0.1, 0, -(2 ** 64), 7)
