"""Smoke tests of the study scripts (CI runs studies/ once, untimed), on the Fashion-MNIST network
at tiny schedules: every source, bit setting and stage each script promises is measured and written to
its JSON. effnet_recipes.py is what the GPU script's `recipes` part runs, with these options and the
`genie` recipe among them: a script that rotted would waste the lent GPU's minutes."""

import json

import effnet_recipes
import reconstruction_study
import synthesis_recipes
import torch

from dsg_ext import quantization as quant
from dsg_ext.models import load_model

MODEL = "fashion-mnist-resnet20"


def test_effnet_recipes_every_source_bit_setting_and_stage(tmp_path):
    out = tmp_path / "recipes.json"
    assert effnet_recipes.main(["--model", MODEL, "--recipes", "recommended,genie,paper-dsg", "--samples", "4",
                                "--batch", "4", "--iterations", "2", "--bits", "W8A8,W4A4",
                                "--reconstruction", "genie", "--recon-iterations", "2", "--bias-correction",
                                "--cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["source"]: r for r in report["rows"]}
    assert list(rows) == ["real photos", "noise", "recommended", "genie", "paper-dsg"]
    assert rows["real photos"]["spread_vs_photos"] == 1.0
    stages = ("calibration", "bias_corrected", "reconstructed", "reconstructed_bias_corrected")
    for row in rows.values():
        assert 1 <= row["classes"] <= 10 and 0 <= row["outside"] <= 1 and row["spread"] > 0
        assert set(row["bits"]) == {"W8A8", "W4A4"}
        for cell in row["bits"].values():
            assert cell["reconstruction_s"] > 0
            for stage in stages:
                assert 0 <= cell[stage]["top1_agreement"] <= 100 and cell[stage]["mean_kl"] >= 0
    # The synthetic sources were timed, cached, and a second run reuses them unchanged.
    assert all(rows[n]["synthesis_s"] > 0 for n in ("recommended", "genie", "paper-dsg"))
    assert len(list((tmp_path / "cache").iterdir())) == 3
    again = tmp_path / "again.json"
    assert effnet_recipes.main(["--model", MODEL, "--recipes", "recommended", "--samples", "4", "--batch", "4",
                                "--iterations", "2", "--bits", "W8A8", "--skip-sources", "real photos,noise",
                                "--cache", str(tmp_path / "cache"), "--json", str(again)]) == 0
    (row,) = json.loads(again.read_text())["rows"]
    assert row["synthesis_s"] is None and row["spread"] == rows["recommended"]["spread"]
    assert row["bits"]["W8A8"]["calibration"] == rows["recommended"]["bits"]["W8A8"]["calibration"]


def test_calibrate_and_reconstruct_keeps_the_calibrated_model_apart():
    loaded = load_model(MODEL)
    fp = loaded.model.eval()
    images = torch.randn(4, 1, 28, 28)
    q, qr, seconds = effnet_recipes.calibrate_and_reconstruct(fp, quant.QuantConfig(wbits=4, abits=4), images,
                                                              "recommended", 3, 0.05)
    assert qr is not q and seconds > 0
    q2, none, no_seconds = effnet_recipes.calibrate_and_reconstruct(fp, quant.QuantConfig(wbits=4, abits=4), images)
    assert none is None and no_seconds is None
    with torch.no_grad():
        assert torch.equal(q(images), q2(images))  # the reconstruction changed the copy only


def test_synthesis_recipes_measures_every_source(tmp_path):
    out = tmp_path / "synth.json"
    assert synthesis_recipes.main(["--recipes", "recommended,batch+aug+swing+clamp", "--samples", "4",
                                   "--batch", "4", "--iterations", "2", "--eval", "200", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["source"] for r in rows] == ["real", "noise", "recommended", "batch+aug+swing+clamp"]
    assert rows[0]["spread_vs_real"] == 1.0
    assert all(0 <= r["top1"] <= 100 and 1 <= r["classes"] <= 10 for r in rows)


def test_reconstruction_study_scores_each_variant(tmp_path):
    out = tmp_path / "study.json"
    assert reconstruction_study.main(["--data", "noise", "--variants", "calibration only,blocks + qdrop",
                                      "--samples", "4", "--iterations", "2", "--eval", "200", "--bias-correction",
                                      "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["calibration only", "blocks + qdrop"]
    assert all(0 <= r["top1"] <= 100 and 0 <= r["top1_bias_corrected"] <= 100 for r in rows)


def test_second_order_measures_every_source_and_method(tmp_path):
    import second_order

    out = tmp_path / "second_order.json"
    assert second_order.main(["--samples", "8", "--iterations", "2", "--eval", "50", "--bits", "W4A4",
                              "--recon-iterations", "2", "--cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    cells = {(r["source"], r["method"]): r for r in report["rows"]}
    assert set(cells) == {(s, m) for s in ("real", "recommended", "noise") for m in second_order.METHODS}
    assert all(0 <= r["top1"] <= 100 and r["seconds"] > 0 for r in cells.values())


def test_bit_allocation_compares_every_budget_with_uniform_bits(tmp_path):
    import bit_allocation

    out = tmp_path / "alloc.json"
    assert bit_allocation.main(["--samples", "8", "--sensitivity-images", "4", "--iterations", "2", "--eval", "50",
                                "--budgets", "3.5,5", "--uniform", "3,4", "--methods", "nearest",
                                "--cache", str(tmp_path / "cache"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["setting"] for r in report["rows"]] == ["uniform 3", "uniform 4", "auto 3.5", "auto 5"]
    budgets = {"uniform 3": 3, "uniform 4": 4, "auto 3.5": 3.5, "auto 5": 5}
    assert all(r["average_wbits"] <= budgets[r["setting"]] + 1e-9 for r in report["rows"])
    assert all(0 <= r["top1"] <= 100 for r in report["rows"]) and len(report["sensitivity"]) == 22


def test_demo_seed_spread_measures_every_variant_and_seed(tmp_path):
    import demo_seed_spread

    out = tmp_path / "spread.json"
    assert demo_seed_spread.main(["--seeds", "0,1", "--eval-samples", "40", "--samples", "4", "--synth-iters", "2",
                                  "--adaround-iters", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["seed"]) for r in rows] == [(v, s) for v in demo_seed_spread.VARIANTS for s in (0, 1)]
    assert all(0 <= r["calibration"] <= 100 and 0 <= r["reconstruction"] <= 100 for r in rows)
