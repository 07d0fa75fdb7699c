"""The Skellam mechanism of distributed DP, and its privacy accounting.

Under `privacy.mode = "distributed"` every site adds a share of integer noise to its
quantized sum of clipped per-record gradients; secure aggregation sums the shares.
Skellam noise, Sk(lam) = Poisson(lam) - Poisson(lam) (variance 2 * lam), is closed under
summation, so the shares of the honest sites add up to Sk(sum of their lam), and it is
integer, so the guarantee holds for the quantized values that are actually released
(Agarwal, Kairouz and Liu, "The Skellam Mechanism for Differentially Private Federated
Learning", NeurIPS 2021, arXiv 2110.04995).

Accounting, in Renyi DP at the integer orders `ORDERS`:

1. One release of Sk(lam) per coordinate, for a change of one record moving the integer
   sum by a vector k with ||k||_2 <= l2 and ||k||_1 <= l1:

       eps(alpha) <= alpha l2^2 / (4 lam) + min(((2 alpha - 1) l2^2 + 6 l1) / (16 lam^2), 3 l1 / (4 lam))

   Per coordinate this is the one-dimensional bound of Agarwal et al. with variance 2 lam;
   Renyi divergences of independent coordinates add, and a sum of minima is at most the
   minimum of the sums. tests/test_distributed_dp.py checks the one-dimensional bound against
   exact divergences computed from scipy's Skellam pmf. The first term is the Gaussian
   mechanism's at the same variance; the rest vanishes as lam grows.
2. Poisson subsampling at rate q: the general upper bound of Zhu and Wang, "Poisson
   Subsampled Renyi Differential Privacy", ICML 2019, Theorem 6, which holds for any
   mechanism given its RDP at every integer order (tested to upper-bound Opacus's exact
   subsampled-Gaussian RDP, as it must).
3. Composition adds RDP; Gaussian entries of the same ledger (local DP rounds,
   evaluations) enter through Opacus's subsampled-Gaussian RDP at the same orders, and
   the total converts to (epsilon, delta) with Opacus's conversion.

A history entry of this mechanism is (noise_multiplier, sample_rate, steps, l2, l1), with
lam = (noise_multiplier * l2)^2 / 2: the noise multiplier is that of a Gaussian of the
same variance, in units of the L2 sensitivity.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

ORDERS = tuple(range(2, 257))


def skellam_lambda(noise_multiplier: float, l2: float) -> float:
    """The Poisson parameter lam of Sk(lam) whose variance 2 lam is (noise_multiplier * l2)^2."""
    return (noise_multiplier * l2) ** 2 / 2


def skellam_rdp(alpha: float, lam: float, l2: float, l1: float) -> float:
    """RDP at order `alpha` of adding Sk(lam) to each coordinate of an integer vector whose
    change per record has norms at most (l2, l1)."""
    if lam <= 0:
        return math.inf
    return alpha * l2 * l2 / (4 * lam) + min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (16 * lam * lam), 3 * l1 / (4 * lam))


def poisson_subsampled_rdp(q: float, base: np.ndarray) -> np.ndarray:
    """Zhu and Wang's Theorem 6: RDP at ORDERS of a mechanism run on a Poisson sample at
    rate q, from its own RDP `base` at ORDERS (base[i] at order ORDERS[i])."""
    if q <= 0:
        return np.zeros(len(ORDERS))
    if q >= 1:
        return np.asarray(base, dtype=np.float64)
    eps = dict(zip(ORDERS, base))
    out = np.empty(len(ORDERS))
    log_q, log_1q = math.log(q), math.log1p(-q)
    for i, alpha in enumerate(ORDERS):
        terms = [(alpha - 1) * log_1q + math.log1p((alpha - 1) * q),
                 _log_binom(alpha, 2) + 2 * log_q + (alpha - 2) * log_1q + eps[2]]
        for ell in range(3, alpha + 1):
            terms.append(math.log(3) + _log_binom(alpha, ell) + (alpha - ell) * log_1q + ell * log_q + (ell - 1) * eps[ell])
        top = max(terms)
        out[i] = (top + math.log(sum(math.exp(t - top) for t in terms))) / (alpha - 1)
    return out


def _log_binom(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


@lru_cache(maxsize=1024)  # a site repeats one mechanism round after round
def subsampled_skellam_rdp(noise_multiplier: float, q: float, l2: float, l1: float) -> tuple[float, ...]:
    """RDP at ORDERS of one Poisson-subsampled Skellam release (one distributed DP-SGD step)."""
    lam = skellam_lambda(noise_multiplier, l2)
    base = np.array([skellam_rdp(a, lam, l2, l1) for a in ORDERS])
    return tuple(poisson_subsampled_rdp(q, base))


def history_rdp(history: list[tuple]) -> np.ndarray:
    """The composed RDP at ORDERS of a history mixing Gaussian entries (sigma, q, steps) and
    Skellam entries (sigma, q, steps, l2, l1)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    total = np.zeros(len(ORDERS))
    for entry in history:
        sigma, q, steps = float(entry[0]), float(entry[1]), int(entry[2])
        if len(entry) == 5:
            total += steps * np.asarray(subsampled_skellam_rdp(sigma, q, float(entry[3]), float(entry[4])))
        else:
            total += np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=list(ORDERS)))
    return total


def epsilon_of_rdp_history(history: list[tuple], delta: float) -> float:
    """(epsilon at delta) of a history with Skellam entries, by RDP composition."""
    from opacus.accountants.analysis.rdp import get_privacy_spent

    if not history:
        return 0.0
    epsilon, _ = get_privacy_spent(orders=list(ORDERS), rdp=history_rdp(history), delta=delta)
    return float(epsilon)


def sensitivities(values: int, levels: int) -> tuple[float, float]:
    """(l2, l1) of one record's contribution to the integer sum: its clipped gradient,
    scaled to `levels` per clipping norm and rounded per coordinate (each coordinate
    moves by less than 1), over `values` coordinates."""
    l2 = levels + math.sqrt(values)
    l1 = math.sqrt(values) * levels + values
    return l2, l1


def skellam_noise(lam: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sk(lam) per coordinate, as int64."""
    return rng.poisson(lam, size).astype(np.int64) - rng.poisson(lam, size).astype(np.int64)
