"""Capturing what a model computes inside: batches of images, forward hooks removed whatever
happens, and forwards stopped where a module is entered (the inputs of a layer or a block, without
running the rest of the network). Every algorithm that needs a layer's inputs or outputs uses these."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, List

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class StopForward(Exception):
    """Raised by a capture hook to end the forward pass where it has what it needs."""


def batches(images: Tensor, batch_size: int) -> Iterable[Tensor]:
    """``images`` in consecutive slices of ``batch_size`` (the last may be shorter)."""
    for i in range(0, images.shape[0], batch_size):
        yield images[i : i + batch_size]


@contextlib.contextmanager
def hooks(handles: List[RemovableHandle]) -> Iterator[List[RemovableHandle]]:
    """The hook ``handles`` for the ``with`` body, removed afterwards whatever happens."""
    try:
        yield handles
    finally:
        for h in handles:
            h.remove()


def forward_until(model: nn.Module, module: nn.Module, grab: Callable[..., None], images: Tensor, batch_size: int,
                  device: str, **hook_options) -> None:
    """Runs ``model`` over ``images`` batch by batch, each forward stopped where ``module`` is entered:
    ``grab`` is its forward pre-hook (``hook_options`` go to ``register_forward_pre_hook``) and ends
    the forward by raising ``StopForward``."""
    with hooks([module.register_forward_pre_hook(grab, **hook_options)]), torch.no_grad():
        for x in batches(images, batch_size):
            try:
                model(x.to(device))
            except StopForward:
                pass
