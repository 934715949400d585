"""Smoke test of studies/reconstruction_gap.py (CI runs studies/ once, untimed), on the Fashion-MNIST
network at a tiny schedule: every model measured on every image set, the synthetic images cached and
reused, the fresh synthetic images another seed's."""

import json

import reconstruction_gap
from safetensors.torch import load_file

ARGS = ["--model", "fashion-mnist-resnet20", "--samples", "8", "--batch", "8", "--iterations", "2",
        "--bits", "W4A4", "--recon-iterations", "2", "--eval-crops", "1"]


def test_every_model_on_every_set_with_cached_images(tmp_path, capsys):
    out = tmp_path / "gap.json"
    assert reconstruction_gap.main(ARGS + ["--cache", str(tmp_path), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["source"], r["stage"]) for r in rows] == [
        ("real photos", "calibrated"), ("real photos", "recommended reconstruction"),
        ("recommended", "calibrated"), ("recommended", "recommended reconstruction")]
    for r in rows:
        assert list(r["sets"]) == list(reconstruction_gap.SETS)
        assert all(0 <= c["top1_agreement"] <= 100 and c["mean_kl"] >= 0 for c in r["sets"].values())
    assert rows[1]["reconstruction_s"] > 0 and rows[0]["reconstruction_s"] is None
    cached = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(cached) == 2 and cached[0].endswith("-s0.safetensors") and cached[1].endswith("-s1.safetensors")
    own, fresh = (load_file(tmp_path / name)["images"] for name in cached)
    assert own.shape == fresh.shape and own.shape[:2] == (8, 1) and not own.equal(fresh)
    capsys.readouterr()
    assert reconstruction_gap.main(ARGS + ["--cache", str(tmp_path), "--json", str(out)]) == 0
    assert capsys.readouterr().out.count("loaded recommended") == 2
    assert [r["sets"] for r in json.loads(out.read_text())["rows"]] == [r["sets"] for r in rows]
