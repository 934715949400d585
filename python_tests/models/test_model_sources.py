"""Model sources beyond eager modules: TorchScript files (scripted and traced), torch.export programs
(.pt2) and timm architectures -- BN taps, synthesis and quantization must see the same network as the
eager model the file was made from."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import residual_net, tiny_bn_net
from torch import nn

from dsg_ext import quantization as Q
from dsg_ext.errors import ModelSourceError
from dsg_ext.models import load_model, model_identity
from dsg_ext.synthesis import SynthesisConfig, synthesize_batch

SIZE = 64  # ResNet-18 reaches 2x2 feature maps (per-sample statistics need more than one pixel)


def _save(model: nn.Module, kind: str, path) -> str:
    x = torch.randn(2, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if kind == "script":
            torch.jit.script(model).save(str(path))
        elif kind == "trace":
            torch.jit.trace(model, x).save(str(path))
        else:
            ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(ep, str(path))
    return str(path)


def _counts(model: nn.Module):
    kinds = (nn.BatchNorm2d, nn.Conv2d, nn.Linear)
    return [sum(isinstance(m, k) for m in model.modules()) for k in kinds]


@pytest.mark.parametrize("kind,suffix", [("script", ".pt"), ("trace", ".ts"), ("export", ".pt2")])
@pytest.mark.parametrize("make", [tiny_bn_net, residual_net])
def test_graph_sources_match_the_eager_model(tmp_path, make, kind, suffix):
    eager = make()
    path = _save(eager, kind, tmp_path / f"model{suffix}")
    loaded = load_model(path, image_size=SIZE, trust_model_code=kind != "export")
    model = loaded.model
    assert loaded.input.channels == 3 and loaded.input.image_size == SIZE
    # every BN / Conv2d / Linear is a module again, holding the same tensors
    assert _counts(model) == _counts(eager)
    x = torch.randn(5, 3, SIZE, SIZE, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.double()(x), eager.double()(x), rtol=1e-12, atol=1e-12)
    model.float(), eager.float()
    bn_eager = [m for m in eager.modules() if isinstance(m, nn.BatchNorm2d)]
    bn_file = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(float(m.running_var.sum()) for m in bn_file) == pytest.approx(sorted(float(m.running_var.sum()) for m in bn_eager))

    # synthesis through the BN taps: the same images from the file as from the eager model
    cfg = SynthesisConfig(method="dsg", iterations=4, batch_size=4, image_size=SIZE)
    a = synthesize_batch(eager, cfg, batch_index=0)
    b = synthesize_batch(model, cfg, batch_index=0)
    torch.testing.assert_close(b.images, a.images, rtol=1e-4, atol=1e-5)

    # quantization finds the same layers and gives the same outputs
    calib = torch.randn(8, 3, SIZE, SIZE)
    outs = []
    for m in (eager, model):
        q = Q.quantize_model(m, Q.QuantConfig(wbits=4, abits=8), calib[:2])
        Q.calibrate(q, calib)
        assert len(q.dsg_quant_order) == _counts(eager)[1] + _counts(eager)[2]
        with torch.no_grad():
            outs.append(q(calib))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_export_program_keeps_the_eager_identity(tmp_path):
    eager = residual_net()
    loaded = load_model(_save(eager, "export", tmp_path / "m.pt2"))
    assert loaded.identity == model_identity(eager)
    assert loaded.input.image_size == SIZE  # taken from the program when --image-size is not given


def test_unreadable_graph_file_is_named(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(ModelSourceError, match="--trust-model-code"):
        load_model(str(bad))
    with pytest.raises(ModelSourceError, match="neither a TorchScript file nor a torch.export program"):
        load_model(str(bad), trust_model_code=True)
    bad2 = tmp_path / "model.pt2"
    bad2.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelSourceError, match="not a torch.export program file"):
        load_model(str(bad2))


timm = pytest.importorskip("timm", reason="timm sources need the timm package")


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenetv3_small_100"])
def test_timm_models_are_tapped_at_every_batchnorm(name):
    """timm's BatchNormAct2d (BN fused with its activation) subclasses BatchNorm2d: every one is
    tapped, on its input, and synthesis lowers the loss."""
    loaded = load_model(f"timm:{name}", image_size=SIZE)
    bns = [m for m in loaded.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) > 10
    with torch.no_grad():
        for m in bns:
            m.running_var.uniform_(0.5, 2.0)
    cfg = SynthesisConfig(method="dsg", iterations=12, batch_size=4, image_size=SIZE, lr=0.1)
    r = synthesize_batch(loaded.model, cfg, batch_index=0)
    assert len(r.initial_layer_losses) == len(bns)
    assert r.final_loss < r.initial_loss


def test_cli_generate_quantize_eval_from_a_torchscript_file(tmp_path):
    """The whole command-line path on a graph source: generate -> quantize (AdaRound) -> eval reload."""
    import os
    import subprocess
    import sys

    path = _save(tiny_bn_net(), "script", tmp_path / "tiny.pt")

    def dsg(*args):
        r = subprocess.run([sys.executable, "-m", "dsg_ext", *args], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONWARNINGS="ignore"))
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    data, out = str(tmp_path / "data"), str(tmp_path / "q.safetensors")
    r = subprocess.run([sys.executable, "-m", "dsg_ext", "generate", "--model", path, "--out", data],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--trust-model-code" in r.stderr and not os.path.exists(data)
    path = (path, "--trust-model-code")
    dsg("generate", "--model", *path, "--num-samples", "8", "--batch-size", "4", "--iterations", "3",
        "--image-size", "16", "--out", data)
    r = dsg("quantize", "--model", *path, "--calib", data, "--image-size", "16", "--wbits", "4", "--abits", "8",
            "--adaround", "--adaround-iters", "3", "--out", out)
    assert "AdaRound: " in r.stdout
    r = dsg("eval", "--model", *path, "--quantized", out, "--data", "skimage-photos", "--image-size", "16")
    assert "agreement with FP32" in r.stdout
    r = dsg("eval", "--model", *path, "--quantized", out, "--data", data, "--image-size", "16")  # synthetic images
    assert "agreement with FP32" in r.stdout and "8 images" in r.stdout.replace(":", "")
