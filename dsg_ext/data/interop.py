"""Our synthetic data for the quantizers people already run: a torch ``Dataset`` over a
``dsg generate`` directory, batches for any "forward loop" API (NVIDIA ModelOpt's
``mtq.quantize(model, config, forward_loop)``, AIMET's ``compute_encodings``, torchao's PT2E
calibration), and an onnxruntime ``CalibrationDataReader`` for ``quantize_static``.

Every shard is verified (checksum, shape, finite pixels: ``store.read_shard``) when it is read, and
only one shard is held in memory at a time, so a dataset of any size streams in bounded memory.
An unfinished dataset is refused, as everywhere.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import Tensor

from ..errors import ConfigError, DatasetError
from . import store


class SyntheticDataset(torch.utils.data.Dataset):
    """The images of a finished ``dsg generate`` directory, one (C, H, W) float32 tensor per item,
    in the model's normalised input space.

    Args:
        directory: the dataset directory.
        model_identity: when given, the dataset must have been made for the model with this identity
            (``dsg_ext.models.model_identity``); refused otherwise.
        max_samples: use only the first ``max_samples`` images.

    Shards are read (and verified) on demand and the last one is cached: sequential access reads
    each shard once, holding one in memory.
    """

    def __init__(self, directory: str, model_identity: Optional[str] = None, max_samples: Optional[int] = None):
        manifest = store.load_manifest(directory)
        if manifest is None:
            raise DatasetError(f"{directory} has no {store.MANIFEST}: not a dsg_ext synthetic dataset")
        if not manifest.get("complete"):
            raise DatasetError(f"{directory} is an unfinished dataset; re-run the same `dsg generate` command")
        made_for = (manifest.get("model") or {}).get("sha256")
        if model_identity is not None and made_for != model_identity:
            raise DatasetError(f"{directory} was generated for another model (identity {str(made_for)[:12]}...)")
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples < 1):
            raise ConfigError(f"max_samples must be a positive integer, got {max_samples!r}")
        self.directory, self.manifest = directory, manifest
        self.shape = manifest.get("image_shape")
        self.records: List[Dict[str, Any]] = list(manifest["shards"])
        self.starts: List[int] = []
        total = 0
        for record in self.records:
            self.starts.append(total)
            total += int(record["num_samples"])
        self.length = total if max_samples is None else min(total, max_samples)
        self._cached: Optional[int] = None
        self._images: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.length

    def shard(self, index: int) -> Tensor:
        """All images of shard ``index`` (verified), from the one-shard cache when it is there."""
        if self._cached != index:
            self._images = store.read_shard(self.directory, self.records[index],
                                            self.shape if isinstance(self.shape, list) else None)
            self._cached = index
        return self._images

    def __getitem__(self, i: int) -> Tensor:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} images")
        i %= self.length
        s = bisect.bisect_right(self.starts, i) - 1
        return self.shard(s)[i - self.starts[s]]


def calibration_batches(directory: str, batch_size: int = 32, device: Optional[str] = None,
                        max_samples: Optional[int] = None, model_identity: Optional[str] = None) -> Iterator[Tensor]:
    """(B, C, H, W) batches of a ``dsg generate`` directory, shard by shard (bounded memory).

    Args:
        directory: the dataset directory.
        batch_size: images per batch (the last one may be smaller).
        device: move each batch there.
        max_samples: stop after this many images.
        model_identity: refuse a dataset made for another model.

    Returns:
        An iterator of batches.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    data = SyntheticDataset(directory, model_identity, max_samples)
    rest: Optional[Tensor] = None  # images of the previous shard not yet in a batch
    have = 0
    for s in range(len(data.records)):
        if have >= len(data):
            break
        images = data.shard(s)[: len(data) - have]
        have += images.shape[0]
        images = images if rest is None else torch.cat([rest, images])  # one copy per shard, at most
        full = images.shape[0] // batch_size * batch_size
        for i in range(0, full, batch_size):
            yield images[i:i + batch_size].to(device) if device else images[i:i + batch_size]
        rest = images[full:] if full < images.shape[0] else None
    if rest is not None:
        yield rest.to(device) if device else rest


def forward_loop(directory: str, batch_size: int = 32, device: Optional[str] = None,
                 max_samples: Optional[int] = None, model_identity: Optional[str] = None
                 ) -> Callable[[torch.nn.Module], None]:
    """A ``forward_loop(model)`` that runs the model on every batch of the dataset under no_grad:
    what ModelOpt's ``mtq.quantize(model, config, forward_loop)`` and AIMET's
    ``sim.compute_encodings(forward_pass_callback)`` (``lambda model, _: loop(model)``) call.

    Args: as for ``calibration_batches``.

    Returns:
        The loop function.
    """
    def loop(model: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in calibration_batches(directory, batch_size, device, max_samples, model_identity):
                model(batch)

    return loop


def ort_calibration_reader(directory: str, input_name: str, batch_size: int = 32,
                           max_samples: Optional[int] = None, model_identity: Optional[str] = None):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over the dataset, for
    ``onnxruntime.quantization.quantize_static(model_in, model_out, calibration_data_reader=...)``.

    Args:
        directory: the dataset directory.
        input_name: the ONNX model's input name.
        batch_size, max_samples, model_identity: as for ``calibration_batches``.

    Returns:
        The reader (``get_next()`` gives ``{input_name: array}`` until the data end, then None;
        ``rewind()`` starts over).
    """
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch.numpy()}

        def rewind(self):
            self._batches = calibration_batches(directory, batch_size, None, max_samples, model_identity)

    return Reader()
