"""Smoke test of studies/weight_sensitivity.py (CI runs studies/ once, untimed)."""

import json

import torch
import weight_sensitivity


def test_fake_quant_weight_is_per_channel_min_max_rounding():
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64) * torch.tensor([0.01, 1, 3, 0.5, 2.0]).view(5, 1, 1, 1)
    w[2] = w[2].abs()  # a channel without negative weights: its range starts at 0
    q = weight_sensitivity.fake_quant_weight(w.float(), 4).double()
    flat = w.flatten(1)
    lo, hi = flat.min(1).values.clamp(max=0), flat.max(1).values.clamp(min=0)
    scale = ((hi - lo) / 15).view(5, 1, 1, 1)
    assert ((q - w).abs() <= scale / 2 + 1e-6).all()
    steps, zero = q / scale, (-lo / scale.flatten()).round().view(5, 1, 1, 1)  # an integer grid holding 0
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert (steps + zero).min() > -1e-3 and (steps + zero).max() < 15 + 1e-3
    assert q.flatten(1).unique(dim=1).shape[1] > 1


def test_sixteen_bits_agree_and_every_layer_is_measured(tmp_path):
    out = tmp_path / "s.json"
    assert weight_sensitivity.main(["--model", "fashion-mnist-resnet20", "--eval-crops", "1", "--bits", "3",
                                    "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["whole"]["all layers, 16-bit"]["top1_agreement"] == 100.0
    assert result["whole"]["all layers, 16-bit"]["mean_kl"] < 1e-6
    assert len(result["single"]) == 22 and result["whole"]["all layers"]["mean_kl"] > 1e-4
    kls = [r["mean_kl"] for r in result["single"]]
    assert kls == sorted(kls, reverse=True)
