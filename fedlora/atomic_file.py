"""Replace a file in one step: a reader sees the old content or the new, never half.

The one way fedlora writes a file that someone may read while it is written (a ledger,
a cache, a run's config, a report). The temporary file has a unique name beside the
target (same filesystem, so the rename is atomic), so concurrent writers never write
into each other's temporary file; the last rename wins whole.

`durable=True` also fsyncs the file and its folder: after a power cut the new content
is there, or the old, not an empty file (the privacy ledger needs this).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | os.PathLike, data: str | bytes, durable: bool = False) -> None:
    """Write `data` (text as UTF-8) to `path`, replacing it atomically."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes 0600; keep what a plain write would give
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)


def _umask() -> int:
    # Read, not set-and-restore: os.umask(0) would open a window in which another thread's
    # new files are world-writable.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022
