"""`fedlora verify-dossier DIR`: re-check an export dossier (server/dossier.py) from the file
alone, trusting none of the coordinator's own checks.

- Every statement: well formed (privacy/privacy_statement.py), its signature the signer's,
  the signer among the dossier's registered keys and registered to the node the statement
  came from, and with `--trusted-keys FILE` also among keys the reader got from the sites
  themselves (OpenSSH public-key lines, as `fedlora site-key` writes them); its run and base
  model the dossier's (where the dossier names no fingerprint, every statement's the same);
  its site label the one its signer is registered under.
- Every figure that follows from the statements (sites, app hashes, largest epsilons, sites
  without DP) equals what the statements give.
- Every model file the dossier names is beside it with the recorded SHA-256, and the adapter
  weights among them are the adapter the sites' statements of the last evaluation name: a
  model no site evaluated is not the run's. A site without such a statement (it left, or the
  coordinator left its last statements out) is named: its epsilons are lower bounds.

Valid: exit 0. Invalid (a check failed, or no signed statement at all): exit 1. Bad input
(no dossier.json, not JSON, not a dossier, an unreadable --trusted-keys file): exit 2.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.privacy.node_keys import canonical_key_line, key_fingerprint
from fedlora.privacy.privacy_statement import SIGNATURE, StatementError, check_statement
from fedlora.server.dossier_figures import (ADAPTER_FILE, FORMAT, JSON_FILE, file_beside, file_sha256, model_adapter_digest,
                                            summarize)
from fedlora.server.registered_keys import RegisteredKey
from fedlora.server.statement_book import statement_problem

REQUIRED = ("format", "run", "base_model", "model_files", "final_adapter", "registered_keys", "statements", "sites",
            "app_hashes", "largest_epsilon", "no_dp_sites")
DERIVED = ("final_adapter", "sites", "app_hashes", "largest_epsilon", "no_dp_sites")


class DossierInputError(ValueError):
    """Not a dossier to check (exit 2), as one line naming the file."""


@dataclass
class DossierResult:
    valid: bool
    line: str
    problems: list[str] = field(default_factory=list)


def read_trusted_keys(path: Path) -> set[str]:
    """The keys of an OpenSSH public-key file (one per line; blank lines and # comments skipped)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DossierInputError(f"--trusted-keys {path}: not readable ({getattr(exc, 'strerror', None) or 'not text'})") from None
    keys = set()
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                keys.add(canonical_key_line(line))
            except ValueError as exc:
                raise DossierInputError(f"--trusted-keys {path}: line {number}: {exc}") from None
    if not keys:
        raise DossierInputError(f"--trusted-keys {path}: no keys")
    return keys


def load_dossier(folder: Path) -> dict[str, Any]:
    path = folder / JSON_FILE
    if not folder.is_dir():
        raise DossierInputError(f"{folder}: not a folder (give the folder that holds {JSON_FILE})")
    try:
        dossier = json.loads(path.read_text())
    except FileNotFoundError:
        raise DossierInputError(f"{path}: not found (`fedlora export` and every run write one)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DossierInputError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(dossier, dict) or dossier.get("format") != FORMAT:
        raise DossierInputError(f"{path}: not a fedlora dossier (format {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in dossier]
    if missing:
        raise DossierInputError(f"{path}: missing {', '.join(missing)}")
    return dossier


def registered_map(dossier: dict[str, Any], problems: list[str]) -> dict[str, RegisteredKey]:
    out = {}
    for entry in dossier["registered_keys"].get("keys", []):
        try:
            line = canonical_key_line(str(entry["public_key"]))
            out[line] = RegisteredKey(line, key_fingerprint(line), entry.get("node"), str(entry.get("label")))
        except (KeyError, ValueError, TypeError):
            problems.append(f"registered key {entry!r:.80}: not an OpenSSH P-384 public key")
    return out


def statement_problems(index: int, entry: dict[str, Any], dossier: dict[str, Any], registered: dict[str, RegisteredKey],
                       trusted: set[str] | None) -> list[str]:
    where = f"statement {index + 1} (round {entry.get('round')} {entry.get('message')}, node {entry.get('node')})"
    fields, signature = entry.get("fields"), entry.get("signature")
    if not isinstance(fields, dict) or not isinstance(signature, str):
        return [f"{where}: malformed ({entry.get('problem') or 'no fields or signature'})"]
    try:
        raw = base64.b64decode(signature, validate=True)
        fields = check_statement({**fields, SIGNATURE: raw})
    except (binascii.Error, ValueError) as exc:
        return [f"{where}: {exc if isinstance(exc, StatementError) else 'the signature is not base64'}"]
    node = entry.get("node") if isinstance(entry.get("node"), int) else None
    problems = []
    if (problem := statement_problem(fields, raw, registered, node)) is not None:
        problems.append(f"{where}: {problem}")
    elif entry.get("site") != (label := registered[fields["signer"]].label):
        # The coordinator writes the label, the signer says whose statement it is: a label
        # moved to another site's statements would move 'trained without DP' with it.
        problems.append(f"{where}: its signer is registered as {label!r}, not {entry.get('site')!r:.80}")
    if trusted is not None and canonical_key_line(fields["signer"]) not in trusted:
        problems.append(f"{where}: signed by {key_fingerprint(fields['signer'])}, which is not among --trusted-keys")
    if (fields["round"], fields["message"]) != (entry.get("round"), entry.get("message")):
        problems.append(f"{where}: states round {fields['round']} {fields['message']}")
    if fields["run"] != dossier["run"]:
        problems.append(f"{where}: states run {fields['run']!r:.100}, not the dossier's")
    fingerprint = dossier["base_model"].get("fingerprint")
    expected, whose = (fingerprint, "the dossier's") if fingerprint else (first_base_model(dossier), "the first statement's")
    if expected and fields["base-model"] != expected:
        problems.append(f"{where}: states base model {fields['base-model']}, not {whose} {expected}")
    return problems


def first_base_model(dossier: dict[str, Any]) -> str | None:
    """Where the dossier names no fingerprint, the base model its first well-formed statement
    states: every statement must state the same one (one run trains one base model)."""
    for entry in dossier["statements"]:
        fields = entry.get("fields") if isinstance(entry, dict) else None
        if isinstance(fields, dict) and isinstance(fields.get("base-model"), str):
            return fields["base-model"]
    return None


def model_file_problems(folder: Path, files: dict[str, str]) -> list[str]:
    problems = []
    for name, digest in files.items():
        path = file_beside(folder, name)
        if path is None:
            problems.append(f"model file {name!r}: outside the dossier's folder")
            continue
        if not path.is_file():
            problems.append(f"model file {name}: missing beside the dossier")
        elif file_sha256(path) != digest:
            problems.append(f"model file {name}: its SHA-256 is not the one the dossier records")
    return problems


def _summary(largest: dict[str, Any] | None) -> str:
    return "none" if not largest else f"{largest['epsilon']:.4g} at delta {largest['delta']:.3g} per {largest['unit']}"


def verify_dossier(folder: Path, trusted: set[str] | None = None) -> DossierResult:
    """Check the dossier in `folder` (DossierInputError if there is none to check)."""
    folder = Path(folder)
    dossier = load_dossier(folder)
    problems: list[str] = []
    registered = registered_map(dossier, problems)
    statements = dossier["statements"]
    if not isinstance(statements, list) or not all(isinstance(s, dict) for s in statements):
        raise DossierInputError(f"{folder / JSON_FILE}: 'statements' is not a list of objects")
    for index, entry in enumerate(statements):
        problems += statement_problems(index, entry, dossier, registered, trusted)
    files = dossier["model_files"] if isinstance(dossier["model_files"], dict) else {}
    problems += model_file_problems(folder, files)
    try:
        final_adapter = model_adapter_digest(folder, files)
    except (OSError, ValueError, RuntimeError) as exc:  # weights safetensors cannot read
        final_adapter = None
        problems.append(f"model file {ADAPTER_FILE}: not readable adapter weights ({str(exc)[:80]})")
    try:
        derived = summarize(statements, final_adapter)
    except (KeyError, TypeError, ValueError):
        derived = None
        problems.append("the statements' figures cannot be summarized (malformed statements)")
    if derived is not None:
        for key in DERIVED:
            if dossier[key] != derived[key]:
                problems.append(f"{key}: the dossier says {json.dumps(dossier[key])[:160]}, its statements give "
                                f"{json.dumps(derived[key])[:160]}")
    if not statements:
        problems.append("the dossier holds no signed privacy statement")
    elif derived is not None and final_adapter is not None and not any(s["evaluated_final_adapter"] for s in derived["sites"]):
        problems.append(f"no statement names the model's adapter ({final_adapter[:19]}...): no site evaluated this model")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return DossierResult(False, f"invalid: {problems[0]}{more}", problems)
    sites = len({s["fields"]["signer"] for s in statements})
    unstated = len(dossier.get("unstated") or [])
    largest = derived["largest_epsilon"] if derived else {}
    partial = [str(s["site"]) for s in derived["sites"] if not s["evaluated_final_adapter"]] if derived else []
    line = (f"valid: {len(statements)} signed statements from {sites} site(s) verify"
            f"{' against --trusted-keys' if trusted is not None else ' against the registered keys'}; "
            f"largest epsilon this run {_summary(largest.get('run'))}, over every run {_summary(largest.get('total'))}"
            + ("; no adapter weights beside the dossier: the model files are bound by the coordinator's hashes alone"
               if final_adapter is None else
               f"; the model is the adapter {len(derived['sites']) - len(partial)} site(s) evaluated last"
               + (f" (no statement on it from {', '.join(partial)}: their epsilons are lower bounds)" if partial else ""))
            + (f"; trained without DP: {', '.join(derived['no_dp_sites'])}" if derived and derived["no_dp_sites"] else "")
            + (f"; {unstated} usable replies came without a statement" if unstated else ""))
    return DossierResult(True, line)
