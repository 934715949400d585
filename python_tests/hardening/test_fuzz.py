"""Property-based fuzzing (hypothesis) of the two ways in: op arguments and command-line option
values. Every draw ends in a clear error (naming the op or the option) or in a correct result; no
draw crashes, hangs or gets through validation with a value that breaks later (a NaN config would
make the resumed run "a different config", since NaN != NaN)."""

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsg_ext
from dsg_ext import cli
from dsg_ext.errors import ConfigError
from dsg_ext.quantization import AdaRoundConfig, QuantConfig
from dsg_ext.synthesis import SynthesisConfig

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2 ** 70), 2 ** 70),
                    st.sampled_from([0, -0.0, 1e-45, 1e38, 2 ** 31, 2 ** 63, -1]))
texts = st.one_of(numbers.map(str), st.text(max_size=12), st.sampled_from(["nan", "-inf", "1e400", "0x10", "", " 3"]))
OP_ERRORS = (RuntimeError, ValueError, TypeError, OverflowError)


@FUZZ
@given(scale=numbers, zero_point=numbers, qmin=numbers, qmax=numbers)
def test_fake_quant_arguments(scale, zero_point, qmin, qmax):
    x = torch.linspace(-3, 3, 37)
    try:
        out = dsg_ext.fake_quant(x, scale, zero_point, qmin, qmax)
    except OP_ERRORS as e:
        assert "fake_quant" in str(e) or "must be" in str(e), e
        return
    assert math.isfinite(float(scale)) and float(scale) > 0 and qmin < qmax
    if isinstance(zero_point, float):  # documented: rounded half to even, clamped into the range
        zp = min(max(round(zero_point), qmin), qmax)
    else:  # integers must lie inside the range
        zp = zero_point
        assert qmin <= zp <= qmax
    lo, hi = (qmin - zp) * float(scale), (qmax - zp) * float(scale)
    assert torch.isfinite(out).all()
    assert (out >= lo - 1e-3 * abs(lo)).all() and (out <= hi + 1e-3 * abs(hi)).all()
    inside = (x >= lo) & (x <= hi)
    assert ((out - x).abs()[inside] <= float(scale) * 0.5001 + 1e-6).all()


@FUZZ
@given(scale=st.one_of(numbers, st.lists(numbers, min_size=1, max_size=6)),
       axis=st.one_of(st.none(), st.integers(-4, 4), st.booleans()))
def test_adaround_init_arguments(scale, axis):
    w = torch.randn(5, 3)
    try:
        s = torch.tensor(scale, dtype=torch.float64) if isinstance(scale, list) else scale
        v = dsg_ext.adaround_init(w, s, axis=axis)
    except OP_ERRORS as e:
        assert "adaround_init" in str(e) or "value cannot be converted" in str(e) or "overflow" in str(e).lower(), e
        return
    assert v.shape == w.shape and torch.isfinite(v).all()


@FUZZ
@given(eps=numbers, std=numbers, delta=numbers, gamma=numbers)
def test_slack_loss_arguments(eps, std, delta, gamma):
    x = torch.randn(2, 3, 4, 4)
    try:
        std_t = torch.full((3,), float(std))
        loss = dsg_ext.bn_stat_slack_loss(x, torch.zeros(3), std_t, delta, gamma, eps=eps)
    except OP_ERRORS as e:
        assert "bn_stat_slack_loss" in str(e) or "must be" in str(e) or "overflow" in str(e).lower() \
            or "cannot be converted" in str(e), e
        return
    assert math.isfinite(float(std)) and float(std) > 0
    assert (torch.isnan(loss) | (loss >= 0)).all()  # a NaN margin propagates; the op never raises on values


GENERATE_OPTIONS = ["--iterations", "--batch-size", "--lr", "--epsilon", "--enhancement", "--seed", "--tv", "--l2",
                    "--jitter", "--ce", "--num-samples"]
QUANTIZE_OPTIONS = ["--wbits", "--abits", "--first-last-bits", "--percentile", "--adaround-iters", "--adaround-batch",
                    "--adaround-lr", "--num-samples"]


def _parse(argv):
    import contextlib
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return cli.build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 2  # argparse's own refusal: usage and a message, exit code 2
        return None


def _round_trips(config):
    """The config survives the manifest's JSON, equal to itself (what resuming compares)."""
    again = type(config)(**json.loads(json.dumps(dataclasses.asdict(config))))
    assert again == config


@FUZZ
@given(option=st.sampled_from(GENERATE_OPTIONS), value=texts)
def test_generate_option_values(option, value):
    args = _parse(["generate", "--model", "m", "--out", "o", f"{option}={value}"])
    if args is None:
        return
    try:
        config = cli.config_from_args(args, SynthesisConfig).validate()
    except ConfigError as e:
        assert str(e).startswith("invalid synthesis options")
        return
    assert args.num_samples >= 1
    assert all(math.isfinite(v) for v in dataclasses.asdict(config).values() if isinstance(v, float))
    _round_trips(config)


@FUZZ
@given(option=st.sampled_from(QUANTIZE_OPTIONS), value=texts)
def test_quantize_option_values(option, value):
    args = _parse(["quantize", "--model", "m", "--real", "noise", "--out", "o", "--adaround", f"{option}={value}"])
    if args is None:
        return
    try:
        q = cli.config_from_args(args, QuantConfig).validate()
        a = cli.config_from_args(args, AdaRoundConfig).validate()
    except ConfigError as e:
        assert str(e).startswith("invalid")
        return
    _round_trips(q)
    _round_trips(a)
    assert 2 <= q.wbits <= 8 and a.iterations >= 1 and math.isfinite(a.lr)


@pytest.mark.parametrize("cls", [SynthesisConfig, QuantConfig, AdaRoundConfig])
def test_every_float_field_refuses_nan(cls):
    for f in dataclasses.fields(cls):
        if isinstance(getattr(cls(), f.name), float):
            with pytest.raises(ConfigError, match=f.name):
                dataclasses.replace(cls(), **{f.name: float("nan")}).validate()
