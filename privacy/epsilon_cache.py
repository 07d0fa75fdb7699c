"""Epsilons a site's ledger report needs, kept beside the ledger (`ledger-epsilons.json`)
so that `fedlora privacy` answers without importing the accountant (Opacus, torch:
seconds on a site's node).

Each value is keyed by exactly what it is a function of: the mechanisms' history, the
delta and the accountant. A key that changed (a new run with a smaller delta, another
accountant) is simply a miss and is computed, so a stored value is never used for
inputs it was not computed for. The ledger warms the figures for each entry it
records; `fedlora privacy --recompute` ignores the file. The budget guard never reads
it: only the report does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.atomic_file import write_atomic

if TYPE_CHECKING:
    from fedlora.privacy.accounting import History

CACHE_FILE = "ledger-epsilons.json"
log = logging.getLogger("fedlora.privacy")


def epsilon_key(history: History, delta: float, accountant: str) -> str:
    entries = [[float(z), float(q), int(s), *map(float, sensitivity)] for z, q, s, *sensitivity in history]
    exact = json.dumps([entries, repr(float(delta)), accountant])
    return hashlib.sha256(exact.encode()).hexdigest()


class EpsilonCache:
    """`epsilon(history, delta, accountant)` from the file, or computed and kept; `save()`
    writes what was added. `use_file=False` computes every value (and keeps nothing)."""

    def __init__(self, state_dir: str | Path, use_file: bool = True):
        self.path = Path(state_dir) / CACHE_FILE
        self.use_file = use_file
        self.values: dict[str, float] = {}
        self.added = False
        if use_file and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text())
                self.values = {k: float(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
            except (OSError, ValueError, TypeError):
                self.values = {}  # a cache: recomputed

    def epsilon(self, history: History, delta: float, accountant: str) -> float:
        key = epsilon_key(history, delta, accountant)
        if key not in self.values:
            from fedlora.privacy.accounting import epsilon_of

            self.values[key] = epsilon_of(list(history), delta, accountant)
            self.added = True
        return self.values[key]

    def save(self) -> None:
        """Atomic replace; a state dir the reader may not write to keeps the old file."""
        if not (self.use_file and self.added):
            return
        try:
            write_atomic(self.path, json.dumps(self.values, indent=0))
        except OSError as exc:
            log.warning("could not keep the report's epsilons in %s: %s", self.path, exc)
