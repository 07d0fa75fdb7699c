"""Epsilon from a mechanism history, and noise calibrated to a planned budget.

State is plain data: a history is a list of ``(noise_multiplier, sample_rate, steps)``
exactly as Opacus's accountants keep it; the math is Opacus's own accountants.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

# Opacus's PRV calibration brackets its search with RDP, which warns when the bracket's
# order is at the edge; the PRV result is unaffected.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)

History = list[tuple[float, float, int]]

ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}


def compressed(history: History) -> History:
    """Entries with the same (noise_multiplier, sample_rate) merged, steps summed: the
    same composition (it is commutative), but PRV's cost grows with the entry count
    (about 0.1 s each), and a ledger repeats one mechanism round after round."""
    steps: dict[tuple[float, float], int] = {}
    for s, q, n in history:
        key = (float(s), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return [(s, q, n) for (s, q), n in steps.items()]


def epsilon_of(history: History, delta: float, accountant: str = "prv") -> float:
    """Cumulative epsilon of all mechanisms in `history` at `delta` (0.0 if empty)."""
    if not history:
        return 0.0
    return _epsilon(tuple(sorted(compressed(history))), float(delta), accountant)


@lru_cache(maxsize=4096)  # sites with the same data size repeat the same histories, round after round
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    acc = ACCOUNTANTS[accountant]()
    acc.history = list(history)
    with np.errstate(divide="ignore"):  # PRV evaluates log(0) at the domain's edge for large q
        return float(acc.get_epsilon(delta=delta))


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate q = B / N (capped at 1)."""
    return min(1.0, batch_size / max(1, num_examples))


@lru_cache(maxsize=256)  # the search takes about a second; sites repeat it every round
def calibrate_noise(target_epsilon: float, delta: float, rate: float, total_steps: int, accountant: str = "prv") -> float:
    """The noise multiplier that spends exactly `target_epsilon` over `total_steps` steps."""
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=rate,
            steps=total_steps,
            accountant=accountant,
            epsilon_tolerance=0.01,
        )
    )

