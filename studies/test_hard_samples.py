"""Smoke test of studies/hard_samples.py (CI runs studies/ once, untimed), on the Fashion-MNIST network at a
tiny schedule: the KL term pushes the images to where the quantized network disagrees (more than the BN
loss alone does), pixels stay valid, and every source is measured at every stage."""

import json

import hard_samples
import torch
from effnet_recipes import synthetic_images

from dsg_ext import quantization as quant
from dsg_ext.models import load_model

MODEL = "fashion-mnist-resnet20"


def test_kl_term_moves_images_towards_disagreement_and_keeps_pixels_valid():
    loaded = load_model(MODEL)
    spec, fp = loaded.input, loaded.model.eval()
    base, _ = synthetic_images(MODEL, fp, spec, "recommended", 8, 8, 3, seed=0)
    adversary = quant.quantize_model(fp, quant.QuantConfig(wbits=4, abits=4), base[:2])
    quant.calibrate(adversary, base)
    quant.finalize_weights(adversary)
    lo, hi = (torch.tensor(v).view(1, -1, 1, 1) for v in spec.valid_range())
    kl_after = {}
    for w in (0.0, 1.0):
        images, measured = hard_samples.refine(fp, adversary, base, spec, w, 8, 0.05, seed=0)
        assert images.shape == base.shape and torch.isfinite(images).all()
        assert (images >= lo - 1e-6).all() and (images <= hi + 1e-6).all()
        (bn0, kl0), (bn1, kl1) = measured
        assert kl0 >= 0 and kl1 >= 0 and bn0 > 0
        if w == 0.0:
            assert bn1 < bn0  # the control: BN loss alone keeps converging
        kl_after[w] = kl1
    assert kl_after[1.0] > 1.5 * kl_after[0.0]
    # With a target the term pushes each sample's KL up to it only (a hinge): up from the start, finite.
    _, ((_, kl0), (_, kl1)) = hard_samples.refine(fp, adversary, base, spec, 1.0, 8, 0.05, seed=0, target=1.0)
    assert kl1 > kl0 and kl1 < float("inf")
    # A hinge every sample already meets adds nothing (no gradient): the images are exactly the control's.
    met, _ = hard_samples.refine(fp, adversary, base, spec, 1.0, 8, 0.05, seed=0, target=1e-12)
    control, _ = hard_samples.refine(fp, adversary, base, spec, 0.0, 8, 0.05, seed=0)
    assert torch.equal(met, control)
    # The networks are frozen by refine, not changed.
    assert not any(p.requires_grad for p in fp.parameters())


def test_every_source_at_every_stage(tmp_path):
    out = tmp_path / "hard.json"
    assert hard_samples.main(["--model", MODEL, "--samples", "8", "--batch", "8", "--iterations", "2",
                              "--bits", "W4A4", "--weights", "0,1", "--refine-iterations", "2",
                              "--recon-iterations", "2", "--mix", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["images"], r["stage"]) for r in rows] == [
        (name, stage) for name in ("refined w=0.0", "refined w=1.0", "base")
        for stage in ("calibrated", "recommended reconstruction")]
    for r in rows:
        assert all(0 <= c["top1_agreement"] <= 100 and c["mean_kl"] >= 0 for c in r["sets"].values())
    assert rows[0]["refine_s"] > 0 and rows[-1]["refine"] is None
