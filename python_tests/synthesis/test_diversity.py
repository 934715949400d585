"""The diversity measures every `dsg generate` run reports (dsg_ext.synthesis.diversity), checked
where the answer is known: real images predict every class and stay in the valid pixel range,
Gaussian noise leaves it; the manifest of a run carries them."""

import json
import os

import pytest

from dsg_ext.data.calibration import gaussian_noise, real_fashion_mnist
from dsg_ext.models import load_model
from dsg_ext.synthesis import SynthesisConfig, generate
from dsg_ext.synthesis.diversity import diversity


def test_real_images_against_noise():
    loaded = load_model("fashion-mnist-resnet20")
    real = diversity(loaded, real_fashion_mnist(256))
    noise = diversity(loaded, gaussian_noise(loaded.input, 256))
    assert real["classes_predicted"] == real["num_classes"] == 10
    assert real["pixels_outside_valid_range"] == 0 and 0 <= real["pixel_min"] and real["pixel_max"] <= 1 + 1e-6
    assert noise["pixels_outside_valid_range"] > 0.2
    assert real["relative_sample_spread_mean"] > noise["relative_sample_spread_mean"]  # the 0.239 vs 0.091
    assert len(real["relative_sample_spread"]) == 21


def test_pixels_clamped_to_the_valid_edge_are_not_outside():
    """Normalised pixels clamped to the edge of valid_range() map back to 0 and 1 within float
    rounding (with EfficientNet-Lite's normalisation, 0 comes back as -3e-8): not outside; only
    pixels beyond that count."""
    import torch
    from tiny_models import tiny_bn_net

    from dsg_ext.models import InputSpec, LoadedModel

    spec = InputSpec(3, 8, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    loaded = LoadedModel(tiny_bn_net(), "tiny", spec, "0")
    lo, hi = spec.valid_range()
    images = torch.rand(16, 3, 8, 8) * (hi[0] - lo[0]) + lo[0]
    images[:8, :, :3] = lo[0]  # black rows, as clamped synthesis leaves them
    images[:8, :, -3:] = hi[0]
    assert float((images * spec.std[0] + spec.mean[0]).min()) < 0  # the rounding the tolerance is for
    assert diversity(loaded, images)["pixels_outside_valid_range"] == 0
    images[0, 0, 0, 0] = lo[0] - 0.01  # a pixel really below black
    assert diversity(loaded, images)["pixels_outside_valid_range"] == pytest.approx(1 / images.numel())


def test_every_run_reports_them(tmp_path):
    out = str(tmp_path / "d")
    generate("tiny_models:tiny_bn_net", out, SynthesisConfig(iterations=2, batch_size=4, image_size=8), 4,
             show_progress=False)
    d = json.load(open(os.path.join(out, "manifest.json")))["summary"]["diversity"]
    assert d["images_measured"] == 4 and 1 <= d["classes_predicted"] <= d["num_classes"] == 10
    assert d["pixel_min"] <= d["pixel_max"] and 0 <= d["pixels_outside_valid_range"] <= 1
