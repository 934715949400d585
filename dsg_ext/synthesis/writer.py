"""`dsg generate`: the dataset writer -- synthesise a calibration dataset to disk, resumably, on one process or many.

Under torchrun (torch.distributed: NCCL on GPUs, gloo on the CPU) rank r takes batches b with
b % world_size == r; batch b is seeded from (seed, b) alone, so the dataset is the same whatever
the number of processes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

from .._utils.io import atomic_write_json, check_output_dir, check_output_file, prepare_output_dir
from ..data import store as dataset
from ..errors import ConfigError
from ..models import LoadedModel, load_model
from ..models.spec import check_device
from .config import AUGMENT_ONLY_FIELDS, LATER_FIELDS, RANDOM_AUGMENTATIONS, SynthesisConfig
from .diversity import diversity
from .loop import per_sample_statistics, synthesize_batch
from .taps import synthesis_layers

DEFAULT_NUM_SAMPLES = 256


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def _barrier(info: DistInfo) -> None:
    if info.world > 1:
        import torch.distributed as dist

        dist.barrier()


def dataset_identity(loaded: LoadedModel, config: SynthesisConfig, num_samples: int) -> Dict[str, Any]:
    """What must match for an existing directory to be resumed (device and preview do not matter)."""
    return {
        "method": config.method,
        "config": dataclasses.asdict(config),
        "model": {"source": loaded.source, "sha256": loaded.identity},
        "num_samples": num_samples,
        "image_shape": [config.channels, config.image_size, config.image_size],
        "input_normalization": {"mean": list(loaded.input.mean), "std": list(loaded.input.std)},
    }


def _as_written(identity: Dict[str, Any], manifest: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """``identity`` in the form an existing dataset recorded it: config fields added after that dataset was
    written (LATER_FIELDS) are left out while they hold the value that makes the same images, and the
    augmentation-only ones (AUGMENT_ONLY_FIELDS) whatever their value when no random augmentation is on."""
    written = (manifest or {}).get("config")
    if not isinstance(written, dict):
        return identity
    augmented = any(identity["config"].get(k) for k in RANDOM_AUGMENTATIONS)
    config = {k: v for k, v in identity["config"].items()
              if k in written or ((augmented or k not in AUGMENT_ONLY_FIELDS)
                                  and (k not in LATER_FIELDS or v != LATER_FIELDS[k]))}
    return {**identity, "config": config}


def homogenization_summary(loaded: LoadedModel, images: torch.Tensor, device: str,
                           unbiased: bool) -> List[Dict[str, Any]]:
    """Per BN layer: spread across samples of the per-sample channel means (mean over channels of
    the std over samples). Collapsed, homogeneous samples give small values."""
    stats = per_sample_statistics(loaded.model, images, unbiased=unbiased, device=device)
    return [{"layer": name, "sample_spread": float(m.std(0).mean())} for name, m in stats.items()]


def image_grid(images: torch.Tensor, mean, std, max_images: int = 64):
    """Up to ``max_images`` samples back in [0, 1] image space (``mean``/``std``: the model's input
    normalisation), tiled on a white grid: an (H, W) or (H, W, 3) array."""
    x = images[:max_images].float()
    mean = torch.tensor(mean[: x.shape[1]]).view(1, -1, 1, 1)
    std = torch.tensor(std[: x.shape[1]]).view(1, -1, 1, 1)
    x = (x * std + mean).clamp(0, 1)
    n = x.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    c, h, w = x.shape[1:]
    grid = torch.ones(c, rows * (h + 2), cols * (w + 2))
    for i in range(n):
        r, q = divmod(i, cols)
        grid[:, r * (h + 2) + 1 : r * (h + 2) + 1 + h, q * (w + 2) + 1 : q * (w + 2) + 1 + w] = x[i]
    img = grid.permute(1, 2, 0).numpy()
    return img[..., 0] if c == 1 else img


def write_preview(images: torch.Tensor, spec, path: str, max_images: int = 64) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = image_grid(images, spec.mean, spec.std, max_images)
    plt.imsave(path, img, cmap="gray" if img.ndim == 2 else None)


def generate(
    source: str,
    out: str,
    config: SynthesisConfig,
    num_samples: int,
    device: str = "cpu",
    weights: Optional[str] = None,
    preview: Optional[str] = None,
    show_progress: bool = True,
    image_size: Optional[int] = -1,
    compare_zeroq: bool = False,
    trust_model_code: bool = False,
) -> Dict[str, Any]:
    """Synthesises a calibration dataset into directory ``out`` (what ``dsg generate`` runs).

    Args:
        source: a model source string (``dsg_ext.models.load_model``: ``torchvision:NAME``, a file, ...).
        out: the dataset directory; re-running the same call resumes it, a different config is refused.
        config: the recipe; its ``channels`` and ``image_size`` are replaced by the model's input.
        num_samples: images in all.
        device: where to synthesise; under torchrun each rank takes its share of the batches.
        weights: a state-dict file for the source, when it needs one.
        preview: also write a PNG grid of (up to 64 of) the samples there.
        show_progress: a tqdm bar on stderr.
        image_size: -1 uses ``config.image_size``, None the model's own input size.
        compare_zeroq: also synthesise batch 0 with ZeroQ and report both methods' sample spread (the
            paper's homogenization measure) in the manifest's summary.
        trust_model_code: allow model files whose loading runs code (TorchScript).

    Every problem that can be seen before synthesis starts is refused then (a bad option or device,
    an unwritable ``out`` or ``preview``, a model that rejects its input). A finished dataset is
    returned as it is, without writing (it may lie on read-only media).

    Returns:
        The manifest (an empty dict on ranks other than 0).
    """
    config.validate()
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}", parameter="num_samples")
    check_device(device)
    check_output_dir(out, "dataset directory")
    if preview is not None:
        check_output_file(preview, "preview")
    info = _init_distributed(device)
    if device.startswith("cuda") and info.world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', info.rank))}"
        torch.cuda.set_device(device)
    loaded = load_model(source, weights=weights, image_size=config.image_size if image_size == -1 else image_size,
                        trust_model_code=trust_model_code)
    config = dataclasses.replace(config, channels=loaded.input.channels, image_size=loaded.input.image_size)
    model = loaded.model.to(device)
    layers = synthesis_layers(model, config.channels, config.image_size, device, source)  # probes the model too

    identity = dataset_identity(loaded, config, num_samples)
    num_batches = math.ceil(num_samples / config.batch_size)
    layer_names = [name for name, _ in layers]
    if info.main:
        existing = dataset.load_manifest(out) if os.path.isdir(out) else None
        identity = _as_written(identity, existing)
        dataset.check_compatible(out, existing, identity)
        if _finished(out, existing, num_batches):
            if preview:
                write_preview(dataset.load_images(out, max_samples=256), loaded.input, preview)
            return existing
        prepare_output_dir(out, "dataset directory")  # from here on it is written
        if existing is None:  # claim the directory before any shard exists, so a killed run resumes safely
            dataset.build_manifest(out, identity, num_batches, {"layers": layer_names})
    _barrier(info)
    manifest = dataset.load_manifest(out)
    identity = _as_written(identity, manifest)
    dataset.check_compatible(out, manifest, identity)

    spec = loaded.input
    input_range = spec.valid_range()
    mine = [b for b in range(num_batches) if b % info.world == info.rank]
    todo = [b for b in mine if dataset.verify_shard(out, b) is None]
    bar = None
    if show_progress and info.main:
        from tqdm import tqdm

        bar = tqdm(total=len(todo) * config.iterations, unit="it", desc=f"synthesis iterations ({config.method})",
                   file=sys.stderr)
    error: Optional[BaseException] = None
    try:
        for done, b in enumerate(todo):
            count = min(config.batch_size, num_samples - b * config.batch_size)

            def progress(it: int, loss: float, _b=b, _done=done) -> None:
                if bar is not None:
                    bar.n = _done * config.iterations + it
                    bar.set_postfix(batch=f"{_done + 1}/{len(todo)}", loss=f"{loss:.4g}", refresh=False)
                    bar.refresh()

            started = time.perf_counter()
            result = synthesize_batch(model, config, b, count=count, device=device, layers=layers, progress=progress,
                                      input_range=input_range)
            seconds = time.perf_counter() - started
            dataset.write_shard(
                out,
                b,
                result.images,
                {
                    "batch": b,
                    "slack_delta": result.delta,
                    "slack_gamma": result.gamma,
                    "initial_loss": result.initial_loss,
                    "final_loss": result.final_loss,
                    "initial_layer_losses": result.initial_layer_losses,
                    "final_layer_losses": result.final_layer_losses,
                    "seconds": seconds,
                },
            )
    except BaseException as e:  # finished shards are on disk already; record them before failing
        error = e
    finally:
        if bar is not None:
            bar.close()
    if error is None:
        _barrier(info)
    manifest = dataset.build_manifest(out, identity, num_batches, {"layers": layer_names}) if info.main else {}
    if error is not None:
        raise error
    if info.main and manifest.get("complete"):
        images = dataset.load_images(out, max_samples=256)  # enough for the summary and the preview
        manifest["summary"] = _summary(manifest, layer_names, loaded, images, device, config.unbiased)
        if compare_zeroq and config.method != "zeroq":
            manifest["summary"]["zeroq_comparison"] = _compare_zeroq(
                loaded, model, config, images[: config.batch_size], device, layers, input_range)
        atomic_write_json(os.path.join(out, dataset.MANIFEST), manifest)
        if preview:
            write_preview(images, loaded.input, preview)
    return manifest


def _finished(out: str, manifest: Optional[Dict[str, Any]], num_batches: int) -> bool:
    """Whether ``out`` holds this dataset complete, summarised and intact (nothing left to write)."""
    if not manifest or not manifest.get("complete") or "summary" not in manifest:
        return False
    return all(dataset.verify_shard(out, b) is not None for b in range(num_batches))


def _compare_zeroq(loaded, model, config, images, device, layers, input_range) -> Dict[str, Any]:
    """Batch 0 again with ZeroQ (same seed and options): mean per-layer sample spread of both."""
    zq = dataclasses.replace(config, method="zeroq")
    result = synthesize_batch(model, zq, 0, count=images.shape[0], device=device, layers=layers,
                              input_range=input_range)
    ours = homogenization_summary(loaded, images, device, config.unbiased)
    theirs = homogenization_summary(loaded, result.images, device, config.unbiased)
    return {
        "batch": 0,
        f"{config.method}_mean_sample_spread": sum(r["sample_spread"] for r in ours) / len(ours),
        "zeroq_mean_sample_spread": sum(r["sample_spread"] for r in theirs) / len(theirs),
        "zeroq_final_loss": result.final_loss,
    }


def _summary(manifest, layer_names, loaded, images, device, unbiased) -> Dict[str, Any]:
    final = torch.tensor([s["final_layer_losses"] for s in manifest["shards"]]).mean(0)
    initial = torch.tensor([s["initial_layer_losses"] for s in manifest["shards"]]).mean(0)
    spread = homogenization_summary(loaded, images, device, unbiased)
    return {
        "diversity": diversity(loaded, images, device, unbiased),
        "layer_loss_initial_mean": float(initial.mean()),
        "layer_loss_final_mean": float(final.mean()),
        "layer_loss_final_max": float(final.max()),
        "worst_layer": layer_names[int(final.argmax())],
        "per_layer": [
            {"layer": n, "initial": float(i), "final": float(f), "sample_spread": s["sample_spread"]}
            for n, i, f, s in zip(layer_names, initial, final, spread)
        ],
    }
