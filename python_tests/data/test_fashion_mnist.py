"""The Fashion-MNIST data reader (the IDX files of the Debian package) and its preprocessing."""

from __future__ import annotations

import gzip
import os

import pytest
import torch

from dsg_ext.data import fashion_mnist as fm
from dsg_ext.errors import DataSourceError

HAVE_DATA = os.path.exists(os.path.join(fm.data_dir(), "t10k-images-idx3-ubyte.gz"))
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="dataset-fashion-mnist not installed (.ci/run installs it)")


@needs_data
def test_splits_have_the_published_sizes():
    x, y = fm.load_split(train=False)
    assert x.shape == (10000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (10000,) and set(y.unique().tolist()) == set(range(10))


def test_corrupt_and_missing_files_named(tmp_path):
    with pytest.raises(DataSourceError, match="not found"):
        fm.load_split(train=False, directory=str(tmp_path))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
    with pytest.raises(DataSourceError, match="corrupt"):
        fm.load_split(train=False, directory=str(tmp_path))
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"PK\x03\x04 not an idx file")
    with pytest.raises(DataSourceError, match="not an IDX"):
        fm.load_split(train=False, directory=str(tmp_path))


def test_preprocess_pads_and_normalises():
    x = torch.full((2, 28, 28), 255, dtype=torch.uint8)
    p = fm.preprocess(x)
    assert p.shape == (2, 1, 32, 32)
    torch.testing.assert_close(p[0, 0, 5, 5], torch.tensor((1 - fm.MEAN) / fm.STD))
    torch.testing.assert_close(p[0, 0, 0, 0], torch.tensor((0 - fm.MEAN) / fm.STD))
