"""A site's audit log: every run that reached the site, what it asked for, and what
the site decided, on the site's own disk next to its privacy ledger.

One JSON object per line in `STATE_DIR/audit-log.jsonl`, appended and fsync'd. An
entry is plain data: the UTC time, the event, the run it belongs to, and fields that
describe the request or the decision (app hashes, requested settings, the policy key
that declined). It never holds a value read from the site's data.

Events: "app" (the app bundle a run shipped: its hash and whether the site approved
it), "request" (the privacy settings a run asked for, once per run and message type),
"declined" (a message refused by the site's policy or budget, with the key),
"evaluation read" (an evaluation about to read the site's data: the policy
`max-evaluations` counts these, so one that fails after reading counts too) and
"evaluated" (one that released its sums).

The lines form a hash chain (privacy/trail_chain.py): each carries `seq` and `prev`, and
`STATE_DIR/audit-log.head.json` holds the head (and the last head signed with the site's
node key), rewritten after every append under a lock. An append checks that the log's
last entry is the one the head names (else a deleted or changed tail would be re-signed);
`check_audit_trail` checks every line (`fedlora privacy STATE_DIR --verify`). Lines
written before the chain existed are its legacy prefix.
"""

from __future__ import annotations

import fcntl
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedlora.atomic_file import write_atomic
from fedlora.privacy.trail_chain import TrailCheck, check_heads, digest, make_heads, prefix_hash, trail_signer

AUDIT_FILE = "audit-log.jsonl"
HEAD_FILE = "audit-log.head.json"
LOCK_FILE = ".audit-log.lock"
TAIL_BYTES = 1 << 16
EVALUATION_READ = "evaluation read"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class AuditError(RuntimeError):
    """The audit log cannot be written; the site must not act without a record."""


def append_audit(state_dir: str | Path, event: str, run: str, **fields: Any) -> dict[str, Any]:
    """Append one entry (and fsync it) before the site acts on the decision it records,
    chained to the entry before it; then rewrite the head (signed where the client floor
    lent the site's key)."""
    state_dir = Path(state_dir)
    path = state_dir / AUDIT_FILE
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        with (state_dir / LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the link to the last entry and the append are one step
            heads = _read_heads(state_dir)
            last = _last_entry(path)
            if last is not None and "seq" in last:
                _check_tail(path, last, heads)
                seq, prev = last["seq"] + 1, digest(last)
            elif heads.get("head"):
                raise AuditError(f"audit log {path}: its last line carries no chain link, yet the log is chained "
                                 "(a line added by hand?); restore it from a backup")
            else:  # the first chained entry: it hashes the lines written before the chain existed
                seq, prev = 0, prefix_hash(read_audit(state_dir))
            entry = {"time": utc_now(), "event": event, "run": run, **fields, "seq": seq, "prev": prev}
            line = json.dumps(entry, sort_keys=True) + "\n"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode())  # one write with O_APPEND: a line is never torn by another writer
                os.fsync(fd)
            finally:
                os.close(fd)
            new_heads = make_heads(AUDIT_FILE, seq + 1, digest(entry), heads.get("signed_head"),
                                   trail_signer(state_dir), entry["time"])
            write_atomic(state_dir / HEAD_FILE, json.dumps(new_heads, indent=1), durable=True)
    except OSError as exc:
        raise AuditError(f"audit log {path}: cannot write ({exc.strerror})") from None
    return entry


def _read_heads(state_dir: Path) -> dict[str, Any]:
    path = state_dir / HEAD_FILE
    if not path.is_file():
        return {}
    try:
        heads = json.loads(path.read_text())
    except ValueError:
        raise AuditError(f"audit log head {path}: not valid JSON (restore it from a backup)") from None
    if not isinstance(heads, dict):
        raise AuditError(f"audit log head {path}: not a JSON object (restore it from a backup)")
    return heads


def _last_entry(path: Path) -> dict[str, Any] | None:
    """The log's last readable entry, read from its end (a long log is not read whole)."""
    if not path.is_file():
        return None
    with path.open("rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        span = TAIL_BYTES
        while True:
            fh.seek(max(0, size - span))
            lines = fh.read().splitlines()
            if span < size:
                lines = lines[1:]  # the first may be cut
            for raw in reversed(lines):
                try:
                    return json.loads(raw)
                except ValueError:
                    continue  # a torn last line (a crash mid-write), as read_audit skips it
            if span >= size:
                return None
            span *= 4


def _check_tail(path: Path, last: dict[str, Any], heads: dict[str, Any]) -> None:
    """The last entry is the one the head names (or the one after it, written before a crash
    kept its head from being rewritten): else entries were cut or changed at the end."""
    head = heads.get("head")
    if not isinstance(head, dict):
        raise AuditError(f"audit log {path}: its head ({HEAD_FILE}) is missing; the site writes no audit entry "
                         "onto a chain it cannot check (restore it from a backup)")
    covered = head.get("entries")
    if covered == last["seq"] + 1 and head.get("last") == digest(last):
        return
    if covered == last["seq"]:
        return  # one entry past the head: its head was not written (checked in full by --verify)
    raise AuditError(f"audit log {path}: its last entry {last['seq']} is not the one its head names (entry "
                     f"{covered - 1 if isinstance(covered, int) else '?'}): entries were cut or changed at the end; "
                     "restore it from a backup")


def read_audit(state_dir: str | Path) -> list[dict[str, Any]]:
    """Every entry, oldest first ([] if the site has no audit log yet). A torn last line
    (a crash mid-write) is skipped; any other unreadable line is an error."""
    path = Path(state_dir) / AUDIT_FILE
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise AuditError(f"audit log {path}: line {number} is not valid JSON") from None
    return entries


def check_audit_trail(state_dir: str | Path) -> TrailCheck:
    """Every line's link and the heads: the first entry that breaks the chain is named."""
    state_dir = Path(state_dir)
    path = state_dir / AUDIT_FILE
    entries = read_audit(state_dir)
    legacy: list[dict[str, Any]] = []
    chained: list[tuple[int, dict[str, Any]]] = []  # (line number, entry)
    for number, entry in enumerate(entries, 1):
        if "seq" not in entry:
            if chained:
                return TrailCheck(path, len(chained), len(legacy), 0, None,
                                  f"{path}: line {number} carries no chain link (added after the chain began)")
            legacy.append(entry)
        else:
            chained.append((number, entry))

    def name(k: int) -> str:
        return f"entry {k} (line {chained[k][0]}: {chained[k][1].get('event')})" if k < len(chained) else f"entry {k}"

    def broken(problem: str) -> TrailCheck:
        return TrailCheck(path, len(chained), len(legacy), 0, None, f"{path}: {problem}")

    numbers = {e.get("seq") for _, e in chained}
    hashes, expected = [], prefix_hash(legacy)
    for k, (number, entry) in enumerate(chained):
        if entry.get("seq") != k:
            if k in numbers:
                return broken(f"entry {entry.get('seq')} (line {number}) is out of order: it stands where entry {k} belongs")
            return broken(f"entry {k} is missing (deleted): line {number} holds entry {entry.get('seq')}")
        if entry.get("prev") != expected:
            return broken(f"{name(k - 1)} was changed: {name(k)} holds another hash for it" if k else
                          f"the {len(legacy)} lines written before the chain began were changed: "
                          f"{name(0)} holds another hash for them")
        expected = digest(entry)
        hashes.append(expected)
    try:
        heads = _read_heads(state_dir)
    except AuditError as exc:
        return broken(str(exc))
    return check_heads(path, heads, hashes, len(legacy), name, may_lag=1)
