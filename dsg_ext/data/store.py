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

from .._io import atomic_write_bytes, atomic_write_json, sha256_file
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


def read_record(directory: str, index: int) -> Optional[Dict[str, Any]]:
    path = os.path.join(directory, record_name(index))
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def verify_shard(directory: str, index: int) -> Optional[Dict[str, Any]]:
    """The shard's record if the shard is finished and intact; None if it must be (re)generated.

    A shard whose checksum does not match its record is reported (a warning) and never used."""
    record = read_record(directory, index)
    if record is None:
        return None
    path = os.path.join(directory, shard_name(index))
    if not os.path.exists(path):
        return None
    digest = sha256_file(path)
    if digest != record.get("sha256"):
        import warnings

        warnings.warn(f"{path}: checksum mismatch (expected {record.get('sha256')}, found {digest}); regenerating it",
                      stacklevel=2)
        return None
    return record


def load_manifest(directory: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not readable JSON ({e}); move it away or choose another --out") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DatasetError(f"{path} is not a dsg_ext synthetic-dataset manifest (format {FORMAT!r} expected)")
    return manifest


def check_compatible(directory: str, manifest: Optional[Dict[str, Any]], identity: Dict[str, Any]) -> None:
    """Refuses to mix datasets: an existing DIR must have been made with the same settings."""
    if manifest is None:
        return
    for key, value in identity.items():
        if manifest.get(key) != value:
            raise DatasetError(
                f"{directory} holds a dataset made with a different {key}:\n  existing: {manifest.get(key)}\n"
                f"  requested: {value}\nuse another --out, or delete {directory} to start over"
            )


def build_manifest(directory: str, identity: Dict[str, Any], num_batches: int, extra: Dict[str, Any]) -> Dict[str, Any]:
    shards: List[Dict[str, Any]] = []
    for index in range(num_batches):
        record = read_record(directory, index)
        if record is not None:
            shards.append(record)
    manifest = dict(identity, format=FORMAT, shards=shards, complete=len(shards) == num_batches, **extra)
    atomic_write_json(os.path.join(directory, MANIFEST), manifest)
    return manifest


def load_images(directory: str, verify: bool = True, max_samples: Optional[int] = None) -> torch.Tensor:
    """The images of a finished dataset in shard order (checksums verified); with max_samples only
    as many shards as that needs are read."""
    from safetensors.torch import load_file

    manifest = load_manifest(directory)
    if manifest is None:
        raise DatasetError(f"{directory} has no {MANIFEST}: not a dsg_ext synthetic dataset")
    parts = []
    for record in manifest["shards"]:
        if max_samples is not None and sum(p.shape[0] for p in parts) >= max_samples:
            break
        path = os.path.join(directory, record["file"])
        if verify and sha256_file(path) != record["sha256"]:
            raise DatasetError(
                f"{path}: checksum mismatch, the shard is corrupt; re-run `dsg generate` to regenerate it")
        parts.append(load_file(path)["images"])
    if not parts:
        raise DatasetError(f"{directory} holds no finished shard")
    return torch.cat(parts)[:max_samples]
