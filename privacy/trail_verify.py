"""`fedlora privacy STATE_DIR --verify`: a site's ledger and audit log checked as a
governance reader would, each chain link and each signed head, with one line that says
either what holds or exactly which entry broke it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from fedlora.privacy.site_audit import AUDIT_FILE, AuditError, check_audit_trail
from fedlora.privacy.site_ledger import LEDGER_FILE, LedgerError, SiteLedger
from fedlora.privacy.trail_chain import TrailCheck, fingerprint, key_blob


@dataclass(frozen=True)
class TrailVerdict:
    intact: bool
    line: str  # one line: what holds, or the first break, naming the file and the entry


def trusted_key(path: Path) -> str:
    """The OpenSSH public key in `path` (a site's `.pub`), as `type base64` without its comment."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
        serialization.load_ssh_public_key(lines[0].strip().encode())
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"public key {path}: not readable ({getattr(exc, 'strerror', None) or 'not text'})") from None
    except (IndexError, ValueError, TypeError):
        raise LedgerError(f"public key {path}: not an OpenSSH public key (a site's .pub file)") from None
    return key_blob(lines[0])


def _pinned(check: TrailCheck, key: str | None) -> str | None:
    """With a trusted key: a trail with any entry must carry a head signed by exactly that key.
    Legacy entries too: stripping every entry's link and both heads turns a chained file into
    a "legacy" one whose entries anyone could delete, and only the missing signature tells."""
    if key is None or not (check.entries or check.legacy):
        return None
    if check.signer is None:
        unsigned = (f"its {check.legacy} legacy entries (written before the chain, or stripped of it) are signed by "
                    "no one" if not check.entries else "no signed head at all")
        return f"{check.file}: no head signed by the given key ({unsigned})"
    if key_blob(check.signer) != key:
        return f"{check.file}: its signed head is by key {fingerprint(check.signer)}, not the given key {fingerprint(key)}"
    return None


def verify_site_trail(state_dir: str | Path, public_key: Path | None = None) -> TrailVerdict:
    """Both trails of a state dir: the first break found, or a line saying what holds."""
    state_dir = Path(state_dir)
    if not (state_dir / LEDGER_FILE).is_file() and not (state_dir / AUDIT_FILE).is_file():
        raise LedgerError(f"{state_dir}: no privacy ledger here ({LEDGER_FILE} not found)")
    key = trusted_key(public_key) if public_key is not None else None
    checks = []
    if (state_dir / LEDGER_FILE).is_file():
        try:
            checks.append(SiteLedger.load(state_dir).check_trail())
        except LedgerError as exc:
            return TrailVerdict(False, f"trail broken: {exc}")
    if (state_dir / AUDIT_FILE).is_file():
        try:
            checks.append(check_audit_trail(state_dir))
        except AuditError as exc:
            return TrailVerdict(False, f"trail broken: {exc}")
    for check in checks:
        problem = check.problem or _pinned(check, key)
        if problem:
            return TrailVerdict(False, f"trail broken: {problem}")
    return TrailVerdict(True, "trail intact: " + "; ".join(c.summary() for c in checks))
