"""A site's signed privacy statement: what one reply spent, signed with the site's node key.

After every train or evaluate reply that it answers (not a decline or a refusal), a site
with a node key signs a statement of fixed fields and sends it beside the reply as the
ConfigRecord "statement" (client/site_statement.py). Every field is the run's
configuration, the site's code or model identity, or an epsilon figure the reply's
metrics already carry (public to the accounting); none is a value of the site's data:

  format              "fedlora-privacy-statement/2"
  run                 the run (the coordinator's run directory, as the site's ledger names it)
  round               the round the reply answers (0: the initial evaluation)
  message             "train" or "evaluate"
  base-model          the fingerprint of the base model the site used (fedlora/base_fingerprint.py)
  app-hash            the app hash the site checked before running (fedlora/app_hash.py); "" if
                      it ran unpinned code (a simulation, `flwr run`, a bare ClientApp)
  adapter             the digest of the global adapter the request carried, as the site loaded it
                      (fedlora/adapter_digest.py): the coordinator's own tensors. The
                      last round's evaluation names the final model, which binds the model files
                      of a dossier to the sites' statements
  run-epsilon         what this run has spent at the site so far, at run-delta
  run-delta           the run's delta
  total-epsilon       what the site has spent over every run in its ledger, at total-delta
  total-delta         the smallest delta of the site's ledger (privacy/site_ledger.py: guard_delta)
  unit                the privacy unit, "example" or "user"
  mechanism           this reply's mechanism: "gaussian" (DP-SGD, or noisy evaluation sums),
                      "skellam" (distributed DP), "none" (no DP: the site's allow-no-dp)
  accountant          "prv" or "rdp"
  secure-aggregation  whether the reply was a masked input to secure aggregation
  dp-mode             "local", "distributed" or "off"
  signer              the site's public node key, an OpenSSH line ("ecdsa-sha2-nistp384 AAAA...")

plus "signature": ECDSA P-384 / SHA-384 by the signer over `statement_bytes(fields)`.
Under dp-mode "off" the epsilons are what the ledger accounted, and the round itself is
bounded by none of them: the dossier says so.

The same check (`check_statement`) guards the site's reply (client/reply_guard.py) and
reads it at the coordinator (server/statement_book.py) and in `fedlora verify-dossier`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.privacy.node_keys import KEY_TYPE, load_public_key_line, public_key_line

RECORD = "statement"  # the ConfigRecord of a train or evaluate reply
FORMAT = "fedlora-privacy-statement/2"
SIGNATURE = "signature"
MESSAGES = ("train", "evaluate")
UNITS = ("example", "user")
MECHANISMS = ("gaussian", "skellam", "none")
ACCOUNTANTS = ("prv", "rdp")
DP_MODES = ("local", "distributed", "off")
MAX_RUN_LENGTH = 4096

_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_KEY_LINE = re.compile(KEY_TYPE + r" [A-Za-z0-9+/]+={0,2}")

# field -> its type; the record holds exactly these and the signature.
FIELDS: dict[str, type] = {
    "format": str, "run": str, "round": int, "message": str, "base-model": str, "app-hash": str, "adapter": str,
    "run-epsilon": float, "run-delta": float, "total-epsilon": float, "total-delta": float,
    "unit": str, "mechanism": str, "accountant": str, "secure-aggregation": bool, "dp-mode": str, "signer": str,
}
RECORD_KEYS = (*FIELDS, SIGNATURE)

# Fields whose value is one of a fixed set (a string the site could fill with anything is no field).
CHOICES: dict[str, tuple[str, ...]] = {
    "format": (FORMAT,), "message": MESSAGES, "unit": UNITS, "mechanism": MECHANISMS, "accountant": ACCOUNTANTS,
    "dp-mode": DP_MODES,
}


class StatementError(ValueError):
    """A statement that is not one: a missing, extra or ill-typed field, as one line naming it."""


def check_statement(values: Mapping[str, Any]) -> dict[str, Any]:
    """The statement's fields (without the signature), checked: exactly the fixed keys, each of
    its type, strings from their fixed sets or forms, epsilons finite and >= 0, deltas in [0, 1)."""
    keys = set(values)
    if keys != set(RECORD_KEYS):
        extra, missing = sorted(keys - set(RECORD_KEYS)), sorted(set(RECORD_KEYS) - keys)
        raise StatementError(f"statement keys: {'extra ' + ', '.join(map(str, extra)) if extra else ''}"
                             f"{'; ' if extra and missing else ''}{'missing ' + ', '.join(missing) if missing else ''}")
    if not isinstance(values[SIGNATURE], bytes):
        raise StatementError("statement field 'signature' is not bytes")
    fields = {k: values[k] for k in FIELDS}
    for key, kind in FIELDS.items():
        value = fields[key]
        # bool is an int in Python: a flag is no round, and a round no flag.
        if type(value) is not kind:
            raise StatementError(f"statement field {key!r} is not {kind.__name__}")
    for key, allowed in CHOICES.items():
        if fields[key] not in allowed:
            raise StatementError(f"statement field {key!r} is not one of {', '.join(allowed)}")
    if not _HASH.fullmatch(fields["base-model"]):
        raise StatementError("statement field 'base-model' is not a sha256: fingerprint")
    if not _HASH.fullmatch(fields["adapter"]):
        raise StatementError("statement field 'adapter' is not a sha256: adapter digest")
    if fields["app-hash"] and not _HASH.fullmatch(fields["app-hash"]):
        raise StatementError("statement field 'app-hash' is neither empty nor a sha256: app hash")
    if not _KEY_LINE.fullmatch(fields["signer"]):
        raise StatementError(f"statement field 'signer' is not an OpenSSH {KEY_TYPE} public key")
    if len(fields["run"]) > MAX_RUN_LENGTH:
        raise StatementError(f"statement field 'run' is longer than {MAX_RUN_LENGTH} characters")
    if fields["round"] < 0:
        raise StatementError("statement field 'round' is negative")
    for key in ("run-epsilon", "total-epsilon"):
        if not (math.isfinite(fields[key]) and fields[key] >= 0):
            raise StatementError(f"statement field {key!r} is not a finite number >= 0")
    for key in ("run-delta", "total-delta"):
        if not 0 <= fields[key] < 1:
            raise StatementError(f"statement field {key!r} is not in [0, 1)")
    return fields


def statement_bytes(fields: Mapping[str, Any]) -> bytes:
    """What the signature covers: a fixed prefix and the fields as canonical JSON (sorted keys,
    no spaces; floats as Python writes them, which read back to the same float)."""
    body = json.dumps({k: fields[k] for k in FIELDS}, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return b"fedlora privacy statement/2\n" + body.encode()


def sign_statement(fields: Mapping[str, Any], node_key: ec.EllipticCurvePrivateKey) -> dict[str, Any]:
    """The record's values: `fields` (all but the signer) with the signer and signature added."""
    signed = {**fields, "format": FORMAT, "signer": public_key_line(node_key.public_key())}
    signed[SIGNATURE] = node_key.sign(statement_bytes(signed), ec.ECDSA(hashes.SHA384()))
    check_statement(signed)  # the site never signs what the coordinator would not read
    return signed


def signature_valid(fields: Mapping[str, Any], signature: bytes) -> bool:
    """Whether `signature` is the signer's over these fields."""
    try:
        load_public_key_line(fields["signer"]).verify(signature, statement_bytes(fields), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        return False
    return True
