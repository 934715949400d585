"""Diverse Sample Generation: calibration images synthesised from a network's BatchNorm statistics.

Reads top-down like the paper: taps on the BN layers -> slack margins (Slack Distribution
Alignment) -> layerwise enhancement weights (Layerwise Sample Enhancement) -> optimisation loop.
The per-sample statistic loss of every BN layer is the fused op ``dsg_ext.bn_stat_slack_loss``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .ops import bn_eval_slack, bn_stat_slack_loss

METHODS = ("zeroq", "dsg")
INITS = ("gaussian", "uniform")


class NoBatchNormError(ValueError):
    """The model has no BatchNorm2d layer, so there are no statistics to synthesise from."""


class NonFiniteLossError(FloatingPointError):
    """The synthesis loss became NaN or Inf; names the first layer where it did."""


@dataclasses.dataclass
class SynthesisConfig:
    """Everything that determines the generated images (saved in the dataset manifest)."""

    method: str = "dsg"
    iterations: int = 500
    lr: float = 0.5
    batch_size: int = 32
    image_size: int = 224
    channels: int = 3
    epsilon: float = 0.9  # slack quantile (dsg)
    enhancement: float = 2.0  # weight of each sample's own layer (dsg; the paper's I + 11^T)
    init: str = "gaussian"
    seed: int = 0
    unbiased: bool = True  # ZeroQ's statistics use torch.var (unbiased)
    # Optional image priors, off by default so that "dsg" is the paper's method.
    tv_weight: float = 0.0
    l2_weight: float = 0.0
    jitter: int = 0
    ce_weight: float = 0.0  # random-label cross-entropy prior (each sample pushed towards a random class)
    plateau_patience: int = 100
    min_lr: float = 1e-4
    # Recipe options beyond the paper (off by default): "initial" divides each layer's loss by its
    # value on the initial batch, so that a few layers cannot dominate; clamp_pixels keeps images
    # inside the model's valid input range (pixels in [0, 1] before normalisation).
    layer_weighting: str = "equal"
    clamp_pixels: bool = False
    # Speed: the network in channels_last and/or under bf16 autocast (statistics stay fp32).
    channels_last: bool = False
    autocast_bf16: bool = False
    # Capture one whole iteration (forward, losses, backward, Adam, clamp) in a CUDA graph after a
    # few eager warm-up iterations, and replay it: removes the launch overhead that dominates small
    # batches on a GPU. CUDA only; not with jitter (its random shift is drawn on the host).
    cuda_graph: bool = False

    def validate(self) -> "SynthesisConfig":
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}, got {self.method!r}")
        if self.init not in INITS:
            problems.append(f"init must be one of {INITS}, got {self.init!r}")
        if not (0.0 < self.epsilon <= 1.0):
            problems.append(f"epsilon must lie in (0, 1], got {self.epsilon}")
        if self.iterations <= 0:
            problems.append(f"iterations must be > 0, got {self.iterations}")
        if self.batch_size <= 0:
            problems.append(f"batch size must be > 0, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"learning rate must be positive, got {self.lr}")
        if self.image_size <= 0 or self.channels <= 0:
            problems.append(f"image size and channels must be > 0, got {self.image_size}, {self.channels}")
        if self.layer_weighting not in ("equal", "initial"):
            problems.append(f"layer weighting must be 'equal' or 'initial', got {self.layer_weighting!r}")
        if self.enhancement < 1.0:
            problems.append(f"enhancement weight must be >= 1, got {self.enhancement}")
        for name in ("tv_weight", "l2_weight", "jitter", "ce_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.cuda_graph and self.jitter:
            problems.append("cuda_graph cannot be combined with jitter (the shift is drawn on the host each step)")
        if problems:
            raise ValueError("invalid synthesis options: " + "; ".join(problems))
        return self


# --------------------------------------------------------------------------------------------
# Taps on the BatchNorm layers
# --------------------------------------------------------------------------------------------


def batchnorm_layers(model: nn.Module, model_name: str = "model") -> List[Tuple[str, nn.BatchNorm2d]]:
    """The model's BatchNorm2d layers with running statistics, in forward-registration order."""
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None
    ]
    if not layers:
        raise NoBatchNormError(
            f"{model_name} has no BatchNorm2d layer with running statistics: DSG/ZeroQ synthesis needs them"
        )
    return layers


def fused_bn_enabled(device: torch.device) -> bool:
    """Whether taps run eligible BN layers through the fused ``bn_eval_slack`` op on this device.
    DSG_EXT_FUSED_BN=1/0 forces it; by default on wherever the op has kernels (CPU and CUDA: checked
    against the hooks on an H100, bench/RESULTS.md)."""
    switch = os.environ.get("DSG_EXT_FUSED_BN", "auto").strip().lower()
    if switch in ("1", "on", "true", "yes"):
        return True
    if switch in ("0", "off", "false", "no"):
        return False
    return device.type in ("cpu", "cuda")


class BatchNormTaps:
    """Taps each BN layer's input and computes its per-sample statistic loss there.

    While active, every forward pass fills ``losses`` (one (N) tensor per layer, in layer order)
    and, with ``record_stats``, ``stats`` (mean~, std~ per layer). A plain eval-mode nn.BatchNorm2d
    has its forward replaced by the fused ``bn_eval_slack`` op (the BN output and the loss from one
    pass over the input, and one backward pass) where ``fused_bn_enabled``; every other BN layer
    (subclasses such as timm's BatchNormAct2d, layers in training mode) gets a forward pre-hook
    computing ``bn_stat_slack_loss``.
    """

    def __init__(self, layers: Sequence[Tuple[str, nn.BatchNorm2d]], unbiased: bool):
        self.names = [name for name, _ in layers]
        self.layers = [bn for _, bn in layers]
        self.unbiased = unbiased
        self.delta: List[Tensor] = []
        self.gamma: List[Tensor] = []
        self.losses: List[Optional[Tensor]] = [None] * len(layers)
        self.stats: List[Optional[Tuple[Tensor, Tensor]]] = [None] * len(layers)
        self.record_stats = False
        self._handles = []
        self._patched: List[nn.BatchNorm2d] = []
        self._device_params: Dict[Tuple[int, torch.device], Tuple[Tensor, ...]] = {}
        self.targets = [
            (bn.running_mean.detach().float(), torch.sqrt(bn.running_var.detach().float() + bn.eps)) for bn in self.layers
        ]
        for name, (mean, std) in zip(self.names, self.targets):
            if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
                raise NonFiniteLossError(f"BN layer {name!r}: its running statistics contain NaN or Inf")

    def set_slack(self, delta: Sequence[Tensor], gamma: Sequence[Tensor]) -> None:
        self.delta, self.gamma = list(delta), list(gamma)

    def _params(self, index: int, device: torch.device) -> Tuple[Tensor, ...]:
        """(target mean, target std, bn_scale, bn_shift) of a layer on ``device``, made once (the model is
        frozen while tapped), so no host-to-device copy happens per iteration."""
        key = (index, device)
        if key not in self._device_params:
            bn = self.layers[index]
            mean, std = self.targets[index]
            with torch.no_grad():
                inv = 1.0 / torch.sqrt(bn.running_var.detach().float() + bn.eps)
                scale = inv * bn.weight.detach().float() if bn.weight is not None else inv
                shift = -bn.running_mean.detach().float() * scale
                if bn.bias is not None:
                    shift = shift + bn.bias.detach().float()
            self._device_params[key] = tuple(t.to(device) for t in (mean, std, scale, shift))
        return self._device_params[key]

    def _check_size(self, index: int, x: Tensor) -> None:
        if x.dim() == 4 and x.shape[2] * x.shape[3] < 2:
            raise ValueError(
                f"BN layer {self.names[index]!r} sees {x.shape[2]}x{x.shape[3]} feature maps at this image size: "
                "per-sample statistics need at least 2 pixels per channel; use a larger --image-size")

    def _record(self, index: int, loss: Tensor, stat_mean: Tensor, stat_std: Tensor) -> None:
        self.losses[index] = loss
        if self.record_stats:
            self.stats[index] = (stat_mean, stat_std)

    def _hook(self, index: int) -> Callable:
        bn = self.layers[index]

        def hook(_module, inputs):
            x = inputs[0]
            self._check_size(index, x)
            mean, std = self._params(index, x.device)[:2]
            delta = self.delta[index] if self.delta else 0.0
            gamma = self.gamma[index] if self.gamma else 0.0
            loss, stat_mean, stat_std = bn_stat_slack_loss(
                x, mean, std, delta, gamma, eps=bn.eps, unbiased=self.unbiased, return_stats=True,
            )
            self._record(index, loss, stat_mean, stat_std)

        return hook

    def _fused_forward(self, index: int) -> Callable:
        bn = self.layers[index]
        plain_forward = bn.forward
        hook = self._hook(index)

        def forward(x: Tensor) -> Tensor:
            if bn.training or x.dim() != 4 or not fused_bn_enabled(x.device):
                hook(bn, (x,))
                return plain_forward(x)
            self._check_size(index, x)
            mean, std, scale, shift = self._params(index, x.device)
            delta = self.delta[index] if self.delta else 0.0
            gamma = self.gamma[index] if self.gamma else 0.0
            y, loss, stat_mean, stat_std = bn_eval_slack(x, scale, shift, mean, std, delta, gamma, eps=bn.eps,
                                                         unbiased=self.unbiased)
            self._record(index, loss, stat_mean, stat_std)
            return y

        return forward

    def __enter__(self) -> "BatchNormTaps":
        for i, bn in enumerate(self.layers):
            if type(bn) is nn.BatchNorm2d and bn.track_running_stats and "forward" not in bn.__dict__:
                bn.forward = self._fused_forward(i)  # an instance attribute: nn.Module.__call__ uses it
                self._patched.append(bn)
            else:
                self._handles.append(bn.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for bn in self._patched:
            del bn.forward
        self._handles, self._patched = [], []

    def collected(self) -> List[Tensor]:
        missing = [self.names[i] for i, l in enumerate(self.losses) if l is None]
        if missing:
            raise RuntimeError(f"BN layers not reached by the forward pass: {missing[:5]}")
        return list(self.losses)  # type: ignore[arg-type]

    def reset(self) -> None:
        self.losses = [None] * len(self.layers)
        self.stats = [None] * len(self.layers)


# --------------------------------------------------------------------------------------------
# Slack Distribution Alignment and Layerwise Sample Enhancement
# --------------------------------------------------------------------------------------------


def slack_margins(
    model: nn.Module, taps: BatchNormTaps, images: Tensor, epsilon: float
) -> Tuple[List[Tensor], List[Tensor]]:
    """Per-layer slack (delta_l, gamma_l): the epsilon-quantile of |mean~ - mean| and |std~ - std| over
    all samples and channels of the freshly initialised batch at layer l (one scalar per layer)."""
    taps.set_slack([], [])
    taps.record_stats = True
    taps.reset()
    with torch.no_grad():
        model(images)
    taps.record_stats = False
    deltas, gammas = [], []
    for (mean, std), stats in zip(taps.targets, taps.stats):
        stat_mean, stat_std = stats  # type: ignore[misc]
        gap_mean = (stat_mean - mean.to(stat_mean.device)).abs().flatten().double()
        gap_std = (stat_std - std.to(stat_std.device)).abs().flatten().double()
        deltas.append(torch.quantile(gap_mean, epsilon).float())
        gammas.append(torch.quantile(gap_std, epsilon).float())
    for name, d, g in zip(taps.names, deltas, gammas):
        if not (torch.isfinite(d) and torch.isfinite(g)):
            raise NonFiniteLossError(f"the initial batch gives non-finite statistics at BN layer {name!r}")
    taps.reset()
    return deltas, gammas


def enhancement_weights(batch: int, layers: int, enhancement: float, device=None) -> Tensor:
    """(N, L) weights: sample n counts layer (n mod L) ``enhancement`` times, the others once."""
    w = torch.ones(batch, layers, device=device)
    idx = torch.arange(batch, device=device)
    w[idx, idx % layers] = enhancement
    return w


# --------------------------------------------------------------------------------------------
# The optimisation loop
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BatchResult:
    images: Tensor  # (N, C, H, W), the model's normalised input space, on the CPU
    initial_layer_losses: List[float]  # mean over samples, per BN layer
    final_layer_losses: List[float]
    initial_loss: float
    final_loss: float
    delta: List[float]
    gamma: List[float]


def init_images(config: SynthesisConfig, batch_index: int, count: int) -> Tensor:
    """The starting batch, seeded from (seed, batch index) only: independent of rank and world size."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + batch_index)
    shape = (count, config.channels, config.image_size, config.image_size)
    if config.init == "gaussian":
        return torch.randn(shape, generator=gen)
    return torch.rand(shape, generator=gen) * 2 - 1


def _total_variation(x: Tensor) -> Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


class SynthesisLoop:
    """The optimisation state of one batch and its iteration, eager or replayed from a CUDA graph.

    ``iterate()`` runs one iteration (forward with BN taps, total loss, backward, Adam step, pixel
    clamp) and keeps, on the device, the sum of losses since the last ``window_mean()`` and the
    iteration at which each layer's loss first became non-finite. No host-device sync happens in
    ``iterate()``; ``window_mean()`` syncs once. The learning rate lives in the optimizer's param
    group (a device tensor under CUDA graphs, so that ReduceLROnPlateau still acts on replays).
    """

    warmup_iterations = 3  # eager iterations (on a side stream) before a CUDA graph is captured

    def __init__(self, model: nn.Module, taps: BatchNormTaps, images: Tensor, weights: Tensor,
                 config: SynthesisConfig, device: str,
                 input_range: Optional[Tuple[Sequence[float], Sequence[float]]] = None, sync_every: int = 10,
                 labels_seed: int = 0):
        self.model, self.taps, self.weights, self.config = model, taps, weights, config
        self.device_type = torch.device(device).type
        self.use_graph = config.cuda_graph
        if self.use_graph and self.device_type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got {device!r}")
        self.images = images.requires_grad_(True)
        lr = torch.tensor(config.lr, device=device) if self.use_graph else config.lr
        self.optimizer = torch.optim.Adam([self.images], lr=lr, capturable=self.use_graph)
        # Stepped once per window of iterations (one host sync per window), patience in iterations.
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=0.1, patience=max(1, config.plateau_patience // sync_every),
            min_lr=config.min_lr,
        )
        channels = images.shape[1]
        self.zeros = torch.zeros(channels, device=device)
        self.ones = torch.ones(channels, device=device)
        self.no_slack = torch.zeros((), device=device)  # a Python 0.0 would be copied to the device every step
        self.layer_scale = torch.ones(len(taps.layers), device=device)
        self.lo = self.hi = None
        if config.clamp_pixels:
            if input_range is None:
                raise ValueError("clamp_pixels needs the model's input range")
            self.lo = torch.tensor(input_range[0], device=device, dtype=torch.float32).view(1, -1, 1, 1)
            self.hi = torch.tensor(input_range[1], device=device, dtype=torch.float32).view(1, -1, 1, 1)
            with torch.no_grad():
                self.images.copy_(torch.maximum(torch.minimum(self.images, self.hi), self.lo))
        if config.channels_last:
            self.model = model.to(memory_format=torch.channels_last)
        self.window = torch.zeros((), device=device)
        self.window_count = 0
        self.counter = torch.zeros((), dtype=torch.long, device=device)
        # Iteration at which each layer's loss first became non-finite (-1: never).
        self.first_bad = torch.full((len(taps.layers),), -1, dtype=torch.long, device=device)
        self.initial_layers: Optional[Tensor] = None
        self.initial_loss: Optional[Tensor] = None
        self.labels: Optional[Tensor] = None  # random target classes of the cross-entropy prior
        self._labels_seed = labels_seed
        self.iterations_done = 0
        self._graph = None
        self._graph_out: Optional[Tuple[Tensor, Tensor]] = None
        self._side_stream = torch.cuda.Stream() if self.use_graph else None

    def step(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Total loss and the per-layer mean losses (L) for images x (no backward)."""
        config, taps = self.config, self.taps
        taps.reset()
        inp = x
        if config.jitter:
            dx, dy = torch.randint(-config.jitter, config.jitter + 1, (2,)).tolist()
            inp = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        if config.channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        # Autocast's weight cache must be off while a graph is captured.
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=config.autocast_bf16,
                            cache_enabled=not self.use_graph):
            logits = self.model(inp)
        per_layer = torch.stack(taps.collected(), dim=1)  # (N, L)
        input_term = bn_stat_slack_loss(x, self.zeros, self.ones, self.no_slack, self.no_slack, eps=1e-5,
                                        unbiased=config.unbiased)
        loss = (per_layer * self.layer_scale * self.weights).sum(1).mean() + input_term.mean()
        if config.tv_weight:
            loss = loss + config.tv_weight * _total_variation(x)
        if config.l2_weight:
            loss = loss + config.l2_weight * x.pow(2).mean()
        if config.ce_weight:
            if not (isinstance(logits, Tensor) and logits.dim() == 2):
                raise ValueError("the cross-entropy prior needs a model that returns (N, classes) logits")
            if self.labels is None:
                gen = torch.Generator().manual_seed(self._labels_seed)
                self.labels = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=gen).to(logits.device)
            loss = loss + config.ce_weight * nn.functional.cross_entropy(logits.float(), self.labels)
        return loss, per_layer.detach().mean(0)

    def _body(self) -> Tuple[Tensor, Tensor]:
        loss, layer_means = self.step(self.images)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            if self.lo is not None:
                self.images.copy_(torch.maximum(torch.minimum(self.images, self.hi), self.lo))
            self.window.add_(loss.detach())
            newly_bad = ~torch.isfinite(layer_means) & (self.first_bad < 0)
            self.first_bad.copy_(torch.where(newly_bad, self.counter, self.first_bad))
            self.counter.add_(1)
        return loss, layer_means

    def iterate(self) -> Tuple[Tensor, Tensor]:
        """One iteration; returns (loss, per-layer means) of the images before the step."""
        if self.initial_layers is None:
            with torch.no_grad():
                loss, layer_means = self.step(self.images.detach())
                if self.config.layer_weighting == "initial":
                    self.layer_scale.copy_(1.0 / layer_means.clamp_min(1e-12))
                    loss, layer_means = self.step(self.images.detach())
            self.initial_layers, self.initial_loss = layer_means.clone(), loss.clone()
        self.window_count += 1
        self.iterations_done += 1
        if self._graph is not None:
            self._graph.replay()
            return self._graph_out  # type: ignore[return-value]
        if not self.use_graph:
            self.optimizer.zero_grad(set_to_none=True)
            return self._body()
        stream = self._side_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.optimizer.zero_grad(set_to_none=True)
            if self.iterations_done <= self.warmup_iterations:
                out = self._body()
            else:  # capture this iteration, then replay it (capturing runs nothing)
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph, stream=stream):
                    self._graph_out = self._body()
        torch.cuda.current_stream().wait_stream(stream)
        if self._graph is not None:
            self._graph.replay()
            return self._graph_out  # type: ignore[return-value]
        return out

    def window_mean(self) -> float:
        """Mean loss since the last call (one host sync)."""
        value = self.window.item() / max(1, self.window_count)
        self.window.zero_()
        self.window_count = 0
        return value


def synthesize_batch(
    model: nn.Module,
    config: SynthesisConfig,
    batch_index: int,
    count: Optional[int] = None,
    device: str = "cpu",
    layers: Optional[Sequence[Tuple[str, nn.BatchNorm2d]]] = None,
    progress: Optional[Callable[[int, float], None]] = None,
    sync_every: int = 10,
    input_range: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
) -> BatchResult:
    """Optimises one batch of images against the model's BN statistics (model frozen, eval mode)."""
    config.validate()
    count = count or config.batch_size
    model = model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    layers = list(layers) if layers is not None else batchnorm_layers(model)
    taps = BatchNormTaps(layers, config.unbiased)
    images = init_images(config, batch_index, count).to(device)

    with taps:
        if config.method == "dsg":
            deltas, gammas = slack_margins(model, taps, images, config.epsilon)
            weights = enhancement_weights(count, len(layers), config.enhancement, device)
        else:
            deltas = [torch.zeros(()) for _ in layers]
            gammas = [torch.zeros(()) for _ in layers]
            weights = torch.ones(count, len(layers), device=device)
        taps.set_slack([d.to(device) for d in deltas], [g.to(device) for g in gammas])

        loop = SynthesisLoop(model, taps, images, weights, config, device, input_range=input_range, sync_every=sync_every,
                             labels_seed=config.seed * 1_000_003 + batch_index + 7)
        initial_layers = initial_loss = None
        for it in range(config.iterations):
            loss, layer_means = loop.iterate()
            if initial_layers is None:
                initial_layers, initial_loss = loop.initial_layers, loop.initial_loss
            if (it + 1) % sync_every == 0 or it + 1 == config.iterations:
                value = loop.window_mean()
                if not math.isfinite(value):
                    bad = _first_nonfinite_layer(taps.names, loop.first_bad.tolist())
                    raise NonFiniteLossError(
                        f"synthesis loss became {value} at iteration {it + 1} of batch {batch_index}"
                        + (f" (first non-finite BN layer: {bad})" if bad else "")
                    )
                loop.scheduler.step(value)
                if progress is not None:
                    progress(it + 1, value)
        step = loop.step
        images = loop.images

        with torch.no_grad():
            final_loss, final_layers = step(images.detach())
    result = BatchResult(
        images=images.detach().cpu(),
        initial_layer_losses=initial_layers.cpu().tolist(),
        final_layer_losses=final_layers.cpu().tolist(),
        initial_loss=float(initial_loss),
        final_loss=float(final_loss),
        delta=[float(d) for d in deltas],
        gamma=[float(g) for g in gammas],
    )
    if not result.final_loss < result.initial_loss:
        warnings.warn(
            f"batch {batch_index}: the synthesis loss did not drop ({result.initial_loss:.4g} -> {result.final_loss:.4g});"
            " the samples stay close to their initialisation (see the per-layer losses in the manifest)"
        )
    return result


def _first_nonfinite_layer(names: Sequence[str], first_bad: Sequence[int]) -> Optional[str]:
    """The layer where NaN/Inf appeared first: earliest iteration, then earliest in forward order."""
    went_bad = [(it, i) for i, it in enumerate(first_bad) if it >= 0]
    return names[min(went_bad)[1]] if went_bad else None


def per_sample_statistics(model: nn.Module, images: Tensor, unbiased: bool = True, device: str = "cpu") -> Dict[str, Tensor]:
    """Per-sample BN-input statistics (N, C) per layer: the paper's homogenisation measure reads their spread."""
    layers = batchnorm_layers(model)
    taps = BatchNormTaps(layers, unbiased)
    taps.record_stats = True
    with taps, torch.no_grad():
        model.eval()(images.to(device))
    return {name: stats[0] for name, stats in zip(taps.names, taps.stats)}
