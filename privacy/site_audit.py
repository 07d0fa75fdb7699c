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
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit-log.jsonl"
EVALUATION_READ = "evaluation read"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class AuditError(RuntimeError):
    """The audit log cannot be written; the site must not act without a record."""


def append_audit(state_dir: str | Path, event: str, run: str, **fields: Any) -> dict[str, Any]:
    """Append one entry (and fsync it) before the site acts on the decision it records."""
    entry = {"time": utc_now(), "event": event, "run": run, **fields}
    path = Path(state_dir) / AUDIT_FILE
    line = json.dumps(entry, sort_keys=True) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())  # one write with O_APPEND: lines of concurrent processes never interleave
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise AuditError(f"audit log {path}: cannot write ({exc.strerror})") from None
    return entry


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
