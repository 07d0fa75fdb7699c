"""A site's privacy ledger filled with entries as the site records them, without training."""

from __future__ import annotations

from pathlib import Path

from fedlora.privacy.site_ledger import Declined, Mechanism, open_ledger


def record(state_dir: Path, run: str, delta: float, rounds: int, accountant: str = "prv") -> None:
    with open_ledger(state_dir) as ledger:
        for r in range(1, rounds + 1):
            ledger.record(run, accountant, delta, Mechanism(r, 1.1, 0.05, 4), 20.0)
            ledger.record(run, accountant, delta, Mechanism(r, 3.0, 1.0, 3, kind="evaluation"), 20.0)
        ledger.record(run, accountant, delta, Declined(rounds + 1, 3.0, 30.0, 20.0), 20.0)
