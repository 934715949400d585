"""Empirical bias correction: against a layer-by-layer float64 reference (one full forward per layer,
no hooks), layers without a bias, save/load, bad input, the `dsg quantize --bias-correction` flag."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import dsg, images
from tiny_models import bias_free_net, tiny_bn_net
from torch import nn

from dsg_ext import quantization as Q
from dsg_ext.errors import ConfigError, InvalidDataError


def quantized(model, calib, wbits=3, abits=6):
    q = Q.quantize_model(model, Q.QuantConfig(wbits=wbits, abits=abits, first_last_bits=None), calib[:2])
    Q.calibrate(q, calib)
    return q


def output_means(model, names, x):
    """Per-channel output means of ``names``, one plain forward (no output changed)."""
    got = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, o, n=n: got.__setitem__(n, o.mean(dim=[0, 2, 3]) if o.dim() == 4 else o.mean(0)))
        for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return got


def reference_biases(q, fp, x):
    """Layer by layer in float64: each layer's correction from a whole forward of the model with the
    corrections of the layers before it applied (as biases, nothing else)."""
    q, fp, x = copy.deepcopy(q).double(), copy.deepcopy(fp).double(), x.double()
    target = output_means(fp, q.dsg_quant_order, x)
    for name in q.dsg_quant_order:
        layer = q.get_submodule(name)
        delta = target[name] - output_means(q, [name], x)[name]
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(delta), requires_grad=False)
        layer.bias.data += delta
    return {n: q.get_submodule(n).bias.detach() for n in q.dsg_quant_order}


@pytest.mark.parametrize("make", [tiny_bn_net, bias_free_net])
def test_matches_the_layer_by_layer_float64_reference(make):
    fp, calib = make(), images(48, size=12, seed=3)
    q = quantized(fp, calib)
    expected = reference_biases(q, fp, calib)
    records = Q.correct_bias(q, fp, calib)
    assert [r["layer"] for r in records] == q.dsg_quant_order
    assert any(r["max_abs"] > 1e-3 for r in records)  # 3-bit weights do shift the means
    for name in q.dsg_quant_order:
        got = q.get_submodule(name).bias.detach().double()
        torch.testing.assert_close(got, expected[name], atol=2e-5, rtol=1e-4)
    # the corrected model's layer outputs have the float model's channel means on these images
    after, fp_means = output_means(q, q.dsg_quant_order, calib), output_means(fp, q.dsg_quant_order, calib)
    for name in q.dsg_quant_order:
        torch.testing.assert_close(after[name], fp_means[name], atol=1e-4, rtol=1e-3)


def test_bias_correction_brings_the_quantized_outputs_closer_on_held_out_images():
    fp, calib, held_out = tiny_bn_net(), images(64, seed=4), images(64, seed=5)
    q = quantized(fp, calib, wbits=3, abits=None)
    with torch.no_grad():
        before = (q(held_out) - fp(held_out)).mean(0).abs().mean()
        Q.correct_bias(q, fp, calib)
        after = (q(held_out) - fp(held_out)).mean(0).abs().mean()
    assert after < 0.5 * before


def test_an_added_bias_is_saved_and_loaded(tmp_path):
    from dsg_ext.models import model_identity

    fp, calib = bias_free_net(), images(32, size=12, seed=6)
    q = quantized(fp, calib)
    Q.correct_bias(q, fp, calib)
    assert all(q.get_submodule(n).bias is not None for n in q.dsg_quant_order)
    path = str(tmp_path / "q.safetensors")
    Q.save_quantized(q, path, "test:bias_free_net", model_identity(fp))
    loaded = Q.load_quantized(bias_free_net(), path, model_identity(fp), calib[:2])
    x = images(8, size=12, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q(x))
    assert bias_free_net()[0].bias is None  # the float model itself is untouched


def test_bad_input_is_refused_and_leaves_the_model_as_it_was():
    fp, calib = tiny_bn_net(), images(16)
    q = quantized(fp, calib)
    biases = {n: q.get_submodule(n).bias.clone() for n in q.dsg_quant_order}
    with pytest.raises(InvalidDataError, match="NaN"):
        Q.correct_bias(q, fp, torch.full_like(calib, float("nan")))
    with pytest.raises(InvalidDataError, match="no images"):
        Q.correct_bias(q, fp, calib[:0])
    with pytest.raises(ConfigError, match="no layer"):
        Q.correct_bias(q, bias_free_net(), calib)
    other = tiny_bn_net()
    other[11] = nn.Linear(16, 7)  # same names, another head
    with pytest.raises(ConfigError, match="output channels"):
        Q.correct_bias(q, other, calib)
    for n, b in biases.items():  # the layers corrected before the refusal were restored
        assert torch.equal(q.get_submodule(n).bias, b)


def write_images(root, seed):
    """Six random 20x20 RGB PNGs in ``root``/cls (an ImageFolder for ``--real``)."""
    from PIL import Image

    (root / "cls").mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(6):
        Image.fromarray((torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / "cls" / f"{i}.png")


def test_cli_bias_correction(tmp_path):
    write_images(tmp_path / "imgs", seed=0)
    out = str(tmp_path / "q.safetensors")
    r = dsg("quantize", "--model", "tiny_models:bias_free_net", "--real", str(tmp_path / "imgs"), "--image-size", "16",
            "--bias-correction", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "bias correction: 3 layers" in r.stdout
    _, meta = Q.read_quantized(out)
    assert len(meta["bias_correction"]) == 3
    r = dsg("eval", "--model", "tiny_models:bias_free_net", "--quantized", out, "--data", str(tmp_path / "imgs"),
            "--image-size", "16")
    assert r.returncode == 0, r.stderr
    # the added biases reach the deployed file: onnxruntime computes what our model does
    r = dsg("export", "--model", "tiny_models:bias_free_net", "--quantized", out, "--image-size", "16",
            "--out", str(tmp_path / "q.onnx"))
    assert r.returncode == 0, r.stderr
    diff = float(r.stdout.split("max |logit diff|")[1].split()[0])
    assert diff < 1e-4, r.stdout


@pytest.mark.parametrize("error", [InvalidDataError("the output mean is not finite"), KeyboardInterrupt()])
def test_a_failed_bias_correction_after_reconstruction_keeps_the_reconstructed_model(tmp_path, monkeypatch, capsys,
                                                                                     error):
    from dsg_ext.cli import main

    write_images(tmp_path / "imgs", seed=1)
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        raise error

    monkeypatch.setattr(Q, "correct_bias", fail)
    common = ["--model", "tiny_models:bias_free_net", "--real", str(tmp_path / "imgs"), "--image-size", "16",
              "--bias-correction"]
    out = tmp_path / "q.safetensors"
    argv = ["quantize", *common, "--adaround", "--adaround-iters", "3", "--out", str(out)]
    if isinstance(error, KeyboardInterrupt):
        assert main(argv) == 130
    else:
        assert main(argv) == 2
        assert "bias correction failed (the output mean is not finite)" in capsys.readouterr().err
    assert calls and out.exists()  # the reconstruction is kept, uncorrected, and the file says why
    _, meta = Q.read_quantized(str(out))
    assert meta["bias_correction"] is None and meta["adaround_layers"]
    assert meta["bias_correction_failed"] == (str(error) or "KeyboardInterrupt")
    # without a reconstruction before it nothing is worth keeping: the refusal writes no file
    out2 = tmp_path / "plain.safetensors"
    if not isinstance(error, KeyboardInterrupt):
        assert main(["quantize", *common, "--out", str(out2)]) == 2
        assert not out2.exists()
