"""Epsilon from a mechanism history, and noise calibrated to a planned budget.

State is plain data: a history is a list of ``(noise_multiplier, sample_rate, steps)``
exactly as Opacus's accountants keep it; the math is Opacus's own accountants. A history
that holds distributed DP's Skellam steps, ``(noise_multiplier, sample_rate, steps, l2,
l1)``, is composed in RDP instead (privacy/skellam.py), whatever the accountant named:
PRV has no Skellam mechanism, and RDP only ever states a larger epsilon than PRV would.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

# Opacus bounds the PRV accountant's domain with RDP, which warns when the best order
# is at either end of its range; the PRV result is unaffected (the domain stays safe).
# Under the RDP accountant the same warning means the stated epsilon is looser than it
# could be, never smaller than the truth: nothing for a site to act on either.
warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha", category=UserWarning)

History = list[tuple]  # (sigma, q, steps), or (sigma, q, steps, l2, l1) for a Skellam step

ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}

# PRV's discretized domain grows with the steps it composes (about 2 GB at 20,000 steps of
# sigma 1, q 0.05; a coordinator asking for 100,000 local steps made a site try to allocate
# 24 GB). Past this many steps a history is composed in RDP, which only ever states a
# larger epsilon than PRV: the site stays safe and bounded in memory.
PRV_MAX_STEPS = 4000

# Opacus computes the RDP of one sampled-Gaussian step, (q, sigma, order) -> float, in pure
# Python (a few ms each), for every order and every history entry on every epsilon query:
# PRV's domain bound goes through it too. That value depends on its arguments only and a
# site repeats the same (q, sigma) round after round, so it is memoised, which makes a
# query about 3x faster (python -m fedlora.simulations.bench_accounting) with identical results.
# The memo stands in for Opacus's function only while fedlora's own accountant runs
# (`_memoised_rdp`): anyone else's use of Opacus in the process sees Opacus unchanged.
_opacus_one_step_rdp = opacus_rdp._compute_rdp
_memoised_one_step_rdp = lru_cache(maxsize=1 << 16)(_opacus_one_step_rdp)
_memo = {"enabled": True, "depth": 0}
_memo_lock = threading.Lock()


def set_rdp_memo(enabled: bool) -> None:
    """Use the memo (the default) or Opacus's own function (for the benchmark)."""
    _memo["enabled"] = enabled


@contextmanager
def _memoised_rdp() -> Iterator[None]:
    """Opacus's one-step RDP memoised for the calls inside (nested or from several threads:
    the first in puts the memo in place, the last out puts Opacus's function back)."""
    if not _memo["enabled"]:
        yield
        return
    with _memo_lock:
        if _memo["depth"] == 0:
            opacus_rdp._compute_rdp = _memoised_one_step_rdp
        _memo["depth"] += 1
    try:
        yield
    finally:
        with _memo_lock:
            _memo["depth"] -= 1
            if _memo["depth"] == 0:
                opacus_rdp._compute_rdp = _opacus_one_step_rdp


def clear_caches() -> None:
    """Forget every memoised epsilon, calibration and RDP term (benchmarks start cold)."""
    _memoised_one_step_rdp.cache_clear()
    _epsilon.cache_clear()
    _calibrate.cache_clear()


def compressed(history: History) -> History:
    """Entries with the same (noise_multiplier, sample_rate) merged, steps summed: the
    same composition (it is commutative), but PRV's cost grows with the entry count
    (about 0.1 s each), and a ledger repeats one mechanism round after round."""
    steps: dict[tuple, int] = {}
    for s, q, n, *sensitivity in history:
        key = (float(s), float(q), *map(float, sensitivity))
        steps[key] = steps.get(key, 0) + int(n)
    return [(s, q, n, *sensitivity) for (s, q, *sensitivity), n in steps.items()]


def epsilon_of(history: History, delta: float, accountant: str = "prv") -> float:
    """Cumulative epsilon of all mechanisms in `history` at `delta` (0.0 if empty)."""
    if not history:
        return 0.0
    return _epsilon(tuple(sorted(compressed(history))), float(delta), accountant)


@lru_cache(maxsize=4096)  # sites with the same data size repeat the same histories, round after round
def _epsilon(history: tuple[tuple, ...], delta: float, accountant: str) -> float:
    with _memoised_rdp():
        if any(len(entry) == 5 for entry in history):
            from fedlora.privacy.skellam import epsilon_of_rdp_history

            return epsilon_of_rdp_history(list(history), delta)
        if accountant == "prv" and sum(int(entry[2]) for entry in history) > PRV_MAX_STEPS:
            accountant = "rdp"
        acc = ACCOUNTANTS[accountant]()
        acc.history = list(history)
        with np.errstate(divide="ignore"):  # PRV evaluates log(0) at the domain's edge for large q
            return float(acc.get_epsilon(delta=delta))


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate q = B / N (capped at 1)."""
    return min(1.0, batch_size / max(1, num_examples))


def calibrate_noise(
    target_epsilon: float, delta: float, rate: float, total_steps: int, accountant: str = "prv", fixed: History = (),
    sensitivities: tuple[float, float] | None = None,
) -> float:
    """The noise multiplier sigma at which `total_steps` steps at sampling rate `rate`,
    composed with the mechanisms already in `fixed` (spent, or planned at their own
    noise), spend `target_epsilon` (within 0.01, never above). Raises ValueError if
    `fixed` alone already spends the target. With `sensitivities` (l2, l1) the steps are
    Skellam releases of distributed DP (privacy/skellam.py), else Gaussian."""
    return _calibrate(float(target_epsilon), float(delta), float(rate), int(total_steps), accountant,
                      tuple(sorted(compressed(list(fixed)))), tuple(map(float, sensitivities or ())))


@lru_cache(maxsize=256)  # the search takes seconds; sites repeat it every round
def _calibrate(target: float, delta: float, rate: float, steps: int, accountant: str,
               fixed: tuple[tuple, ...], sensitivities: tuple[float, ...] = ()) -> float:
    def spent(sigma: float) -> float:
        return epsilon_of([*fixed, (sigma, rate, steps, *sensitivities)], delta, accountant)

    if steps <= 0 or not rate > 0:
        # Epsilon would not depend on sigma: the bracket below would halve sigma forever
        # (a round past the run's plan asked exactly this, holding the ledger lock).
        raise ValueError(f"nothing to calibrate: {steps} steps at sampling rate {rate}")
    floor = epsilon_of(list(fixed), delta, accountant)
    if floor >= target:
        raise ValueError(f"the mechanisms already counted spend epsilon {floor:.3f} >= the target {target:.3f}")
    # Bracket sigma (epsilon falls as sigma grows), then regula falsi with the Illinois rule on
    # log(epsilon) against log(sigma), nearly a line there, aimed at the middle of the accepted
    # band [target - 0.01, target]: each PRV evaluation costs up to a second, and this needs
    # 2-4 after the bracket where regula falsi on epsilon itself needed 5-6 (ten site plans,
    # 2026-12-04). The Illinois halving weighs the interpolation only: the bounds keep their
    # true epsilons, so the band is checked on what `high` really spends.
    low, high = 0.5, 2.0
    eps_low, eps_high = spent(low), spent(high)
    while eps_low < target:
        if low < 1e-12:
            raise ValueError(f"no noise multiplier spends epsilon {target:.3f}: even sigma {low:g} spends less")
        low, high, eps_high = low / 4, low, eps_low
        eps_low = spent(low)
    while eps_high > target:
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target:.3f} (the fixed mechanisms spend {floor:.3f})")
        low, eps_low, high = high, eps_high, high * 4
        eps_high = spent(high)

    def above_aim(eps: float) -> float:
        return math.log(max(eps, 1e-300)) - math.log(target - 0.005)

    f_low, f_high = above_aim(eps_low), above_aim(eps_high)  # f_low > 0 > f_high
    side = 0
    for _ in range(60):
        if target - eps_high <= 0.01:
            break
        a, b = math.log(low), math.log(high)
        mid = math.exp(b - f_high * (b - a) / (f_high - f_low))
        if not low < mid < high:
            mid = math.sqrt(low * high)
        eps_mid = spent(mid)
        if eps_mid > target:
            low, eps_low, f_low = mid, eps_mid, above_aim(eps_mid)
            if side == -1:
                f_high /= 2  # Illinois: the end that stays put weighs less, so it is not stuck
            side = -1
        else:
            high, eps_high, f_high = mid, eps_mid, above_aim(eps_mid)
            if side == 1:
                f_low /= 2
            side = 1
    return high
