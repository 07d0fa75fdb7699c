"""Which app bundles a site runs: the approved set and the decision about one bundle.

By default a site approves exactly the fedlora release installed on it (its app
hash, fedlora/app_hash.py); `fedlora client --allow-app sha256:HEX` (repeatable) and
`--allow-apps FILE` (one hash per line, `#` comments) approve more. The decision is
taken from the bundle's bytes before anything in it is extracted, imported or run,
written to the site's audit log, and a refusal reaches the coordinator as an error
reply with the fixed reason REFUSED_APP and nothing else.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from fedlora.app_hash import HASH_PREFIX, AppHashError, app_dir_hash, fab_code_hash, installed_app_dir

REFUSED_APP = "refused: app not approved"  # the whole error reason the coordinator receives
APP_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")

log = logging.getLogger("fedlora.site")


def site_log_handler() -> None:
    """The site's processes log fedlora's lines (its own and the ClientApp's) to stderr,
    which `fedlora client` shares with the SuperNode: the site's log."""
    logger = logging.getLogger("fedlora")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s [fedlora] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class AppPinningError(ValueError):
    """An app hash or a file of hashes that cannot be read, as one line naming the flag."""


def parse_app_hash(text: str, flag: str = "--allow-app") -> str:
    """`sha256:` + 64 hex digits (upper case accepted, kept lower case)."""
    value = text.strip()
    if value.lower().startswith(HASH_PREFIX):
        value = HASH_PREFIX + value[len(HASH_PREFIX):].lower()
    if not APP_HASH_RE.fullmatch(value):
        raise AppPinningError(f"{flag}: expected sha256: and 64 hex digits (as `fedlora app-hash` prints), got {text.strip()[:80]!r}")
    return value


def read_allowed_apps(path: Path) -> list[str]:
    """The hashes in a file: one per line; blank lines and `#` comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AppPinningError(f"--allow-apps {path}: not readable ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise AppPinningError(f"--allow-apps {path}: not a UTF-8 text file") from None
    hashes = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                hashes.append(parse_app_hash(text))
            except AppPinningError:
                raise AppPinningError(f"--allow-apps {path}: line {number} is not sha256: and 64 hex digits") from None
    return hashes


def installed_release_hash() -> str:
    """The app hash of the fedlora release installed at this site."""
    try:
        return app_dir_hash(installed_app_dir())
    except AppHashError as exc:
        raise AppPinningError(f"the installed fedlora release: {exc}") from None


def approved_hashes(allow_app: list[str], allow_apps_file: Path | None, installed: str | None = None) -> list[str]:
    """The site's approved set, the installed release first, without duplicates."""
    extra = [parse_app_hash(h) for h in allow_app]
    if allow_apps_file is not None:
        extra += read_allowed_apps(allow_apps_file)
    return list(dict.fromkeys([installed or installed_release_hash(), *extra]))


@dataclass(frozen=True)
class AppDecision:
    app_hash: str | None  # None: the bundle is not a readable FAB (never approved)
    approved: bool


def decide(fab: bytes, approved: list[str]) -> AppDecision:
    """Hash the bundle's code (from its bytes) and check it against the approved set."""
    try:
        shipped = fab_code_hash(fab)
    except AppHashError:
        return AppDecision(None, False)
    return AppDecision(shipped, shipped in approved)


def log_decision(decision: AppDecision, approved: list[str], run: str) -> None:
    """The site's log holds both sides: the hash shipped and the hashes approved."""
    shipped = decision.app_hash or "unreadable bundle"
    if decision.approved:
        log.info("run %s: app %s approved", run, shipped)
    else:
        log.warning("run %s: app refused: it ships %s; this site approves %s", run, shipped, ", ".join(approved))
