"""A hash chain with signed heads: what makes a site's ledger and audit log tamper-evident.

Every entry carries `seq` (its place in the chain, from 0) and `prev` (the SHA-256 of the
entry before it, over its canonical JSON: keys sorted, no whitespace, Python's float
repr). The first chained entry's `prev` is the hash of the entries written before the
chain existed (the legacy prefix, in file order; `EMPTY_PREFIX` if there were none), so
from that moment on a changed legacy entry is detected too, though what it said before
then is unverified. Changing, deleting or reordering an entry breaks a link; a head
(the number of chained entries and the hash of the last) catches a deleted last entry.

A head is signed (ECDSA P-384, SHA-384) with the site's node key whenever the client
floor writes the trail: it passes the key down for the message it handles
(`signing_trail`), since the privacy floor loads no keys. The last signed head is kept
beside the latest head: entries after it (a write by a process that holds no key, such as
the site executor's app decisions) are chained but not yet signed. A signature proves
only who wrote the head: `fedlora privacy STATE_DIR --verify --public-key FILE` checks it
against the key the verifier trusts.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

EMPTY_PREFIX = hashlib.sha256(b"fedlora trail: no entries before the chain").hexdigest()


def canonical(value: Any) -> bytes:
    """The one JSON encoding every hash and signature is taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def digest(value: Any) -> str:
    return hashlib.sha256(canonical(value)).hexdigest()


def prefix_hash(legacy: list[Any]) -> str:
    """What the first chained entry holds as `prev`: the legacy entries, in file order."""
    return digest({"legacy": legacy}) if legacy else EMPTY_PREFIX


def public_key_line(key: ec.EllipticCurvePublicKey) -> str:
    """The OpenSSH form, as `fedlora site-key` writes a `.pub` file and peer-keys hold it."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def key_blob(key_line: str) -> str:
    """An OpenSSH public-key line without its comment: what two lines of one key share."""
    return " ".join(key_line.split()[:2])


def fingerprint(key_line: str) -> str:
    """As `ssh-keygen -l` prints it: SHA256 of the key blob, base64 without padding."""
    blob = base64.b64decode(key_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass(frozen=True)
class TrailSigner:
    """The site's node key, lent to the privacy floor to sign trail heads. `pinned`: the
    key is the site's own for good (a deployed site's node key, not a virtual site's
    per-run derived one), so a ledger signed by any other key is refused."""

    key: ec.EllipticCurvePrivateKey
    pinned: bool = False

    def public_line(self) -> str:
        return public_key_line(self.key.public_key())

    def sign(self, head: dict[str, Any]) -> dict[str, Any]:
        signed = {**head, "signer": self.public_line()}
        signature = self.key.sign(canonical(signed), ec.ECDSA(hashes.SHA384()))
        return {**signed, "signature": base64.b64encode(signature).decode()}


def signature_problem(head: dict[str, Any]) -> str | None:
    """Why a signed head's signature does not hold (None if it does)."""
    try:
        public = serialization.load_ssh_public_key(str(head["signer"]).encode())
        signature = base64.b64decode(str(head["signature"]), validate=True)
        unsigned = {k: v for k, v in head.items() if k != "signature"}
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return "its signer is not an EC key"
        public.verify(signature, canonical(unsigned), ec.ECDSA(hashes.SHA384()))
    except (KeyError, ValueError, TypeError, IndexError):
        return "its signature or signer is malformed"
    except InvalidSignature:
        return "its signature does not verify (the head was changed after it was signed)"
    return None


def make_heads(file: str, entries: int, last: str, previous_signed: dict | None, signer: TrailSigner | None,
               time: str, **state: Any) -> dict[str, Any]:
    """The trail's `head` (always) and `signed_head` (this head signed, or the last one
    signed before it when no key is at hand)."""
    head = {"file": file, "entries": entries, "last": last, "time": time, **state}
    signed = signer.sign(head) if signer is not None else previous_signed
    return {"head": head, "signed_head": signed}


@dataclass(frozen=True)
class TrailCheck:
    """What verifying one trail found: `problem` is None when the chain and its heads hold."""

    file: Path
    entries: int  # chained entries
    legacy: int  # entries written before the chain began (unverified)
    signed_entries: int  # chained entries covered by the last signed head
    signer: str | None  # that head's key (OpenSSH line)
    problem: str | None = None

    def summary(self) -> str:
        legacy = f" after {self.legacy} legacy entries (written before the chain, unverified)" if self.legacy else ""
        if self.signer is None:
            signed = "no signed head"
        else:
            covered = "all" if self.signed_entries == self.entries else f"{self.signed_entries} of {self.entries}"
            signed = f"signed head covers {covered} (key {fingerprint(self.signer)})"
        return f"{self.file}: {self.entries} entries chained{legacy}, {signed}"


def check_heads(file: Path, heads: dict[str, Any], hashes_by_seq: list[str], legacy: int,
                name_entry, state: dict[str, Any] | None = None, may_lag: int = 0) -> TrailCheck:
    """The heads against the chain (`hashes_by_seq[k]`: the hash of entry k, already linked):
    the latest head must cover every entry (but `may_lag`, where a head is written after its
    entry, so that a crash between the two leaves one behind), the signed one a prefix of
    them, its signature valid."""
    count, state = len(hashes_by_seq), state or {}

    def broken(problem: str, signed_entries: int = 0, signer: str | None = None) -> TrailCheck:
        return TrailCheck(file, count, legacy, signed_entries, signer, f"{file}: {problem}")

    head = heads.get("head")
    if count and not isinstance(head, dict):
        return broken("the chain's head is missing (the file was cut or rewritten)")
    for label, h in (("head", head), ("signed head", heads.get("signed_head"))):
        if h is None:
            continue
        if not isinstance(h, dict) or not isinstance(h.get("entries"), int) or h.get("file") != file.name:
            return broken(f"the {label} is malformed or belongs to another file")
        covered = h["entries"]
        if covered > count:
            return broken(f"{name_entry(count)} is missing: the {label} covers {covered} entries, the file holds {count}")
        if label == "head" and covered < count - may_lag:
            return broken(f"{name_entry(covered)} is not covered by the head (added without it)")
        if covered and h.get("last") != hashes_by_seq[covered - 1]:
            return broken(f"{name_entry(covered - 1)} was changed: the {label} holds another hash for it")
        if label == "head" and any(h.get(k) != v for k, v in state.items()):
            return broken(f"the head does not match the file's {', '.join(state)}")
    signed = heads.get("signed_head")
    if signed is None:
        return TrailCheck(file, count, legacy, 0, None)
    why = signature_problem(signed)
    if why:
        return broken(f"the signed head ({signed['entries']} entries): {why}", signed["entries"], signed.get("signer"))
    return TrailCheck(file, count, legacy, signed["entries"], signed["signer"])


_signing: ContextVar[tuple[Path, TrailSigner] | None] = ContextVar("fedlora_trail_signer", default=None)


@contextmanager
def signing_trail(state_dir: str | Path, signer: TrailSigner | None) -> Iterator[None]:
    """While the block runs, trail writes in `state_dir` sign their heads with `signer`."""
    token = _signing.set((Path(state_dir).resolve(), signer) if signer is not None else None)
    try:
        yield
    finally:
        _signing.reset(token)


def trail_signer(state_dir: str | Path) -> TrailSigner | None:
    """The key lent for this state dir (None if none: the head stays unsigned)."""
    current = _signing.get()
    return current[1] if current is not None and current[0] == Path(state_dir).resolve() else None
