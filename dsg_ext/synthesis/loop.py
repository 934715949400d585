"""The optimisation loop: one batch of images optimised against the BN statistics of a frozen
network (``synthesize_batch``), and many batches in memory (``synthesize``).

The per-sample statistic loss of every BN layer is the fused op ``dsg_ext.bn_stat_slack_loss`` (or
``bn_eval_slack``, which runs the BN layer too); see ``taps``. DSG's slack and enhancement weights
come from ``dsg``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..errors import ConfigError, NonFiniteLossError
from ..ops import bn_stat_slack_loss
from .augment import Augmenter
from .config import BATCH_METHODS, SynthesisConfig
from .dsg import enhancement_weights, slack_margins
from .generator import GeneratedImages
from .taps import BatchNormTaps, synthesis_layers


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
    gen = torch.Generator().manual_seed(config.batch_seed(batch_index))
    size = config.image_size + 2 * config.crop_pad  # random crops of image_size are what the network sees
    shape = (count, config.channels, size, size)
    if config.init == "gaussian":
        return torch.randn(shape, generator=gen)
    return torch.rand(shape, generator=gen) * 2 - 1


def _total_variation(x: Tensor) -> Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


@contextlib.contextmanager
def channels_last_weights(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """The model's 4-D parameters and buffers in channels_last for the duration, then the very tensors it
    had (the model is frozen meanwhile, so nothing is lost): synthesis does not change the layout, hence
    the numerics, of the caller's model afterwards."""
    saved = []
    if enabled:
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                saved.append((t, t.data))
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        for t, data in saved:
            t.data = data


class SynthesisLoop:
    """The optimisation state of one batch and its iteration, eager or replayed from a CUDA graph.

    ``iterate()`` runs one iteration (forward with BN taps, total loss, backward, Adam step, pixel
    clamp) and keeps, on the device, the sum of losses since the last ``window_mean()`` and the
    iteration at which each layer's loss first became non-finite. No host-device sync happens in
    ``iterate()``; ``window_mean()`` syncs once. The learning rate lives in the optimizer's param
    group (a device tensor under CUDA graphs, so that ReduceLROnPlateau still acts on replays).
    ``images``: the free pixels to optimise, or a ``GeneratedImages`` (Genie's generator and latent),
    whose latent then takes the plateau schedule and whose generator its own Adam.
    """

    warmup_iterations = 3  # eager iterations (on a side stream) before a CUDA graph is captured

    def __init__(self, model: nn.Module, taps: BatchNormTaps, images: Union[Tensor, GeneratedImages], weights: Tensor,
                 config: SynthesisConfig, device: str,
                 input_range: Optional[Tuple[Sequence[float], Sequence[float]]] = None, sync_every: int = 10,
                 labels_seed: int = 0, augmenter: Optional[Augmenter] = None):
        self.model, self.taps, self.weights, self.config = model, taps, weights, config
        self.generated = images if isinstance(images, GeneratedImages) else None
        channels = config.channels if self.generated is not None else images.shape[1]
        self.augmenter = augmenter or Augmenter(config, model, channels, device, labels_seed)
        self.batch_stats = config.method in BATCH_METHODS
        self.extra_weights = weights - 1  # batch-dsg: each sample's own layer once more, 0 elsewhere
        self.device_type = torch.device(device).type
        self.use_graph = config.cuda_graph
        if self.use_graph and self.device_type != "cuda":
            raise ConfigError(f"cuda_graph needs a CUDA device, got {device!r}")
        self.generator_optimizer = self.generator_scheduler = None
        if self.generated is not None:
            self.images = None
            params = [self.generated.latent]
            self.generator_optimizer = torch.optim.Adam(self.generated.net.parameters(), lr=config.generator_lr)
            self.generator_scheduler = torch.optim.lr_scheduler.ExponentialLR(self.generator_optimizer, 0.95)
        else:
            self.images = images.requires_grad_(True)
            params = [self.images]
        lr = torch.tensor(config.lr, device=device) if self.use_graph else config.lr
        self.optimizer = torch.optim.Adam(params, lr=lr, capturable=self.use_graph)
        # Stepped once per window of iterations (one host sync per window), patience in iterations.
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=0.1, patience=max(1, config.plateau_patience // sync_every),
            min_lr=config.min_lr,
        )
        self.zeros = torch.zeros(channels, device=device)
        self.ones = torch.ones(channels, device=device)
        self.no_slack = torch.zeros((), device=device)  # a Python 0.0 would be copied to the device every step
        self.layer_scale = torch.ones(len(taps.layers), device=device)
        self.lo = self.hi = None
        if config.clamp_pixels:
            if input_range is None:
                raise ConfigError("clamp_pixels needs the model's input range")
            self.lo = torch.tensor(input_range[0], device=device, dtype=torch.float32).view(1, -1, 1, 1)
            self.hi = torch.tensor(input_range[1], device=device, dtype=torch.float32).view(1, -1, 1, 1)
            if self.images is not None:
                with torch.no_grad():
                    self.images.copy_(self._clamp(self.images))
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

    def _clamp(self, x: Tensor) -> Tensor:
        return torch.maximum(torch.minimum(x, self.hi), self.lo)

    def render(self) -> Tensor:
        """The current (optimised, possibly padded) images: the free pixels, or the generator's output
        clamped to the valid range when ``clamp_pixels`` (free pixels are clamped after each step)."""
        if self.generated is None:
            return self.images
        x = self.generated()
        return x if self.lo is None else self._clamp(x)

    def step(self, x: Tensor, train: bool = False) -> Tuple[Tensor, Tensor]:
        """Total loss and the per-layer losses (L) for images x (no backward): mean over samples of the
        per-sample losses, or the batch-statistic losses. ``train``: through the random augmentations."""
        config, taps, aug = self.config, self.taps, self.augmenter
        taps.reset()
        x = aug.view(x, train)
        inp = x
        if config.jitter and train:
            dx, dy = torch.randint(-config.jitter, config.jitter + 1, (2,)).tolist()
            inp = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        if config.channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last)
        # Autocast's weight cache must be off while a graph is captured.
        with aug.training(train), torch.autocast(self.device_type, dtype=torch.bfloat16,
                                                 enabled=config.autocast_bf16, cache_enabled=not self.use_graph):
            logits = self.model(inp)
        mode = "batch" if self.batch_stats else "per_sample"
        input_term = bn_stat_slack_loss(x, self.zeros, self.ones, self.no_slack, self.no_slack, eps=1e-5,
                                        unbiased=config.unbiased, mode=mode).mean()
        if self.batch_stats:
            layers = torch.stack(taps.collected_batch())  # (L)
            loss = (layers * self.layer_scale).sum() + input_term
            if config.method == "batch-dsg":  # each sample's own layer, per sample (weights - 1: 0 elsewhere)
                per_layer = torch.stack(taps.collected(), dim=1)
                loss = loss + (per_layer * self.layer_scale * self.extra_weights).sum(1).mean()
            layer_values = layers.detach()
        else:
            per_layer = torch.stack(taps.collected(), dim=1)  # (N, L)
            loss = (per_layer * self.layer_scale * self.weights).sum(1).mean() + input_term
            layer_values = per_layer.detach().mean(0)
        if config.tv_weight:
            loss = loss + config.tv_weight * _total_variation(x)
        if config.l2_weight:
            loss = loss + config.l2_weight * x.pow(2).mean()
        if config.ce_weight:
            if not (isinstance(logits, Tensor) and logits.dim() == 2):
                raise ConfigError("the cross-entropy prior needs a model that returns (N, classes) logits")
            if self.labels is None:
                n, classes = logits.shape
                if config.ce_labels == "balanced":
                    self.labels = (torch.arange(n) % classes).to(logits.device)
                else:
                    gen = torch.Generator().manual_seed(self._labels_seed)
                    self.labels = torch.randint(0, classes, (n,), generator=gen).to(logits.device)
            loss = loss + config.ce_weight * nn.functional.cross_entropy(logits.float(), self.labels)
        return loss, layer_values

    def _body(self) -> Tuple[Tensor, Tensor]:
        loss, layer_means = self.step(self.render(), train=True)
        loss.backward()
        self.optimizer.step()
        if self.generator_optimizer is not None:
            self.generator_optimizer.step()
        with torch.no_grad():
            if self.lo is not None and self.images is not None:
                self.images.copy_(self._clamp(self.images))
            self.window.add_(loss.detach())
            newly_bad = ~torch.isfinite(layer_means) & (self.first_bad < 0)
            self.first_bad.copy_(torch.where(newly_bad, self.counter, self.first_bad))
            self.counter.add_(1)
        return loss, layer_means

    def iterate(self) -> Tuple[Tensor, Tensor]:
        """One iteration; returns (loss, per-layer means) of the images before the step."""
        if self.initial_layers is None:
            with torch.no_grad():
                start = self.render().detach()
                loss, layer_means = self.step(start)
                if self.config.layer_weighting == "initial":
                    self.layer_scale.copy_(1.0 / layer_means.clamp_min(1e-12))
                    loss, layer_means = self.step(start)
            self.initial_layers, self.initial_loss = layer_means.clone(), loss.clone()
        self.window_count += 1
        self.iterations_done += 1
        if self._graph is not None:
            self._graph.replay()
            return self._graph_out  # type: ignore[return-value]
        if not self.use_graph:
            self.optimizer.zero_grad(set_to_none=True)
            if self.generator_optimizer is not None:
                self.generator_optimizer.zero_grad(set_to_none=True)
            out = self._body()
            if self.generator_scheduler is not None and self.iterations_done % 100 == 0:  # Genie: x0.95 per 100
                self.generator_scheduler.step()
            return out
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
    layers = (list(layers) if layers is not None
              else synthesis_layers(model, config.channels, config.image_size, device, type(model).__name__))
    batch_stats = config.method in BATCH_METHODS
    taps = BatchNormTaps(layers, config.unbiased, fused=config.fused_bn, batch=batch_stats,
                         per_sample=config.method != "batch")
    images = (GeneratedImages(config, batch_index, count, device) if config.generator
              else init_images(config, batch_index, count).to(device))
    seed = config.batch_seed(batch_index) + 7
    augmenter = Augmenter(config, model, config.channels, device, seed)

    with taps, augmenter, channels_last_weights(model, config.channels_last):
        zeros = [torch.zeros(()) for _ in layers]
        deltas, gammas = zeros, zeros
        weights = torch.ones(count, len(layers), device=device)
        with torch.no_grad():
            start = augmenter.result(images() if config.generator else images)  # what the network sees first
        if config.method in ("dsg", "batch-dsg"):
            deltas, gammas = slack_margins(model, taps, start, config.epsilon)
            weights = enhancement_weights(count, len(layers), config.enhancement, device)
        if config.method == "batch-dsg":
            batch_deltas, batch_gammas = slack_margins(model, taps, start, config.epsilon, batch=True)
            taps.set_batch_slack([d.to(device) for d in batch_deltas], [g.to(device) for g in batch_gammas])
        taps.set_slack([d.to(device) for d in deltas], [g.to(device) for g in gammas])

        loop = SynthesisLoop(model, taps, images, weights, config, device, input_range=input_range,
                             sync_every=sync_every, labels_seed=seed, augmenter=augmenter)
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
        with torch.no_grad():
            final = loop.render().detach()
            final_loss, final_layers = loop.step(final)
            images = augmenter.result(final)
    result = BatchResult(
        images=images.cpu(),
        initial_layer_losses=initial_layers.cpu().tolist(),
        final_layer_losses=final_layers.cpu().tolist(),
        initial_loss=float(initial_loss),
        final_loss=float(final_loss),
        delta=[float(d) for d in deltas],
        gamma=[float(g) for g in gammas],
    )
    if not result.final_loss < result.initial_loss:
        warnings.warn(
            f"batch {batch_index}: the synthesis loss did not drop "
            f"({result.initial_loss:.4g} -> {result.final_loss:.4g});"
            " the samples stay close to their initialisation (see the per-layer losses in the manifest)",
            stacklevel=2,
        )
    return result


def _first_nonfinite_layer(names: Sequence[str], first_bad: Sequence[int]) -> Optional[str]:
    """The layer where NaN/Inf appeared first: earliest iteration, then earliest in forward order."""
    went_bad = [(it, i) for i, it in enumerate(first_bad) if it >= 0]
    return names[min(went_bad)[1]] if went_bad else None


def per_sample_moments(model: nn.Module, images: Tensor, unbiased: bool = True,
                       device: str = "cpu") -> Dict[str, Tuple[Tensor, Tensor]]:
    """Per BN layer, the (N, C) per-sample means and stds of its input."""
    model = model.eval()
    layers = synthesis_layers(model, images.shape[1], images.shape[-1], device, type(model).__name__, warn=False)
    taps = BatchNormTaps(layers, unbiased)
    taps.record_stats = True
    with taps, torch.no_grad():
        model.eval()(images.to(device))
    return dict(zip(taps.names, taps.stats))


def per_sample_statistics(model: nn.Module, images: Tensor, unbiased: bool = True,
                          device: str = "cpu") -> Dict[str, Tensor]:
    """Per-sample BN-input means (N, C) per layer: the paper's homogenisation measure reads their spread."""
    return {name: mean for name, (mean, _std) in per_sample_moments(model, images, unbiased, device).items()}


def synthesize(model: nn.Module, config: Optional[SynthesisConfig] = None, num_samples: Optional[int] = None,
               device: str = "cpu", input_range: Optional[Tuple[Sequence[float], Sequence[float]]] = None) -> Tensor:
    """Synthesises calibration images from a network's BatchNorm statistics, in memory.

    Args:
        model: a trained network with BatchNorm2d layers; frozen and switched to eval mode.
        config: the recipe (default ``SynthesisConfig()``: DSG as the paper runs it). Its
            ``channels`` and ``image_size`` must be what the model takes.
        num_samples: how many images (default: one batch of ``config.batch_size``).
        device: where to run the model ("cpu", "cuda", ...); the model is moved there.
        input_range: per-channel (low, high) of valid normalised pixels; needed by ``clamp_pixels``.

    Returns:
        (num_samples, channels, image_size, image_size) float32 images on the CPU, in the model's
        normalised input space. Batch b is seeded from (config.seed, b) alone, as in ``dsg generate``,
        so the images are those ``generate`` writes for the same config.
    """
    config = (config or SynthesisConfig()).validate()
    num_samples = config.batch_size if num_samples is None else num_samples
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
    model = model.to(device)
    layers = synthesis_layers(model, config.channels, config.image_size, device, type(model).__name__)
    parts = []
    for b in range(math.ceil(num_samples / config.batch_size)):
        count = min(config.batch_size, num_samples - b * config.batch_size)
        parts.append(synthesize_batch(model, config, b, count=count, device=device, layers=layers,
                                      input_range=input_range).images)
    return torch.cat(parts)
