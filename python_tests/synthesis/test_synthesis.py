"""The DSG/ZeroQ synthesis engine and `dsg generate` on a small BN network (CPU)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from tiny_models import no_bn_net, tiny_bn_net

from dsg_ext.data import store as dataset
from dsg_ext.errors import ConfigError, ModelSourceError, NoBatchNormError, NonFiniteLossError
from dsg_ext.synthesis import (
    BatchNormTaps,
    SynthesisConfig,
    batchnorm_layers,
    enhancement_weights,
    generate,
    init_images,
    per_sample_statistics,
    slack_margins,
    synthesize_batch,
)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # python_tests/, for tiny_models
SOURCE = "tiny_models:tiny_bn_net"


def small_config(**kw) -> SynthesisConfig:
    base = dict(method="dsg", iterations=40, lr=0.1, batch_size=6, image_size=12, seed=3)
    base.update(kw)
    return SynthesisConfig(**base)


@pytest.mark.parametrize("method", ["zeroq", "dsg"])
def test_loss_decreases(method):
    result = synthesize_batch(tiny_bn_net(), small_config(method=method), batch_index=0)
    assert result.final_loss < 0.5 * result.initial_loss, (result.initial_loss, result.final_loss)
    assert len(result.final_layer_losses) == 3
    assert result.images.shape == (6, 3, 12, 12)


def test_slack_matches_direct_computation():
    model, config = tiny_bn_net(), small_config()
    layers = batchnorm_layers(model)
    images = init_images(config, 0, config.batch_size)
    taps = BatchNormTaps(layers, unbiased=True)
    with taps:
        deltas, gammas = slack_margins(model, taps, images, 0.9)
    # Direct: capture BN inputs, statistics in float64 with torch.mean / torch.var.
    inputs = []
    hooks = [bn.register_forward_pre_hook(lambda m, i: inputs.append(i[0].double())) for _, bn in layers]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    for (name, bn), x, d, g in zip(layers, inputs, deltas, gammas):
        mu = x.mean((2, 3))
        sd = torch.sqrt(x.var((2, 3), unbiased=True) + bn.eps)
        d_ref = torch.quantile((mu - bn.running_mean.double()).abs().flatten(), 0.9)
        g_ref = torch.quantile((sd - torch.sqrt(bn.running_var.double() + bn.eps)).abs().flatten(), 0.9)
        torch.testing.assert_close(d.double(), d_ref, rtol=1e-4, atol=1e-6, msg=name)
        torch.testing.assert_close(g.double(), g_ref, rtol=1e-4, atol=1e-6, msg=name)


def test_enhancement_weights():
    w = enhancement_weights(5, 3, 2.0)
    expected = torch.ones(5, 3)
    for n in range(5):
        expected[n, n % 3] = 2.0
    assert torch.equal(w, expected)


def test_dsg_samples_more_diverse_than_zeroq():
    model = tiny_bn_net()
    spreads = {}
    for method in ("zeroq", "dsg"):
        r = synthesize_batch(model, small_config(method=method, iterations=60, batch_size=8), batch_index=0)
        stats = per_sample_statistics(model, r.images)
        spreads[method] = sum(float(m.std(0).mean()) for m in stats.values())
    assert spreads["dsg"] > spreads["zeroq"], spreads


def test_no_batchnorm_named():
    with pytest.raises(NoBatchNormError, match="MyNet has no BatchNorm2d"):
        batchnorm_layers(no_bn_net(), "MyNet")


@pytest.mark.parametrize(
    "kw, word", [({"epsilon": 0.0}, "epsilon"), ({"epsilon": 1.5}, "epsilon"), ({"iterations": 0}, "iterations"),
                 ({"method": "x"}, "method"), ({"batch_size": 0}, "batch size"), ({"lr": -1.0}, "learning rate")]
)
def test_bad_options(kw, word):
    with pytest.raises(ConfigError, match=word):
        small_config(**kw).validate()


def test_nan_statistics_name_layer():
    model = tiny_bn_net()
    with torch.no_grad():
        model[4].running_var.fill_(float("nan"))  # the second BN layer
    with pytest.raises(NonFiniteLossError, match="BN layer '4'"):
        synthesize_batch(model, small_config(iterations=10), batch_index=0)


@pytest.mark.parametrize("method", ["zeroq", "dsg"])
def test_nonfinite_loss_names_layer(method):
    model = tiny_bn_net()
    with torch.no_grad():
        model[3].weight.fill_(3e38)  # the conv feeding BN layer '4' overflows
    with pytest.raises(NonFiniteLossError, match="'4'|: 4"):
        synthesize_batch(model, small_config(method=method, iterations=10), batch_index=0)


def _shards(directory):
    m = dataset.load_manifest(directory)
    return [dataset.load_images(directory)], m


def test_generate_resume_corruption_and_config_guard(tmp_path):
    out = str(tmp_path / "ds")
    config = small_config(iterations=15)
    m = generate(SOURCE, out, config, num_samples=14, show_progress=False, compare_zeroq=True)
    assert m["complete"] and [s["num_samples"] for s in m["shards"]] == [6, 6, 2]
    cmp = m["summary"]["zeroq_comparison"]
    assert cmp["dsg_mean_sample_spread"] > 0 and cmp["zeroq_mean_sample_spread"] > 0
    images = dataset.load_images(out)
    assert images.shape == (14, 3, 12, 12)
    assert "summary" in m and len(m["summary"]["per_layer"]) == 3

    # A killed run: shard 1 never finished (no record), shard 2 was corrupted on disk.
    os.unlink(os.path.join(out, dataset.record_name(1)))
    with open(os.path.join(out, dataset.shard_name(2)), "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\x00" * 8)
    mtime0 = os.path.getmtime(os.path.join(out, dataset.shard_name(0)))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        m2 = generate(SOURCE, out, config, num_samples=14, show_progress=False)
    assert m2["complete"]
    assert os.path.getmtime(os.path.join(out, dataset.shard_name(0))) == mtime0  # kept, not redone
    assert torch.equal(dataset.load_images(out), images)  # regenerated bitwise identically

    # Another config against the same directory is refused, naming the field.
    with pytest.raises(dataset.DatasetError, match="different config:\n  iterations: "):
        generate(SOURCE, out, small_config(iterations=16), num_samples=14, show_progress=False)


def test_dataset_written_before_later_fields_existed_resumes(tmp_path):
    """A manifest without the fields added later (augmentation, swing, CE labels) was made with their
    neutral values: it resumes when those are requested, and is refused, naming the field, otherwise."""
    from dsg_ext.synthesis.config import LATER_FIELDS

    out = str(tmp_path / "ds")
    config = small_config(iterations=3)
    generate(SOURCE, out, config, num_samples=14, show_progress=False)
    images = dataset.load_images(out)
    path = os.path.join(out, dataset.MANIFEST)
    manifest = json.loads(open(path).read())
    for field in LATER_FIELDS:
        del manifest["config"][field]
    open(path, "w").write(json.dumps(manifest))
    os.unlink(os.path.join(out, dataset.record_name(1)))  # an unfinished shard, redone on resume
    assert generate(SOURCE, out, config, num_samples=14, show_progress=False)["complete"]
    assert torch.equal(dataset.load_images(out), images)
    with pytest.raises(dataset.DatasetError, match="flip: not recorded there, True requested"):
        generate(SOURCE, out, dataclasses.replace(config, flip=True), num_samples=14, show_progress=False)


def test_foreign_manifest_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(dataset.DatasetError, match="not a dsg_ext"):
        generate(SOURCE, str(tmp_path), small_config(iterations=2), num_samples=2, show_progress=False)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(dataset.DatasetError, match="not readable JSON"):
        generate(SOURCE, str(tmp_path), small_config(iterations=2), num_samples=2, show_progress=False)


def test_world_size_invariance_gloo(tmp_path):
    """torchrun with 2 gloo processes writes bitwise the same shards as 1 process."""
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    args = ["generate", "--model", SOURCE, "--method", "dsg", "--num-samples", "10", "--batch-size", "3",
            "--iterations", "8", "--lr", "0.1", "--image-size", "12", "--seed", "5"]
    one = subprocess.run([sys.executable, "-m", "dsg_ext", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "dsg_ext", *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    for b in range(4):
        a = (tmp_path / "one" / dataset.shard_name(b)).read_bytes()
        c = (tmp_path / "two" / dataset.shard_name(b)).read_bytes()
        assert a == c, f"shard {b} differs between 1 and 2 processes"


def test_cli_bad_input_exit_code(tmp_path):
    from dsg_ext.cli import main

    assert main(["generate", "--model", "tiny_models:no_bn_net", "--out", str(tmp_path / "x"),
                 "--iterations", "2", "--image-size", "12"]) == 2
    assert main(["generate", "--model", SOURCE, "--out", str(tmp_path / "y"), "--epsilon", "2"]) == 2


def test_progress_bar_is_labelled_by_what_it_counts(tmp_path, capsys):
    generate(SOURCE, str(tmp_path / "d"), small_config(iterations=3, method="batch"), num_samples=4,
             show_progress=True)
    err = capsys.readouterr().err
    assert "synthesis iterations (batch)" in err and "batch batches" not in err


def test_clamp_pixels_keeps_valid_range():
    lo, hi = [-1.0, -0.5, -2.0], [1.0, 0.5, 2.0]
    r = synthesize_batch(tiny_bn_net(), small_config(clamp_pixels=True, lr=0.5), 0, input_range=(lo, hi))
    for c in range(3):
        assert r.images[:, c].min() >= lo[c] and r.images[:, c].max() <= hi[c]
    with pytest.raises(ConfigError, match="input range"):
        synthesize_batch(tiny_bn_net(), small_config(clamp_pixels=True), 0)


def test_initial_layer_weighting_starts_every_layer_at_one():
    from dsg_ext import bn_stat_slack_loss

    config = small_config(method="zeroq", layer_weighting="initial")
    r = synthesize_batch(tiny_bn_net(), config, 0)
    input_term = bn_stat_slack_loss(init_images(config, 0, config.batch_size), torch.zeros(3), torch.ones(3),
                                    eps=1e-5, unbiased=True).mean()
    # each of the 3 layers contributes exactly 1 at the start; per-layer losses are reported unscaled
    torch.testing.assert_close(torch.tensor(r.initial_loss), 3.0 + input_term, rtol=1e-5, atol=1e-5)
    assert sum(r.initial_layer_losses) > 3.0 * 10
    assert r.final_loss < r.initial_loss


def test_image_size_the_model_rejects(tmp_path):
    with pytest.raises(ModelSourceError, match="rejected a 1x3x16x16 input"):
        generate("tiny_models:fixed_size_net", str(tmp_path), small_config(image_size=16), num_samples=2,
                 show_progress=False)
    assert not any(p.name.startswith("shard_") for p in tmp_path.iterdir())


def test_channels_last_and_bf16_autocast():
    # One step: the same update up to rounding (Adam amplifies rounding differences over many steps).
    base = synthesize_batch(tiny_bn_net(), small_config(method="zeroq", iterations=1), 0)
    cl = synthesize_batch(tiny_bn_net(), small_config(method="zeroq", iterations=1, channels_last=True), 0)
    torch.testing.assert_close(cl.images, base.images, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cl.final_layer_losses, base.final_layer_losses, rtol=1e-3, atol=1e-3)
    bf = synthesize_batch(tiny_bn_net(), small_config(method="zeroq", channels_last=True, autocast_bf16=True), 0)
    assert bf.final_loss < 0.5 * bf.initial_loss
    assert bf.images.dtype == torch.float32


def test_channels_last_synthesis_hands_the_model_back_as_it_was():
    """The network runs in channels_last during synthesis only: afterwards the caller's model holds the
    very tensors it had (layout, hence the numerics of later calibration, unchanged)."""
    model = tiny_bn_net()
    before = {name: t for name, t in model.state_dict().items()}
    pointers = {name: t.data_ptr() for name, t in before.items()}
    synthesize_batch(model, small_config(method="batch", iterations=2, channels_last=True, swing=True), 0)
    after = model.state_dict()
    assert {name: t.data_ptr() for name, t in after.items()} == pointers
    assert all(t.is_contiguous() for t in after.values())


def test_killed_run_resumes_and_guards_config(tmp_path, monkeypatch):
    """A run that dies after its first shard leaves a manifest claiming the directory."""
    import dsg_ext.synthesis.writer as gen

    out = str(tmp_path / "ds")
    real = gen.synthesize_batch
    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "synthesize_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        generate(SOURCE, out, small_config(iterations=5), num_samples=12, show_progress=False)
    m = dataset.load_manifest(out)
    assert m is not None and not m["complete"] and [s["index"] for s in m["shards"]] == [0]
    monkeypatch.setattr(gen, "synthesize_batch", real)
    with pytest.raises(dataset.DatasetError, match="different"):
        generate(SOURCE, out, small_config(iterations=6), num_samples=12, show_progress=False)
    m = generate(SOURCE, out, small_config(iterations=5), num_samples=12, show_progress=False)
    assert m["complete"] and dataset.load_images(out).shape[0] == 12


def test_cuda_graph_option_errors():
    with pytest.raises(ConfigError, match="jitter"):
        small_config(cuda_graph=True, jitter=2).validate()
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        synthesize_batch(tiny_bn_net(), small_config(cuda_graph=True), 0, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("options", [{}, {"clamp_pixels": True, "layer_weighting": "initial"},
                                     {"channels_last": True, "autocast_bf16": True}])
def test_cuda_graph_replay_matches_eager_cuda(options):
    """The captured iteration replays the eager one: same images, same losses, lr decay still acts."""
    import dsg_ext

    if not dsg_ext.cuda_ops_built():
        pytest.skip("dsg_ext built without CUDA kernels")
    kw = dict(iterations=30, plateau_patience=10, **options)
    rng = ([-1.0] * 3, [1.0] * 3)
    eager = synthesize_batch(tiny_bn_net().cuda(), small_config(**kw), 0, device="cuda", input_range=rng)
    graph = synthesize_batch(tiny_bn_net().cuda(), small_config(cuda_graph=True, **kw), 0, device="cuda",
                             input_range=rng)
    if options.get("autocast_bf16"):
        # bf16 rounding differences (autocast's weight cache is off under capture) are amplified by
        # Adam, which normalises the gradient: compare the outcome, not every pixel.
        torch.testing.assert_close(graph.final_loss, eager.final_loss, rtol=0.05, atol=1e-3)
        assert (graph.images - eager.images).abs().mean() < 5e-3
    else:
        torch.testing.assert_close(graph.images, eager.images, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(graph.final_loss, eager.final_loss, rtol=1e-3, atol=1e-3)
    assert graph.final_loss < graph.initial_loss


def test_random_label_cross_entropy_prior_steers_predictions():
    model = tiny_bn_net()
    with_ce = synthesize_batch(model, small_config(method="zeroq", iterations=60, ce_weight=100.0, batch_size=8), 0)
    without = synthesize_batch(model, small_config(method="zeroq", iterations=60, batch_size=8), 0)
    gen = torch.Generator().manual_seed(3 * 1_000_003 + 0 + 7)  # the labels synthesize_batch draws (seed 3, batch 0)
    labels = torch.randint(0, 10, (8,), generator=gen)
    with torch.no_grad():
        hit_ce = (model(with_ce.images).argmax(1) == labels).float().mean()
        hit_plain = (model(without.images).argmax(1) == labels).float().mean()
    assert hit_ce >= 0.75 and hit_ce > hit_plain
    with pytest.raises(ConfigError, match="ce_weight"):
        small_config(ce_weight=-1.0).validate()


def _warnings_of(func):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = func()
    return result, [str(w.message) for w in caught if "synthesis skips" in str(w.message)]


@pytest.mark.parametrize("source, skipped, reason", [
    ("aux_head_net", "aux.1", "not reached by the eval-mode forward"),
    ("se_bn_net", "1.bn", "sees 1x1 maps at every input size"),
])
def test_layers_synthesis_cannot_match_are_skipped_with_one_warning_naming_them(source, skipped, reason):
    """GoogLeNet's training-only auxiliary heads and ReXNet's squeeze-excite BN (1x1 maps at any size) used to
    make synthesis refuse the whole network."""
    import tiny_models

    model = getattr(tiny_models, source)()
    all_layers = [name for name, _ in batchnorm_layers(model)]
    assert skipped in all_layers
    for method in ("dsg", "batch"):
        result, said = _warnings_of(lambda: synthesize_batch(model, small_config(method=method, iterations=3), 0))
        assert len(said) == 1 and f"{reason}: {skipped}" in said[0] and f"1 of {len(all_layers)}" in said[0], said
        assert len(result.final_layer_losses) == len(all_layers) - 1
        assert torch.isfinite(result.images).all()


def test_generate_writes_the_layers_it_matched_and_says_once_which_it_skipped(tmp_path):
    out = str(tmp_path / "aux")
    proc = subprocess.run(
        [sys.executable, "-m", "dsg_ext", "generate", "--model", "tiny_models:aux_head_net", "--out", out,
         "--image-size", "12", "--num-samples", "4", "--batch-size", "4", "--iterations", "3"],
        capture_output=True, text=True, cwd=HERE, env={**os.environ, "PYTHONPATH": HERE})
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "synthesis skips" in line]
    assert said == ["dsg generate: warning: tiny_models:aux_head_net: synthesis skips 1 of 4 BN layers: "
                    "not reached by the eval-mode forward: aux.1"], proc.stderr
    manifest = dataset.load_manifest(out)
    assert "aux.1" not in manifest["layers"] and len(manifest["layers"]) == 3
    assert [r["layer"] for r in manifest["summary"]["per_layer"]] == manifest["layers"]


def test_a_layer_a_larger_image_size_would_keep_is_still_refused_with_that_advice():
    with pytest.raises(ConfigError, match=r"BN layer '4' sees 1x1 feature maps at image_size=2: .*larger image_size"):
        synthesize_batch(tiny_bn_net(), small_config(image_size=2, iterations=2), 0)


def test_a_network_whose_every_bn_layer_is_unusable_is_refused():
    import tiny_models

    class OnlySeBn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.se = tiny_models._SqueezeExciteBn(3)

        def forward(self, x):
            return self.se(x)

    with pytest.raises(NoBatchNormError, match="no BatchNorm2d layer synthesis can match .*1 see 1x1 maps"):
        synthesize_batch(OnlySeBn().eval(), small_config(iterations=2), 0)
