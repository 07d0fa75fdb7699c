"""The Gaussian mechanism for the numbers a DP site releases besides its adapter.

A released sum of per-unit values, each bounded by `sensitivity`, changes by at
most `sensitivity` when one unit is added or removed. Adding N(0, (z * sensitivity)^2)
makes one release a Gaussian mechanism with noise multiplier z; k such releases at
the same z are accounted as k steps at sample rate 1 (Opacus's accountants treat a
subsampled Gaussian with q = 1 as the plain Gaussian mechanism).

The noise comes from the operating system's entropy (random.SystemRandom), never a
seeded generator: the coordinator knows the run seed.
"""

from __future__ import annotations

import random

_entropy = random.SystemRandom()


def noisy_sum(value: float, sensitivity: float, noise_multiplier: float) -> float:
    """`value` + Gaussian noise of standard deviation noise_multiplier * sensitivity."""
    return float(value) + _entropy.gauss(0.0, noise_multiplier * sensitivity)
