"""Smoke test of studies/zoo.py (CI runs studies/ once, untimed): one zoo network with random weights (BN
statistics of smooth noise), a tiny synthesis and evaluation; every row the table promises is measured and
written, and a second run resumes from what the first wrote."""

import json
import os

import torch
import torch.nn.functional as F
import zoo as study
from safetensors.torch import save_file

from dsg_ext.models import zoo


def _random_weights(name, path):
    model = zoo.build(name)
    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None
    noise = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.train()(F.interpolate(noise, size=zoo.IMAGE_SIZE, mode="bilinear", align_corners=False))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


def test_the_zoo_study_measures_every_column_and_resumes(tmp_path, capsys):
    _random_weights("mobilenet_v3_small", str(tmp_path / "w-mobilenet_v3_small.safetensors"))
    out = str(tmp_path / "out")
    argv = ["--out", out, "--networks", "mobilenet_v3_small", "--weights", str(tmp_path / "w-{name}.safetensors"),
            "--samples", "8", "--iterations", "2", "--batch", "8", "--eval", "64", "--repeat", "2"]
    assert study.main(argv) == 0
    row = json.load(open(os.path.join(out, "mobilenet_v3_small.json")))
    assert set(row["synthetic"]["rows"]) == {"fp32", "ort", "deploy-w8a8"}
    assert set(row["real"]["rows"]) == {"ort", "deploy-w8a8"}
    for rows in (row["synthetic"]["rows"], row["real"]["rows"]):
        for r in rows.values():
            assert 0 <= r["top1"] <= 100 and r["throughput_img_s"] > 0 and r["latency_ms"] > 0
    table = open(os.path.join(out, "table.md")).read()
    assert table.startswith("CPU: ") and "| mobilenet_v3_small (hard-swish + squeeze-excite) |" in table
    stamp = os.path.getmtime(os.path.join(out, "mobilenet_v3_small-real.json"))
    assert study.main(argv) == 0  # everything measured: nothing run again
    assert os.path.getmtime(os.path.join(out, "mobilenet_v3_small-real.json")) == stamp
