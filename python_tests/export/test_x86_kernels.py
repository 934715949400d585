"""onnxruntime's int16 pair saturation on x86 CPUs without VNNI: the pair limit that makes our files exact
on every CPU (quantization/int16_pairs.py), and the PyTorch emulation of both kernel classes
(export/x86_kernels.py) the deployment tests assert with, checked against an independent integer
reference here and against onnxruntime's real AVX2 kernels under QEMU where qemu-x86_64 is installed."""

import itertools

import pytest
import torch
from torch import nn

from dsg_ext import quantization as Q
from dsg_ext.export.x86_kernels import cpu_info, describe_cpu, onnxruntime_kernels, qemu, run_as_cpu
from dsg_ext.quantization.int16_pairs import (
    can_saturate,
    could_need_limit,
    limit_pairs,
    pair_excess,
    pair_safe_scale,
    pair_view,
)

QEMU = qemu()  # onnxruntime as an AVX2 CPU (run_as_cpu); .ci/run installs qemu-user


def test_pairs_follow_the_kernels_reduction_order():
    """(kernel row, kernel column, input channel), channel fastest: with 3 channels a pair straddles taps."""
    w = torch.arange(2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    flat = pair_view(w)[1].reshape(-1)
    expected = [w[1, c, i, j] for i in range(2) for j in range(2) for c in range(3)]
    assert flat.tolist() == [int(v) for v in expected]
    linear = pair_view(torch.arange(10).reshape(2, 5))
    assert linear.shape == (2, 3, 2) and linear[0, 2].tolist() == [4, 0]  # an odd end pairs with zero


@pytest.mark.parametrize("lo,hi", [(0, 255), (0, 200), (1, 255), (128, 255)])
def test_the_limit_leaves_no_pair_that_can_saturate_and_moves_only_toward_zero(lo, hi):
    g = torch.Generator().manual_seed(lo + hi)
    target = torch.randn(24, 7, 3, 3, generator=g, dtype=torch.float64) * 70
    q = target.round().clamp(-128, 127).to(torch.int8)
    assert bool(can_saturate(q, lo, hi).any())
    out, moved = limit_pairs(q, target, lo, hi)
    assert out.dtype == torch.int8 and out.shape == q.shape and moved > 0
    assert not bool(can_saturate(out, lo, hi).any())
    q64, out64 = q.long(), out.long()
    assert bool((out64.abs() <= q64.abs()).all()) and bool((out64 * q64 >= 0).all())
    untouched = ~can_saturate(q, lo, hi).unsqueeze(-1).expand(-1, -1, 2)
    assert torch.equal(pair_view(q64)[untouched], pair_view(out64)[untouched])
    assert int((out64 != q64).sum()) == moved


def test_the_limit_is_the_least_squared_error_on_each_pair():
    """Brute force over every integer pair in range that fits: the greedy steps find the optimum."""
    grid = torch.tensor(list(itertools.product(range(-128, 128), repeat=2)), dtype=torch.float64)
    over, under = pair_excess(grid.long(), 0, 255)
    feasible = grid[(over <= 0) & (under <= 0)]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        t = (torch.rand(2, generator=g, dtype=torch.float64) * 2 - 1) * 127.4
        if torch.rand(1, generator=g) < 0.5:  # half of them one-signed: the pairs that can saturate
            t = t.abs() * torch.sign(t[0])
        q = t.round().clamp(-128, 127)
        got, _ = limit_pairs(q.view(1, 2), t.view(1, 2))
        best = float(((feasible - t) ** 2).sum(1).min())
        assert ((got.view(2) - t) ** 2).sum().item() == pytest.approx(best, abs=1e-9)


def test_no_limit_is_needed_below_8_bits():
    assert could_need_limit(-128, 127, 0, 255)
    assert not could_need_limit(-64, 63, 0, 255)  # 7-bit weights: 2 * 64 * 255 fits int16
    assert not could_need_limit(-128, 127, 0, 127)  # 7-bit activations


def test_the_scale_widens_only_where_that_errs_less():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 16, 1, 1, generator=g)
    w[:8, :2] = w[:8, :2].abs() * 4  # channels whose two largest weights share a pair
    scale = w.abs().amax((1, 2, 3)) / 127
    chosen = pair_safe_scale(w, scale, -128, 127)
    assert chosen.shape == scale.shape and bool((chosen >= scale).all())
    assert bool((chosen[:8] > scale[:8]).all())

    def error(s):
        t = w / s.view(-1, 1, 1, 1)
        q, _ = limit_pairs(t.round().clamp(-128, 127), t)
        return ((q * s.view(-1, 1, 1, 1) - w) ** 2).sum((1, 2, 3))

    assert bool((error(chosen) <= error(scale) + 1e-12).all())


def _reference_pair_safe_scale(w, scale, qmin, qmax, lo, hi, candidates=17):
    """The scale search written plainly: every candidate's nearest rounding of the whole weight, limit_pairs
    on all of it, the float-unit squared error per channel (or summed, per tensor)."""
    rows = w.shape[0]
    per_row = scale.numel() == rows and rows > 1
    s = scale.double().reshape(-1).expand(rows) if per_row else scale.double().reshape(1).expand(rows)
    t = w.double() / s.view(-1, *[1] * (w.dim() - 1))
    pairs = pair_view(t)
    pos, neg = pairs.clamp(min=0).sum(-1), pairs.clamp(max=0).sum(-1)
    need = torch.maximum((hi * pos + lo * neg) / 32767, (lo * pos + hi * neg) / -32768).amax(-1)
    top = need.clamp(min=1.0) * (1 + 1 / 64)
    if not per_row:
        top = top.amax().expand(rows)
    errors, factors = [], []
    for j in range(candidates):
        f = 1 + (top - 1) * j / (candidates - 1)
        tf = t / f.view(-1, *[1] * (w.dim() - 1))
        q, _ = limit_pairs(tf.round().clamp(qmin, qmax), tf, lo, hi)
        e = (f * f) * ((q - tf) ** 2).reshape(rows, -1).sum(-1)
        errors.append(e if per_row else e.sum().expand(rows))
        factors.append(f)
    pick = torch.stack(errors).argmin(0)  # the first of equal errors, as a strict < keeps it
    chosen = s * torch.stack(factors).gather(0, pick[None])[0]
    return (chosen if per_row else chosen[:1]).to(scale.dtype).reshape(scale.shape)


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("lo, hi", [(0, 255), (7, 250)])
def test_the_scale_search_limits_only_the_pairs_that_can_saturate_and_chooses_as_the_plain_search(
        per_channel, lo, hi):
    """pair_safe_scale runs limit_pairs only on the pairs that can saturate at the observer's scale (a coarser
    grid cannot add any); it picks the scales the plain search over the whole tensor picks."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 13, 3, 3, generator=g)  # 117 weights per channel: odd, the last pair padded
    w[:10, :4] = w[:10, :4].abs() * 3  # large same-sign neighbours: pairs that saturate
    w[10:14, :4] = -w[10:14, :4].abs() * 3
    scale = w.abs().amax((1, 2, 3)) / 127 if per_channel else w.abs().amax().reshape(1) / 127
    got = pair_safe_scale(w, scale, -128, 127, lo, hi)
    assert torch.equal(got, _reference_pair_safe_scale(w, scale, -128, 127, lo, hi))
    assert bool((got > scale).any()) if per_channel else True


class _TwoConvs(nn.Module):
    """A 3-channel (odd: pairs straddle taps) padded stride-2 conv, a grouped (non-depthwise) conv, a
    depthwise conv and a Linear: every pairing the emulation handles."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 5 * 5, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.dw(torch.relu(self.b(torch.relu(self.a(x)))))).flatten(1))


def _saturating_model(vnni_only=True, placement="input"):
    torch.manual_seed(0)
    model = _TwoConvs().eval()
    with torch.no_grad():  # large weights of one sign side by side: pairs that saturate on 0..255 inputs
        for m in (model.a, model.b, model.fc):
            m.weight.abs_()
            m.weight[:, :2] *= 6
    x = torch.rand(16, 3, 9, 9) * 4 - 1
    config = Q.QuantConfig(wbits=8, abits=8, first_last_bits=None, observer="minmax", act_placement=placement,
                           fold_bn=placement == "deploy", vnni_only=vnni_only)
    q = Q.quantize_model(model, config, x[:1])
    Q.calibrate(q, x)
    Q.finalize_weights(q)
    return q, x


def _reference_layer(layer, aq, x):
    """The x86 kernel without VNNI, written out: raw uint8 inputs (zero point in the padding), products
    in the (row, column, channel) order, each adjacent pair saturated to int16, int32 sums, the zero point
    taken off, then scaled -- float64, loops, no unfold."""
    wq = layer.parametrizations.weight[0]
    w, s_w, s, zp = wq.w_int.double(), wq.scale.double().reshape(-1), float(aq.scale), int(aq.zero_point)
    a = torch.round(x.double() / s) + zp
    if not isinstance(layer, nn.Linear):
        ph, pw = layer.padding
        a = nn.functional.pad(a, (pw, pw, ph, ph), value=zp)
        cin, cout = layer.in_channels // layer.groups, layer.out_channels // layer.groups
        kh, kw = layer.kernel_size
        oh = (a.shape[2] - kh) // layer.stride[0] + 1
        ow = (a.shape[3] - kw) // layer.stride[1] + 1
        out = torch.zeros(a.shape[0], layer.out_channels, oh, ow, dtype=torch.float64)
        for o in range(layer.out_channels):
            grp = o // cout
            wk = [w[o, c, i, j] for i in range(kh) for j in range(kw) for c in range(cin)]
            for y in range(oh):
                for z in range(ow):
                    ak = [a[:, grp * cin + c, y * layer.stride[0] + i, z * layer.stride[1] + j]
                          for i in range(kh) for j in range(kw) for c in range(cin)]
                    acc = torch.zeros(a.shape[0], dtype=torch.float64)
                    for k in range(0, len(wk), 2):
                        pair = ak[k] * wk[k] + (ak[k + 1] * wk[k + 1] if k + 1 < len(wk) else 0)
                        acc += pair.clamp(-32768, 32767)
                    out[:, o, y, z] = (acc - zp * sum(wk)) * s * s_w[o]
        return out + layer.bias.double().view(1, -1, 1, 1)
    acc = torch.zeros(a.shape[0], w.shape[0], dtype=torch.float64)
    flat = a.reshape(a.shape[0], -1)
    for k in range(0, flat.shape[1], 2):
        nxt = flat[:, k + 1:k + 2] * w[:, k + 1] if k + 1 < flat.shape[1] else 0
        acc += (flat[:, k:k + 1] * w[:, k] + nxt).clamp(-32768, 32767)
    return (acc - zp * w.sum(1)) * s * s_w + layer.bias.double()


@pytest.mark.parametrize("name", ["a", "b", "fc"])
def test_the_emulation_computes_the_saturating_kernel(name):
    q, x = _saturating_model()
    layer = q.get_submodule(name)
    seen = []

    def capture(m, inp, out):  # registered after the emulation's hook: sees its output
        seen.append((inp[0].detach(), out.detach()))

    with torch.no_grad(), onnxruntime_kernels(q, vnni=False) as pairs:
        handle = layer.register_forward_hook(capture)
        q(x)
        handle.remove()
    (inputs, emulated), = seen
    with torch.no_grad():
        exact = layer(inputs)
    assert pairs > 0
    reference = _reference_layer(layer, layer.act_quant, layer.act_quant(inputs))
    torch.testing.assert_close(emulated.double(), reference, rtol=1e-5, atol=1e-4)
    assert float((exact - emulated).abs().max()) > 0.01  # the saturation changes this layer's output
    with torch.no_grad(), onnxruntime_kernels(q, vnni=True) as none:
        assert none == 0 and torch.equal(q(x), q(x))


def test_depthwise_layers_and_limited_models_are_exact_on_every_cpu():
    q, x = _saturating_model(vnni_only=False)
    assert q.get_submodule("dw").parametrizations.weight[0].pair_range is None
    assert q.get_submodule("a").parametrizations.weight[0].export_uint8  # the first layer: U8U8 instead
    assert q.get_submodule("b").parametrizations.weight[0].pair_range == (0, 255)
    with torch.no_grad():
        exact = q(x)
        with onnxruntime_kernels(q, vnni=False) as pairs:
            assert pairs == 0 and torch.equal(q(x), exact)


def test_the_cpu_is_named_with_its_kernel_class():
    info = cpu_info()
    assert isinstance(info["vnni"], bool) and info["exact_pairs"] == (info["vnni"] or not info["x86"])
    assert ("no VNNI" in describe_cpu(info)) == (info["x86"] and not info["vnni"])


def _export(q, x, path):
    from dsg_ext.export import export_onnx

    record = export_onnx(q, x[:2], path, check_images=x, check_data="test images")
    return record


def test_the_export_record_verifies_both_cpu_classes(tmp_path):
    q, x = _saturating_model(vnni_only=True, placement="deploy")
    record = _export(q, x, str(tmp_path / "v.onnx"))["verify"]
    assert record["images"] == 16 and record["data"] == "test images"
    other = record["other_cpus"]
    if record["cpu_exact_pairs"]:
        assert record["top1_agreement"] >= 99.9 or record["max_abs_diff"] < 0.05
        assert other["saturating_pairs"] > 0 and other["max_abs_diff"] > 0.01
    safe, x = _saturating_model(vnni_only=False, placement="deploy")
    record = _export(safe, x, str(tmp_path / "s.onnx"))["verify"]
    assert record["other_cpus"]["max_abs_diff"] == 0.0 and record["top1_agreement"] >= 99.9


@pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 (Debian qemu-user) not installed")
def test_the_emulation_matches_onnxruntimes_avx2_kernels(tmp_path):
    """The real thing: onnxruntime under QEMU as an AVX2 CPU computes what the emulation says, for a
    file whose pairs saturate, and what our model computes for one made with the limit."""
    q, x = _saturating_model(vnni_only=True, placement="deploy")
    path = str(tmp_path / "v.onnx")
    _export(q, x, path)
    avx2 = run_as_cpu(path, x)
    with torch.no_grad():
        exact = q(x)
        with onnxruntime_kernels(q, vnni=False):
            emulated = q(x)
    spread = float(exact.abs().max())
    assert float((avx2 - exact).abs().max()) > 0.05 * spread  # it does saturate there
    assert float((avx2 - emulated).abs().max()) <= 0.02 * spread  # and as emulated (requantization ulps aside)
    safe, x = _saturating_model(vnni_only=False, placement="deploy")
    path = str(tmp_path / "s.onnx")
    _export(safe, x, path)
    with torch.no_grad():
        assert float((run_as_cpu(path, x) - safe(x)).abs().max()) <= 0.02 * float(safe(x).abs().max())


def _forge(path, tmp_path, change):
    import json

    from safetensors import safe_open
    from safetensors.torch import save

    from dsg_ext.quantization.serialization import content_checksum

    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["dsg_ext"])
    change(meta)
    meta["checksum"] = content_checksum(tensors, meta)
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(save(tensors, metadata={"dsg_ext": json.dumps(meta)}))
    return str(forged)


def test_files_without_the_limit_say_so_and_a_false_claim_is_refused(tmp_path):
    """A file written before the limit existed (no ``vnni_only`` in its config) loads as what it is, a
    VNNI-only file; a file whose config claims the limit while its weights break it is refused."""
    from dsg_ext.errors import QuantizedFileError

    q, x = _saturating_model(vnni_only=True, placement="deploy")
    model = _TwoConvs().eval()
    path = str(tmp_path / "q.safetensors")
    Q.save_quantized(q, path, "test", "id")
    old = _forge(path, tmp_path, lambda meta: meta["config"].pop("vnni_only"))
    back = Q.load_quantized(model, old, "id", x[:1])
    assert back.dsg_quant_config["vnni_only"] is True
    with torch.no_grad(), onnxruntime_kernels(back, vnni=False) as pairs:
        assert pairs > 0
    forged = _forge(path, tmp_path, lambda meta: meta["config"].update(vnni_only=False))
    with pytest.raises(QuantizedFileError, match="weight pairs whose products can leave int16"):
        Q.load_quantized(model, forged, "id", x[:1])


class _Awkward(nn.Module):
    """'same' padding with an even kernel (the extra row after), and a Linear on channels-last 4-D input."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 2, padding="same")
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).permute(0, 2, 3, 1)).mean((1, 2))


def test_the_emulation_handles_same_padding_and_linear_on_4d_inputs():
    torch.manual_seed(0)
    model = _Awkward().eval()
    with torch.no_grad():
        for m in (model.b, model.fc):
            m.weight.abs_()
            m.weight[:, :2] *= 6
    x = torch.rand(4, 3, 7, 7)
    q = Q.quantize_model(model, Q.QuantConfig(wbits=8, abits=8, first_last_bits=None, observer="minmax",
                                              vnni_only=True), x[:1])
    Q.calibrate(q, x)
    Q.finalize_weights(q)
    with torch.no_grad():
        exact = q(x)
        with onnxruntime_kernels(q, vnni=False) as pairs:
            emulated = q(x)
    assert pairs > 0 and emulated.shape == exact.shape and bool(torch.isfinite(emulated).all())
    assert not torch.equal(emulated, exact)
