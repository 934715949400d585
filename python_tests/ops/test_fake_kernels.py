"""The ops' fake (meta) kernels check shapes as the real kernels do, so a traced or compiled program
with a shape error is refused while it is traced, with the message the real op would give."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

ops = torch.ops.dsg_ext


def _traced(fn):
    with FakeTensorMode():
        return fn()


def test_good_shapes_trace_to_the_real_output_shapes():
    def run():
        x = torch.empty(2, 3, 5, 5)
        c = torch.empty(3)
        loss, mean, std = ops.bn_stat_slack_loss(x, c, c, torch.empty(()), torch.empty(3), 1e-5, True, True)
        y, loss2, _, _ = ops.bn_eval_slack(x, c, c, c, c, torch.empty(()), torch.empty(()), 1e-5, True)
        q = ops.fake_quant(x, torch.empty(3), torch.zeros((), dtype=torch.int32), 0, 255, 1)
        w, reg = ops.adaround(torch.empty(4, 3), torch.empty(4, 3), torch.empty(4), torch.zeros(4), -8, 7, 0, 2.0, False)
        return loss.shape, mean.shape, y.shape, loss2.shape, q.shape, w.shape, reg.shape

    assert _traced(run) == ((2,), (2, 3), (2, 3, 5, 5), (2,), (2, 3, 5, 5), (4, 3), ())


@pytest.mark.parametrize("case,message", [
    (lambda: ops.bn_stat_slack_loss(torch.empty(5), torch.empty(1), torch.empty(1), torch.empty(()),
                                    torch.empty(()), 1e-5, False, True), r"x must have shape \(N, C, \*spatial\)"),
    (lambda: ops.bn_stat_slack_loss(torch.empty(2, 3, 4, 4), torch.empty(4), torch.empty(3), torch.empty(()),
                                    torch.empty(()), 1e-5, False, True), r"mean must have shape \(3\)"),
    (lambda: ops.bn_stat_slack_loss(torch.empty(2, 3, 4, 4), torch.empty(3), torch.empty(3), torch.empty(2),
                                    torch.empty(()), 1e-5, False, True), r"delta must have shape \(3\)"),
    (lambda: ops.bn_stat_slack_loss_backward(torch.empty(5), torch.empty(2, 3, 4, 4), torch.empty(3), torch.empty(3),
                                             torch.empty(()), torch.empty(()), torch.empty(2, 3), torch.empty(2, 3),
                                             False, True), "grad_loss must have one value per sample"),
    (lambda: ops.bn_eval_slack(torch.empty(2, 3, 4, 4), torch.empty(2), torch.empty(3), torch.empty(3),
                               torch.empty(3), torch.empty(()), torch.empty(()), 1e-5, False),
     r"bn_scale must have shape \(3\)"),
    (lambda: ops.fake_quant(torch.empty(2, 3), torch.empty(2), torch.zeros(2), 0, 255, 1),
     r"scale must have shape \(3\)"),
    (lambda: ops.fake_quant(torch.empty(2, 3), torch.empty(2), torch.zeros(2), 0, 255, None),
     "needs a single scale"),
    (lambda: ops.fake_quant(torch.empty(2, 3), torch.empty(3), torch.zeros(3), 0, 255, 2), "axis 2 is out of range"),
    (lambda: ops.fake_quant_backward(torch.empty(3, 2), torch.empty(2, 3), torch.empty(3), torch.zeros(3), 0, 255, 1,
                                     True), "grad must have the shape of x"),
    (lambda: ops.adaround(torch.empty(4, 3), torch.empty(3, 4), torch.empty(4), torch.zeros(4), -8, 7, 0, 2.0, False),
     "v must have the shape of w"),
    (lambda: ops.adaround(torch.empty(4, 3), torch.empty(4, 3), torch.empty(4), torch.zeros(3), -8, 7, 0, 2.0, False),
     r"zero_point must have shape \(4\)"),
])
def test_bad_shapes_are_refused_while_tracing(case, message):
    with pytest.raises(RuntimeError, match=message):
        _traced(case)
