"""The node keys a coordinator accepts as its sites': what a privacy statement's signer is
checked against (server/statement_book.py), kept in the run directory as
`RUN_DIR/site-keys.json` so that the dossier (server/dossier.py) carries them.

- A deployed coordinator (`fedlora coordinator`): the keys its SuperLink registered
  (`fedlora register-site`), read from the SuperLink's database in the coordinator's state
  dir, which is the ServerApp's working directory (fedlora/flower_internals.py:
  registered_node_keys). Each key belongs to one node id: a statement must come from the
  node its signer is registered to.
- A simulation: the virtual sites' derived keys (privacy/node_keys.py), one per partition,
  named "site N"; the node of each is the one the virtual site noted
  (RUN_DIR/sites/N/node-id), where it did.

A ServerApp started elsewhere (a SuperLink that is not a `fedlora coordinator`) finds no
registry and checks statements against the simulation's keys: a real site's statements then
fail as signed by an unregistered key, which is what they are, as far as it can tell.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.atomic_file import write_atomic
from fedlora.config import Config
from fedlora.privacy.node_keys import key_fingerprint, public_key_line, virtual_node_key
from fedlora.server import site_names

SITE_KEYS_FILE = "site-keys.json"
SUPERLINK_DATABASE = "superlink.db"  # in the coordinator's state dir (server/coordinator_service.py)
REGISTRY = "coordinator registry"
SIMULATION = "simulation (derived virtual-site keys)"


@dataclass(frozen=True)
class RegisteredKey:
    public_key: str  # OpenSSH line, no comment
    fingerprint: str  # SHA256:..., as ssh-keygen -l prints it
    node: int | None  # the node id it is registered to (None: a virtual site that has not noted its id)
    label: str  # what the report calls the site


class KeyRegistry:
    """The keys a run's statements are checked against, recorded in the run directory as
    they are read (a key unregistered during the run stays recorded with its node)."""

    def __init__(self, config: Config, run_dir: Path, coordinator_dir: Path | None = None):
        self.config, self.run_dir = config, run_dir
        self.coordinator_dir = coordinator_dir if coordinator_dir is not None else _deployed_coordinator_dir()
        self.source = REGISTRY if self.coordinator_dir is not None else SIMULATION
        self.known: dict[str, RegisteredKey] = {}

    def current(self) -> dict[str, RegisteredKey]:
        """Every key registered now (public-key line -> entry), merged into those recorded."""
        found = self._registry() if self.source == REGISTRY else self._virtual()
        changed = {line: key for line, key in found.items() if self.known.get(line) != key}
        if changed or not (self.run_dir / SITE_KEYS_FILE).is_file():
            self.known.update(changed)
            write_site_keys(self.run_dir, self.source, list(self.known.values()))
        return self.known

    def _registry(self) -> dict[str, RegisteredKey]:
        from fedlora.flower_internals import registered_node_keys

        assert self.coordinator_dir is not None
        names = site_names.load(self.coordinator_dir)
        out = {}
        for node, pem in registered_node_keys(self.coordinator_dir / SUPERLINK_DATABASE).items():
            public = serialization.load_pem_public_key(pem)
            if not isinstance(public, ec.EllipticCurvePublicKey):
                continue  # Flower registers EC keys only; anything else signs no statement of ours
            line = public_key_line(public)
            out[line] = RegisteredKey(line, key_fingerprint(line), node, site_names.label(node, names))
        return out

    def _virtual(self) -> dict[str, RegisteredKey]:
        out = {}
        for partition in range(self.config.simulation.clients):
            line = public_key_line(virtual_node_key(self.config.run.seed, partition).public_key())
            noted = self.run_dir / "sites" / str(partition) / site_names.VIRTUAL_NODE_FILE
            node = int(noted.read_text()) if noted.is_file() else None
            out[line] = RegisteredKey(line, key_fingerprint(line), node, f"site {partition}")
        return out


def _deployed_coordinator_dir() -> Path | None:
    """The coordinator's state dir, if this ServerApp runs in one (`fedlora coordinator`
    starts its SuperLink there)."""
    return Path.cwd() if (Path.cwd() / SUPERLINK_DATABASE).is_file() else None


def write_site_keys(run_dir: Path, source: str, keys: list[RegisteredKey]) -> None:
    payload = {"source": source, "keys": [asdict(k) for k in sorted(keys, key=lambda k: k.label)]}
    write_atomic(run_dir / SITE_KEYS_FILE, json.dumps(payload, indent=1) + "\n")


def read_site_keys(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/site-keys.json ({"source": ..., "keys": []} if the run recorded none)."""
    path = run_dir / SITE_KEYS_FILE
    return json.loads(path.read_text()) if path.is_file() else {"source": "none recorded", "keys": []}
