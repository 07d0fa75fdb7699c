"""The coordinator operator's names for its registered sites (node id -> name), kept in
the coordinator's state dir: Flower takes a name at registration but does not list it.
The name is the operator's label (`register-site --name`, else the comment of the
site's public key, which `fedlora site-key --name` sets); sites never send it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

NAMES_FILE = "site-names.json"


def key_comment(public_key: Path) -> str | None:
    """The comment of an OpenSSH public key line ("ecdsa-sha2-nistp384 AAAA... site-a")."""
    fields = public_key.read_text().split()
    return " ".join(fields[2:]) if len(fields) > 2 else None


def load(coordinator_dir: Path) -> dict[int, str]:
    path = coordinator_dir / NAMES_FILE
    if not path.is_file():
        return {}
    return {int(node): name for node, name in json.loads(path.read_text()).items()}


def _save(coordinator_dir: Path, names: dict[int, str]) -> None:
    path = coordinator_dir / NAMES_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({str(n): names[n] for n in sorted(names)}, indent=1) + "\n")
    os.replace(tmp, path)  # never a half-written file


def record(coordinator_dir: Path, node_id: int, name: str) -> None:
    _save(coordinator_dir, {**load(coordinator_dir), node_id: name})


def forget(coordinator_dir: Path, node_id: int) -> None:
    names = load(coordinator_dir)
    if names.pop(node_id, None) is not None:
        _save(coordinator_dir, names)


def label(node_id: int, names: dict[int, str]) -> str:
    return f"{names[node_id]} (node {node_id})" if node_id in names else f"node {node_id}"


def problem_lines(rows: list[dict[str, Any]], names: dict[int, str]) -> list[str]:
    """One line per round in which some site did not deliver: which site, which phase, why."""
    lines = []
    for row in rows:
        problems = [f"{label(s['node'], names)} {phase}: {s[phase]}" for s in row.get("sites", [])
                    for phase in ("train", "evaluate") if s.get(phase) not in (None, "ok")]
        if problems:
            lines.append(f"round {row['round']}: " + "; ".join(problems))
    return lines
