"""How good a (quantized) model is: top-k accuracy on labelled images, fidelity to the float model
on any images (top-1 agreement, KL divergence), and ``evaluate`` for ``dsg eval``'s data names."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.spec import LoadedModel


@torch.no_grad()
def topk_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 200) -> Tuple[float, float]:
    """(top-1, top-5) accuracy in percent of preprocessed images (top-k capped at the class count)."""
    top1 = top5 = 0
    for i in range(0, images.shape[0], batch_size):
        logits = model(images[i : i + batch_size])
        y = labels[i : i + batch_size]
        pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += int((pred[:, 0] == y).sum())
        top5 += int((pred == y[:, None]).any(1).sum())
    return 100.0 * top1 / images.shape[0], 100.0 * top5 / images.shape[0]


@torch.no_grad()
def fidelity(fp_model: nn.Module, qmodel: nn.Module, images: Tensor, batch_size: int = 100,
             device: str = "cpu") -> Dict[str, float]:
    """Agreement of the quantized model with FP32 on any images: top-1 agreement (%) and the mean
    KL(p_fp32 || p_quant) of the softmax outputs."""
    agree = 0
    kl = 0.0
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device)
        a, b = fp_model(x).double(), qmodel(x).double()
        agree += int((a.argmax(1) == b.argmax(1)).sum())
        kl += float(F.kl_div(F.log_softmax(b, 1), F.log_softmax(a, 1), log_target=True, reduction="sum"))
    n = images.shape[0]
    return {"top1_agreement": 100.0 * agree / n, "mean_kl": kl / n}


def evaluate(model: nn.Module, loaded: LoadedModel, data: str, max_images: Optional[int] = None,
             fp_model: Optional[nn.Module] = None, batch_size: int = 200) -> Dict[str, Any]:
    """What ``dsg eval`` reports for one data source (``data.calibration.evaluation_images``).

    Args:
        model: the model to evaluate (float or quantized).
        loaded: the loaded float model it comes from (input spec, identity).
        data: "fashion-mnist", "skimage-photos", an image directory or a ``dsg generate`` directory.
        max_images: evaluate at most this many images.
        fp_model: when given, also the fidelity of ``model`` to it.
        batch_size: images per forward pass.

    Returns:
        {"data", "images"} plus "top1"/"top5" where the images have labels and
        "top1_agreement"/"mean_kl" with ``fp_model``.
    """
    from .data.calibration import evaluation_images

    images, labels = evaluation_images(loaded, data, max_images)
    result: Dict[str, Any] = {"data": data, "images": int(images.shape[0])}
    if labels is not None:
        result["top1"], result["top5"] = topk_accuracy(model, images, labels, batch_size)
    if fp_model is not None:
        result.update(fidelity(fp_model, model, images, batch_size))
    return result
