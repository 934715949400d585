"""The peers' plain-PyTorch baselines compute what the fused ops compute: a benchmark that compares
them must compare the same work (run with the benchmark suite, `python -m pytest bench`)."""

import plain
import torch

from dsg_ext import quantization as Q


def _tiny():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 12 * 12, 10)).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(8, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
    return model, torch.randn(64, 3, 12, 12, generator=gen)


def test_plain_rounding_gives_the_fused_op_soft_weights_and_regularizer():
    model, images = _tiny()
    q = Q.quantize_model(model, Q.QuantConfig(wbits=4, abits=None, first_last_bits=None), images[:2])
    layer = q.get_submodule("3")
    wq = layer.parametrizations.weight[0]
    w = layer.parametrizations.weight.original
    wq.start_adaround(w)
    with torch.no_grad():
        wq.v.add_(torch.randn(wq.v.shape, generator=torch.Generator().manual_seed(0)))
    wq.beta = 7.0
    a, ra = wq(w), wq.last_reg
    wq.rounding = plain.plain_rounding
    b, rb = wq(w), wq.last_reg
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ra, rb.to(ra.dtype), rtol=1e-4, atol=1e-4)


def test_reconstruction_with_the_plain_rounding_reduces_the_error_too():
    model, calib = _tiny()
    q = Q.quantize_model(model, Q.QuantConfig(wbits=3, abits=None, first_last_bits=None), calib[:2])
    Q.weight_quantizers(q)["3"].rounding = plain.plain_rounding
    (r,) = Q.reconstruct(q, model, calib, Q.AdaRoundConfig(iterations=400, lr=1e-2), progress=False, layers=["3"])
    assert r["rec_loss_adaround"] < 0.9 * r["rec_loss_nearest"]


def test_plain_slack_loss_matches_the_op():
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    mean, std = torch.randn(6, dtype=torch.float64) * 0.1, torch.rand(6, dtype=torch.float64) + 0.5
    from dsg_ext import bn_stat_slack_loss

    ours = bn_stat_slack_loss(x, mean, std, 0.05, 0.02, unbiased=True)
    theirs = plain.slack_loss(x, mean, std, 0.05, 0.02, unbiased=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
