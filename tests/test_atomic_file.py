"""write_atomic: a reader never sees half a file, concurrent writers never collide, and
a failed write leaves the old file and no temporary behind."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from fedlora.atomic_file import write_atomic


@pytest.mark.parametrize("durable", [False, True])
def test_writes_text_and_bytes_and_replaces_whole(tmp_path, durable):
    target = tmp_path / "ledger.json"
    write_atomic(target, "first\n", durable=durable)
    assert target.read_text() == "first\n"
    write_atomic(target, b"\x00second", durable=durable)
    assert target.read_bytes() == b"\x00second"
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]  # no temporary left
    assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask_now())


def _umask_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    return 0o022


def test_concurrent_writers_each_land_whole(tmp_path):
    """The fixed `NAME.tmp` this replaces let two writers write into one temporary file
    (a torn or interleaved result, or a rename of a file the other had just moved)."""
    target = tmp_path / "site-names.json"
    payloads = [(str(i) * 200_000).encode() for i in range(8)]
    errors: list[BaseException] = []

    def write(data: bytes) -> None:
        try:
            for _ in range(20):
                write_atomic(target, data)
                seen = target.read_bytes()
                assert seen in payloads  # whole, never a mix of two writers
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["site-names.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "config.toml"
    write_atomic(target, "old")

    def refuse(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["config.toml"]


def test_no_module_writes_its_own_temporary_file():
    """One way to replace a file: every os.replace outside fedlora/atomic_file.py is a
    checkpoint folder's rename (a folder, which write_atomic does not write)."""
    import re

    root = Path(__file__).resolve().parent.parent
    found = sorted(str(p.relative_to(root)) for folder in ("fedlora", "client", "server", "strategies", "privacy", "simulations")
                   for p in (root / folder).rglob("*.py") if re.search(r"os\.replace\(|\.replace\(tmp|\.rename\(", p.read_text()))
    assert found == ["fedlora/atomic_file.py", "server/run_directory.py"]
