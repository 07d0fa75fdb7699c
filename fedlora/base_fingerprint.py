"""A fingerprint of a base model: its architecture config plus a hash of its weights.

The coordinator sends its fingerprint with every message; a site holding a different
base model (another checkpoint, another revision, a corrupted copy) refuses instead of
training an adapter that means nothing on the coordinator's model. Hashing a 2 GB
checkpoint takes seconds, and a deployed site starts a process per message, so a
weight file's hash is cached on disk keyed by its size and modification time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedlora.model_folder import file_sha256
from fedlora.disk_cache import cached_in_file

# Config keys that describe where or how a folder was saved, not the model.
VOLATILE_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "id2label", "label2id", "_commit_hash"}
CACHE_FILE = "weight-hashes.json"


def _cached_sha256(path: Path, cache_dir: Path | None) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cached_in_file(cache_dir / CACHE_FILE if cache_dir else None, key, lambda: file_sha256(path))


def weight_files(folder: Path) -> list[Path]:
    """The model's own weights, as transformers loads them: model*.safetensors, else
    pytorch_model*.bin (not optimizer states or training arguments saved beside them)."""
    return sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


_MEMO: dict[tuple, str] = {}  # (folder, files' names/sizes/mtimes) -> fingerprint, per process


def _fingerprint(folder: Path, cache_dir: Path | None) -> str:
    config = json.loads((folder / "config.json").read_text())
    architecture = {k: v for k, v in sorted(config.items()) if k not in VOLATILE_KEYS}
    digest = hashlib.sha256(json.dumps(architecture, sort_keys=True).encode())
    weights = weight_files(folder)
    for path in weights:
        digest.update(path.name.encode() + b"\0" + _cached_sha256(path, cache_dir).encode())
    return "sha256:" + digest.hexdigest()


def model_fingerprint(folder: Path, cache_dir: Path | None = None) -> str:
    """sha256 over the architecture config (minus save-time keys) and every weight
    file's sha256; `cache_dir` keeps the weight hashes between processes."""
    folder = folder.resolve()
    stamp = (folder, tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()))
    if stamp not in _MEMO:
        _MEMO[stamp] = _fingerprint(folder, cache_dir)
    return _MEMO[stamp]
