"""Automatic mixed precision (allocation.py): the knapsack against exhaustive search, the sensitivity
against an independent whole-forward loop (traced graph and fallback alike), rule-fixed layers, the
errors for impossible budgets, and the allocated file carried through save/load, report and export."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from dsg_ext import quantization as Q
from dsg_ext.errors import ConfigError, QuantizedFileError
from dsg_ext.models import model_identity
from dsg_ext.quantization import allocation as A
from dsg_ext.quantization.serialization import content_checksum


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn1 = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = x + self.b(torch.relu(self.bn1(self.a(x))))  # the skip keeps x alive across a and b
        return self.head(x.mean((2, 3)))


class _Untraceable(_Residual):
    def forward(self, x):
        if float(x.sum()) > 1e30:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return super().forward(x)


def _net(cls=_Residual):
    torch.manual_seed(0)
    net = cls()
    for bn in (net.bn0, net.bn1):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


X = torch.randn(6, 3, 9, 7, generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def _reference_sensitivity(model, images, bits):
    """Independent: each layer's weight rounded by the textbook formula, a whole forward, the KL."""
    out = {}
    ref = F.log_softmax(model(images).double(), 1)
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        w = m.weight.detach().clone()
        out[name] = {}
        for b in bits:
            qmax = 2 ** (b - 1) - 1
            s = w.abs().reshape(w.shape[0], -1).amax(1).clamp_min(1e-8).view(-1, *[1] * (w.dim() - 1)) / qmax
            with torch.no_grad():
                m.weight.copy_(torch.clamp(torch.round(w / s), -qmax - 1, qmax) * s)
                p = F.log_softmax(model(images).double(), 1)
                m.weight.copy_(w)
            out[name][b] = float((ref.exp() * (ref - p)).sum(1).mean())
    return out


@pytest.mark.parametrize("cls", [_Residual, _Untraceable])
def test_sensitivity_matches_an_independent_whole_forward_loop(cls):
    model = _net(cls)
    got = A.layer_sensitivity(model, X, Q.QuantConfig(), choices=(2, 4, 8), batch_size=4, progress=False)
    want = _reference_sensitivity(model, X, (2, 4, 8))
    assert list(got) == ["stem", "a", "b", "head"]  # execution order
    for name in want:
        for b in (2, 4, 8):
            assert got[name][b] == pytest.approx(want[name][b], rel=1e-5, abs=1e-12)
        assert got[name][2] > got[name][8]
    traced = A._Outputs(model, X, 4, "cpu").graph is not None
    assert traced == (cls is _Residual)  # the fast path ran where it can, the fallback elsewhere
    # the model's own weights are untouched
    assert torch.equal(model.a.weight, _net(cls).a.weight)


def _exhaustive(sens, params, budget, fixed):
    total = sum(params.values())
    names = list(params)
    best = (math.inf, None)
    for combo in itertools.product(*[[fixed[n]] if n in fixed else sorted(sens[n]) for n in names]):
        size = sum(params[n] * b for n, b in zip(names, combo))
        if size <= budget * total + 1e-9:
            obj = sum(0.0 if n in fixed else sens[n][b] for n, b in zip(names, combo))
            best = min(best, (obj, size), key=lambda t: t[0])
    return best[0]


@pytest.mark.parametrize("seed", range(6))
def test_allocation_is_the_exhaustive_optimum(seed):
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(999, generator=g)[:4].add(1).tolist())
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [1000])]  # 5 layers, 1000 weights: exact size units
    params = {f"l{i}": n for i, n in enumerate(sizes)}
    sens = {n: {b: float(torch.rand(1, generator=g)) * 2.0 ** -b for b in (2, 3, 4, 6, 8)} for n in params}
    fixed = {"l1": 8} if seed % 2 else {}
    for budget in (2.0, 3.3, 4.0, 5.5, 8.0):
        try:
            bits = A.allocate(sens, params, budget, fixed)
        except ConfigError:
            assert _exhaustive(sens, params, budget, fixed) == math.inf
            continue
        assert sum(params[n] * b for n, b in bits.items()) <= budget * 1000 + 1e-9
        assert all(bits[n] == b for n, b in fixed.items())
        got = sum(sens[n][b] for n, b in bits.items() if n not in fixed)
        assert got == pytest.approx(_exhaustive(sens, params, budget, fixed), rel=1e-9, abs=1e-15)


def test_impossible_budgets_are_refused_naming_the_least_average():
    with pytest.raises(ConfigError, match="below the smallest bit choice \\(3\\)"):
        A.check_budget(2.5, [3, 4])
    model = _net()
    with pytest.raises(ConfigError, match="cannot be met.*rule-fixed.*averages"):
        # head (40 of 360 weights) and stem fixed at 8: 3 bits on average is out of reach
        A.allocate_bits(model, X, Q.QuantConfig(layer_wbits="stem=8,head=8,b=8"), 3.0, (2, 3), progress=False)
    with pytest.raises(ConfigError, match="each must be an integer in 2..8"):
        A.parse_choices("3,9")
    with pytest.raises(ConfigError, match="not comma-separated integers"):
        A.parse_choices("3,four")


def test_allocated_file_round_trips_and_its_bits_are_checked(tmp_path):
    model = _net()
    config = Q.QuantConfig(wbits=4, abits=8, layer_wbits="a=8")
    alloc = A.allocate_bits(model, X, config, 4.0, (2, 3, 4, 5, 6, 8), progress=False)
    assert alloc.bits["a"] == 8 and alloc.fixed == ["a"] and alloc.average_bits <= 4.0
    # every free layer at 3 bits fits the budget (3.92 average with 'a' at 8): the optimum is no worse
    assert alloc.predicted <= alloc.uniform_predicted(3) + 1e-15
    q = Q.quantize_model(model, Q.QuantConfig(wbits=4, abits=8, layer_wbits=alloc.rules()), X[:1])
    assert {n: wq.bits for n, wq in Q.weight_quantizers(q).items()} == alloc.bits
    assert Q.QuantConfig(layer_wbits=alloc.rules()).label() == f"W4A4[{alloc.rules()}]"  # 4 rules: shown whole
    assert Q.QuantConfig(layer_wbits="a=8,b=8,c=8,d=8,e=8").label() == "W4A4[5 per-layer rules]"
    Q.calibrate(q, X)
    path = str(tmp_path / "q.safetensors")
    Q.save_quantized(q, path, "test", model_identity(model), {"bit_allocation": alloc.summary()})
    back = Q.load_quantized(model, path, model_identity(model), X[:1])
    assert torch.equal(back(X), q(X))
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["dsg_ext"])
    assert meta["weight_bits"] == alloc.bits and meta["bit_allocation"]["budget"] == 4.0
    meta["weight_bits"]["b"] = 8 if alloc.bits["b"] != 8 else 2  # a forged record, re-signed
    meta["checksum"] = content_checksum(tensors, meta)
    forged = str(tmp_path / "forged.safetensors")
    with open(forged, "wb") as f:
        f.write(save(tensors, metadata={"dsg_ext": json.dumps(meta)}))
    with pytest.raises(QuantizedFileError, match="per-layer weight bits do not follow from its config.*'b'"):
        Q.load_quantized(model, forged, model_identity(model), X[:1])


def test_automatic_bits_for_the_onnxruntime_target():
    """dsg quantize --target onnxruntime --wbits-budget: the deploy placement (BN folded) allocates too."""
    model = _net()
    config = Q.QuantConfig.for_target("onnxruntime", wbits=4, abits=8)
    alloc = A.allocate_bits(model, X, config, 4.0, (2, 4, 8), progress=False)
    assert alloc.average_bits <= 4.0 and set(alloc.bits) == set(alloc.params)
