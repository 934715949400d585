"""DSG's two changes to ZeroQ's BN-statistic matching (Zhang et al., CVPR 2021):

- Slack Distribution Alignment: each BN layer's statistic gaps count only beyond a slack margin,
  the epsilon-quantile of the gaps of the freshly initialised batch (``slack_margins``);
- Layerwise Sample Enhancement: each sample weights "its" layer more (``enhancement_weights``), so
  that the samples do not all settle on the same compromise.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor, nn

from ..errors import NonFiniteLossError
from .taps import BatchNormTaps


def slack_margins(
    model: nn.Module, taps: BatchNormTaps, images: Tensor, epsilon: float, batch: bool = False
) -> Tuple[List[Tensor], List[Tensor]]:
    """Per-layer slack (delta_l, gamma_l): the epsilon-quantile of |mean~ - mean| and |std~ - std| over
    all samples and channels of the freshly initialised batch at layer l (one scalar per layer).
    ``batch``: of the batch statistics' gaps (over channels), for the batch-statistic loss."""
    taps.set_slack([], [])
    taps.set_batch_slack([], [])
    taps.record_stats = True
    taps.reset()
    with torch.no_grad():
        model(images)
    taps.record_stats = False
    deltas, gammas = [], []
    for (mean, std), stats in zip(taps.targets, taps.batch_stats if batch else taps.stats):
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
