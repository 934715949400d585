"""Every op rejects invalid inputs with a clear error (never a crash, a silent NaN on the CPU, or garbage)."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

import dsg_ext

F32, F64 = torch.float32, torch.float64
ops = torch.ops.dsg_ext


def x4(dtype=F32):
    return torch.randn(2, 3, 4, 5, dtype=dtype)


C3 = torch.zeros(3)
ONES3 = torch.ones(3)


# ------------------------------------------------------------------------------------------------
# bn_stat_slack_loss
# ------------------------------------------------------------------------------------------------

SLACK_CASES = {
    "integer_x": (lambda: dsg_ext.bn_stat_slack_loss(torch.ones(2, 3, 4, 4, dtype=torch.int64), C3, ONES3),
                  RuntimeError, "x must be a floating tensor"),
    "bool_x": (lambda: dsg_ext.bn_stat_slack_loss(torch.ones(2, 3, 4, 4, dtype=torch.bool), C3, ONES3),
               RuntimeError, "x must be a floating tensor"),
    "x_1d": (lambda: dsg_ext.bn_stat_slack_loss(torch.randn(3), C3, ONES3), RuntimeError, r"shape \(N, C, \*spatial\)"),
    "x_0d": (lambda: dsg_ext.bn_stat_slack_loss(torch.tensor(1.0), C3, ONES3), RuntimeError, r"shape \(N, C, \*spatial\)"),
    "mean_len": (lambda: dsg_ext.bn_stat_slack_loss(x4(), torch.zeros(4), ONES3), RuntimeError, "mean must have shape"),
    "std_len": (lambda: dsg_ext.bn_stat_slack_loss(x4(), C3, torch.ones(2)), RuntimeError, "std must have shape"),
    "mean_scalar": (lambda: dsg_ext.bn_stat_slack_loss(x4(), torch.tensor(0.0), ONES3), RuntimeError,
                    "mean must have shape"),
    "mean_2d": (lambda: dsg_ext.bn_stat_slack_loss(x4(), torch.zeros(1, 3), ONES3), RuntimeError, "mean must have shape"),
    "delta_len": (lambda: dsg_ext.bn_stat_slack_loss(x4(), C3, ONES3, torch.zeros(2)), RuntimeError,
                  "delta must have shape"),
    "gamma_len": (lambda: dsg_ext.bn_stat_slack_loss(x4(), C3, ONES3, 0.0, torch.zeros(4)), RuntimeError,
                  "gamma must have shape"),
    "integer_mean": (lambda: dsg_ext.bn_stat_slack_loss(x4(), torch.zeros(3, dtype=torch.int32), ONES3), RuntimeError,
                     "mean must be a floating tensor"),
    "negative_delta": (lambda: dsg_ext.bn_stat_slack_loss(x4(), C3, ONES3, -0.1, 0.0), RuntimeError, "must be >= 0"),
    "negative_gamma_channel": (lambda: dsg_ext.bn_stat_slack_loss(x4(), C3, ONES3, 0.0, torch.tensor([0.1, -0.1, 0.1])),
                               RuntimeError, "must be >= 0"),
    "nan_delta": (lambda: dsg_ext.bn_stat_slack_loss(x4(), C3, ONES3, float("nan"), 0.0), RuntimeError, "must be >= 0"),
    "unknown_mode": (lambda: dsg_ext.bn_stat_slack_loss(x4(), C3, ONES3, mode="per_channel"), ValueError,
                     "mode must be one of"),
    "mean_requires_grad": (lambda: dsg_ext.bn_stat_slack_loss(x4(), torch.zeros(3, requires_grad=True), ONES3),
                           ValueError, "mean requires grad"),
    "std_requires_grad": (lambda: dsg_ext.bn_stat_slack_loss(x4(), C3, torch.ones(3, requires_grad=True)), ValueError,
                          "std requires grad"),
    "delta_requires_grad": (lambda: dsg_ext.bn_stat_slack_loss(x4(), C3, ONES3, torch.zeros(3, requires_grad=True)),
                            ValueError, "delta requires grad"),
    "gamma_requires_grad": (lambda: dsg_ext.bn_stat_slack_loss(x4(), C3, ONES3, 0.0, torch.zeros((), requires_grad=True)),
                            ValueError, "gamma requires grad"),
}


@pytest.mark.parametrize("case", list(SLACK_CASES))
def test_slack_loss_rejects(case):
    fn, exc, match = SLACK_CASES[case]
    with pytest.raises(exc, match=match):
        fn()


def _slack_saved(per_sample=True, dtype=F32):
    x = x4(dtype)
    acc = F64 if dtype == F64 else F32
    d = torch.tensor(0.0, dtype=acc)
    loss, sm, ss = ops.bn_stat_slack_loss(x, C3.to(acc), ONES3.to(acc), d, d, 1e-5, False, per_sample)
    return x, C3.to(acc), ONES3.to(acc), d, sm, ss


SLACK_BACKWARD_CASES = {
    "grad_loss_shape": (lambda x, m, s, d, sm, ss: ops.bn_stat_slack_loss_backward(
        torch.ones(3), x, m, s, d, d, sm, ss, False, True), "grad_loss must have shape"),
    "grad_loss_not_scalar_batch": (lambda x, m, s, d, sm, ss: ops.bn_stat_slack_loss_backward(
        torch.ones(2), x, m, s, d, d, sm[0], ss[0], False, False), "grad_loss must be a scalar"),
    "grad_loss_integer": (lambda x, m, s, d, sm, ss: ops.bn_stat_slack_loss_backward(
        torch.ones(2, dtype=torch.int64), x, m, s, d, d, sm, ss, False, True), "grad_loss must be a floating tensor"),
    "stats_dtype": (lambda x, m, s, d, sm, ss: ops.bn_stat_slack_loss_backward(
        torch.ones(2), x, m, s, d, d, sm.double(), ss.double(), False, True), "saved statistics"),
    "stats_shape": (lambda x, m, s, d, sm, ss: ops.bn_stat_slack_loss_backward(
        torch.ones(2), x, m, s, d, d, sm[:1], ss[:1], False, True), "saved statistics"),
}


@pytest.mark.parametrize("case", list(SLACK_BACKWARD_CASES))
def test_slack_loss_backward_rejects(case):
    fn, match = SLACK_BACKWARD_CASES[case]
    with pytest.raises(RuntimeError, match=match):
        fn(*_slack_saved())


# ------------------------------------------------------------------------------------------------
# fake_quant
# ------------------------------------------------------------------------------------------------

FQ_CASES = {
    "integer_x": (lambda: dsg_ext.fake_quant(torch.ones(4, dtype=torch.int32), 0.1, 0, 0, 255), RuntimeError,
                  "must be a floating tensor"),
    "integer_scale": (lambda: dsg_ext.fake_quant(torch.randn(4), torch.tensor(1), 0, 0, 255), RuntimeError,
                      "scale must be a floating tensor"),
    "bool_zero_point": (lambda: dsg_ext.fake_quant(torch.randn(4), 0.1, torch.tensor(True), 0, 255), RuntimeError,
                        "zero_point must be an integer or floating tensor"),
    "qmin_eq_qmax": (lambda: dsg_ext.fake_quant(torch.randn(4), 0.1, 0, 5, 5), RuntimeError,
                     "must be smaller than quant_max"),
    "qmin_gt_qmax": (lambda: dsg_ext.fake_quant(torch.randn(4), 0.1, 0, 255, 0), RuntimeError,
                     "must be smaller than quant_max"),
    "range_too_wide": (lambda: dsg_ext.fake_quant(torch.randn(4), 0.1, 0, 0, 2**20), RuntimeError, "not supported"),
    "range_outside_int32": (lambda: dsg_ext.fake_quant(torch.randn(4), 0.1, 0, -(2**31) - 10, -(2**31) + 10),
                            RuntimeError, "not supported"),
    "scale_zero": (lambda: dsg_ext.fake_quant(torch.randn(4), 0.0, 0, 0, 255), RuntimeError, "scale must be positive"),
    "scale_negative": (lambda: dsg_ext.fake_quant(torch.randn(4), -0.1, 0, 0, 255), RuntimeError,
                       "scale must be positive"),
    "scale_inf": (lambda: dsg_ext.fake_quant(torch.randn(4), float("inf"), 0, 0, 255), RuntimeError,
                  "scale must be positive and finite"),
    "scale_nan": (lambda: dsg_ext.fake_quant(torch.randn(4), float("nan"), 0, 0, 255), RuntimeError,
                  "scale must be positive and finite"),
    "scale_overflows_fp32": (lambda: dsg_ext.fake_quant(torch.randn(4), torch.tensor(1e300, dtype=F64), 0, 0, 255),
                             RuntimeError, "scale must be positive and finite"),
    "channel_scale_negative": (lambda: dsg_ext.fake_quant(torch.randn(2, 3), torch.tensor([0.1, -0.1, 0.1]),
                                                          torch.zeros(3, dtype=torch.int32), 0, 255, 1),
                               RuntimeError, "scale must be positive and finite, got -0.1.* at channel 1"),
    "int_zero_point_above": (lambda: dsg_ext.fake_quant(torch.randn(4), 0.1, 300, 0, 255), RuntimeError,
                             r"zero_point 300 lies outside \[quant_min, quant_max\]"),
    "int_zero_point_below": (lambda: dsg_ext.fake_quant(torch.randn(4), 0.1, torch.tensor(-1, dtype=torch.int64), 0, 255),
                             RuntimeError, "lies outside"),
    "int_zero_point_channel": (lambda: dsg_ext.fake_quant(torch.randn(2, 3), torch.full((3,), 0.1),
                                                          torch.tensor([0, 9, 0], dtype=torch.int32), -8, 7, 1),
                               RuntimeError, "lies outside .* at channel 1"),
    "nan_zero_point": (lambda: dsg_ext.fake_quant(torch.randn(4), 0.1, torch.tensor(float("nan")), 0, 255), RuntimeError,
                       "zero_point is NaN"),
    "per_tensor_scale_vector": (lambda: dsg_ext.fake_quant(torch.randn(2, 3), torch.full((3,), 0.1), 0, 0, 255),
                                RuntimeError, "needs a single scale"),
    "per_tensor_zero_point_vector": (lambda: dsg_ext.fake_quant(torch.randn(2, 3), 0.1, torch.zeros(3, dtype=torch.int32),
                                                                0, 255), RuntimeError, "needs a single zero_point"),
    "scale_len": (lambda: dsg_ext.fake_quant(torch.randn(2, 3), torch.full((2,), 0.1), torch.zeros(2), 0, 255, 1),
                  RuntimeError, r"scale must have shape \(3\)"),
    "scale_scalar_per_channel": (lambda: dsg_ext.fake_quant(torch.randn(2, 3), 0.1, torch.zeros(3), 0, 255, 1),
                                 RuntimeError, r"scale must have shape \(3\)"),
    "zero_point_len": (lambda: dsg_ext.fake_quant(torch.randn(2, 3), torch.full((3,), 0.1), torch.zeros(4), 0, 255, 1),
                       RuntimeError, r"zero_point must have shape \(3\)"),
    "axis_too_large": (lambda: dsg_ext.fake_quant(torch.randn(2, 3), torch.full((3,), 0.1), torch.zeros(3), 0, 255, 2),
                       RuntimeError, "axis 2 is out of range"),
    "axis_too_negative": (lambda: dsg_ext.fake_quant(torch.randn(2, 3), torch.full((2,), 0.1), torch.zeros(2), 0, 255, -3),
                          RuntimeError, "axis -3 is out of range"),
    "axis_on_scalar": (lambda: dsg_ext.fake_quant(torch.tensor(1.0), torch.full((1,), 0.1), torch.zeros(1), 0, 255, 0),
                       RuntimeError, "at least one dimension"),
}


@pytest.mark.parametrize("case", list(FQ_CASES))
def test_fake_quant_rejects(case):
    fn, exc, match = FQ_CASES[case]
    with pytest.raises(exc, match=match):
        fn()


FQ_BACKWARD_CASES = {
    "grad_dtype": (lambda x: ops.fake_quant_backward(torch.ones_like(x, dtype=F64), x, torch.tensor(0.1),
                                                     torch.tensor(0.0), 0, 255, None, True),
                   "grad must have the dtype of x"),
    "grad_shape": (lambda x: ops.fake_quant_backward(torch.ones(3, 4), x, torch.tensor(0.1), torch.tensor(0.0), 0, 255,
                                                     None, True), "grad must have the shape of x"),
    "scale_zero": (lambda x: ops.fake_quant_backward(torch.ones_like(x), x, torch.tensor(0.0), torch.tensor(0.0), 0, 255,
                                                     None, True), "scale must be positive"),
    "qrange": (lambda x: ops.fake_quant_backward(torch.ones_like(x), x, torch.tensor(0.1), torch.tensor(0.0), 3, 2,
                                                 None, False), "must be smaller than quant_max"),
}


@pytest.mark.parametrize("case", list(FQ_BACKWARD_CASES))
def test_fake_quant_backward_rejects(case):
    fn, match = FQ_BACKWARD_CASES[case]
    with pytest.raises(RuntimeError, match=match):
        fn(torch.randn(2, 3, 4))


def test_fake_quant_grad_dtype_via_autograd():
    """An upstream gradient of another dtype is a user error only at the op level; autograd casts it."""
    x = torch.randn(3, 4, requires_grad=True)
    y = dsg_ext.fake_quant(x, 0.1, 0, -128, 127)
    (y.double() * 2).sum().backward()
    assert x.grad.dtype == F32 and torch.equal(x.grad, torch.full_like(x, 2.0))


# ------------------------------------------------------------------------------------------------
# adaround
# ------------------------------------------------------------------------------------------------


def w4(dtype=F32):
    return torch.randn(4, 3, 2, 2, dtype=dtype) * 0.1


ADA_CASES = {
    "integer_w": (lambda: dsg_ext.adaround(torch.ones(4, 3, dtype=torch.int32), torch.zeros(4, 3, dtype=torch.int32),
                                           0.1, 0, -8, 7), RuntimeError, "must be a floating tensor"),
    "v_dtype": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2, dtype=F64), 0.1, 0, -8, 7), RuntimeError,
                "v must have the dtype of w"),
    "v_half": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2, dtype=torch.float16), 0.1, 0, -8, 7), RuntimeError,
               "v must have the dtype of w"),
    "v_shape": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 1), 0.1, 0, -8, 7), RuntimeError,
                "v must have the shape of w"),
    "v_broadcastable": (lambda: dsg_ext.adaround(w4(), torch.zeros(3, 2, 2), 0.1, 0, -8, 7), RuntimeError,
                        "v must have the shape of w"),
    "scale_len": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2), torch.full((3,), 0.1),
                                           torch.zeros(3, dtype=torch.int32), -8, 7, 0), RuntimeError,
                  r"scale must have shape \(4\)"),
    "per_tensor_scale_vector": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2), torch.full((4,), 0.1), 0, -8, 7),
                                RuntimeError, "needs a single scale"),
    "zero_point_len": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2), torch.full((4,), 0.1),
                                                torch.zeros(2, dtype=torch.int32), -8, 7, 0), RuntimeError,
                       r"zero_point must have shape \(4\)"),
    "scale_zero": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2), 0.0, 0, -8, 7), RuntimeError,
                   "scale must be positive"),
    "scale_negative_channel": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2), torch.tensor([0.1, 0.1, 0.1, -1.0]),
                                                        torch.zeros(4, dtype=torch.int32), -8, 7, 0), RuntimeError,
                               "scale must be positive and finite, got -1 at channel 3"),
    "scale_inf": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2), float("inf"), 0, -8, 7), RuntimeError,
                  "scale must be positive and finite"),
    "scale_nan": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2), float("nan"), 0, -8, 7), RuntimeError,
                  "scale must be positive and finite"),
    "qmin_ge_qmax": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2), 0.1, 0, 7, -8), RuntimeError,
                     "must be smaller than quant_max"),
    "int_zero_point_outside": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2), 0.1, 8, -8, 7), RuntimeError,
                               "lies outside"),
    "nan_zero_point": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2), 0.1, float("nan"), -8, 7), RuntimeError,
                       "zero_point is NaN"),
    "beta_zero": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2), 0.1, 0, -8, 7, beta=0.0), RuntimeError,
                  "beta must be positive"),
    "beta_inf": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2), 0.1, 0, -8, 7, beta=float("inf")), RuntimeError,
                 "beta must be positive and finite"),
    "axis_out_of_range": (lambda: dsg_ext.adaround(w4(), torch.zeros(4, 3, 2, 2), torch.full((4,), 0.1),
                                                   torch.zeros(4, dtype=torch.int32), -8, 7, 4), RuntimeError,
                          "axis 4 is out of range"),
    "init_integer_w": (lambda: dsg_ext.adaround_init(torch.ones(3, 3, dtype=torch.int64), 0.1), TypeError,
                       "must be a floating tensor"),
}


@pytest.mark.parametrize("case", list(ADA_CASES))
def test_adaround_rejects(case):
    fn, exc, match = ADA_CASES[case]
    with pytest.raises(exc, match=match):
        fn()


def _ada_backward(gw=None, gr=None, w=None, scale=None):
    w = w4() if w is None else w
    v = torch.zeros_like(w)
    gw = torch.ones_like(w) if gw is None else gw
    gr = torch.tensor(1.0) if gr is None else gr
    s = torch.tensor(0.1) if scale is None else scale
    return ops.adaround_backward(gw, gr, w, v, s, torch.tensor(0, dtype=torch.int32), -8, 7, None, 2.0, False, True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gw=torch.ones(4, 3, 2, 2, dtype=F64)), "grad_w must have the dtype of w"),
        (dict(gw=torch.ones(4, 3, 2)), "grad_w must have the shape of w"),
        (dict(gr=torch.ones(2)), "grad_reg must be a scalar"),
        (dict(scale=torch.tensor(-0.1)), "scale must be positive"),
    ],
    ids=["grad_w_dtype", "grad_w_shape", "grad_reg_shape", "scale"],
)
def test_adaround_backward_rejects(kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        _ada_backward(**kwargs)


def test_rejected_inputs_leave_no_partial_output():
    """Validation happens before any work: a rejected call does not alter its inputs."""
    x = x4()
    x0 = x.clone()
    with pytest.raises(RuntimeError):
        dsg_ext.fake_quant(x, -1.0, 0, 0, 255)
    with pytest.raises(RuntimeError):
        dsg_ext.bn_stat_slack_loss(x, C3, ONES3, -1.0)
    assert torch.equal(x, x0)


# ------------------------------------------------------------------------------------------------
# mixed devices (needs a GPU)
# ------------------------------------------------------------------------------------------------


@requires_cuda
def test_mixed_devices_rejected_cuda():
    xc = torch.randn(2, 3, 4, 4, device="cuda")
    with pytest.raises(RuntimeError, match="device"):
        dsg_ext.bn_stat_slack_loss(xc, C3, ONES3.cuda())
    with pytest.raises(RuntimeError, match="device"):
        dsg_ext.bn_stat_slack_loss(xc, C3.cuda(), ONES3.cuda(), torch.zeros(3))
    with pytest.raises(RuntimeError, match="device"):
        dsg_ext.fake_quant(xc, torch.full((3,), 0.1), torch.zeros(3, device="cuda"), 0, 255, 1)
    with pytest.raises(RuntimeError, match="device"):
        dsg_ext.fake_quant(xc, torch.full((3,), 0.1, device="cuda"), torch.zeros(3), 0, 255, 1)
    wc = torch.randn(4, 3, device="cuda")
    with pytest.raises(RuntimeError, match="device"):
        dsg_ext.adaround(wc, torch.zeros(4, 3), 0.1, 0, -8, 7)
    with pytest.raises(RuntimeError, match="device"):
        dsg_ext.adaround(wc, torch.zeros(4, 3, device="cuda"), torch.full((4,), 0.1), torch.zeros(4, dtype=torch.int32,
                         device="cuda"), -8, 7, 0)


@requires_cuda
def test_cuda_invalid_values_give_nan():
    """On CUDA an invalid scale or zero point gives NaN instead of an error (documented: no device sync)."""
    xc = torch.randn(2, 3, device="cuda")
    out = dsg_ext.fake_quant(xc, torch.tensor([0.1, -0.1, 0.1], device="cuda"), torch.zeros(3, device="cuda"), 0, 255, 1)
    assert torch.isnan(out[:, 1]).all() and torch.isfinite(out[:, [0, 2]]).all()


# ------------------------------------------------------------------------------------------------
# The C++ checks build their messages without std::ostream (csrc/checks.cpp: streaming an integer
# from extension code crashed a gcc 13.3 + torch 2.11 build). The exact text of every kind of value
# they format -- integers, shapes, floats, dtypes, devices -- is pinned here, on each device.

def _message(fn):
    with pytest.raises(RuntimeError) as info:
        fn()
    return str(info.value).splitlines()[0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_op_error_messages_format_every_value_kind(device):
    fq = torch.ops.dsg_ext.fake_quant
    x = torch.randn(4, 3, device=device)
    ones, zeros = torch.ones(3, device=device), torch.zeros(3, device=device)
    assert _message(lambda: fq(x, ones, zeros, 5, 1, 1)) == \
        "fake_quant: quant_min (5) must be smaller than quant_max (1)"
    assert _message(lambda: fq(x, ones, zeros, -70000, 1, 1)) == (
        "fake_quant: quantization range [-70000, 1] is not supported: quant_min and quant_max must lie in "
        "[-65536, 65536] (at most 16 bits)")
    assert _message(lambda: fq(x, ones, zeros, 0, 255, -3)) == \
        "fake_quant: axis -3 is out of range for a tensor of 2 dimensions"
    assert _message(lambda: fq(x, ones[:2], zeros[:2], 0, 255, 1)) == \
        "fake_quant: scale must have shape (3) to match the channel dimension of x, got shape [2]"
    if device == "cpu":  # value checks read the parameters: the CUDA op leaves them to the Python side (no sync)
        assert _message(lambda: fq(x, torch.tensor([1.0, -0.25, 1.0]), zeros, 0, 255, 1)) == \
            "fake_quant: scale must be positive and finite, got -0.25 at channel 1"
        assert _message(lambda: fq(x, ones, torch.tensor([0, 300, 0], dtype=torch.int32), 0, 255, 1)) == \
            "fake_quant: zero_point 300 lies outside [quant_min, quant_max] = [0, 255] at channel 1"
    assert _message(lambda: fq(x.int(), ones, zeros, 0, 255, 1)) == \
        "fake_quant: input must be a floating tensor (float32, float64, float16 or bfloat16), got Int"
    if device == "cuda":
        assert _message(lambda: fq(x, ones.cpu(), zeros, 0, 255, 1)) == \
            "fake_quant: scale is on cpu but x is on cuda:0; all tensors must be on the same device"
    slack = torch.ops.dsg_ext.bn_stat_slack_loss
    assert _message(lambda: slack(torch.randn(5, device=device), zeros, ones, zeros, zeros, 1e-5, True, True)) == \
        "bn_stat_slack_loss: x must have shape (N, C, *spatial), got shape [5]"
