"""Helpers shared by several test modules (a real module: tests import it as they import
``reference``, never each other)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from reference import slack_loss_ref, slack_stats_ref
from tiny_models import tiny_bn_net

import dsg_ext
from dsg_ext import quantization as Q

F64 = torch.float64
HERE = os.path.dirname(os.path.abspath(__file__))  # python_tests/, for tiny_models


# -- quantization -------------------------------------------------------------------------------

def images(n=32, size=12, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def dsg(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "dsg_ext", *args], capture_output=True, text=True, env=env, cwd=cwd)


def calibrated(wbits=4, abits=8, seed=0):
    model = tiny_bn_net()
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(48, 3, 12, 12, generator=g)
    qmodel = Q.quantize_model(model, Q.QuantConfig(wbits=wbits, abits=abits, first_last_bits=None,
                                                   observer="minmax"), example=images[:1])
    Q.calibrate(qmodel, images)
    return model, qmodel, images


# -- the slack-loss op -------------------------------------------------------------------------

def make_x(shape, dtype=F64, scale=1.5):
    """Activations with a different mean and spread per channel."""
    x = torch.randn(shape, dtype=F64)
    if len(shape) >= 2 and shape[1] > 0:
        c = shape[1]
        view = [1, c] + [1] * (len(shape) - 2)
        x = x * (0.5 + scale * torch.rand(c, dtype=F64)).reshape(view) + torch.randn(c, dtype=F64).reshape(view)
    return x.to(dtype)


def make_targets(x, spread=0.3):
    """BN targets near the statistics of x, so some channels lie inside a slack of ~0.1 and some outside."""
    sm, ss = slack_stats_ref(x, mode="batch")
    c = x.shape[1]
    mean = sm + spread * torch.randn(c, dtype=F64)
    std = (ss + spread * torch.randn(c, dtype=F64)).abs() + 0.05
    return mean.nan_to_num(0.0), std.nan_to_num(1.0)


def gradcheck_setup(mode, unbiased):
    x = make_x((2, 3, 3, 4))
    sm, ss = slack_stats_ref(x, 1e-5, unbiased, mode)
    center_m = sm.mean(0) if mode == "per_sample" else sm
    center_s = ss.mean(0) if mode == "per_sample" else ss
    # channel 0 outside both slacks, channel 1 inside both, channel 2 mixed
    mean = center_m + torch.tensor([0.8, 0.0, -0.7], dtype=F64)
    std = center_s + torch.tensor([-0.5, 0.0, 0.0], dtype=F64)
    delta = torch.tensor([0.1, 2.0, 0.1], dtype=F64)
    gamma = torch.tensor([0.1, 2.0, 2.0], dtype=F64)
    # every hinge is at least 1e-3 away from its kink (finite differences would see a kink)
    dm = (sm - mean).abs() - delta
    ds = (ss - std).abs() - gamma
    assert dm.abs().min() > 1e-3 and ds.abs().min() > 1e-3
    assert (dm < 0).any() and (dm > 0).any() and (ds < 0).any() and (ds > 0).any()
    return x, mean, std, delta, gamma


def check_empty(device, shape, mode, channels_last=False):
    x = torch.zeros(shape, dtype=F64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    mean, std = torch.zeros(c, dtype=F64), torch.ones(c, dtype=F64)
    xo = x.to(device).requires_grad_(True)
    loss, sm, ss = dsg_ext.bn_stat_slack_loss(xo, mean.to(device), std.to(device), 0.1, 0.1, mode=mode,
                                              return_stats=True)
    ref, rm, rs = slack_loss_ref(x, mean, std, 0.1, 0.1, mode=mode, return_stats=True)
    assert loss.shape == ref.shape and sm.shape == rm.shape and ss.shape == rs.shape
    # empty groups give NaN statistics (as torch.mean / torch.var), no channels a zero loss
    torch.testing.assert_close(loss.cpu(), ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(sm.cpu(), rm, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(ss.cpu(), rs, equal_nan=True, rtol=0, atol=0)
    if loss.numel() > 0:
        (gx,) = torch.autograd.grad(loss.sum(), xo)
        assert gx.shape == x.shape
