"""Benchmark workloads: each fused op next to the plain-PyTorch way (and torch.compile of it).

Shared by the pytest-benchmark suite (bench/test_bench_ops.py), the GPU script (bench/gpu_bench.py)
and bench/run.py (the table of ratios). A workload knows the bytes its operation must move at least, so a timing can be
given as a ratio to the memory floor (bytes / measured copy bandwidth).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Callable, Dict, List, Optional

import plain
import torch
from torch import nn

from dsg_ext import ops

# Shapes: "gpu" are the goal shapes (H100); "cpu" are small enough for a 2-core machine.
SHAPES = {
    "gpu": {"slack": (256, 64, 112, 112), "fq": (256, 64, 56, 56), "adaround": (512, 512, 3, 3)},
    "cpu": {"slack": (16, 64, 56, 56), "fq": (16, 64, 56, 56), "adaround": (512, 512, 3, 3)},
    "tiny": {"slack": (2, 8, 9, 9), "fq": (2, 8, 9, 9), "adaround": (16, 8, 3, 3)},
}

@dataclasses.dataclass
class Workload:
    name: str
    description: str
    bytes_moved: int  # the fewest bytes the operation must read + write
    impls: Dict[str, Callable[[], object]]

def _compiled(fn: Callable, enabled: bool) -> Optional[Callable]:
    return torch.compile(fn) if enabled else None

def make_workloads(device: str = "cpu", size: str = "cpu", compile_plain: bool = True) -> List[Workload]:
    """Builds every workload with fresh random inputs on ``device``."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    shapes = SHAPES[size]
    workloads: List[Workload] = []

    # 1. BN-statistic slack loss, per-sample statistics over H*W, forward + backward.
    n, c, h, w = shapes["slack"]
    x = (randn(n, c, h, w) * 1.5 + 0.3).requires_grad_(True)
    mean, std = randn(c) * 0.2, randn(c).abs() + 0.5
    delta, gamma = torch.full((c,), 0.02, device=device), torch.full((c,), 0.02, device=device)
    elem = x.element_size()

    def slack_ours():
        loss = ops.bn_stat_slack_loss(x, mean, std, delta, gamma, eps=1e-5).sum()
        return torch.autograd.grad(loss, x)

    def slack_plain_fn(x_):
        return plain.slack_loss(x_, mean, std, delta, gamma, eps=1e-5).sum()

    slack_compiled = _compiled(slack_plain_fn, compile_plain)
    impls = {"dsg_ext": slack_ours, "plain": lambda: torch.autograd.grad(slack_plain_fn(x), x)}
    if slack_compiled is not None:
        impls["plain_compiled"] = lambda: torch.autograd.grad(slack_compiled(x), x)
    workloads.append(
        Workload("slack_loss_fwd_bwd", f"x {n}x{c}x{h}x{w}", 3 * x.numel() * elem, impls)
    )

    x_nograd = x.detach()
    workloads.append(
        Workload(
            "slack_loss_fwd",
            f"x {n}x{c}x{h}x{w}",
            x.numel() * elem,
            {
                "dsg_ext": lambda: ops.bn_stat_slack_loss(x_nograd, mean, std, delta, gamma, eps=1e-5),
                "plain": lambda: plain.slack_loss(x_nograd, mean, std, delta, gamma, eps=1e-5),
            },
        )
    )

    # 2. Fake quantization, 8-bit asymmetric, per channel along axis 1 and per tensor.
    n, c, h, w = shapes["fq"]
    xq = randn(n, c, h, w)
    scale = (torch.rand(c, generator=gen) * 0.02 + 0.01).to(device)
    zp = torch.randint(0, 256, (c,), generator=gen, dtype=torch.int32).to(device)
    s0, z0 = torch.tensor([0.02], device=device), torch.tensor([128], device=device, dtype=torch.int32)
    elem = xq.element_size()
    workloads.append(
        Workload(
            "fake_quant_per_channel_fwd",
            f"x {n}x{c}x{h}x{w}",
            2 * xq.numel() * elem,
            {
                "dsg_ext": lambda: ops.fake_quant(xq, scale, zp, 0, 255, axis=1),
                "plain": lambda: plain.fake_quant(xq, scale, zp, 0, 255, axis=1),
            },
        )
    )
    workloads.append(
        Workload(
            "fake_quant_per_tensor_fwd",
            f"x {n}x{c}x{h}x{w}",
            2 * xq.numel() * elem,
            {
                "dsg_ext": lambda: ops.fake_quant(xq, s0, z0, 0, 255),
                "plain": lambda: torch.fake_quantize_per_tensor_affine(xq, s0, z0, 0, 255),
            },
        )
    )
    xg = xq.clone().requires_grad_(True)
    dy = randn(n, c, h, w)

    def fq_ste(fn):
        return lambda: torch.autograd.grad(fn(), xg, dy)

    workloads.append(
        Workload(
            "fake_quant_per_channel_fwd_bwd",
            f"x {n}x{c}x{h}x{w}",
            4 * xq.numel() * elem,  # read x, write y; read dy, write dx
            {
                "dsg_ext": fq_ste(lambda: ops.fake_quant(xg, scale, zp, 0, 255, axis=1)),
                "plain": fq_ste(lambda: plain.fake_quant(xg, scale, zp, 0, 255, axis=1)),
            },
        )
    )
    scale_l = scale.clone().requires_grad_(True)
    zp_l = zp.float().requires_grad_(True)

    def fq_learnable(fn):
        return lambda: torch.autograd.grad(fn(), (xg, scale_l, zp_l), dy)

    workloads.append(
        Workload(
            "fake_quant_learnable_per_channel_fwd_bwd",
            f"x {n}x{c}x{h}x{w}",
            4 * xq.numel() * elem,
            {
                "dsg_ext": fq_learnable(lambda: ops.fake_quant(xg, scale_l, zp_l, 0, 255, axis=1)),
                "plain": fq_learnable(lambda: plain.fake_quant_learnable(xg, scale_l, zp_l, 0, 255, axis=1)),
            },
        )
    )

    # 3. AdaRound step: soft rounding + regularizer, forward + backward to V, 4-bit per output channel.
    o, i_, kh, kw = shapes["adaround"]
    wt = randn(o, i_, kh, kw) * 0.05
    s_ch = (wt.abs().amax(dim=(1, 2, 3)) / 7.5).clamp_min(1e-8)
    z_ch = torch.full((o,), 8.0, device=device)
    v = ops.adaround_init(wt, s_ch, axis=0).requires_grad_(True)
    dw = randn(o, i_, kh, kw)
    lam = torch.tensor(0.01, device=device)
    s_b, z_b = s_ch.view(-1, 1, 1, 1), z_ch.view(-1, 1, 1, 1)
    elem = wt.element_size()

    def ada_ours():
        w_q, reg = ops.adaround(wt, v, s_ch, z_ch, 0, 15, axis=0, beta=10.0)
        return torch.autograd.grad((w_q, reg), v, (dw, lam))

    def ada_plain_fn(v_):
        return plain.adaround(wt, v_, s_b, z_b, 0, 15, beta=10.0)

    ada_compiled = _compiled(ada_plain_fn, compile_plain)
    impls = {"dsg_ext": ada_ours, "plain": lambda: torch.autograd.grad(ada_plain_fn(v), v, (dw, lam))}
    if ada_compiled is not None:
        impls["plain_compiled"] = lambda: torch.autograd.grad(ada_compiled(v), v, (dw, lam))
    workloads.append(
        Workload(
            "adaround_step",
            f"W {o}x{i_}x{kh}x{kw}",
            7 * wt.numel() * elem,  # fwd: read w, v, write w~; bwd: read w, v, dw, write dv
            impls,
        )
    )
    return workloads

def layer_workloads(device: str = "cpu", size: str = "cpu") -> List[Workload]:
    """The statistic ops at the shape and dtype synthesis feeds them on a GPU: a ResNet-50 stage-1 BN
    input (256 x 256 x 56 x 56) in bf16 channels_last, as under ``--bf16 --channels-last``. The slack
    loss (forward + backward), and the fused eval-BN op (y, loss; backward dx = dy * scale + loss
    gradient) next to torch's eval-mode batch_norm alone (the network-alone cost it replaces).
    ``bench/gpu_check.sh``'s sweep times these for several CUDA tile sizes (DSG_EXT_CUDA_WORK)."""
    n, c, h, w = {"gpu": (256, 256, 56, 56), "cpu": (8, 256, 28, 28), "tiny": (2, 8, 9, 9)}[size]
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, h, w, generator=gen) * 1.5 + 0.3).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    dy = torch.randn(n, c, h, w, generator=gen).to(device, dtype).contiguous(memory_format=torch.channels_last)
    mean, std = (torch.randn(c, generator=gen) * 0.2).to(device), (torch.rand(c, generator=gen) + 0.5).to(device)
    delta = gamma = torch.full((c,), 0.02, device=device)
    running_var = std * std - 1e-5
    weight, bias = (torch.rand(c, generator=gen) + 0.5).to(device), torch.randn(c, generator=gen).to(device)
    scale = weight / std
    shift = bias - mean * scale
    elem = x.element_size()

    def slack():
        loss = ops.bn_stat_slack_loss(x, mean, std, delta, gamma, eps=1e-5, unbiased=True).sum()
        return torch.autograd.grad(loss, x)

    def fused():
        y, loss, _, _ = ops.bn_eval_slack(x, scale, shift, mean, std, delta, gamma, eps=1e-5, unbiased=True)
        return torch.autograd.grad((y, loss.sum()), x, (dy, None))

    def bn_alone():
        y = nn.functional.batch_norm(x, mean, running_var, weight, bias, training=False, eps=1e-5)
        return torch.autograd.grad(y, x, dy)

    shape = f"x {n}x{c}x{h}x{w} {str(dtype).replace('torch.', '')} CL"
    return [
        Workload("layer_slack_loss_fwd_bwd", shape, 3 * x.numel() * elem, {"dsg_ext": slack}),
        # floor: read x, write y; read x and dy, write dx
        Workload("layer_bn_eval_slack_fwd_bwd", shape, 5 * x.numel() * elem,
                 {"dsg_ext": fused, "torch_batch_norm_alone": bn_alone}),
    ]


def time_cpu(fn: Callable[[], object], min_run_time: float = 0.5) -> float:
    """Median seconds per call on the CPU (torch.utils.benchmark, after warm-up)."""
    from torch.utils import benchmark

    fn()
    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return m.median

def time_cuda(fn: Callable[[], object], iters: int = 50, warmup: int = 10) -> float:
    """Median seconds per call on the current CUDA stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)

def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth in bytes/s, counting bytes read + written."""
    n = nbytes // 4
    if device == "cuda":
        src = torch.empty(n, device=device)
        dst = torch.empty_like(src)
        t = time_cuda(lambda: dst.copy_(src), iters=20)
    else:
        n = min(n, 64 << 20)
        src = torch.ones(n)
        dst = torch.empty_like(src)
        t = time_cpu(lambda: dst.copy_(src))
    return 2 * n * 4 / t

def synthesis_workloads(device: str = "cpu", size: str = "cpu", arch: str = "resnet18",
                        batch: Optional[int] = None, variants: bool = False,
                        only: Optional[List[str]] = None) -> List[Workload]:
    """One full synthesis iteration (forward with BN taps + statistic loss + backward + Adam step) on a
    torchvision network: ours (``SynthesisLoop``, the code ``dsg generate`` runs) against the peers'
    plain loop (forward pre-hooks computing the loss with torch.mean/torch.var), and the network
    alone (trivial loss). Ours taps BN layers through the fused ``bn_eval_slack`` op (CPU and CUDA)
    unless ``SynthesisConfig.fused_bn`` is off. With ``variants`` (GPU): each also under channels_last + bf16
    autocast, ours replayed from a CUDA graph, and ours with pre-hooks instead of the fused op
    (``*_hooks*``, torch's BatchNorm). ``only`` keeps the named variants.

    Skipped (empty list) when torchvision is not installed."""
    try:
        import torchvision
    except ImportError:
        return []
    import copy

    from dsg_ext.synthesis import BatchNormTaps, SynthesisConfig, SynthesisLoop, batchnorm_layers, enhancement_weights

    default_batch, image = {"gpu": (256, 224), "cpu": (8, 112), "tiny": (2, 32)}[size]
    batch = batch or default_batch
    gen = torch.Generator().manual_seed(0)
    base = torchvision.models.get_model(arch, weights=None).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that the loss has work to do
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    for p in base.parameters():
        p.requires_grad_(False)
    start = torch.randn(batch, 3, image, image, generator=gen)

    def make(kind: str, fast: bool = False, graph: bool = False, cl_only: bool = False,
             fused_bn: bool = True, recipe: Optional[str] = None) -> Callable[[], object]:
        # fast: channels_last + bf16 autocast (GPU); cl_only: channels_last in fp32 (CPU);
        # fused_bn=False: ours with pre-hooks and torch's BatchNorm instead of the fused BN op
        state = {}

        def build():
            model = copy.deepcopy(base).to(device)
            if fast or cl_only:  # every tool's network in channels_last alike (a copy: base stays as it is)
                model = model.to(memory_format=torch.channels_last)
            images = start.clone().to(device)
            layers = batchnorm_layers(model)
            if kind == "dsg_ext" and recipe is not None:  # a named recipe: batch statistics + augmentation
                config = SynthesisConfig.from_recipe(recipe, lr=0.1, batch_size=batch, image_size=image,
                                                     channels_last=fast or cl_only, autocast_bf16=fast,
                                                     cuda_graph=graph, fused_bn=fused_bn)
                pad = config.crop_pad
                images = torch.nn.functional.pad(images, (pad, pad, pad, pad), mode="reflect")
                taps = BatchNormTaps(layers, unbiased=True, fused=config.fused_bn, batch=True,
                                     per_sample=False).__enter__()
                loop = SynthesisLoop(model, taps, images, torch.ones(batch, len(layers), device=device), config,
                                     device, input_range=([-2.2] * 3, [2.7] * 3))
                state["fn"] = loop.iterate
                state["keep"] = (loop, taps)
                return
            if kind == "dsg_ext":
                config = SynthesisConfig(method="dsg", lr=0.1, batch_size=batch, image_size=image,
                                         channels_last=fast or cl_only, autocast_bf16=fast, cuda_graph=graph,
                                         fused_bn=fused_bn)
                taps = BatchNormTaps(layers, unbiased=True, fused=config.fused_bn).__enter__()
                taps.set_slack([torch.full((), 0.05, device=device)] * len(layers),
                               [torch.full((), 0.05, device=device)] * len(layers))
                weights = enhancement_weights(batch, len(layers), 2.0, device)
                loop = SynthesisLoop(model, taps, images, weights, config, device)
                state["fn"] = loop.iterate
                state["keep"] = (loop, taps)
                return
            images.requires_grad_(True)
            opt = torch.optim.Adam([images], lr=0.1)
            losses: List[torch.Tensor] = []
            if kind == "plain":
                def hook(bn):
                    mean, std = bn.running_mean, torch.sqrt(bn.running_var + bn.eps)
                    return lambda _m, inp: losses.append(
                        plain.slack_loss(inp[0].float(), mean, std, 0.05, 0.05, eps=bn.eps, unbiased=True))
                for _, bn in layers:
                    bn.register_forward_pre_hook(hook(bn))

            def iteration():
                opt.zero_grad(set_to_none=True)
                losses.clear()
                inp = images.contiguous(memory_format=torch.channels_last) if fast or cl_only else images
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=fast):
                    out = model(inp)
                if kind == "plain":
                    loss = torch.stack(losses, 1).sum(1).mean()
                else:
                    loss = out.float().mean()
                loss.backward()
                opt.step()

            state["fn"] = iteration

        def run():  # built on first use, so that a workload's memory exists only while it is timed
            if "fn" not in state:
                build()
            return state["fn"]()

        return run

    impls = {"dsg_ext": make("dsg_ext"), "plain": make("plain"), "network_alone": make("network")}
    if torch.device(device).type == "cpu":  # channels_last in fp32 is the faster layout for oneDNN convolutions
        impls.update({"dsg_ext_recommended": make("dsg_ext", recipe="recommended"),
                      "dsg_ext_cl": make("dsg_ext", cl_only=True), "plain_cl": make("plain", cl_only=True),
                      "network_alone_cl": make("network", cl_only=True)})
    if variants:
        impls.update({
            "dsg_ext_bf16_cl": make("dsg_ext", fast=True),
            "dsg_ext_bf16_cl_graph": make("dsg_ext", fast=True, graph=True),
            "dsg_ext_fp32_graph": make("dsg_ext", graph=True),
            # the recommended recipe (crop, flip, smoothing, swing drawn on the device), graph-captured
            "dsg_ext_recommended_bf16_cl_graph": make("dsg_ext", fast=True, graph=True, recipe="recommended"),
            "dsg_ext_recommended_bf16_cl": make("dsg_ext", fast=True, recipe="recommended"),
            # the taps' other path: pre-hooks computing the statistics, torch's own BatchNorm
            "dsg_ext_hooks_bf16_cl_graph": make("dsg_ext", fast=True, graph=True, fused_bn=False),
            "dsg_ext_hooks_fp32": make("dsg_ext", fused_bn=False),
            "plain_bf16_cl": make("plain", fast=True),
            "network_alone_bf16_cl": make("network", fast=True),
        })
    if only is not None:
        impls = {k: v for k, v in impls.items() if k in only}
    return [Workload(f"synthesis_iteration_{arch}", f"batch {batch}, {image}x{image}", 0, impls)]


def adaround_layer_workloads(device: str = "cpu", size: str = "cpu") -> List[Workload]:
    """One AdaRound reconstruction iteration of a conv layer, as ``quantize.adaround`` runs it (conv
    forward with the soft-rounded weights, reconstruction loss + lambda R, backward to V, Adam step):
    the fused ``adaround`` op against the peers' elementwise chain (BRECQ/AIMET) in the same loop."""
    from dsg_ext import quantization as Q

    cin, cout, hw, batch = {"gpu": (256, 256, 14, 32), "cpu": (128, 128, 8, 32), "tiny": (8, 8, 4, 4)}[size]
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.05)
    x = torch.randn(batch, cin, hw, hw, generator=gen).to(device)
    target = conv.to(device)(x).detach()

    def make(plain_chain: bool) -> Callable[[], object]:
        q = Q.quantize_model(nn.Sequential(conv), Q.QuantConfig(wbits=4, abits=None, first_last_bits=None)).to(device)
        layer = q.get_submodule("0")
        wq = layer.parametrizations.weight[0]
        if plain_chain:
            wq.rounding = plain.plain_rounding
        wq.start_adaround(layer.parametrizations.weight.original)
        wq.beta = 10.0
        opt = torch.optim.Adam([wq.v], lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = Q.reconstruction_loss(layer(x), target) + 0.01 * wq.last_reg
            loss.backward()
            opt.step()

        return step

    return [Workload("adaround_layer_iteration", f"conv {cin}->{cout} 3x3, x {batch}x{cin}x{hw}x{hw}", 0,
                     {"dsg_ext": make(False), "plain": make(True)})]
