"""The learned rounding started from the second-order rounding: with the rounding variables left
where they start it reproduces GPTQ's integers exactly; with learning, the keep-better guard never
leaves a unit worse than GPTQ's decision; GPTQ alone through ``reconstruct``; the options' checks."""

import dataclasses

import pytest
import torch
from helpers import calibrated as _calibrated

from dsg_ext import quantization as Q
from dsg_ext.errors import ConfigError
from dsg_ext.quantization.algorithms.second_order import gptq


def _ints(qmodel):
    return {n: wq.w_int.clone() for n, wq in Q.weight_quantizers(qmodel).items()}


def test_gptq_alone_through_reconstruct_is_the_gptq_step():
    model, a, images = _calibrated(wbits=3)
    b = _calibrated(wbits=3)[1]
    records = Q.reconstruct(a, model, images, Q.AdaRoundConfig.from_preset("gptq"), progress=False)
    gptq(b, images, progress=False)
    assert {k: v.tolist() for k, v in _ints(a).items()} == {k: v.tolist() for k, v in _ints(b).items()}
    assert [r["kind"] for r in records] == ["gptq"] * len(a.dsg_quant_order)
    assert all(wq.start_weight is None for wq in Q.weight_quantizers(a).values())
    line, warning = Q.reconstruction_summary(records)
    assert line.startswith(f"GPTQ: {len(records)} layers rounded") and warning is None


def test_rounding_variables_start_at_gptqs_decision():
    """lr ~ 0 and no regularizer: the hard rounding of the starting variables is GPTQ's integers, even
    where GPTQ moved a weight more than one step from its own nearest rounding."""
    model, a, images = _calibrated(wbits=3)
    b = _calibrated(wbits=3)[1]
    gptq(b, images, progress=False)
    wanted = _ints(b)
    moved = 0
    for name, wq in Q.weight_quantizers(b).items():
        w = Q.prepare.float_weight(b, name).detach()
        low = torch.floor(w / wq.scale.view(wq.broadcast_shape(w)))
        q = wanted[name].float()
        moved += int(((q != low) & (q != low + 1) & (q > wq.qmin) & (q < wq.qmax)).sum())
    config = Q.AdaRoundConfig(start="gptq", unit="layer", iterations=1, lr=1e-12, reg_weight=0.0, keep_better=False,
                              engine="loop")
    records = Q.reconstruct(a, model, images, config, progress=False)
    assert {r["start"] for r in records if r["kind"] != "gptq"} == {"gptq"}
    assert {k: v.tolist() for k, v in _ints(a).items()} == {k: v.tolist() for k, v in wanted.items()}
    assert moved > 0  # the test covers weights GPTQ put outside their own two grid neighbours


def test_refinement_from_gptq_is_never_worse_than_gptq_on_the_calibration_data():
    model, qmodel, images = _calibrated(wbits=3)
    config = Q.AdaRoundConfig(start="gptq", unit="layer", iterations=30, lr=1e-2, engine="loop")
    records = [r for r in Q.reconstruct(qmodel, model, images, config, progress=False) if r["kind"] != "gptq"]
    assert records and all(r["start"] == "gptq" for r in records)
    for r in records:
        kept = r["rec_loss_adaround"] if r["kept"] == "adaround" else r["rec_loss_nearest"]
        assert kept <= r["rec_loss_nearest"] and r["kept"] in ("adaround", "gptq")
    assert "than GPTQ's rounding" in Q.reconstruction_summary(records)[0]


def test_a_unit_kept_at_gptqs_decision_keeps_gptqs_integers():
    model, a, images = _calibrated(wbits=3)
    b = _calibrated(wbits=3)[1]
    gptq(b, images, progress=False)
    # a learning rate that wrecks the rounding: the guard must bring every unit back to GPTQ's integers
    config = Q.AdaRoundConfig(start="gptq", unit="layer", iterations=20, lr=50.0, warmup=0.0, engine="loop")
    records = [r for r in Q.reconstruct(a, model, images, config, progress=False) if r["kind"] != "gptq"]
    back = [r["layer"] for r in records if r["kept"] == "gptq"]
    assert back
    for name in back:
        assert torch.equal(Q.weight_quantizers(a)[name].w_int, Q.weight_quantizers(b)[name].w_int)


def test_start_options_are_checked():
    with pytest.raises(ConfigError, match="iterations must be an integer >= 1"):
        Q.AdaRoundConfig(iterations=0).validate()
    Q.AdaRoundConfig(start="gptq", iterations=0).validate()
    for bad in ({"start": "random"}, {"gptq_damp": 0.0}, {"gptq_damp": float("nan")}):
        with pytest.raises(ConfigError):
            dataclasses.replace(Q.AdaRoundConfig(), **bad).validate()


def test_a_layer_where_gptq_measures_worse_keeps_nearest_rounding(monkeypatch):
    import dsg_ext.quantization.algorithms.second_order as G

    model, qmodel, images = _calibrated(wbits=3)
    real = G.gptq_round

    def off_by_one(w, h, scale, zp, qmin, qmax, *a, **k):  # a rounding far worse than nearest
        q, err, lam, comp = real(w, h, scale, zp, qmin, qmax, *a, **k)
        return torch.where(q < qmax, q + 1, q - 1), err, lam, comp

    monkeypatch.setattr(G, "gptq_round", off_by_one)
    records = gptq(qmodel, images, progress=False)
    assert {r["kept"] for r in records} == {"nearest"}
    for r in records:
        assert r["error"] == r["nearest_error"] < r["gptq_error"] and r["changed"] == 0.0
    assert all(wq.start_weight is None for wq in Q.weight_quantizers(qmodel).values())
