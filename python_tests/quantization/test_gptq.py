"""Second-order rounding (GPTQ): the input Hessians of every layer kind against the objective they
stand for, the lazy-block Cholesky algorithm against a plain sequential OBS reference with explicit
inverse updates, the error it reports against the error measured, exhaustive search on tiny layers,
and the model-level step."""

import itertools

import pytest
import torch
from helpers import calibrated as _calibrated
from torch import nn

import dsg_ext
from dsg_ext import quantization as Q
from dsg_ext.errors import ConfigError, InvalidDataError, QuantizationError
from dsg_ext.quantization.algorithms.hessian import LayerHessian, grouped_weight
from dsg_ext.quantization.algorithms.second_order import GptqConfig, gptq, gptq_round, quadratic_error


def _quant(w, scale, zp, qmin, qmax):
    return torch.clamp(torch.round(w / scale) + zp, qmin, qmax)


def obs_reference(w, h, scale, zp, qmin, qmax, lam, order):
    """Optimal Brain Quantization's sequential form, written independently: float64, one column at a
    time in ``order``, the remaining columns updated by -e / [H^-1]_ii x H^-1[i, :], and the inverse
    Hessian downdated explicitly (no Cholesky, no blocks)."""
    w = w.clone().double()
    hinv = torch.linalg.inv(h.double() + lam * torch.eye(h.shape[0], dtype=torch.float64))
    q = torch.zeros_like(w)
    for i in order:
        q[:, i] = _quant(w[:, i], scale, zp, qmin, qmax)
        e = (w[:, i] - (q[:, i] - zp) * scale) / hinv[i, i]
        w -= e[:, None] * hinv[i, :][None, :]
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return q


def _problem(seed, rows=5, dim=13, vectors=40, bits=4):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    x = mix @ torch.randn(dim, vectors, generator=g, dtype=torch.float64)  # correlated inputs
    w = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    qmax = 2 ** (bits - 1) - 1
    scale = w.abs().amax(1) / qmax
    return w, x, scale, torch.zeros(rows, dtype=torch.float64), -qmax - 1, qmax


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block_size", [1, 4, 128])
def test_gptq_matches_the_sequential_obs_reference(act_order, block_size):
    for seed in range(4):
        w, x, scale, zp, qmin, qmax = _problem(seed)
        h = x @ x.t()
        q, reported, lam, _ = gptq_round(w[None], h[None], scale[None], zp[None], qmin, qmax, damp=0.01,
                                      block_size=block_size, act_order=act_order)
        order = (torch.argsort(h.diagonal(), descending=True, stable=True).tolist() if act_order
                 else range(w.shape[1]))
        ref = obs_reference(w, h, scale[:, None].squeeze(1), zp, qmin, qmax, float(lam[0]), order)
        assert torch.equal(q[0], ref)
        assert float(lam[0]) == pytest.approx(0.01 * float(h.diagonal().mean()))


def test_the_reported_error_is_the_damped_objective_and_the_measured_error_its_undamped_part():
    w, x, scale, zp, qmin, qmax = _problem(7, rows=6, dim=20, vectors=200)
    h = x @ x.t()
    q, reported, lam, _ = gptq_round(w[None], h[None], scale[None], zp[None], qmin, qmax, damp=0.01, block_size=8)
    deq = (q[0] - zp[:, None]) * scale[:, None]
    damped = h + float(lam[0]) * torch.eye(20, dtype=torch.float64)
    assert float(reported[0]) == pytest.approx(float(quadratic_error(w[None], deq[None], damped[None])[0]), rel=1e-9)
    measured = float(((w @ x - deq @ x) ** 2).sum())  # ||W X - W~ X||^2 from the inputs themselves
    assert float(quadratic_error(w[None], deq[None], h[None])[0]) == pytest.approx(measured, rel=1e-9)
    nearest = (_quant(w, scale[:, None], 0, qmin, qmax)) * scale[:, None]
    assert measured < float(((w @ x - nearest @ x) ** 2).sum())


def test_on_tiny_layers_gptq_lies_between_the_exhaustive_optimum_and_nearest_rounding():
    """Every integer choice within floor(W/s) - 2 .. floor(W/s) + 3 of a 1 x 7 layer (6^7 of them,
    clamped to the grid): GPTQ's choice (default dampening) lies there, is never worse than nearest
    rounding on these problems and on average closes most of the gap to the optimum. (Without
    dampening it can be far worse: its compensation then runs into the grid's clamp.)"""
    offsets = torch.tensor(list(itertools.product(range(-2, 4), repeat=7)), dtype=torch.float64)
    gaps = []
    for seed in range(12):
        w, x, scale, zp, qmin, qmax = _problem(100 + seed, rows=1, dim=7, vectors=30, bits=3)
        h = x @ x.t()
        s = scale[0]
        lo = torch.floor(w[0] / s)

        def objective(ints):  # (..., 7) integers -> (W - W~) H (W - W~)^T
            d = w[0] - ints * s
            return torch.einsum("...i,ij,...j->...", d, h, d)

        best = float(objective(torch.clamp(lo + offsets, qmin, qmax)).min())
        q, _, _, _ = gptq_round(w[None], h[None], scale[None], zp[None], qmin, qmax)
        assert bool(((q[0, 0] - lo >= -2) & (q[0, 0] - lo <= 3)).all())
        ours, nearest = float(objective(q[0, 0])), float(objective(_quant(w[0], s, 0, qmin, qmax)))
        assert best * (1 - 1e-9) <= ours <= nearest * (1 + 1e-9)
        gaps.append((ours - best) / max(nearest - best, 1e-12))
    assert sum(gaps) / len(gaps) < 0.5


LAYERS = {
    "linear": lambda: nn.Linear(7, 5, bias=False),
    "conv": lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False),
    "conv_stride_dilation": lambda: nn.Conv2d(3, 6, 3, stride=2, dilation=2, padding=2, bias=False),
    "conv_grouped": lambda: nn.Conv2d(4, 6, (3, 2), groups=2, padding=(1, 0), bias=False),
    "depthwise": lambda: nn.Conv2d(5, 5, 5, groups=5, padding=2, bias=False),
    "conv_same_reflect": lambda: nn.Conv2d(3, 4, 4, padding="same", padding_mode="reflect", bias=False),
    "pointwise": lambda: nn.Conv2d(6, 3, 1, bias=False),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_the_hessian_gives_the_output_energy_of_any_weight(kind):
    """The definition, checked through the layer itself: for any weight W of the layer's shape,
    ||layer_W(x)||^2 = sum over groups of tr(W_g H_g W_g^T) -- padding, stride, dilation, groups."""
    torch.manual_seed(0)
    layer = LAYERS[kind]().double()
    x = torch.randn(3, layer.in_features, dtype=torch.float64) if kind == "linear" else \
        torch.randn(3, layer.in_channels, 9, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    hess = LayerHessian(layer)
    hess.add(x[:2])
    hess.add(x[2:])  # accumulated over calls
    for _ in range(3):
        w = torch.randn_like(layer.weight)
        with torch.no_grad():
            layer.weight.copy_(w)
            energy = float((layer(x) ** 2).sum())
        wg = grouped_weight(layer, w)
        assert float(torch.einsum("grd,gde,gre->", wg, hess.h, wg)) == pytest.approx(energy, rel=1e-10)
    assert hess.vectors == (x.shape[0] if kind == "linear" else layer(x).shape[0] * layer(x)[0, 0].numel())


def test_the_hessian_refuses_non_finite_inputs():
    hess = LayerHessian(nn.Linear(3, 2))
    with pytest.raises(QuantizationError, match="NaN or Inf"):
        hess.add(torch.tensor([[1.0, float("nan"), 0.0]]))



def test_gptq_rounds_every_layer_better_than_nearest_and_the_model_follows():
    model, qmodel, images = _calibrated(wbits=3)
    nearest = Q.quantize_model(model, Q.QuantConfig(wbits=3, abits=8, first_last_bits=None, observer="minmax",
                                                    weight_observer="mse"), example=images[:1])
    Q.calibrate(nearest, images)
    lines = []
    records = gptq(qmodel, images, log=lines.append)
    assert [r["layer"] for r in records] == qmodel.dsg_quant_order and len(lines) == len(records)
    for r in records:
        assert r["error"] <= r["nearest_error"] and r["vectors"] >= r["input_dim"]
    for wq in Q.weight_quantizers(qmodel).values():
        assert wq.mode is Q.WeightMode.INT and wq.qmin <= int(wq.w_int.min()) and int(wq.w_int.max()) <= wq.qmax
    Q.finalize_weights(nearest)
    held = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    assert dsg_ext.fidelity(model, qmodel, held)["mean_kl"] < dsg_ext.fidelity(model, nearest, held)["mean_kl"]
    assert gptq(qmodel, images) == []  # nothing left to round


def test_gptq_warns_when_a_layer_sees_fewer_vectors_than_its_input_dimension():
    model, qmodel, images = _calibrated()
    lines = []
    gptq(qmodel, images[:4], progress=False, log=lines.append)
    assert any("warning: 11:" in line and "rank-deficient" in line for line in lines)  # the Linear: 4 < 16


def test_gptq_input_errors():
    _, qmodel, images = _calibrated()
    with pytest.raises(InvalidDataError, match="NaN or Inf"):
        gptq(qmodel, images * float("nan"))
    with pytest.raises(ConfigError, match="not quantized layers"):
        gptq(qmodel, images, layers=["nope"])
    for bad in ({"damp": 0}, {"damp": float("inf")}, {"block_size": 0}, {"batch_size": 1.5}):
        with pytest.raises(ConfigError, match="second-order"):
            GptqConfig(**bad).validate()


def test_gptq_in_float32_matches_the_float64_rounding_on_a_well_conditioned_problem():
    """The float32 path (a Hessian too large for float64) follows the same algorithm: same integers but for
    the rare column whose rounding sits on a tie after float32 error propagation."""
    same = total = 0
    for seed in range(4):
        w, x, scale, zp, qmin, qmax = _problem(seed, rows=16, dim=40, vectors=200)
        h = x @ x.t()
        q64, _, _, _ = gptq_round(w[None], h[None], scale[None], zp[None], qmin, qmax)
        q32, _, _, _ = gptq_round(w[None].float(), h[None].float(), scale[None], zp[None], qmin, qmax)
        assert q32.dtype == torch.float32
        same += int((q32.double() == q64).sum())
        total += q64.numel()
    assert same / total >= 0.99, same / total


def test_the_precision_of_each_layer_is_planned_from_the_memory_before_any_is_rounded():
    from dsg_ext.quantization.algorithms import second_order

    _, qmodel, images = _calibrated()
    names = qmodel.dsg_quant_order
    sizes = {n: second_order.hessian_bytes(qmodel.get_submodule(n), torch.float64) for n in names}
    big = max(sizes, key=sizes.get)
    # Memory for every layer in float64 but the largest, which fits in float32.
    available = int(sizes[big] / second_order.MEMORY_SHARE) - 1
    plan = second_order.plan_precision(qmodel, names, GptqConfig(), "cpu", available=available)
    assert plan[big] is torch.float32 and all(plan[n] is torch.float64 for n in names if n != big)
    # Too little for the largest even in float32: nearest rounding, and a warning naming it and the memory.
    with pytest.warns(UserWarning, match=rf"GPTQ: layer '{big}' is rounded to nearest: .* GiB in float32"):
        plan = second_order.plan_precision(qmodel, names, GptqConfig(), "cpu", available=available // 4)
    assert plan[big] is None


def test_a_layer_whose_hessian_does_not_fit_is_rounded_to_nearest_and_the_rest_by_gptq(monkeypatch):
    from dsg_ext._utils import memory
    from dsg_ext.quantization.algorithms import second_order

    _, qmodel, images = _calibrated(wbits=3)
    names = qmodel.dsg_quant_order
    sizes = {n: second_order.hessian_bytes(qmodel.get_submodule(n), torch.float32) for n in names}
    big = max(sizes, key=sizes.get)
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": int(sizes[big] / second_order.MEMORY_SHARE) - 1)
    collected = []
    real_collect = second_order._collect
    monkeypatch.setattr(second_order, "_collect", lambda q, name, *a, **k: collected.append(name) or real_collect(
        q, name, *a, **k))
    with pytest.warns(UserWarning, match=f"layer '{big}' is rounded to nearest"):
        records = gptq(qmodel, images, progress=False)
    by_layer = {r["layer"]: r for r in records}
    assert big not in collected and by_layer[big]["kept"] == "nearest" and by_layer[big]["error"] is None
    wq = Q.weight_quantizers(qmodel)[big]
    w = Q.prepare.float_weight(qmodel, big).detach()
    nearest = torch.clamp(torch.round(w / wq.scale.reshape(-1, *[1] * (w.dim() - 1)) + wq.zero_point.reshape(
        -1, *[1] * (w.dim() - 1))), wq.qmin, wq.qmax)
    assert torch.equal(wq.w_int.float(), nearest.float())
    assert all(by_layer[n]["precision"] in ("float64", "float32") for n in names if n != big)
    from dsg_ext.quantization.algorithms.reconstruct import reconstruction_summary

    summary, _ = reconstruction_summary([{**r, "kind": "gptq"} for r in records])
    assert summary.startswith(f"GPTQ: {len(names)} layers")


@pytest.mark.parametrize("target", [None, "onnxruntime"])
def test_blocks_give_their_layers_the_inputs_a_prefix_replay_gives_with_fewer_forwards(monkeypatch, target):
    """Inside a block GPTQ takes each layer's inputs from a forward of the block alone (its inputs captured once,
    or the previous block's outputs): the same integers as replaying the whole prefix for every layer, with far
    fewer forwards of the model (a MobileNetV2: its 17 inverted residuals chain)."""
    import importlib

    import torchvision

    units = importlib.import_module("dsg_ext.quantization.algorithms.units")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10)
    images = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.train()(images)  # BN statistics of these images
    model.eval()

    def rounded():
        config = (Q.QuantConfig.for_target(target, wbits=4, abits=8) if target
                  else Q.QuantConfig(wbits=4, abits=8, first_last_bits=None, observer="minmax"))
        qmodel = Q.quantize_model(model, config, example=images[:1])
        Q.calibrate(qmodel, images)
        calls = []
        qmodel.register_forward_pre_hook(lambda *_: calls.append(1))
        records = gptq(qmodel, images, GptqConfig(batch_size=5), progress=False, log=lambda _line: None)
        ints = {n: wq.w_int.clone() for n, wq in Q.weight_quantizers(qmodel).items()}
        return ints, [r["layer"] for r in records], len(calls)

    blocked, order, forwards = rounded()
    monkeypatch.setattr(units, "find_blocks", lambda qmodel: [])
    replayed, replay_order, replay_forwards = rounded()
    assert order == replay_order and len(order) == 53
    assert [n for n in order if not torch.equal(blocked[n], replayed[n])] == []
    assert replay_forwards == 53 * 3  # 12 images in batches of 5, for every layer
    assert forwards < replay_forwards / 5, (forwards, replay_forwards)


class _PairBlock(nn.Module):
    """A block returning a tuple (its output and a side value), read by the next module."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return y, y.mean()


class _First(nn.Module):
    def forward(self, pair):
        return pair[0] + pair[1]


def test_gptq_rounds_blocks_that_return_a_tuple_as_a_prefix_replay_does(monkeypatch):
    import importlib

    units = importlib.import_module("dsg_ext.quantization.algorithms.units")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _PairBlock(), _First(), _PairBlock(), _First(),
                          nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    images = torch.randn(10, 3, 6, 6)

    def rounded():
        qmodel = Q.quantize_model(model, Q.QuantConfig(wbits=4, abits=8, first_last_bits=None), example=images[:1])
        Q.calibrate(qmodel, images)
        gptq(qmodel, images, GptqConfig(batch_size=4), progress=False, log=lambda _line: None)
        return {n: wq.w_int.clone() for n, wq in Q.weight_quantizers(qmodel).items()}

    blocked = rounded()
    monkeypatch.setattr(units, "find_blocks", lambda qmodel: [])
    assert all(torch.equal(blocked[n], w) for n, w in rounded().items())
