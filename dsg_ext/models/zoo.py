"""The labelled zoo: one torchvision network per family users bring, trained on Fashion-MNIST on the CPU,
so that every family's accuracy is measured on 10,000 labelled test images (model source ``zoo:NAME``).

Each network is the torchvision architecture as users build it (10 classes), fed the Fashion-MNIST
images resized to 64 px and repeated over 3 channels: at 64 px every stride-32 network still ends on
2x2 maps, where per-sample BN statistics exist. ``scripts/train_zoo.py`` trains them (``train``: AdamW,
one-cycle, random crops and flips), each in minutes on 2 cores, and caches the weights under
``$DSG_ZOO_DIR`` (default ``~/.cache/dsg_ext/zoo``) in a file named by the hash of its training recipe
(``recipe_hash``): a changed recipe trains anew, an unchanged one is never trained twice. Weights are
made on the machine, never downloaded or committed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelSourceError
from .spec import InputSpec, load_state_dict_file

IMAGE_SIZE = 64
TRAIN_VERSION = 1  # bump when ``train`` changes in a way that changes the weights


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One family's network: the torchvision constructor and its training budget."""

    family: str
    architecture: str  # torchvision.models name
    train_images: int  # images drawn per epoch from the 60,000 (a budget that keeps training to minutes)
    epochs: int = 1
    options: Tuple[Tuple[str, object], ...] = ()  # constructor keyword arguments besides num_classes


ZOO: Dict[str, ZooEntry] = {
    "resnet18": ZooEntry("basic-block ResNet", "resnet18", 60000),
    "resnet50": ZooEntry("bottleneck ResNet", "resnet50", 30000),
    "mobilenet_v2": ZooEntry("inverted residual (ReLU6)", "mobilenet_v2", 60000),
    "mobilenet_v3_small": ZooEntry("hard-swish + squeeze-excite", "mobilenet_v3_small", 60000, epochs=2),
    "mobilenet_v3_large": ZooEntry("hard-swish + squeeze-excite", "mobilenet_v3_large", 60000),
    "efficientnet_b0": ZooEntry("SiLU + squeeze-excite", "efficientnet_b0", 48000),
    "regnet_y_400mf": ZooEntry("grouped convolutions + squeeze-excite", "regnet_y_400mf", 60000),
    "shufflenet_v2_x1_0": ZooEntry("channel split + shuffle", "shufflenet_v2_x1_0", 60000, epochs=2),
    "googlenet": ZooEntry("concatenations (Inception), training-only auxiliary heads", "googlenet", 48000,
                          options=(("aux_logits", True), ("init_weights", True))),
}


def input_spec() -> InputSpec:
    from ..data.fashion_mnist import MEAN, STD

    return InputSpec(3, IMAGE_SIZE, mean=(MEAN,) * 3, std=(STD,) * 3)


def _entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise ModelSourceError(f"the zoo has no network {name!r} (it has {', '.join(ZOO)})")
    return ZOO[name]


def build(name: str, seed: int = 0) -> nn.Module:
    """The untrained network, the same on every call for a seed (eval mode)."""
    import torchvision

    entry = _entry(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = torchvision.models.get_model(entry.architecture, weights=None, num_classes=10, **dict(entry.options))
    return model.eval()


def recipe_hash(name: str) -> str:
    """SHA-256 (hex, 12 digits) of what decides the trained weights: the entry, the training code's version,
    the image size."""
    entry = _entry(name)
    text = json.dumps([name, dataclasses.asdict(entry), TRAIN_VERSION, IMAGE_SIZE], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_dir() -> str:
    return os.environ.get("DSG_ZOO_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dsg_ext", "zoo")


def weights_path(name: str, directory: Optional[str] = None) -> str:
    return os.path.join(directory or cache_dir(), f"{name}-{recipe_hash(name)}.safetensors")


def trained_metadata(name: str, directory: Optional[str] = None) -> Optional[Dict[str, str]]:
    """The training record stored with the cached weights (test top-1, seconds, ...), or None if not trained."""
    path = weights_path(name, directory)
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {})


def load(name: str, weights: Optional[str] = None) -> nn.Module:
    """The network with ``weights`` (a state-dict file) or else its cached trained weights."""
    model = build(name)
    path = weights or weights_path(name)
    if weights is None and not os.path.isfile(path):
        raise ModelSourceError(f"zoo:{name} is not trained on this machine (no {path}): "
                               f"run python scripts/train_zoo.py {name} (minutes on 2 cores), or give weights=FILE",
                               parameter="weights")
    load_state_dict_file(model, path)
    return model.eval()


def fashion_inputs(images_u8: Tensor) -> Tensor:
    """uint8 (N, 28, 28) Fashion-MNIST -> the zoo's normalised (N, 3, 64, 64) input."""
    from ..data.fashion_mnist import preprocess

    return to_zoo_size(preprocess(images_u8))


def to_zoo_size(x32: Tensor) -> Tensor:
    """Normalised (N, 1, 32, 32) -> (N, 3, 64, 64): bilinear resize, the grey channel repeated."""
    return F.interpolate(x32, size=IMAGE_SIZE, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    out = model(x)
    if isinstance(out, tuple):  # GoogLeNet in training: (logits, aux2, aux1), the auxiliary losses weighted 0.3
        logits = out[0]
        return F.cross_entropy(logits, y) + 0.3 * sum(F.cross_entropy(a, y) for a in out[1:] if a is not None), logits
    return F.cross_entropy(out, y), out


@torch.no_grad()
def _recalibrate_bn(model: nn.Module, x_all: Tensor, gen: torch.Generator, images: int = 5120,
                    batch_size: int = 256) -> None:
    """BN running statistics as the exact average over ``images`` training images (unaugmented): the running
    averages of a short training lag behind the weights (torchvision's MobileNetV3 and EfficientNet use momentum
    0.01), and these statistics are what synthesis matches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    idx = torch.randperm(x_all.shape[0], generator=gen)[:images]
    for i in range(0, idx.numel(), batch_size):
        model(to_zoo_size(x_all[idx[i:i + batch_size]]))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
    model.eval()


@torch.no_grad()
def test_accuracy(model: nn.Module, max_images: Optional[int] = None, batch_size: int = 250) -> float:
    """Top-1 (%) on the Fashion-MNIST test split (the first ``max_images``)."""
    from ..data.fashion_mnist import load_split

    images, labels = load_split(train=False)
    if max_images:
        images, labels = images[:max_images], labels[:max_images]
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        correct += int((model(fashion_inputs(images[i:i + batch_size])).argmax(1) == labels[i:i + batch_size]).sum())
    return 100.0 * correct / images.shape[0]


def train(name: str, log: Callable[[str], None] = print, batch_size: int = 128, lr: float = 3e-3,
          seed: int = 0, bn_images: int = 5120, test_images: Optional[int] = None) -> Tuple[nn.Module, Dict[str, str]]:
    """Trains a zoo network on Fashion-MNIST: AdamW (weight decay 0.05), one-cycle learning rate peaking at
    ``lr``, the entry's image budget, then BN statistics averaged over ``bn_images`` training images. Returns
    the model (eval mode) and its record (top-1 on the first ``test_images`` test images (all), seconds)."""
    from ..data.fashion_mnist import augment, load_split, preprocess

    entry = _entry(name)
    model = build(name, seed)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y = load_split(train=True)
    x_all = preprocess(train_x)
    steps_per_epoch = -(-entry.train_images // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=entry.epochs * steps_per_epoch,
                                                pct_start=0.2)
    start = time.time()
    for epoch in range(entry.epochs):
        model.train()
        perm = torch.randperm(x_all.shape[0], generator=gen)[:entry.train_images]
        seen = correct = 0
        for i in range(0, perm.numel(), batch_size):
            idx = perm[i:i + batch_size]
            loss, logits = _loss(model, to_zoo_size(augment(x_all[idx], gen)), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += idx.numel()
            correct += int((logits.argmax(1) == train_y[idx]).sum())
        log(f"{name}: epoch {epoch + 1}/{entry.epochs}, train top-1 {100 * correct / seen:.2f}% "
            f"({time.time() - start:.0f} s)")
    _recalibrate_bn(model, x_all, gen, bn_images)
    seconds = time.time() - start
    top1 = test_accuracy(model, test_images)
    log(f"{name}: test top-1 {top1:.2f}% after {seconds:.0f} s of training")
    record = {"test_top1": f"{top1:.2f}", "test_images": str(test_images or 10000), "train_seconds": f"{seconds:.0f}",
              "recipe_hash": recipe_hash(name), "torch": torch.__version__, "threads": str(torch.get_num_threads())}
    return model.eval(), record


def save(name: str, model: nn.Module, record: Dict[str, str], directory: Optional[str] = None) -> str:
    """Writes the weights and record where ``load`` finds them (atomically); returns the path."""
    from safetensors.torch import save_file

    path = weights_path(name, directory)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata=record)
    os.replace(tmp, path)
    return path
