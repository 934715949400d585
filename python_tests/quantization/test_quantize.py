"""Quantization: builder, observers against direct computations, AdaRound, save/load, bad input,
the `dsg quantize/eval/demo` commands (CPU)."""

from __future__ import annotations

import copy
import functools
import json
import os

import pytest
import torch
from helpers import dsg, images
from tiny_models import tiny_bn_net
from torch import nn

from dsg_ext import quantization as Q
from dsg_ext.data.calibration import synthetic_calibration
from dsg_ext.errors import ConfigError, DataSourceError, InvalidDataError, QuantizationError, QuantizedFileError
from dsg_ext.evaluation import fidelity
from dsg_ext.quantization.qparams import fake_quant_broadcast

FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
needs_fashion = pytest.mark.skipif(not os.path.exists(FASHION), reason="needs the Debian package dataset-fashion-mnist")



def quantized(config=None, model=None, calib=None):
    model = model or tiny_bn_net()
    calib = images() if calib is None else calib
    q = Q.quantize_model(model, config or Q.QuantConfig(), calib[:2])
    Q.calibrate(q, calib)
    return model, q


# ---------------------------------------------------------------------------------------------
# builder
# ---------------------------------------------------------------------------------------------


def test_every_conv_and_linear_is_quantized_and_the_original_untouched():
    model = tiny_bn_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = Q.quantize_model(model, Q.QuantConfig(), images()[:2])
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert q.dsg_quant_order == layers
    for name in layers:
        assert isinstance(q.get_submodule(name).parametrizations.weight[0], Q.WeightQuantizer)
        assert isinstance(q.get_submodule(name).act_quant, Q.ActQuantizer)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # first and last layers at 8 bits, the others at 4
    wq = Q.weight_quantizers(q)
    assert [wq[n].bits for n in layers] == [8, 4, 4, 8]


def test_eight_bit_model_is_close_to_fp32_and_four_bit_is_further():
    x = images(64, seed=5)
    model, q8 = quantized(Q.QuantConfig(wbits=8, abits=8))
    _, q4 = quantized(Q.QuantConfig(wbits=4, abits=4, first_last_bits=None))
    with torch.no_grad():
        ref = model(x)
        err8 = (q8(x) - ref).norm() / ref.norm()
        err4 = (q4(x) - ref).norm() / ref.norm()
    assert err8 < 0.03
    assert err4 > 3 * err8


def test_weight_fake_quant_matches_direct_per_channel_and_per_tensor():
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64).float()
    for per_channel in (True, False):
        for symmetric in (True, False):
            wq = Q.WeightQuantizer(w, 4, per_channel, symmetric, "minmax")
            flat = w.double().reshape(6, -1) if per_channel else w.double().reshape(1, -1)
            lo, hi = flat.min(1).values.clamp(max=0), flat.max(1).values.clamp(min=0)
            if symmetric:
                scale, zp, qmin, qmax = torch.maximum(hi, -lo) / 7, torch.zeros_like(hi), -8, 7
            else:
                scale = (hi - lo) / 15
                zp, qmin, qmax = (0 - torch.round(lo / scale)).clamp(0, 15), 0, 15
            shape = (-1, 1, 1, 1) if per_channel else (1, 1, 1, 1)
            s, z = scale.view(shape), zp.view(shape)
            expect = (torch.clamp(torch.round(w.double() / s) + z, qmin, qmax) - z) * s
            torch.testing.assert_close(wq(w).double(), expect, rtol=1e-6, atol=1e-6)
            wq.finalize(w)
            torch.testing.assert_close(wq(w).double(), expect, rtol=1e-6, atol=1e-6)


def test_relu_placement_puts_quantizers_after_relus():
    model, q = quantized(Q.QuantConfig(act_placement="relu"))
    relus = [n for n, m in q.named_modules() if isinstance(m, nn.ReLU)]
    assert set(Q.act_quantizers(q)) == set(relus)
    with pytest.raises(ConfigError, match="ReLU"):
        Q.quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), Q.QuantConfig(act_placement="relu"))


def test_bn_folding_keeps_the_float_function():
    model = tiny_bn_net()
    folded = Q.quantize_model(model, Q.QuantConfig(fold_bn=True), images()[:2])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    q_nofold = Q.quantize_model(model, Q.QuantConfig(fold_bn=False, abits=None, wbits=8, first_last_bits=None))
    q_fold = Q.quantize_model(model, Q.QuantConfig(fold_bn=True, abits=None, wbits=8, first_last_bits=None))
    x = images(8, seed=3)
    with torch.no_grad():
        ref = model(x)
        assert (q_fold(x) - ref).norm() / ref.norm() < 0.03
        assert (q_nofold(x) - ref).norm() / ref.norm() < 0.03
    pairs = Q.fold_batchnorm(tiny_bn_net())
    assert pairs == [("0", "1"), ("3", "4"), ("6", "7")]


def test_timm_batchnorm_act_folds_and_keeps_its_activation():
    """timm's BatchNormAct2d (a BatchNorm2d subclass that applies its dropout and activation too) folds like a
    BatchNorm2d; its activation stays, so the function is unchanged and the deploy placement sees it."""
    norm_act = pytest.importorskip("timm.layers.norm_act")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), norm_act.BatchNormAct2d(8, act_layer=nn.ReLU),
                          nn.Conv2d(8, 8, 3), norm_act.BatchNormAct2d(8, act_layer=nn.Hardswish, drop_layer=nn.Dropout),
                          nn.Conv2d(8, 4, 1))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5), nn.init.uniform_(m.bias, -0.5, 0.5)
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    model.eval()
    x = images(4, seed=1)
    with torch.no_grad():
        ref = model(x)
    folded = copy.deepcopy(model)
    assert Q.fold_batchnorm(folded) == [("0", "1"), ("2", "3")]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert isinstance(folded[1], nn.ReLU) and isinstance(folded[3][1], nn.Hardswish)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# observers against direct computations
# ---------------------------------------------------------------------------------------------


def observe(observer, batches, **kw):
    aq = Q.ActQuantizer(4, False, functools.partial(Q.OBSERVERS[observer], symmetric=False, **kw))
    aq.start_calibration()
    for b in batches:
        aq(b)
    aq.finish_calibration()
    return aq


def direct_qparams(lo, hi, qmin=0, qmax=15):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (qmax - qmin)
    return scale, int(min(max(qmin - round(lo / scale), qmin), qmax))


BATCHES = [torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(i)) * (i + 1) + 0.3 * i for i in range(4)]


def test_minmax_observer():
    aq = observe("minmax", BATCHES)
    allv = torch.cat([b.flatten() for b in BATCHES]).double()
    scale, zp = direct_qparams(float(allv.min()), float(allv.max()))
    assert float(aq.scale) == pytest.approx(scale, rel=1e-6) and int(aq.zero_point) == zp


def test_ema_observer():
    aq = observe("ema", BATCHES)
    lo, hi = float(BATCHES[0].min()), float(BATCHES[0].max())
    for b in BATCHES[1:]:
        lo, hi = 0.9 * lo + 0.1 * float(b.min()), 0.9 * hi + 0.1 * float(b.max())
    scale, zp = direct_qparams(lo, hi)
    assert float(aq.scale) == pytest.approx(scale, rel=1e-5) and int(aq.zero_point) == zp


def test_percentile_observer():
    aq = observe("percentile", BATCHES, percentile=99.0)
    allv = torch.cat([b.flatten() for b in BATCHES]).double()
    lo, hi = float(torch.quantile(allv, 0.01)), float(torch.quantile(allv, 0.99))
    scale, zp = direct_qparams(lo, hi)
    assert float(aq.scale) == pytest.approx(scale, rel=1e-5) and int(aq.zero_point) == zp


def test_mse_observer_picks_the_best_candidate():
    aq = observe("mse", BATCHES)
    allv = torch.cat([b.flatten() for b in BATCHES]).double()
    lo, hi = float(allv.min()), float(allv.max())
    best = None
    for a in torch.linspace(0.2, 1.0, 50).tolist():  # the same candidates, one at a time, in float64
        scale, zp = direct_qparams(lo * a, hi * a)
        q = (torch.clamp(torch.round(allv / scale) + zp, 0, 15) - zp) * scale
        err = float((q - allv).pow(2).mean())
        if best is None or err < best[0] - 1e-12:
            best = (err, scale, zp)
    assert float(aq.scale) == pytest.approx(best[1], rel=1e-4) and int(aq.zero_point) == best[2]
    # and it is no worse than min/max
    mm = observe("minmax", BATCHES)

    def err_of(a):
        return float((fake_quant_broadcast(allv, a.scale.double(), a.zero_point.double(), 0, 15) - allv).pow(2).mean())

    assert err_of(aq) <= err_of(mm)


def test_observer_rejects_nan_and_unreached_layers():
    def quantizer():
        return Q.ActQuantizer(4, False, functools.partial(Q.MinMaxObserver, symmetric=False))

    aq = quantizer()
    aq.start_calibration()
    with pytest.raises(InvalidDataError, match="NaN"):
        aq(torch.tensor([1.0, float("nan")]))
    unreached = quantizer()
    unreached.start_calibration()
    with pytest.raises(QuantizationError, match="saw no data"):
        unreached.finish_calibration()
    with pytest.raises(QuantizationError, match="before calibration"):
        quantizer()(torch.ones(3))


# ---------------------------------------------------------------------------------------------
# AdaRound
# ---------------------------------------------------------------------------------------------


def test_adaround_reduces_reconstruction_error():
    model = tiny_bn_net()
    calib = images(64, seed=7)
    q = Q.quantize_model(model, Q.QuantConfig(wbits=3, abits=None, first_last_bits=None), calib[:2])
    records = Q.reconstruct(q, model, calib, Q.AdaRoundConfig(iterations=400, lr=1e-2), progress=False, layers=["3"])
    (r,) = records
    assert r["rec_loss_adaround"] < 0.9 * r["rec_loss_nearest"]
    wq = Q.weight_quantizers(q)["3"]
    assert wq.mode is Q.WeightMode.INT and wq.w_int.dtype == torch.int8
    assert int(wq.w_int.min()) >= -4 and int(wq.w_int.max()) <= 3


def _nearest_ints(q, name):
    wq = Q.weight_quantizers(q)[name]
    w = q.get_submodule(name).parametrizations.weight.original
    shape = wq.broadcast_shape(w)
    return torch.clamp(torch.round(w / wq.scale.view(shape)) + wq.zero_point.view(shape), wq.qmin, wq.qmax)


@pytest.mark.parametrize("keep_better", [True, False])
def test_adaround_never_left_worse_than_nearest_rounding(keep_better):
    """A schedule that wrecks the rounding (huge lr, 3 iterations, no regularizer) makes hard rounding
    worse than nearest; the guard keeps nearest rounding then -- and only then."""
    model = tiny_bn_net()
    calib = images(64, seed=7)
    q = Q.quantize_model(model, Q.QuantConfig(wbits=3, abits=None, first_last_bits=None), calib[:2])
    bad = Q.AdaRoundConfig(iterations=3, lr=50.0, warmup=0.99, keep_better=keep_better)
    (r,) = Q.reconstruct(q, model, calib, bad, progress=False, layers=["3"])
    assert r["rec_loss_adaround"] > r["rec_loss_nearest"]  # the sabotage worked
    assert r["changed_vs_nearest"] > 0.1
    wq = Q.weight_quantizers(q)["3"]
    same = torch.equal(wq.w_int.float(), _nearest_ints(q, "3"))
    assert r["kept"] == ("nearest" if keep_better else "adaround") and same == keep_better
    # a sane schedule is kept
    q2 = Q.quantize_model(model, Q.QuantConfig(wbits=3, abits=None, first_last_bits=None), calib[:2])
    (r2,) = Q.reconstruct(q2, model, calib, Q.AdaRoundConfig(iterations=400, lr=1e-2), progress=False, layers=["3"])
    assert r2["kept"] == "adaround" and 0 < r2["changed_vs_nearest"] < 0.5 and 0 <= r2["undecided"] <= 1
    assert "1/1 layers" in Q.reconstruction_summary([r2])[0]
    line, warning = Q.reconstruction_summary([r])
    assert "0/1 layers" in line and "too short" in warning
    settled = dict(r2, undecided=0.01)
    assert Q.reconstruction_summary([settled] * 4)[1] is None
    assert "too short" in Q.reconstruction_summary([settled] * 2 + [dict(r2, undecided=0.9)] * 2)[1]


def test_reconstruction_of_a_bn_folded_model_targets_the_folded_float_layers():
    """With fold_bn the quantized convolution computes conv+BN: its target is the folded float layer,
    not the unfolded convolution's output (BN's input). At 8 bits nearest rounding then reconstructs
    the layer about as well as without folding."""
    model, calib = tiny_bn_net(), images(32, seed=5)
    losses = {}
    for fold in (False, True):
        q = Q.quantize_model(model, Q.QuantConfig(wbits=8, abits=None, first_last_bits=None, fold_bn=fold), calib[:2])
        (r,) = Q.reconstruct(q, model, calib, Q.AdaRoundConfig(iterations=20), progress=False, layers=["3"])
        losses[fold] = r["rec_loss_nearest"]
    assert losses[True] < 3 * losses[False]
    assert Q.float_reference(Q.quantize_model(model, Q.QuantConfig(), calib[:2]), model) is model


def test_find_blocks_on_real_architectures():
    import torchvision

    from dsg_ext.models import load_model

    x = torch.randn(1, 3, 64, 64)
    r18 = Q.quantize_model(torchvision.models.resnet18(num_classes=10).eval(), Q.QuantConfig(), x)
    assert Q.find_blocks(r18) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    mv2 = Q.quantize_model(torchvision.models.mobilenet_v2(num_classes=10).eval(), Q.QuantConfig(), x)
    blocks = Q.find_blocks(mv2)
    assert len(blocks) == 17 and all(b.startswith("features.") for b in blocks)  # the inverted residuals
    loaded = load_model("fashion-mnist-resnet20")
    r20 = Q.quantize_model(loaded.model, Q.QuantConfig(), torch.randn(1, 1, 32, 32))
    assert len(Q.find_blocks(r20)) == 9
    assert Q.find_blocks(Q.quantize_model(tiny_bn_net(), Q.QuantConfig(), images()[:2])) == []


def test_block_reconstruction_rounds_a_residual_block_jointly():
    """BRECQ-style: both convolutions of a ResNet block rounded together to reconstruct the block's
    output (with its residual add and activation quantizers), never left worse than nearest rounding."""
    from tiny_models import residual_net

    model = residual_net()
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    q = Q.quantize_model(model, Q.QuantConfig(wbits=3, abits=8, first_last_bits=None), calib[:2])
    Q.calibrate(q, calib)
    layers = ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"]
    records = Q.reconstruct(q, model, calib, Q.AdaRoundConfig(iterations=300, lr=1e-2, batch_size=8), progress=False,
                         layers=layers, blocks=["layer1.0", "layer1.1"])
    assert [r["layer"] for r in records] == ["layer1.0", "layer1.1"]
    assert records[0]["kind"] == "block" and records[0]["layers"] == layers[:2]
    assert records[1]["layers"] == ["layer1.1.conv1"]  # only the layers asked for are rounded
    assert records[0]["rec_loss_adaround"] < 0.9 * records[0]["rec_loss_nearest"]
    wqs = Q.weight_quantizers(q)
    assert all(wqs[n].mode is Q.WeightMode.INT for n in layers) and wqs["layer1.1.conv2"].mode is Q.WeightMode.FAKE


# ---------------------------------------------------------------------------------------------
# save / load, fidelity
# ---------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    model, q = quantized(Q.QuantConfig(wbits=4, abits=4, observer="mse"))
    path = str(tmp_path / "q.safetensors")
    from dsg_ext.models import model_identity

    ident = model_identity(model)
    Q.save_quantized(q, path, "tiny_models:tiny_bn_net", ident)
    loaded = Q.load_quantized(tiny_bn_net(), path, ident, images()[:2])
    x = images(16, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))
    fid = fidelity(q, loaded, x)
    assert fid["top1_agreement"] == 100.0 and fid["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(QuantizedFileError, match="another model"):
        Q.load_quantized(tiny_bn_net(seed=1), path, model_identity(tiny_bn_net(seed=1)))
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(QuantizedFileError, match="not a readable"):
        Q.read_quantized(str(corrupt))
    with pytest.raises(QuantizedFileError, match="does not exist"):
        Q.read_quantized(str(tmp_path / "missing.safetensors"))


def test_fidelity_detects_a_different_model():
    model, q = quantized(Q.QuantConfig(wbits=2, abits=2, first_last_bits=None))
    fid = fidelity(model, q, images(64, seed=11))
    assert fid["mean_kl"] > 1e-3


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{"wbits": 1}, {"wbits": 9}, {"abits": 0}, {"first_last_bits": 16}, {"observer": "max"},
                                {"act_placement": "after"}, {"percentile": 20.0}])
def test_bad_quant_options(kw):
    with pytest.raises(ConfigError):
        Q.QuantConfig(**kw).validate()


def test_bad_calibration_data():
    model = tiny_bn_net()
    q = Q.quantize_model(model, Q.QuantConfig())
    with pytest.raises(InvalidDataError, match="no calibration images"):
        Q.calibrate(q, torch.empty(0, 3, 12, 12))
    bad = images(4)
    bad[1, 0, 0, 0] = float("inf")
    with pytest.raises(InvalidDataError, match="NaN or Inf"):
        Q.calibrate(q, bad)
    with pytest.raises(ConfigError, match="no Conv2d or Linear"):
        Q.quantize_model(nn.Sequential(nn.ReLU()), Q.QuantConfig())


def test_synthetic_calibration_of_another_model_is_refused(tmp_path):
    from dsg_ext.models import load_model
    from dsg_ext.synthesis import SynthesisConfig, generate

    out = str(tmp_path / "ds")
    generate("tiny_models:tiny_bn_net", out, SynthesisConfig(iterations=2, batch_size=4, image_size=12, lr=0.1),
             num_samples=4, show_progress=False)
    assert synthetic_calibration(out, load_model("tiny_models:tiny_bn_net", image_size=12)).shape == (4, 3, 12, 12)
    with pytest.raises(DataSourceError, match="another model"):
        synthetic_calibration(out, load_model("tiny_models:fixed_size_net", image_size=12))
    with pytest.raises(DataSourceError, match="shape"):
        synthetic_calibration(out, load_model("tiny_models:tiny_bn_net", image_size=16))
    with pytest.raises(DataSourceError, match="not a dsg_ext synthetic dataset"):
        synthetic_calibration(str(tmp_path), load_model("tiny_models:tiny_bn_net", image_size=12))


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------



def test_cli_quantize_eval_round_trip_and_refusals(tmp_path):
    img_dir = tmp_path / "imgs" / "cls"
    img_dir.mkdir(parents=True)
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i in range(6):
        arr = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(img_dir / f"{i}.png")
    out = str(tmp_path / "q.safetensors")
    r = dsg("quantize", "--model", "tiny_models:tiny_bn_net", "--real", str(tmp_path / "imgs"), "--wbits", "4",
            "--abits", "8", "--image-size", "16", "--out", out)
    assert r.returncode == 0, r.stderr
    r = dsg("eval", "--model", "tiny_models:tiny_bn_net", "--quantized", out, "--data", str(tmp_path / "imgs"),
            "--image-size", "16")
    assert r.returncode == 0, r.stderr
    assert "agreement with FP32" in r.stdout and "top-1" in r.stdout
    before = open(out, "rb").read()
    r = dsg("quantize", "--model", "tiny_models:tiny_bn_net", "--real", str(tmp_path / "imgs"), "--out", out)
    assert r.returncode == 2 and "exists" in r.stderr
    r = dsg("quantize", "--model", "tiny_models:tiny_bn_net", "--real", str(tmp_path / "imgs"), "--wbits", "9",
            "--out", out, "--force")
    assert r.returncode == 2 and "wbits" in r.stderr
    assert open(out, "rb").read() == before
    r = dsg("eval", "--model", "tiny_models:fixed_size_net", "--quantized", out, "--data", str(tmp_path / "imgs"),
            "--image-size", "12")
    assert r.returncode == 2 and "another model" in r.stderr
    r = dsg("eval", "--model", "tiny_models:fixed_size_net", "--quantized", out, "--data", str(tmp_path / "imgs"))
    assert r.returncode == 2 and "rejected a 1x3x224x224 input" in r.stderr and "Traceback" not in r.stderr
    r = dsg("quantize", "--model", "tiny_models:tiny_bn_net", "--real", str(tmp_path / "empty"), "--out", out, "--force")
    assert r.returncode == 2 and "no such directory" in r.stderr
    # block reconstruction (BRECQ) from the command line, on a residual network
    out2 = str(tmp_path / "r18.safetensors")
    r = dsg("quantize", "--model", "torchvision:resnet18", "--real", str(tmp_path / "imgs"), "--image-size", "32",
            "--adaround", "--adaround-iters", "3", "--reconstruct", "block", "--out", out2)
    assert r.returncode == 0, r.stderr
    assert "AdaRound:" in r.stdout
    _, meta = Q.read_quantized(out2)
    assert meta["reconstruct"] == "block"
    kinds = [rec["kind"] for rec in meta["adaround_layers"]]
    assert kinds.count("block") == 8 and kinds.count("layer") == 2  # stem conv and fc stay layer-wise


@needs_fashion
def test_demo_pipeline_at_tiny_settings(tmp_path):
    from dsg_ext.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=str(tmp_path / "demo"), samples=8, synth_iterations=2, synth_batch=8, adaround_iterations=2,
                     eval_samples=50, bits=[(4, 4)])
    lines = []
    result = run_demo(cfg, progress=False, log=lines.append)
    assert [r["source"] for r in result["rows"]] == ["real", "recommended", "dsg", "zeroq", "noise"]
    # its last lines say where each file went
    tail = "\n".join(lines[-4:])
    for name in ("demo.json", "demo.png", "report.html"):
        assert str(tmp_path / "demo" / name) in tail and (tmp_path / "demo" / name).is_file()
    assert result["config"]["reconstruction"] == "recommended"
    assert 0 <= result["rows"][0]["calibration"] <= 100 and result["fp32_top1"] > 80
    saved = json.load(open(tmp_path / "demo" / "demo.json"))
    assert saved["rows"] == result["rows"]
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 1000
    # a second run reuses the verified synthetic datasets
    again = run_demo(cfg, progress=False, log=lambda *_: None)
    assert again["timings"]["data_dsg_s"] < result["timings"]["data_dsg_s"] + 5
    from dsg_ext.data import store

    made = {m: store.load_manifest(str(tmp_path / "demo" / "data" / m))["config"] for m in ("recommended", "dsg")}
    assert made["recommended"]["method"] == "batch" and made["recommended"]["clamp_pixels"]
    assert made["dsg"]["method"] == "dsg" and not made["dsg"]["swing"]
    with pytest.raises(ConfigError, match="unknown reconstruction preset"):
        run_demo(DemoConfig(out=str(tmp_path / "demo2"), reconstruction="fast"), progress=False, log=lambda *_: None)
    assert not (tmp_path / "demo2").exists()  # refused before any work


@needs_fashion
def test_demo_bias_correction_corrects_both_columns(tmp_path, monkeypatch):
    from dsg_ext.demo import DemoConfig, format_table, run_demo

    corrected = []
    real = Q.correct_bias
    monkeypatch.setattr(Q, "correct_bias", lambda q, *a, **k: corrected.append(q) or real(q, *a, **k))
    cfg = DemoConfig(out=str(tmp_path / "demo"), samples=8, adaround_iterations=2, eval_samples=50,
                     bits=[(4, 4), (8, 8)], sources=("real", "noise"), bias_correction=True)
    result = run_demo(cfg, progress=False, log=lambda *_: None)
    # W4A4: the plain and the reconstructed model of each source; W8A8 (not reconstructed): the plain one
    assert len(corrected) == 6 and len({id(q) for q in corrected}) == 6
    assert all(q.get_submodule(q.dsg_quant_order[0]).bias is not None for q in corrected)
    assert "both bias-corrected" in format_table(result)


def test_photo_crops_are_deterministic_real_images():
    pytest.importorskip("skimage", reason="needs scikit-image (installed by scripts/setup.sh)")
    from dsg_ext.data.photos import photo_crops
    from dsg_ext.models import InputSpec

    spec = InputSpec(3, 16, mean=(0.5,) * 3, std=(0.25,) * 3)
    a = photo_crops(spec, crops_per_photo=2, photos=["astronaut.png", "coffee.png"])
    b = photo_crops(spec, crops_per_photo=2, photos=["astronaut.png", "coffee.png"])
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b)
    assert -2.0 - 1e-6 <= float(a.min()) and float(a.max()) <= 2.0 + 1e-6 and float(a.std()) > 0.1
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("placement", ["input", "deploy"])
def test_a_layer_the_eval_forward_never_runs_stays_float_and_the_rest_quantizes_saves_and_exports(tmp_path, placement):
    """GoogLeNet's auxiliary heads run only in training: calibration names their quantizers and leaves them
    float instead of refusing the model; the file keeps that, GPTQ rounds their weights to nearest, and the
    exported file (an eval-mode trace) has no node of them."""
    import warnings

    from tiny_models import aux_head_net

    from dsg_ext import gptq
    from dsg_ext.export import export_onnx
    from dsg_ext.models.spec import model_identity

    model = aux_head_net()
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    extra = Q.TARGETS["onnxruntime"] if placement == "deploy" else {}
    q = Q.quantize_model(model, Q.QuantConfig(**{**extra, "wbits": 8, "abits": 8}), x[:1])
    with pytest.warns(UserWarning, match=r"saw no calibration data .* stay float: .*aux"):
        Q.calibrate(q, x)
    unreached = [n for n, aq in Q.act_quantizers(q).items() if aq.unreached]
    assert unreached and all(n.startswith("aux") for n in unreached)
    with pytest.warns(UserWarning, match=r"GPTQ: layer 'aux\.0' is not reached by the forward pass"):
        records = gptq(q, x, progress=False)
    assert {r["layer"]: r["kept"] for r in records}["aux.0"] == "nearest"
    with torch.no_grad():
        ours = q(x)
    path = str(tmp_path / "q.safetensors")
    Q.save_quantized(q, path, "tiny_models:aux_head_net", model_identity(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading warns about nothing
        loaded = Q.load_quantized(aux_head_net(), path, model_identity(model), x[:1])
    assert [n for n, aq in Q.act_quantizers(loaded).items() if aq.unreached] == unreached
    with torch.no_grad():
        assert torch.equal(loaded(x), ours)
    record = export_onnx(loaded, x[:2], str(tmp_path / "q.onnx"))
    assert record["runtime"] is None or all("aux" not in f for f in record["runtime"]["float_nodes"])


def test_calibration_that_reaches_no_quantizer_is_refused():
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = tiny_bn_net()

        def forward(self, x):
            return x.mean((1, 2, 3))

    q = Q.quantize_model(Detached().eval(), Q.QuantConfig(wbits=8, abits=8), torch.zeros(1, 3, 12, 12))
    with pytest.raises(QuantizationError, match="reaches none of its quantized layers"):
        Q.calibrate(q, torch.randn(4, 3, 12, 12))


def test_reconstruction_skips_a_unit_the_forward_never_runs_and_says_so():
    from tiny_models import aux_head_net

    model = aux_head_net()
    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    q = Q.quantize_model(model, Q.QuantConfig(wbits=4, abits=8), x[:1])
    with pytest.warns(UserWarning, match="saw no calibration data"):
        Q.calibrate(q, x)
    with pytest.warns(UserWarning, match=r"reconstruction: 'aux\.0' is not reached"):
        records = Q.reconstruct(q, model, x, Q.AdaRoundConfig(iterations=3, unit="layer"), progress=False)
    assert [r["kind"] for r in records if r.get("unit", r.get("layer", "")).startswith("aux")] == ["unreached"] * 2
    assert Q.reconstruction_summary(records)[0].startswith("AdaRound: ")
