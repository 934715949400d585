"""Genie's generator as the image source of synthesis: the architecture against an independent
float64 functional computation, seeding, the loss it is measured by, both optimisers and their
schedules, and the recipe options combined with it."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_bn_net

from dsg_ext.errors import ConfigError
from dsg_ext.synthesis import RECIPES, SynthesisConfig, batchnorm_layers, synthesize_batch
from dsg_ext.synthesis.generator import GeneratedImages, ImageGenerator
from dsg_ext.synthesis.loop import SynthesisLoop
from dsg_ext.synthesis.taps import BatchNormTaps


def gen_config(**kw) -> SynthesisConfig:
    base = dict(method="batch", generator=True, iterations=30, lr=0.1, batch_size=6, image_size=12, seed=3,
                latent_dim=16)
    base.update(kw)
    return SynthesisConfig(**base)


def _reference_render(net: ImageGenerator, z: torch.Tensor) -> torch.Tensor:
    """The published architecture written out with functional ops in float64 (training-mode BN:
    batch mean and biased variance over N*H*W)."""
    d = {k: v.double() for k, v in net.state_dict().items()}

    def bn(x, prefix=None):
        m = x.mean((0, 2, 3), keepdim=True)
        v = x.var((0, 2, 3), unbiased=False, keepdim=True)
        y = (x - m) / torch.sqrt(v + 1e-5)
        if prefix is not None:
            y = y * d[prefix + ".weight"].view(1, -1, 1, 1) + d[prefix + ".bias"].view(1, -1, 1, 1)
        return y

    x = (z.double() @ d["linear.weight"].T + d["linear.bias"]).view(z.shape[0], net.width, net.base, net.base)
    x = bn(x, "body.0")
    x = x.repeat_interleave(2, 2).repeat_interleave(2, 3)  # nearest x2
    x = F.leaky_relu(bn(F.conv2d(x, d["body.2.weight"], d["body.2.bias"], padding=1), "body.3"), 0.2)
    x = x.repeat_interleave(2, 2).repeat_interleave(2, 3)
    x = bn(torch.tanh(F.conv2d(x, d["body.6.weight"], d["body.6.bias"], padding=1)))
    off = (x.shape[-1] - net.size) // 2
    return x[..., off:off + net.size, off:off + net.size]


@pytest.mark.parametrize("size", [12, 13, 15])
def test_generator_matches_float64_reference(size):
    torch.manual_seed(0)
    net = ImageGenerator(size, 3, latent_dim=16, width=8)
    z = torch.randn(5, 16)
    out = net(z)
    assert out.shape == (5, 3, size, size)
    torch.testing.assert_close(out.double(), _reference_render(net, z), rtol=1e-4, atol=1e-5)


def test_generator_output_is_batch_normalised_per_channel():
    """The last BN (no affine parameters) hands the statistic loss a batch with mean 0, std 1 per channel."""
    net = ImageGenerator(16, 3, latent_dim=16, width=8)
    x = net(torch.randn(7, 16)).double()
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.var((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-3, rtol=0)


def test_generated_images_seeded_by_batch_and_leave_the_global_rng_alone():
    config = gen_config()
    state = torch.random.get_rng_state()
    a, b = GeneratedImages(config, 0, 4, "cpu"), GeneratedImages(config, 0, 4, "cpu")
    c = GeneratedImages(config, 1, 4, "cpu")
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.no_grad():
        assert torch.equal(a(), b()) and not torch.equal(a(), c())
    assert a().shape == (4, 3, 12, 12)
    assert GeneratedImages(dataclasses.replace(config, crop_pad=2), 0, 4, "cpu")().shape == (4, 3, 16, 16)


def _batch_terms(x, mean, std, eps):
    m = x.mean((0, 2, 3))
    s = torch.sqrt(x.var((0, 2, 3), unbiased=True) + eps)
    return float(((m - mean) ** 2 + (s - std) ** 2).sum())


def test_initial_loss_is_the_batch_statistic_loss_of_the_rendered_images():
    model, config = tiny_bn_net(), gen_config(iterations=1)
    with torch.no_grad():
        images = GeneratedImages(config, 0, config.batch_size, "cpu")().double()
    r = synthesize_batch(model, config, 0)
    inputs = []
    double = copy.deepcopy(model).double()
    hooks = [bn.register_forward_pre_hook(lambda m, i: inputs.append(i[0])) for _, bn in batchnorm_layers(double)]
    with torch.no_grad():
        double(images)
    for h in hooks:
        h.remove()
    expected = sum(_batch_terms(x, bn.running_mean.double(), torch.sqrt(bn.running_var.double() + bn.eps), bn.eps)
                   for x, (_, bn) in zip(inputs, batchnorm_layers(double)))
    expected += _batch_terms(images, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), 1e-5)
    assert r.initial_loss == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("method", ["batch", "dsg", "batch-dsg"])
def test_generator_synthesis_lowers_the_loss_reproducibly(method):
    config = gen_config(method=method, iterations=80)
    a = synthesize_batch(tiny_bn_net(), config, 0)
    assert a.final_loss < 0.5 * a.initial_loss, (a.initial_loss, a.final_loss)
    assert a.images.shape == (6, 3, 12, 12)
    b = synthesize_batch(tiny_bn_net(), config, 0)
    assert torch.equal(a.images, b.images)


def test_generator_and_latent_both_learn_with_their_own_schedules():
    model = tiny_bn_net().eval()
    config = gen_config(generator_lr=0.02, lr=0.3)
    taps = BatchNormTaps(batchnorm_layers(model), unbiased=True, batch=True, per_sample=False)
    source = GeneratedImages(config, 0, 4, "cpu")
    latent0 = source.latent.detach().clone()
    conv0 = source.net.body[2].weight.detach().clone()
    with taps:
        loop = SynthesisLoop(model, taps, source, torch.ones(4, len(taps.layers)), config, "cpu")
        for _ in range(101):
            loop.iterate()
    assert not torch.equal(source.latent.detach(), latent0)
    assert not torch.equal(source.net.body[2].weight.detach(), conv0)
    assert loop.optimizer.param_groups[0]["lr"] == 0.3  # the latent's plateau schedule steps per window
    assert loop.generator_optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * 0.95)  # x0.95 per 100 iterations
    assert loop.images is None and loop.optimizer.param_groups[0]["params"] == [source.latent]


def test_generator_with_crop_flip_smoothing_swing_and_valid_pixels():
    lo, hi = [-0.5] * 3, [0.7] * 3
    config = gen_config(crop_pad=2, flip=True, smoothing=0.5, swing=True, clamp_pixels=True, iterations=20)
    r = synthesize_batch(tiny_bn_net(), config, 0, input_range=(lo, hi))
    assert r.images.shape == (6, 3, 12, 12)
    assert float(r.images.min()) >= -0.5 - 1e-6 and float(r.images.max()) <= 0.7 + 1e-6
    assert r.final_loss < r.initial_loss


@pytest.mark.parametrize("kw, word", [
    (dict(cuda_graph=True), "cuda_graph"), (dict(generator_lr=0.0), "generator_lr"),
    (dict(generator_lr=float("inf")), "generator_lr"), (dict(latent_dim=0), "latent_dim"),
    (dict(generator="yes"), "generator"),
    (dict(init="uniform"), "init='uniform' sets free pixels"),
])
def test_bad_generator_options(kw, word):
    with pytest.raises(ConfigError, match=word):
        gen_config(**kw).validate()


def test_genie_recipe_is_the_published_schedule():
    genie = SynthesisConfig.from_recipe("genie")
    assert "genie" in RECIPES
    assert (genie.method, genie.generator, genie.swing, genie.batch_size, genie.iterations, genie.lr,
            genie.generator_lr, genie.latent_dim) == ("batch", True, True, 128, 4000, 0.1, 0.01, 256)
