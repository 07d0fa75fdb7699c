"""The coordinator keeps every privacy statement the sites send (privacy/privacy_statement.py)
in `RUN_DIR/statements.jsonl`, one JSON object per statement, appended and fsync'd as each
round's replies arrive:

  {"round": R, "message": "train" | "evaluate", "node": NODE_ID, "site": LABEL,
   "received": ISO time, "fields": {...the signed fields...}, "signature": BASE64,
   "verified": true | false, "problem": null | "why not"}

`verified` is the coordinator's own check at arrival: the fields are well formed, the
signature is the signer's, and the signer is a registered key (server/registered_keys.py)
registered to the node the reply came from. A statement that fails is kept all the same,
with its problem: the dossier shows it and `fedlora verify-dossier` fails on it, which is
what a reader must learn. It changes nothing in the round: the update is screened as any
other (the statement is evidence about the site, not a part of the model).

A reply without a statement (a site without a node key) is not recorded here; the dossier
lists the rounds a site answered without one (server/dossier.py).
"""

from __future__ import annotations

import base64
import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.privacy.privacy_statement import RECORD, SIGNATURE, StatementError, check_statement, signature_valid
from fedlora.server.registered_keys import KeyRegistry, RegisteredKey

if TYPE_CHECKING:  # verify-dossier reads statements without loading Flower
    from flwr.app import Message

STATEMENTS_FILE = "statements.jsonl"
log = logging.getLogger("fedlora.server")


def statement_problem(fields: dict[str, Any], signature: bytes, registered: dict[str, RegisteredKey],
                      node: int | None) -> str | None:
    """Why a well-formed statement does not verify (None if it does): a signature that is not
    the signer's, a signer no one registered, or one registered to another node."""
    if not signature_valid(fields, signature):
        return "the signature is not the signer's over these fields"
    key = registered.get(fields["signer"])
    if key is None:
        return "signed by a key that is not registered"
    if key.node is not None and node is not None and key.node != node:
        return f"signed by the key registered to node {key.node}, sent by node {node}"
    return None


class StatementBook:
    def __init__(self, run_dir: Path, registry: KeyRegistry):
        self.path = run_dir / STATEMENTS_FILE
        self.registry = registry

    def take(self, replies: list[Message], server_round: int, message: str) -> int:
        """Record the statements among a round's usable `message` replies; returns how many
        did not verify (each named in the coordinator's log)."""
        lines, failed = [], 0
        registered: dict[str, RegisteredKey] | None = None
        for reply in replies:
            if RECORD not in reply.content.config_records:
                continue
            registered = registered if registered is not None else self.registry.current()
            entry = self.entry(reply, server_round, message, registered)
            if not entry["verified"]:
                failed += 1
                log.warning("round %d %s: node %d's privacy statement does not verify: %s", server_round, message,
                            entry["node"], entry["problem"])
            lines.append(json.dumps(entry) + "\n")
        if lines:
            with self.path.open("a") as fh:
                fh.write("".join(lines))
                fh.flush()
                os.fsync(fh.fileno())
        return failed

    def entry(self, reply: Message, server_round: int, message: str, registered: dict[str, RegisteredKey]) -> dict[str, Any]:
        node = int(reply.metadata.src_node_id)
        raw = dict(reply.content.config_records[RECORD])
        entry: dict[str, Any] = {"round": server_round, "message": message, "node": node,
                                 "received": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            fields = check_statement(raw)
        except StatementError as exc:
            # Kept as what it is: nothing of a malformed record is copied but its keys.
            return {**entry, "site": None, "fields": None, "signature": None, "verified": False,
                    "problem": f"malformed: {str(exc)[:200]}"}
        problem = statement_problem(fields, raw[SIGNATURE], registered, node)
        if problem is None and (fields["round"], fields["message"]) != (server_round, message):
            problem = f"states round {fields['round']} {fields['message']}, sent as round {server_round} {message}"
        key = registered.get(fields["signer"])
        return {**entry, "site": key.label if key else None, "fields": fields,
                "signature": base64.b64encode(raw[SIGNATURE]).decode(), "verified": problem is None, "problem": problem}


def read_statements(run_dir: Path) -> list[dict[str, Any]]:
    """RUN_DIR/statements.jsonl's entries ([] if the run recorded none); a torn last line
    (a coordinator killed while appending) is skipped; ValueError for any other."""
    path = run_dir / STATEMENTS_FILE
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except ValueError:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not JSON") from None
    return out
