"""The labelled zoo (dsg_ext/models/zoo.py): the architectures build and end on maps synthesis can match, the
cache is keyed by the training recipe, an untrained network is refused with the command that trains it, and a
network trained, saved and loaded as ``zoo:NAME`` is the same network, fed Fashion-MNIST at its input size."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from dsg_ext.data.calibration import calibration_images, evaluation_images
from dsg_ext.errors import DataSourceError, ModelSourceError
from dsg_ext.models import load_model, zoo
from dsg_ext.synthesis.taps import batchnorm_layers, synthesis_layers


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_every_zoo_network_builds_and_synthesis_can_match_its_bn_layers(name):
    model = zoo.build(name)
    assert model(torch.zeros(2, 3, zoo.IMAGE_SIZE, zoo.IMAGE_SIZE)).shape == (2, 10)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        kept = synthesis_layers(model, 3, zoo.IMAGE_SIZE)
    skipped = {n for n, _ in batchnorm_layers(model)} - {n for n, _ in kept}
    # Only GoogLeNet's auxiliary heads (training only) are skipped; no layer sees 1x1 maps at 64 px.
    assert skipped == ({"aux1.conv.bn", "aux2.conv.bn"} if name == "googlenet" else set()), said
    assert all(torch.equal(a, b) for a, b in zip(zoo.build(name).state_dict().values(),
                                                  model.state_dict().values()))  # seeded: the same every call


def test_the_cache_is_keyed_by_the_training_recipe(monkeypatch, tmp_path):
    monkeypatch.setenv("DSG_ZOO_DIR", str(tmp_path))
    before = zoo.weights_path("resnet18")
    assert before.startswith(str(tmp_path)) and zoo.recipe_hash("resnet18") in before
    monkeypatch.setitem(zoo.ZOO, "resnet18", dataclasses.replace(zoo.ZOO["resnet18"], train_images=100))
    assert zoo.weights_path("resnet18") != before
    monkeypatch.setattr(zoo, "TRAIN_VERSION", zoo.TRAIN_VERSION + 1)
    assert len({zoo.recipe_hash("resnet18"), zoo.recipe_hash("resnet50")}) == 2


def test_an_untrained_or_unknown_network_is_refused_with_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("DSG_ZOO_DIR", str(tmp_path))
    with pytest.raises(ModelSourceError, match="zoo:resnet18 is not trained on this machine.*train_zoo.py resnet18"):
        load_model("zoo:resnet18")
    with pytest.raises(ModelSourceError, match="the zoo has no network 'resnet19'"):
        load_model("zoo:resnet19")


def test_a_network_trained_saved_and_loaded_is_the_same_and_reads_fashion_mnist_at_its_size(monkeypatch, tmp_path):
    monkeypatch.setenv("DSG_ZOO_DIR", str(tmp_path))
    monkeypatch.setitem(zoo.ZOO, "mobilenet_v3_small", dataclasses.replace(zoo.ZOO["mobilenet_v3_small"],
                                                                          train_images=256, epochs=1))
    lines = []
    model, record = zoo.train("mobilenet_v3_small", log=lines.append, bn_images=256, test_images=200)
    assert len(lines) == 2 and 0 <= float(record["test_top1"]) <= 100 and record["test_images"] == "200"
    path = zoo.save("mobilenet_v3_small", model, record)
    assert zoo.trained_metadata("mobilenet_v3_small") == record
    loaded = load_model("zoo:mobilenet_v3_small")
    x, labels = evaluation_images(loaded, "fashion-mnist", 16)
    assert x.shape == (16, 3, 64, 64) and labels.shape == (16,)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert zoo.test_accuracy(loaded.model, 200) == float(record["test_top1"])
    calib, described = calibration_images(loaded, None, "fashion-mnist", 8)
    assert calib.shape == (8, 3, 64, 64) and described == "real:fashion-mnist-train"
    assert torch.equal(load_model("zoo:mobilenet_v3_small", weights=path).model.state_dict()["classifier.3.bias"],
                       model.state_dict()["classifier.3.bias"])


def test_fashion_mnist_is_refused_for_a_network_that_does_not_read_it():
    loaded = load_model("torchvision:resnet18", image_size=64)
    with pytest.raises(DataSourceError, match="--real fashion-mnist goes with"):
        calibration_images(loaded, None, "fashion-mnist", 8)
    with pytest.raises(DataSourceError, match="--data fashion-mnist goes with"):
        evaluation_images(loaded, "fashion-mnist", 8)
