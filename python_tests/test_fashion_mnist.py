"""The Fashion-MNIST data reader and the shipped ResNet-20."""

from __future__ import annotations

import gzip
import os

import pytest
import torch

from dsg_ext import fashion_mnist as fm

HAVE_DATA = os.path.exists(os.path.join(fm.data_dir(), "t10k-images-idx3-ubyte.gz"))
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="dataset-fashion-mnist not installed (.ci/run installs it)")


@needs_data
def test_splits_have_the_published_sizes():
    x, y = fm.load_split(train=False)
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (10000,) and set(y.unique().tolist()) == set(range(10))


def test_corrupt_and_missing_files_named(tmp_path):
    with pytest.raises(fm.DataError, match="not found"):
        fm.load_split(train=False, directory=str(tmp_path))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with pytest.raises(fm.DataError, match="corrupt"):
        fm.load_split(train=False, directory=str(tmp_path))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"PK\x03\x04 not an idx file")
    with pytest.raises(fm.DataError, match="not an IDX"):
        fm.load_split(train=False, directory=str(tmp_path))


def test_preprocess_pads_and_normalises():
    x = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    p = fm.preprocess(x)
    assert p.shape == (2, 1, 32, 32)
    torch.testing.assert_close(p[0, 0, 5, 5], torch.tensor((1 - fm.MEAN) / fm.STD))
    torch.testing.assert_close(p[0, 0, 0, 0], torch.tensor((0 - fm.MEAN) / fm.STD))


@needs_data
@pytest.mark.skipif(not os.path.exists(fm.WEIGHTS), reason="weights not trained yet")
def test_shipped_resnet20_accuracy_matches_its_record():
    from safetensors import safe_open

    with safe_open(fm.WEIGHTS, "pt") as f:
        recorded = float(f.metadata()["test_top1"])
    model = fm.pretrained_resnet20()
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 21
    x, y = fm.load_split(train=False)
    top1, top5 = fm.evaluate(model, x, y)
    assert abs(top1 - recorded) < 0.05, (top1, recorded)
    assert top1 > 90.0 and top5 > 99.0
