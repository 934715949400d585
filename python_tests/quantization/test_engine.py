"""The reconstruction engines (quantization/engine.py): the plain loop, the device-resident loop and its
CUDA-graph replay run the same schedule on the same batches, so they must end in the same rounding;
the device-side regularizer (beta in a tensor) must equal the fused op's, values and gradients."""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny_models import tiny_bn_net

from dsg_ext import ops
from dsg_ext import quantization as Q
from dsg_ext.errors import ConfigError, QuantizationError

engine = importlib.import_module("dsg_ext.quantization.algorithms.engine")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def calibrated(device="cpu", seed=7):
    model, calib = tiny_bn_net(), torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(seed))
    q = Q.quantize_model(model, Q.QuantConfig(wbits=4, abits=4, first_last_bits=None, observer="minmax"), calib[:2])
    Q.calibrate(q, calib)
    return model.to(device), q.to(device), calib.to(device)


def run(engine_name, device="cpu", **options):
    model, q, calib = calibrated(device)
    records = Q.reconstruct(q, model, calib, Q.AdaRoundConfig(iterations=80, lr=1e-2, engine=engine_name, **options),
                            device=device, progress=False)
    ints = torch.cat([w.w_int.flatten().float().cpu() for w in Q.weight_quantizers(q).values()])
    return ints, records


@pytest.mark.parametrize("beta", [2.0, 3.7, 20.0])
@pytest.mark.parametrize("shape", [(7, 3, 3, 3), (5, 11), (1,)])
def test_device_regularizer_matches_the_fused_op(beta, shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    v = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).requires_grad_()
    _, reg = ops.adaround(w, v, torch.tensor(0.05, dtype=torch.float64), 0, -8, 7, beta=beta)
    (grad_fused,) = torch.autograd.grad(reg, v)
    reg_t = ops.rounding_regularizer(v, torch.tensor(beta, dtype=torch.float64))
    (grad_t,) = torch.autograd.grad(reg_t, v)
    torch.testing.assert_close(reg_t, reg)
    torch.testing.assert_close(grad_t, grad_fused)


def test_weight_quantizer_with_a_tensor_beta_equals_a_host_beta():
    _, q, calib = calibrated()
    wq = next(iter(Q.weight_quantizers(q).values()))
    w = Q.float_weight(q, next(iter(Q.weight_quantizers(q))))
    wq.start_adaround(w)
    wq.beta = 6.5
    a, reg_a = wq(w), wq.last_reg
    wq.beta = torch.tensor(6.5)
    b, reg_b = wq(w), wq.last_reg
    assert torch.equal(a, b)
    torch.testing.assert_close(reg_b, reg_a)


def test_device_indices_are_the_plain_loops_draws():
    config = Q.AdaRoundConfig(iterations=9, batch_size=5)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    plain = torch.stack([torch.randint(0, 40, (5,), generator=gen_a) for _ in range(9)])
    step = engine.DeviceStep(None, None, [], torch.zeros(40, 1), torch.zeros(40, 1), config, gen_b, "cpu", False)
    assert torch.equal(step.indices, plain)
    assert torch.equal(torch.randint(0, 1000, (4,), generator=gen_a), torch.randint(0, 1000, (4,), generator=gen_b))


def test_schedule_warmup_then_linear_anneal():
    c = Q.AdaRoundConfig(iterations=10, warmup=0.2, beta_start=20.0, beta_end=2.0, reg_weight=0.5)
    assert [engine.schedule(c, i) for i in (0, 1)] == [(20.0, 0.0), (20.0, 0.0)]
    assert engine.schedule(c, 2) == (20.0, 0.5)
    assert engine.schedule(c, 6) == pytest.approx((11.0, 0.5))


@pytest.mark.parametrize("options", [{}, {"qdrop": 0.5}, {"learn_act_scale": True, "learn_weight_scale": True},
                                     {"unit": "layer"}])
def test_device_engine_ends_where_the_plain_loop_ends(options):
    ints_loop, rec_loop = run("loop", **options)
    ints_dev, rec_dev = run("device", **options)
    assert torch.equal(ints_loop, ints_dev)
    for a, b in zip(rec_loop, rec_dev):
        assert a["engine"] == "loop" and b["engine"] == "device"
        assert a["first_batch_loss"] == pytest.approx(b["first_batch_loss"], rel=1e-6)
        assert a["rec_loss_adaround"] == pytest.approx(b["rec_loss_adaround"], rel=1e-5)


@pytest.mark.parametrize("options", [{}, {"qdrop": 0.5, "learn_act_scale": True}])
def test_resident_step_run_eagerly_matches_the_plain_loop(options, monkeypatch):
    """The step a CUDA graph captures (schedule and counter read on the device, the regularizer with a
    tensor beta), run eagerly on the CPU: same rounding as the plain loop, up to rounding-variable ties."""
    real = engine.optimise_device

    def resident(*args, **kw):
        return real(*args, **{**kw, "resident": True})

    monkeypatch.setattr(importlib.import_module("dsg_ext.quantization.algorithms.reconstruct"), "optimise_device", resident)
    ints_res, rec_res = run("device", **options)
    ints_loop, rec_loop = run("loop", **options)
    assert (ints_res != ints_loop).float().mean() < 0.01
    for a, b in zip(rec_loop, rec_res):
        assert a["first_batch_loss"] == pytest.approx(b["first_batch_loss"], rel=1e-5)
        assert b["rec_loss_adaround"] == pytest.approx(a["rec_loss_adaround"], rel=0.05)


def test_engine_choice_and_refusals():
    assert engine.resolve_engine("auto", "cpu") == "device"
    assert engine.resolve_engine("auto", "cuda:0") == "graph"
    assert engine.resolve_engine("loop", "cuda") == "loop"
    with pytest.raises(QuantizationError, match="needs a CUDA device"):
        engine.resolve_engine("graph", "cpu")
    with pytest.raises(ConfigError, match="engine must be one of"):
        Q.AdaRoundConfig(engine="fast").validate()
    model, q, calib = calibrated()
    with pytest.raises(QuantizationError, match="needs a CUDA device"):
        Q.reconstruct(q, model, calib, Q.AdaRoundConfig(iterations=2, engine="graph"), progress=False)
    assert all(w.mode is not Q.WeightMode.ADAROUND for w in Q.weight_quantizers(q).values())


@needs_cuda
@pytest.mark.parametrize("options", [{}, {"qdrop": 0.5, "learn_act_scale": True, "learn_weight_scale": True}])
def test_cuda_graph_replay_matches_the_device_engine(options):
    ints_graph, rec_graph = run("graph", "cuda", **options)
    ints_dev, _ = run("device", "cuda", **options)
    ints_loop, _ = run("loop", "cuda", **options)
    assert all(r["engine"] == "graph" for r in rec_graph)
    assert torch.equal(ints_dev, ints_loop)
    assert (ints_graph != ints_dev).float().mean() < 0.01


@pytest.mark.parametrize("engine_name", ["loop", "device"])
def test_learned_scales_stay_above_their_floor(engine_name):
    """Adam moves a parameter by ~lr per step whatever its size: a learning rate far above the scales
    would make them negative (the op refuses that, CUDA would give NaN) without the projection."""
    model, q, calib = calibrated()
    start_w = {n: w.scale.clone() for n, w in Q.weight_quantizers(q).items()}
    start_a = {n: a.scale.clone() for n, a in Q.act_quantizers(q).items()}
    config = Q.AdaRoundConfig(iterations=30, learn_weight_scale=True, weight_scale_lr=1.0, learn_act_scale=True,
                              act_scale_lr=1.0, keep_better=False, engine=engine_name)
    Q.reconstruct(q, model, calib, config, progress=False)
    for starts, quantizers in ((start_w, Q.weight_quantizers(q)), (start_a, Q.act_quantizers(q))):
        for n, qz in quantizers.items():
            assert bool((qz.scale >= engine.SCALE_FLOOR * starts[n] * (1 - 1e-6)).all()), n


@needs_cuda
@pytest.mark.parametrize("engine_name", ["device", "graph"])
def test_no_host_sync_between_iterations_on_cuda(engine_name):
    """torch's sync debug mode set to "error" from the end of the first iteration (for the graph: of the
    first replay; capturing it synchronises once) to the end of the last: any device-to-host wait inside
    the loop raises."""
    model, q, calib = calibrated("cuda")
    R = importlib.import_module("dsg_ext.quantization.algorithms.reconstruct")
    config = Q.AdaRoundConfig(iterations=12, qdrop=0.5, learn_act_scale=True, learn_weight_scale=True)
    calls = []

    def step():
        calls.append(1)
        first = engine.GRAPH_WARMUP + 1 if engine_name == "graph" else 1
        torch.cuda.set_sync_debug_mode("error" if first <= len(calls) < config.iterations else "default")

    try:
        record, _ = R._reconstruct_unit(q, model, "3", ["3"], calib, config, "cuda", torch.Generator().manual_seed(0),
                                     step, engine_name)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == config.iterations and record["engine"] == engine_name


def test_chained_inputs_equal_the_full_forward_and_only_where_units_chain(monkeypatch):
    """The device engines take a block's inputs from the previous block's outputs (one block forward
    instead of the whole prefix) where the blocks form a chain: ResNet-18's blocks after the first of
    each stage follow one another; the first block (after the max pool) and fc (after the average pool)
    do not. The rounding is the one full-forward inputs give."""
    from tiny_models import residual_net

    R = importlib.import_module("dsg_ext.quantization.algorithms.reconstruct")
    model = residual_net()
    calib = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(5))

    def rounded(chain: bool):
        q = Q.quantize_model(model, Q.QuantConfig(wbits=4, abits=8), calib[:2])
        Q.calibrate(q, calib)
        if not chain:
            monkeypatch.setattr(R, "_chained_inputs", lambda *a: None)
        records = Q.reconstruct(q, model, calib, Q.AdaRoundConfig(iterations=6, engine="device"), progress=False)
        monkeypatch.undo()
        return torch.cat([w.w_int.flatten().float() for w in Q.weight_quantizers(q).values()]), records

    ints_chain, records = rounded(True)
    ints_forward, records_forward = rounded(False)
    how = {r["layer"]: r["inputs"] for r in records}
    assert how["conv1"] == how["layer1.0"] == how["fc"] == "forward"
    assert how["layer1.1"] == how["layer2.0"] == how["layer4.1"] == "chained"
    assert all(r["inputs"] == "forward" for r in records_forward)
    assert (ints_chain == ints_forward).float().mean() > 0.999
    for a, b in zip(records, records_forward):
        assert a["rec_loss_adaround"] == pytest.approx(b["rec_loss_adaround"], rel=1e-3)


def test_auto_engine_runs_on_eagerly_when_the_step_cannot_be_captured(monkeypatch):
    """engine "auto": a capture failure warns and the unit goes on with the captured step's body,
    eagerly, from where the warm-up left it; engine "graph" asked for explicitly raises."""
    R = importlib.import_module("dsg_ext.quantization.algorithms.reconstruct")

    def cannot(*_a):
        raise QuantizationError("the reconstruction step could not be captured in a CUDA graph (test)")

    monkeypatch.setattr(engine, "_capture", cannot)
    monkeypatch.setattr(R, "resolve_engine", lambda name, device: "graph" if name in ("auto", "graph") else name)
    with pytest.warns(UserWarning, match="runs on with the device engine"):
        ints, records = run("auto")
    assert all(r["engine"] == "device" for r in records)
    ints_loop, _ = run("loop")
    assert (ints != ints_loop).float().mean() < 0.01
    with pytest.raises(QuantizationError, match="could not be captured"):
        run("graph")
