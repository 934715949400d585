"""The synthetic dataset store on disk: safetensors shards, one JSON record per shard, and a manifest.

DIR/
  manifest.json               method, full config, model identity, shapes, every shard's record
  shard_00000.safetensors     "images": (n, C, H, W) float32, the model's normalised input space
  shard_00000.json            record: sample count, SHA-256 of the shard file, slack, losses

Every file is written to a temporary name and renamed, so a killed run leaves only whole files.
A shard counts as finished when its record exists and the shard's SHA-256 matches it; the
manifest is rebuilt from the records (each rank of a distributed run writes only its own shards).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional

import torch

from .._utils.io import atomic_write_bytes, atomic_write_json, read_regular, sha256_bytes
from ..errors import DatasetError

FORMAT = "dsg_ext.synthetic/1"
MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def record_name(index: int) -> str:
    return f"shard_{index:05d}.json"


def write_shard(directory: str, index: int, images: torch.Tensor, record: Dict[str, Any]) -> Dict[str, Any]:
    """Writes shard `index` and then its record (the record marks the shard finished)."""
    from safetensors.torch import save

    data = save({"images": images.detach().to(torch.float32).contiguous().cpu()})
    path = os.path.join(directory, shard_name(index))
    atomic_write_bytes(path, data)
    record = dict(record, index=index, file=shard_name(index), num_samples=int(images.shape[0]),
                  sha256=hashlib.sha256(data).hexdigest())
    atomic_write_json(os.path.join(directory, record_name(index)), record)
    return record


def member_path(directory: str, name: Any, what: str = "shard") -> str:
    """``directory/name`` for a file name read from inside the dataset, which must be a plain name
    (no directory part, not absolute, not . or ..): nothing a manifest names may reach outside its
    directory."""
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name) or os.path.basename(name) != name):
        raise DatasetError(f"{os.path.join(directory, MANIFEST)} names the {what} file {name!r}; only plain file "
                           f"names inside {directory} are accepted")
    return os.path.join(directory, name)


def _read_json(path: str, what: str) -> Any:
    data = read_regular(path, DatasetError, what, follow_links=False)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DatasetError(f"{what} {path} is not readable JSON ({e})") from None


def read_record(directory: str, index: int) -> Optional[Dict[str, Any]]:
    """Shard ``index``'s record, or None when it is missing or unreadable (the shard is then made again)."""
    path = os.path.join(directory, record_name(index))
    if not os.path.lexists(path):
        return None
    data = read_regular(path, DatasetError, "shard record", follow_links=False)  # a FIFO or link: refused
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None  # a damaged record: the shard is made again
    ok = (isinstance(record, dict) and record.get("file") == shard_name(index) and isinstance(record.get("sha256"), str)
          and isinstance(record.get("num_samples"), int))
    return record if ok else None


def verify_shard(directory: str, index: int) -> Optional[Dict[str, Any]]:
    """The shard's record if the shard is finished and intact; None if it must be (re)generated.

    A shard whose checksum does not match its record is reported (a warning) and never used; a
    shard that is not a regular file (a FIFO, a device, a link) is refused with DatasetError."""
    record = read_record(directory, index)
    if record is None:
        return None
    path = os.path.join(directory, shard_name(index))
    if not os.path.lexists(path):
        return None
    digest = sha256_bytes(read_regular(path, DatasetError, "shard", follow_links=False))
    if digest != record.get("sha256"):
        import warnings

        warnings.warn(f"{path}: checksum mismatch (expected {record.get('sha256')}, found {digest}); regenerating it",
                      stacklevel=2)
        return None
    return record


def load_manifest(directory: str) -> Optional[Dict[str, Any]]:
    """The manifest of ``directory``, None when there is none; DatasetError when it is not one of
    ours or is malformed (shards without a plain file name, checksum or sample count)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.lexists(path):
        return None
    manifest = _read_json(path, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a dsg_ext synthetic-dataset manifest (format {FORMAT!r} expected)")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise DatasetError(f"{path} has no list of shards")
    for i, record in enumerate(shards):
        if not isinstance(record, dict):
            raise DatasetError(f"{path}: shard entry {i} is not a record")
        member_path(directory, record.get("file"))
        if not isinstance(record.get("sha256"), str) or not isinstance(record.get("num_samples"), int) \
                or record["num_samples"] < 0:
            raise DatasetError(f"{path}: shard entry {i} ({record.get('file')}) has no checksum or sample count")
    return manifest


_MISSING = object()


def check_compatible(directory: str, manifest: Optional[Dict[str, Any]], identity: Dict[str, Any]) -> None:
    """Refuses to mix datasets: an existing DIR must have been made with the same settings."""
    if manifest is None:
        return
    for key, value in identity.items():
        have = manifest.get(key)
        if have != value:
            if isinstance(have, dict) and isinstance(value, dict):  # name the fields that differ
                fields = sorted(set(have) | set(value), key=str)
                shown = lambda d, f: repr(d[f]) if f in d else "not recorded"  # noqa: E731
                diff = "; ".join(f"{f}: {shown(have, f)} there, {shown(value, f)} requested"
                                 for f in fields if have.get(f, _MISSING) != value.get(f, _MISSING))
                detail = f"\n  {diff}"
            else:
                detail = f"\n  existing: {have}\n  requested: {value}"
            raise DatasetError(f"{directory} holds a dataset made with a different {key}:{detail}\n"
                               f"use another --out, or delete {directory} to start over")


def build_manifest(directory: str, identity: Dict[str, Any], num_batches: int, extra: Dict[str, Any]) -> Dict[str, Any]:
    shards: List[Dict[str, Any]] = []
    for index in range(num_batches):
        record = read_record(directory, index)
        if record is not None:
            shards.append(record)
    manifest = dict(identity, format=FORMAT, shards=shards, complete=len(shards) == num_batches, **extra)
    atomic_write_json(os.path.join(directory, MANIFEST), manifest)
    return manifest


def read_shard(directory: str, record: Dict[str, Any], image_shape: Optional[List[int]] = None,
               verify: bool = True) -> torch.Tensor:
    """One shard's images, checked: a regular file inside ``directory``, the checksum of its record,
    a safetensors file with a finite float32 ``images`` tensor of the recorded count and shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    path = member_path(directory, record.get("file"))
    data = read_regular(path, DatasetError, "shard", follow_links=False)
    if verify and sha256_bytes(data) != record.get("sha256"):
        raise DatasetError(f"{path}: checksum mismatch, the shard is corrupt; re-run `dsg generate` to regenerate it")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise DatasetError(f"{path} is not a safetensors file ({e})") from None
    images = tensors.get("images")
    expected = [record.get("num_samples")] + list(image_shape or [])
    if images is None:
        raise DatasetError(f"{path} holds no 'images' tensor (found {sorted(tensors)})")
    if images.dtype != torch.float32 or images.dim() != 4 or (image_shape and list(images.shape) != expected):
        raise DatasetError(f"{path} holds images {images.dtype} {list(images.shape)}, expected float32 {expected}")
    if not bool(torch.isfinite(images).all()):
        raise DatasetError(f"{path} holds NaN or infinite pixels")
    return images


def load_images(directory: str, verify: bool = True, max_samples: Optional[int] = None) -> torch.Tensor:
    """The images of a finished dataset in shard order (checksums verified); with max_samples only
    as many shards as that needs are read. An unfinished dataset (what an interrupted `dsg generate`
    leaves) is refused: re-running the same command finishes it."""
    manifest = load_manifest(directory)
    if manifest is None:
        raise DatasetError(f"{directory} has no {MANIFEST}: not a dsg_ext synthetic dataset")
    if not manifest.get("complete"):
        raise DatasetError(
            f"{directory} is an unfinished dataset ({len(manifest['shards'])} shards written); re-run the same "
            "`dsg generate` command to finish it")
    if max_samples is not None and max_samples < 1:
        raise DatasetError(f"asked for {max_samples} samples of {directory}; give at least 1")
    shape = manifest.get("image_shape")
    parts: List[torch.Tensor] = []
    for record in manifest["shards"]:
        if max_samples is not None and sum(p.shape[0] for p in parts) >= max_samples:
            break
        parts.append(read_shard(directory, record, shape if isinstance(shape, list) else None, verify))
    if not parts:
        raise DatasetError(f"{directory} holds no finished shard")
    return torch.cat(parts)[:max_samples]
