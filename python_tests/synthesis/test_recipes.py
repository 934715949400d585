"""The synthesis recipe options beyond the papers: batch-statistic alignment (batch, batch-dsg),
augmentation (crop with extra pixels, flips, smoothing), swing convolution, balanced labels, and the
named presets -- each checked against an independent float64 computation where it computes a loss."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tiny_models import tiny_bn_net
from torch import nn

from dsg_ext.errors import ConfigError
from dsg_ext.synthesis import RECIPES, SynthesisConfig, batchnorm_layers, init_images, synthesize_batch
from dsg_ext.synthesis.augment import Augmenter, gaussian_kernel


def small_config(**kw) -> SynthesisConfig:
    base = dict(method="batch", iterations=30, lr=0.1, batch_size=6, image_size=12, seed=3)
    base.update(kw)
    return SynthesisConfig(**base)


def _bn_inputs(model, images):
    """Each BN layer's input in float64 (the model run in float64)."""
    model = _double(model)
    inputs = []
    hooks = [bn.register_forward_pre_hook(lambda m, i: inputs.append(i[0])) for _, bn in batchnorm_layers(model)]
    with torch.no_grad():
        model(images.double())
    for h in hooks:
        h.remove()
    return inputs


def _double(model):
    import copy

    return copy.deepcopy(model).double()


def _hinge(gap, slack):
    return (gap.abs() - slack).clamp_min(0).pow(2)


def _batch_terms(x, mean, std, eps, delta=0.0, gamma=0.0):
    m = x.mean((0, 2, 3))
    s = torch.sqrt(x.var((0, 2, 3), unbiased=True) + eps)
    return float((_hinge(m - mean, delta) + _hinge(s - std, gamma)).sum())


def _sample_terms(x, mean, std, eps, delta=0.0, gamma=0.0):
    m = x.mean((2, 3))
    s = torch.sqrt(x.var((2, 3), unbiased=True) + eps)
    return (_hinge(m - mean, delta) + _hinge(s - std, gamma)).sum(1)  # (N)


def _targets(bn):
    return bn.running_mean.double(), torch.sqrt(bn.running_var.double() + bn.eps)


def test_batch_loss_matches_float64_reference():
    model, config = tiny_bn_net(), small_config(iterations=1)
    images = init_images(config, 0, config.batch_size)
    r = synthesize_batch(model, config, 0)
    layers = batchnorm_layers(model)
    expected = [_batch_terms(x, *_targets(bn), bn.eps) for x, (_, bn) in zip(_bn_inputs(model, images), layers)]
    torch.testing.assert_close(torch.tensor(r.initial_layer_losses, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    input_term = _batch_terms(images.double(), torch.zeros(3, dtype=torch.float64),
                              torch.ones(3, dtype=torch.float64), 1e-5)
    assert r.initial_loss == pytest.approx(sum(expected) + input_term, rel=1e-4)


def test_batch_dsg_loss_matches_float64_reference():
    config = small_config(method="batch-dsg", iterations=1, epsilon=0.7, enhancement=3.0)
    model = tiny_bn_net()
    images = init_images(config, 0, config.batch_size).double()
    layers = batchnorm_layers(model)
    total = _batch_terms(images, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64), 1e-5)
    for index, (x, (_, bn)) in enumerate(zip(_bn_inputs(model, images), layers)):
        mean, std = _targets(bn)
        std_b = torch.sqrt(x.var((0, 2, 3), unbiased=True) + bn.eps)
        bd = torch.quantile((x.mean((0, 2, 3)) - mean).abs(), 0.7)
        bg = torch.quantile((std_b - std).abs(), 0.7)
        total += _batch_terms(x, mean, std, bn.eps, bd, bg)
        m = x.mean((2, 3))
        s = torch.sqrt(x.var((2, 3), unbiased=True) + bn.eps)
        d = torch.quantile((m - mean).abs().flatten(), 0.7)
        g = torch.quantile((s - std).abs().flatten(), 0.7)
        own = torch.arange(config.batch_size) % len(layers) == index  # the samples whose layer this is
        total += float((_sample_terms(x, mean, std, bn.eps, d, g) * own * (3.0 - 1)).sum() / config.batch_size)
    r = synthesize_batch(model, config, 0)
    assert r.initial_loss == pytest.approx(total, rel=1e-4)


@pytest.mark.parametrize("method", ["batch", "batch-dsg"])
def test_batch_methods_lower_the_loss_and_spread_samples(method):
    r = synthesize_batch(tiny_bn_net(), small_config(method=method, iterations=60), 0)
    assert r.final_loss < 0.5 * r.initial_loss, (r.initial_loss, r.final_loss)
    assert r.images.shape == (6, 3, 12, 12)


def test_batch_method_keeps_samples_apart_where_zeroq_pulls_them_together():
    """Per-sample matching pulls every sample to the BN means; batch matching only constrains the
    batch, so the per-sample channel means stay spread (the homogenisation the issue measures)."""
    from dsg_ext.synthesis import per_sample_statistics

    spreads = {}
    for method in ("zeroq", "batch"):
        r = synthesize_batch(tiny_bn_net(), small_config(method=method, iterations=80, batch_size=12), 0)
        stats = per_sample_statistics(tiny_bn_net(), r.images)
        spreads[method] = sum(float(m.std(0).mean()) for m in stats.values())
    assert spreads["batch"] > 1.5 * spreads["zeroq"], spreads


def test_crop_pad_optimises_larger_images_and_returns_the_centre():
    config = small_config(crop_pad=3, iterations=40)  # one table row per training view
    assert init_images(config, 0, 2).shape == (2, 3, 18, 18)
    aug = Augmenter(config, tiny_bn_net(), 3, "cpu", seed=0)
    x = torch.randn(2, 3, 18, 18)
    assert torch.equal(aug.view(x, train=False), x[..., 3:15, 3:15])
    views = [aug.view(x, train=True) for _ in range(40)]
    assert all(v.shape == (2, 3, 12, 12) for v in views)
    windows = [(oy, ox) for oy in range(7) for ox in range(7)]
    used = [[w for w in windows if torch.equal(v, x[..., w[0]:w[0] + 12, w[1]:w[1] + 12])] for v in views]
    assert all(len(u) == 1 for u in used)  # every view is one of the 49 windows
    assert len({u[0] for u in used}) > 15  # and they are drawn at random
    r = synthesize_batch(tiny_bn_net(), config, 0)
    assert r.images.shape == (6, 3, 12, 12)


def test_flip_shows_both_orientations():
    aug = Augmenter(small_config(flip=True), tiny_bn_net(), 3, "cpu", seed=1)
    x = torch.randn(2, 3, 12, 12)
    views = [aug.view(x, train=True) for _ in range(30)]
    flipped = sum(torch.equal(v, x.flip(3)) for v in views)
    assert 5 < flipped < 25 and all(torch.equal(v, x) or torch.equal(v, x.flip(3)) for v in views)
    assert torch.equal(aug.view(x, train=False), x)


def test_smoothing_is_a_normalised_gaussian_with_reflect_padding():
    sigma = 0.7
    k = gaussian_kernel(sigma, 2, "cpu", torch.float64)
    w = [math.exp(-(d * d) / (2 * sigma * sigma)) for d in (-1, 0, 1)]
    ref = torch.tensor([[a * b for b in w] for a in w], dtype=torch.float64)
    torch.testing.assert_close(k[0, 0], ref / ref.sum())
    aug = Augmenter(small_config(smoothing=sigma), tiny_bn_net(), 2, "cpu", seed=0)
    aug.kernel = k
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    out = aug.result(x)
    xp = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    for i, j in ((0, 0), (2, 3), (4, 5)):
        expected = (xp[0, 1, i:i + 3, j:j + 3] * (ref / ref.sum())).sum()
        torch.testing.assert_close(out[0, 1, i, j], expected)
    assert torch.allclose(aug.result(torch.full((1, 2, 5, 6), 0.3, dtype=torch.float64)),
                          torch.full((1, 2, 5, 6), 0.3, dtype=torch.float64))


def test_swing_shifts_strided_convolution_inputs_only_while_training():
    model = tiny_bn_net()
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    seen = []
    x = torch.randn(2, 3, 12, 12)
    aug = Augmenter(small_config(swing=True), model, 3, "cpu", seed=0)
    model(x)
    for _ in range(10):
        with aug.training():
            # registered after the swing hook, so it sees what the convolution gets
            h = strided[0].register_forward_pre_hook(lambda m, i: seen.append(i[0].clone()))
            model(x)
            h.remove()
        assert all(not m._forward_pre_hooks for m in strided)  # nothing left between training forwards
    strided[0].register_forward_pre_hook(lambda m, i: seen.insert(0, i[0].clone()))
    with aug.training(False):
        model(x)
    plain = seen[0]
    assert all(s.shape == plain.shape for s in seen)
    assert any(not torch.equal(s, plain) for s in seen[1:])
    for s in seen[1:]:  # each a shift of the plain input by -1..1 pixels with reflect padding
        padded = nn.functional.pad(plain, (1, 1, 1, 1), mode="reflect")
        assert any(torch.equal(s, padded[..., a:a + 12, b:b + 12]) for a in range(3) for b in range(3))
    assert len(strided[0]._forward_pre_hooks) == 1  # the swing hook is gone, the test's own remains


class _FailsOnThirdCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.calls = tiny_bn_net(), 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("the model broke mid-synthesis")
        return self.net(x)


def test_swing_hooks_removed_when_synthesis_fails():
    model = _FailsOnThirdCall()
    with pytest.raises(RuntimeError, match="mid-synthesis"):
        synthesize_batch(model, small_config(swing=True, iterations=5), 0)
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_augmented_recipe_reproducible_and_seed_dependent():
    config = small_config(crop_pad=2, flip=True, smoothing=0.5, swing=True, iterations=10)
    a = synthesize_batch(tiny_bn_net(), config, 0).images
    b = synthesize_batch(tiny_bn_net(), config, 0).images
    c = synthesize_batch(tiny_bn_net(), dataclasses.replace(config, seed=4), 0).images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_balanced_labels_cover_every_class():
    config = small_config(method="batch", ce_weight=200.0, ce_labels="balanced", batch_size=20, iterations=100)
    r = synthesize_batch(tiny_bn_net(), config, 0)
    with torch.no_grad():
        pred = tiny_bn_net()(r.images).argmax(1)
    assert (pred == torch.arange(20) % 10).float().mean() >= 0.8, pred  # sample n steered to class n mod 10


@pytest.mark.parametrize("kw, word", [
    (dict(crop_pad=-1), "crop_pad"), (dict(crop_pad=12), "crop_pad"), (dict(smoothing=-0.5), "smoothing"),
    (dict(ce_labels="sorted"), "ce_labels"), (dict(method="genie"), "method"),
    (dict(cuda_graph=True, flip=True, augment_rng="host"), "cuda_graph"),
    (dict(cuda_graph=True, swing=True, augment_rng="host"), "augment_rng='device'"),
    (dict(cuda_graph=True, crop_pad=2, augment_rng="host"), "cuda_graph"), (dict(augment_rng="gpu"), "augment_rng"),
    (dict(smoothing=float("nan")), "smoothing"),
])
def test_bad_recipe_options(kw, word):
    with pytest.raises(ConfigError, match=word):
        small_config(**kw).validate()


def test_named_recipes():
    for name in RECIPES:
        SynthesisConfig.from_recipe(name).validate()
    assert SynthesisConfig.from_recipe("paper-dsg") == SynthesisConfig()
    assert SynthesisConfig.from_recipe("zeroq", iterations=7).iterations == 7
    with pytest.raises(ConfigError, match="unknown synthesis recipe 'best'"):
        SynthesisConfig.from_recipe("best")


def test_a_synthesis_loop_with_its_own_augmenter_leaves_no_hook_on_the_model():
    """SynthesisLoop builds its own Augmenter when none is passed (benchmarks do): with swing on, the
    hooks exist only during each training forward, so none stays on the model afterwards."""
    from dsg_ext.synthesis.loop import SynthesisLoop
    from dsg_ext.synthesis.taps import BatchNormTaps, batchnorm_layers

    model = tiny_bn_net().eval()
    config = small_config(swing=True, method="batch", iterations=3)
    taps = BatchNormTaps(batchnorm_layers(model), unbiased=True, batch=True, per_sample=False)
    images = torch.randn(4, 3, 12, 12)
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    seen = []
    with taps:
        loop = SynthesisLoop(model, taps, images, torch.ones(4, len(taps.layers)), config, "cpu")
        for _ in range(3):
            seen.append(len(strided[0]._forward_pre_hooks))
            loop.iterate()
    assert strided and seen == [0, 0, 0]
    assert not any(m._forward_pre_hooks for m in model.modules() if isinstance(m, nn.Conv2d))


# --- augmentation drawn on the device (augment_rng="device", the default) ---------------------------

def _padded_reference(x, oy, ox, flip, size, smooth):
    """Crop, flip and the smoothing's reflect padding the way the host path does them (slices and pad)."""
    v = x[..., oy:oy + size, ox:ox + size]
    if flip:
        v = v.flip(3)
    return nn.functional.pad(v, (1, 1, 1, 1), mode="reflect") if smooth else v


@pytest.mark.parametrize("channels_last", [False, True])
def test_device_view_is_the_crop_flip_and_smoothing_of_its_drawn_row(channels_last):
    config = small_config(crop_pad=3, flip=True, smoothing=0.6, iterations=25)
    aug = Augmenter(config, tiny_bn_net(), 3, "cpu", seed=5)
    assert aug.table.shape == (25, 3) and aug.table.dtype == torch.long
    assert aug.table[:, :2].min() >= 0 and aug.table[:, :2].max() <= 6 and set(aug.table[:, 2].tolist()) == {0, 1}
    x = torch.randn(2, 3, 18, 18, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    k = gaussian_kernel(0.6, 3, "cpu", torch.float64)
    aug.kernel = k
    for t in range(30):  # past the table's end it starts again at row 0
        oy, ox, f = aug.table[t % 25].tolist()
        expected = nn.functional.conv2d(_padded_reference(x, oy, ox, f, 12, True), k, groups=3)
        torch.testing.assert_close(aug.view(x, train=True), expected, rtol=1e-12, atol=1e-12)
    centre = nn.functional.conv2d(_padded_reference(x, 3, 3, False, 12, True), k, groups=3)
    torch.testing.assert_close(aug.result(x), centre, rtol=1e-12, atol=1e-12)
    # the gradient reaches exactly the pixels the crop used, with the reflect padding's double counts
    leaf = x.detach().clone().requires_grad_(True)
    aug.step_index.zero_()
    aug.view(leaf, train=True).sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    oy, ox, f = aug.table[0].tolist()
    nn.functional.conv2d(_padded_reference(ref, oy, ox, f, 12, True), k, groups=3).sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-12, atol=1e-12)


def test_device_swing_is_a_reflect_shift_by_its_drawn_pair():
    model = tiny_bn_net()
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    aug = Augmenter(small_config(swing=True, iterations=8), model, 3, "cpu", seed=2)
    assert aug.table.shape == (8, 2 * len(strided))
    x = torch.randn(2, 3, 12, 12)
    seen = []
    for _ in range(8):
        with aug.training():
            h = strided[0].register_forward_pre_hook(lambda m, i: seen.append(i[0].clone()))
            model(x)
            h.remove()
    plain = []
    h = strided[0].register_forward_pre_hook(lambda m, i: plain.append(i[0].clone()))
    model(x)
    h.remove()
    padded = nn.functional.pad(plain[0], (1, 1, 1, 1), mode="reflect")
    for t, s in enumerate(seen):
        dy, dx = aug.table[t, :2].tolist()
        assert torch.equal(s, padded[..., dy:dy + s.shape[2], dx:dx + s.shape[3]])
    assert len({tuple(r) for r in aug.table[:, :2].tolist()}) > 1


def test_device_draws_trace_without_a_host_read():
    """The training view and a swing shift trace into one graph (torch.compile, fullgraph): nothing reads
    a random number back to the host, which is what lets a CUDA graph capture the recipe."""
    model = tiny_bn_net()
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1][0]
    aug = Augmenter(small_config(crop_pad=2, flip=True, smoothing=0.5, swing=True, iterations=6), model, 3, "cpu",
                    seed=0)
    x = torch.randn(2, 3, 16, 16)

    def step(img):
        view = aug.view(img, train=True)
        aug.active = True
        shifted = aug._swing(strided, (view,))[0]
        aug.active = False
        return shifted

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got = compiled(x)
    aug.step_index.zero_()
    torch.testing.assert_close(got, step(x))


def test_device_draws_reproducible_per_seed_and_match_across_devices_of_the_table():
    config = small_config(crop_pad=2, flip=True, smoothing=0.5, swing=True, iterations=12)
    a = Augmenter(config, tiny_bn_net(), 3, "cpu", seed=9).table
    b = Augmenter(config, tiny_bn_net(), 3, "cpu", seed=9).table
    c = Augmenter(config, tiny_bn_net(), 3, "cpu", seed=10).table
    assert torch.equal(a, b) and not torch.equal(a, c)
    host = synthesize_batch(tiny_bn_net(), dataclasses.replace(config, augment_rng="host"), 0)
    dev = synthesize_batch(tiny_bn_net(), config, 0)
    assert host.final_loss < host.initial_loss and dev.final_loss < dev.initial_loss


def test_the_batch_recipe_runs_bn_fused_and_matches_the_unfused_taps():
    """With batch statistics only, each BN layer runs as bn_eval_slack(mode="batch"): loss and image
    gradient equal torch's BatchNorm + a separate statistic op."""
    from dsg_ext.synthesis.taps import BatchNormTaps

    torch.manual_seed(0)
    x = torch.randn(5, 3, 12, 12, dtype=torch.float64)
    results = []
    for fused in (True, False):
        model = _double(tiny_bn_net()).eval()
        taps = BatchNormTaps(batchnorm_layers(model), unbiased=True, fused=fused, batch=True, per_sample=False)
        leaf = x.clone().requires_grad_(True)
        with taps:
            assert all("forward" in bn.__dict__ for bn in taps.layers) == fused
            out = model(leaf)
            loss = torch.stack(taps.collected_batch()).sum() + out.sum() * 1e-2
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    # the taps hold BN's scale/shift and the targets in float32, torch's BatchNorm runs in float64
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)


def test_a_dataset_written_before_the_draw_table_resumes_only_with_the_same_draws():
    """A manifest without augment_rng was written by the host path: an augmented config resumes it only
    with augment_rng="host"; without augmentation the field changes no image and is not compared."""
    from dsg_ext.synthesis.writer import _as_written

    def identity(config):
        return {"config": dataclasses.asdict(config)}

    for config, resumes in ((small_config(), True), (small_config(swing=True), False),
                            (small_config(swing=True, augment_rng="host"), True)):
        old = {k: v for k, v in dataclasses.asdict(config).items() if k != "augment_rng"}
        if config.augment_rng == "host":
            old = {k: v for k, v in dataclasses.asdict(dataclasses.replace(config, augment_rng="device")).items()
                   if k != "augment_rng"}
        assert (_as_written(identity(config), {"config": old})["config"] == old) == resumes, config
    new = dataclasses.asdict(small_config(swing=True))  # a manifest that has the field compares it
    assert _as_written(identity(small_config(swing=True)), {"config": new})["config"] == new
