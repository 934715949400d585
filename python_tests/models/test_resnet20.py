"""The shipped Fashion-MNIST ResNet-20: its accuracy on the real test split matches its record."""

from __future__ import annotations

import os

import pytest
import torch

from dsg_ext.data import fashion_mnist as fm
from dsg_ext.evaluation import topk_accuracy
from dsg_ext.models.resnet20 import WEIGHTS, pretrained_resnet20

HAVE_DATA = os.path.exists(os.path.join(fm.data_dir(), "t10k-images-idx3-ubyte.gz"))


@pytest.mark.skipif(not HAVE_DATA, reason="dataset-fashion-mnist not installed (.ci/run installs it)")
@pytest.mark.skipif(not os.path.exists(WEIGHTS), reason="weights not trained yet")
def test_shipped_resnet20_accuracy_matches_its_record():
    from safetensors import safe_open

    with safe_open(WEIGHTS, "pt") as f:
        recorded = float(f.metadata()["test_top1"])
    model = pretrained_resnet20()
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 21
    x, y = fm.load_split(train=False)
    top1, top5 = topk_accuracy(model, fm.preprocess(x), y, batch_size=1000)
    assert abs(top1 - recorded) < 0.05, (top1, recorded)
    assert top1 > 90.0 and top5 > 99.0
