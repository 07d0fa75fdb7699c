"""The adapter digest: "sha256:..." of an adapter's values, whatever file or message holds
them. Each tensor by its key (sorted), its shape and its fp32 little-endian bytes. A site's
privacy statement names the global adapter it received by it, and the dossier names the
model file's (server/dossier.py).

No torch here: `fedlora verify-dossier` reads the weights file with numpy and answers in a
fraction of a second. Only a file of bfloat16 tensors, which numpy cannot hold, is read with
torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np


def digest_of(arrays: Mapping[str, np.ndarray]) -> str:
    """The digest of `arrays` (key -> values of any float dtype numpy holds)."""
    digest = hashlib.sha256(b"fedlora adapter/1\n")
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key], dtype="<f4")
        digest.update(json.dumps([key, list(value.shape)]).encode() + b"\n")
        digest.update(value.tobytes())
    return "sha256:" + digest.hexdigest()


def file_digest(path: Path) -> str:
    """The digest of the adapter weights in the safetensors file `path` (ValueError if the
    file is not one: a dossier's reader is told, not shown a traceback)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        try:
            arrays = load_file(str(path))
        except TypeError:  # "data type 'bfloat16' not understood"
            from safetensors.torch import load_file as load_tensors

            arrays = {key: value.float().numpy() for key, value in load_tensors(str(path)).items()}
    except SafetensorError as exc:
        raise ValueError(f"not a safetensors file ({exc})") from None
    return digest_of(arrays)
