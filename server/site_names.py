"""The coordinator operator's names for its registered sites (node id -> name), kept in
the coordinator's state dir: Flower takes a name at registration but does not list it.
The name is the operator's label (`register-site --name`, else the comment of the
site's public key, which `fedlora site-key --name` sets); sites never send it.

A run keeps the names of its sites in RUN_DIR/site-names.json (node id -> what reports
and console lines call it), so that `fedlora report` names them without the coordinator's
state dir, and the coordinator's log lines call them the same (SiteNamer):
"north-clinic (node 13)" in a deployment, "site 2" in a simulation, whose
virtual sites are known by their partition (RUN_DIR/sites/2/, where the simulation notes
each one's node id, simulations/virtual_node_ids.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlora.atomic_file import write_atomic

NAMES_FILE = "site-names.json"
RUN_NAMES_FILE = "site-names.json"  # in the run directory: node id -> display label
VIRTUAL_NODE_FILE = "node-id"  # RUN_DIR/sites/<partition-id>/node-id: the virtual site's Flower node id


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
    write_atomic(path, json.dumps({str(n): names[n] for n in sorted(names)}, indent=1) + "\n")


def record(coordinator_dir: Path, node_id: int, name: str) -> None:
    _save(coordinator_dir, {**load(coordinator_dir), node_id: name})


def forget(coordinator_dir: Path, node_id: int) -> None:
    names = load(coordinator_dir)
    if names.pop(node_id, None) is not None:
        _save(coordinator_dir, names)


def label(node_id: int, names: dict[int, str]) -> str:
    return f"{names[node_id]} (node {node_id})" if node_id in names else f"node {node_id}"


def virtual_sites(run_dir: Path) -> dict[int, str]:
    """A simulation's virtual sites, node id -> "site <partition-id>" ({} in a deployment)."""
    out = {}
    for path in sorted((run_dir / "sites").glob(f"*/{VIRTUAL_NODE_FILE}")):
        try:
            out[int(path.read_text().strip())] = f"site {int(path.parent.name)}"
        except ValueError:
            continue  # half-written or not a partition's folder: that site keeps its node id
    return out


def run_labels(run_dir: Path, coordinator_dir: Path | None = None) -> dict[int, str]:
    """Node id -> what this run's reports call the site: the run's own record, the
    simulation's partitions, and the operator's names from `coordinator_dir` if given."""
    path = run_dir / RUN_NAMES_FILE
    labels = {int(n): str(v) for n, v in json.loads(path.read_text()).items()} if path.is_file() else {}
    labels.update(virtual_sites(run_dir))
    if coordinator_dir is not None:
        labels.update({node: label(node, {node: name}) for node, name in load(coordinator_dir).items()})
    return labels


def record_run_labels(run_dir: Path, coordinator_dir: Path | None, nodes: list[int]) -> dict[int, str]:
    """RUN_DIR/site-names.json for the run's sites `nodes`; returns node id -> label."""
    path = run_dir / RUN_NAMES_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    labels = run_labels(run_dir, coordinator_dir)
    kept = {n: labels[n] for n in sorted(set(nodes) | {int(n) for n in recorded}) if n in labels}
    if kept:
        write_atomic(run_dir / RUN_NAMES_FILE, json.dumps({str(n): kept[n] for n in kept}, indent=1) + "\n")
    return labels


def called(node_id: int, labels: dict[int, str]) -> str:
    """The site as reports, console and log lines name it (its node id if it has no name)."""
    return labels.get(node_id, f"node {node_id}")


class SiteNamer:
    """What the coordinator's log lines call a site during a run: `called`, with this run's
    labels (run_labels). A node without a label yet has them read again, since a virtual
    site notes its node id only when it first handles a message, and an operator may name
    a site while a run is under way. Without a run directory: node ids."""

    def __init__(self, run_dir: Path | None = None, coordinator_dir: Path | None = None):
        self.run_dir, self.coordinator_dir = run_dir, coordinator_dir
        self._labels: dict[int, str] = {}

    def __call__(self, node_id: int) -> str:
        if node_id not in self._labels and self.run_dir is not None:
            try:
                self._labels = run_labels(self.run_dir, self.coordinator_dir)
            except (OSError, ValueError):  # a names file being replaced or hand-edited: a log line never fails
                pass
        return called(node_id, self._labels)


def problem_lines(rows: list[dict[str, Any]], names: dict[int, str]) -> list[str]:
    """One line per round in which some site did not deliver: which site, which phase, why.
    `names`: the operator's names (node id -> name)."""
    return problem_lines_by_label(rows, {node: label(node, names) for node in names})


def problem_lines_by_label(rows: list[dict[str, Any]], labels: dict[int, str]) -> list[str]:
    """problem_lines with display labels (run_labels)."""
    lines = []
    for row in rows:
        problems = [f"{called(s['node'], labels)} {phase}: {s[phase]}" for s in row.get("sites", [])
                    for phase in ("train", "evaluate") if s.get(phase) not in (None, "ok")]
        if problems:
            lines.append(f"round {row['round']}: " + "; ".join(problems))
    return lines
