"""Results worth keeping between processes (Flower starts one per message at a site):
a JSON file of key -> value. A cache, not a record: an unreadable file is recomputed;
writes are atomic, so concurrent processes never read half a file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fedlora.atomic_file import write_atomic

T = TypeVar("T")


def cached_in_file(path: Path | None, key: str, compute: Callable[[], T]) -> T:
    """`compute()` unless `path` already holds `key` (no file: compute every time)."""
    cache: dict = {}
    if path is not None and path.is_file():
        try:
            cache = json.loads(path.read_text())
        except ValueError:
            cache = {}
    if key in cache:
        return cache[key]
    value = compute()
    if path is not None:
        cache[key] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(cache, indent=1))
    return value
