"""Reconstruction beyond the rounding: QDrop, LSQ activation step sizes and weight scales learned
jointly with AdaRound, the named presets -- checked against torch's own implementations where one
exists, and for leaving every quantizer clean (no learnable scale, no dropping) afterwards."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_bn_net

from dsg_ext import quantization as Q
from dsg_ext.errors import ConfigError


def images(n=32, size=12, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def calibrated(wbits=4, abits=4):
    model, calib = tiny_bn_net(), images(64, seed=7)
    q = Q.quantize_model(model, Q.QuantConfig(wbits=wbits, abits=abits, first_last_bits=None, observer="minmax"),
                         calib[:2])
    Q.calibrate(q, calib)
    return model, q, calib


def _act(q) -> Q.ActQuantizer:
    return Q.act_quantizers(q)["3"]


def test_qdrop_keeps_float_elements_with_the_given_probability():
    _, q, _ = calibrated()
    aq = _act(q)
    x = torch.randn(64, 8, 12, 12) * 2
    quantized = aq(x)
    assert not torch.equal(quantized, x)
    aq.drop_prob, aq.drop_generator = 0.3, torch.Generator().manual_seed(0)
    out = aq(x)
    differs = quantized != x
    is_float = (out == x) & differs
    is_quant = (out == quantized) & differs
    assert bool((is_float | is_quant | ~differs).all())  # each element: its float or its quantized value
    assert float(is_float.sum()) / float(differs.sum()) == pytest.approx(0.3, abs=0.02)
    aq.drop_prob = 0.0
    assert torch.equal(aq(x), quantized)


def test_lsq_step_size_gradient_matches_torch_learnable_fake_quant():
    _, q, _ = calibrated()
    aq = _act(q)
    x = torch.randn(5, 8, 7, 7) * 3
    step = aq.learn_scale()
    out = aq(x)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    factor = 1.0 / (x[0].numel() * aq.qmax) ** 0.5
    s_ref = aq.scale.detach().clone().reshape(1).requires_grad_()  # torch's learnable op is float32-only
    ref = torch._fake_quantize_learnable_per_tensor_affine(
        x, s_ref, aq.zero_point.float().reshape(1), aq.qmin, aq.qmax, factor)
    (ref * grad_out).sum().backward()
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=0)
    torch.testing.assert_close(step.grad.reshape(1), s_ref.grad, rtol=1e-4, atol=1e-6)
    start = aq.scale.clone()
    with torch.no_grad():
        step.mul_(1.5)
    aq.freeze_scale(keep=True)
    assert aq.scale_param is None and torch.allclose(aq.scale, 1.5 * start)
    aq.learn_scale()
    with torch.no_grad():
        aq.scale_param.fill_(-1.0)
    aq.freeze_scale(keep=True)  # a non-positive step is not stored
    assert torch.allclose(aq.scale, 1.5 * start)


def test_weight_scale_gradient_flows_through_adaround():
    _, q, _ = calibrated()
    wq = Q.weight_quantizers(q)["3"]
    w = Q.float_weight(q, "3")
    wq.start_adaround(w)
    s = wq.learn_scale()
    w_q = wq(w)
    w_q.sum().backward()
    assert s.grad is not None and s.grad.shape == wq.scale.shape and bool(s.grad.abs().sum() > 0)


def _clean(q) -> bool:
    acts = Q.act_quantizers(q).values()
    weights = Q.weight_quantizers(q).values()
    return (all(a.scale_param is None and a.drop_prob == 0 and a.drop_generator is None for a in acts)
            and all(w.scale_param is None and w.mode is Q.WeightMode.INT for w in weights))


@pytest.mark.parametrize("options", [
    dict(qdrop=0.5), dict(learn_act_scale=True, act_scale_lr=1e-3), dict(learn_weight_scale=True),
    dict(qdrop=0.5, learn_act_scale=True, learn_weight_scale=True, unit="block"),
])
def test_reconstruction_options_run_clean_and_never_worse_than_nearest(options):
    model, q, calib = calibrated()
    before = {n: a.scale.clone() for n, a in Q.act_quantizers(q).items()}
    records = Q.reconstruct(q, model, calib, Q.AdaRoundConfig(iterations=150, lr=1e-2, **options), progress=False)
    assert _clean(q)
    for r in records:
        assert r["kept"] == "nearest" or r["rec_loss_adaround"] <= r["rec_loss_nearest"]
    after = {n: a.scale for n, a in Q.act_quantizers(q).items()}
    assert all(bool((s > 0).all()) for s in after.values())
    moved = any(not torch.equal(before[n], after[n]) for n in before)
    kept = any(r["kept"] == "adaround" for r in records)
    assert moved == (bool(options.get("learn_act_scale")) and kept)


def test_qdrop_changes_the_result_and_is_reproducible():
    runs = []
    for qdrop in (0.0, 0.5, 0.5):
        model, q, calib = calibrated()
        Q.reconstruct(q, model, calib, Q.AdaRoundConfig(iterations=60, lr=1e-2, qdrop=qdrop), progress=False)
        runs.append(torch.cat([w.w_int.flatten().float() for w in Q.weight_quantizers(q).values()]))
    assert torch.equal(runs[1], runs[2]) and not torch.equal(runs[0], runs[1])


def test_interrupted_reconstruction_leaves_no_learnable_scale_or_dropping():
    model, q, calib = calibrated()
    import importlib

    R = importlib.import_module("dsg_ext.quantization.algorithms.reconstruct")  # the module, not the function

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt

    config = Q.AdaRoundConfig(iterations=20, qdrop=0.5, learn_act_scale=True, learn_weight_scale=True)
    with pytest.raises(KeyboardInterrupt):
        R._reconstruct_unit(q, model, "3", ["3"], calib, config, "cpu", torch.Generator().manual_seed(0), interrupt,
                            "device")
    assert all(a.scale_param is None and a.drop_prob == 0 for a in Q.act_quantizers(q).values())
    assert all(w.scale_param is None for w in Q.weight_quantizers(q).values())


def test_learned_scales_survive_save_and_load(tmp_path):
    from dsg_ext.models import model_identity

    model, q, calib = calibrated()
    Q.reconstruct(q, model, calib, Q.AdaRoundConfig(iterations=80, lr=1e-2, learn_act_scale=True, act_scale_lr=1e-3,
                                                   learn_weight_scale=True), progress=False)
    path = str(tmp_path / "q.safetensors")
    ident = model_identity(model)
    Q.save_quantized(q, path, "tiny_models:tiny_bn_net", ident)
    loaded = Q.load_quantized(tiny_bn_net(), path, ident, calib[:2])
    x = images(8, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_presets_and_bad_options():
    genie = Q.AdaRoundConfig.from_preset("genie").validate()
    assert (genie.iterations, genie.batch_size, genie.unit, genie.qdrop) == (20000, 32, "block", 0.5)
    assert genie.learn_act_scale and genie.learn_weight_scale
    assert (genie.lr, genie.weight_scale_lr, genie.act_scale_lr) == (1e-3, 1e-4, 4e-5)
    for name in Q.RECONSTRUCTION_PRESETS:
        Q.AdaRoundConfig.from_preset(name).validate()
    assert Q.AdaRoundConfig.from_preset("brecq", iterations=5).iterations == 5
    with pytest.raises(ConfigError, match="unknown reconstruction preset"):
        Q.AdaRoundConfig.from_preset("fast")
    for bad in (dict(qdrop=1.0), dict(qdrop=-0.1), dict(act_scale_lr=0.0), dict(weight_scale_lr=float("nan"))):
        with pytest.raises(ConfigError):
            Q.AdaRoundConfig(**bad).validate()
