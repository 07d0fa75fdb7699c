"""Distributed DP-SGD across sites (`privacy.mode = "distributed"`): the noise of one
central DP-SGD step, added in shares by the sites, summed under secure aggregation.

Each round is one DP-SGD step at the global adapter over the union of the sites' records:

1. each site Poisson-samples its records at the run's `privacy.distributed_sample_rate` q,
   clips each record's gradient to `privacy.max_grad_norm` C, scales it to LEVELS steps
   per C and rounds each coordinate at random (unbiased), and sums the integers;
2. it adds its share of Skellam noise, Sk(lam / (n - t)) per coordinate (n the sites that
   mask, t = `privacy.distributed_tolerance`): any n - t honest sites together add Sk(lam)
   or more, the noise the accounting assumes (privacy/skellam.py);
3. it masks the noisy sum plus its record count (privacy/secure_aggregation.py);
4. the coordinator unmasks the sum, divides it by the expected union batch (q times all
   records) and takes the SGD step at `train.lr` (as a change the linear strategy applies).

A record's influence on the integer sum is bounded by (l2, l1) = (LEVELS + sqrt(d),
sqrt(d) LEVELS + d) over d coordinates (skellam.sensitivities), so the guarantee holds for
the quantized values that are released. What it assumes, and a site's ledger records:
secure aggregation reveals only the sum, and at most t of the n sites that share keys drop
out before masking (their noise is missing) or collude with the coordinator (a site reveals
its shares only if at least n - t masked inputs arrived, client/secure_masking.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlora.privacy import skellam
from fedlora.privacy.finite import clip_factors
from fedlora.privacy.secure_aggregation import QuantizationSpec, SecureAggregationError, dequantize
from fedlora.privacy.secure_aggregation_records import MAX_DISTRIBUTED_RECORDS


@dataclass(frozen=True)
class DistributedPlan:
    noise_multiplier: float  # of a Gaussian with the Skellam total's variance, per l2
    sample_rate: float
    l2: float
    l1: float
    tolerance: int

    @property
    def mechanism(self) -> tuple[float, float, int, float, float]:
        """One round as a ledger history entry (one Skellam step)."""
        return (self.noise_multiplier, self.sample_rate, 1, self.l2, self.l1)

    def trust(self, sites: int) -> str:
        return (f"secure aggregation reveals only the sum; at most {self.tolerance} of the {sites} masking sites "
                "drop out before masking or collude with the coordinator")

    def share(self, sites: int) -> float:
        """This site's Skellam parameter: the total's, split over the sites that must stay honest."""
        return skellam.skellam_lambda(self.noise_multiplier, self.l2) / max(1, sites - self.tolerance)

    def min_survivors(self, sites: int) -> int:
        """Fewer survivors than this carry less than the total noise (a site does not reveal)."""
        return max(1, sites - self.tolerance)


def rounded_clipped_sum(grad_samples: list, max_grad_norm: float, levels: int, generator) -> list:
    """Per record (row): its gradient over all `grad_samples` clipped to `max_grad_norm`,
    scaled to `levels` per norm and rounded per coordinate at random (unbiased); the sum
    over records of those integer vectors, per tensor (int64)."""
    import torch

    if not grad_samples:
        raise ValueError("no per-example gradients to sum")
    rows = grad_samples[0].shape[0]
    norms = torch.stack([g.reshape(rows, -1).to(torch.float64).norm(dim=1) for g in grad_samples], dim=1).norm(dim=1)
    # Opacus's clipping factor, then the scale: every record's vector has norm <= levels. A
    # record whose gradient holds NaN or inf contributes nothing (factor 0, privacy/finite.py):
    # a NaN factor would make the sum, and the released integers, garbage.
    factor = clip_factors(norms, max_grad_norm) * (levels / max_grad_norm)
    sums = []
    for g in grad_samples:
        scaled = g.to(torch.float64).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0) * factor.view(-1, *([1] * (g.dim() - 1)))
        low = scaled.floor()
        up = torch.rand(scaled.shape, generator=generator, dtype=torch.float64, device=scaled.device) < (scaled - low)
        sums.append((low + up).to(torch.int64).sum(dim=0))
    return sums


def noisy_input(integer_sum: np.ndarray, records: int, share: float, spec: QuantizationSpec,
                rng: np.random.Generator) -> np.ndarray:
    """The vector a site masks: its integer sum plus its Skellam share, then its record
    count, as residues modulo 2^bits."""
    spec.check()
    if not 0 < records <= MAX_DISTRIBUTED_RECORDS:
        raise SecureAggregationError(f"distributed DP sums at most {MAX_DISTRIBUTED_RECORDS} records per site (this site has {records})")
    noisy = integer_sum.astype(np.int64) + skellam.skellam_noise(share, integer_sum.shape[0], rng)
    mask = np.uint64((1 << spec.modulus_bits) - 1)
    return np.concatenate([noisy.astype(np.uint64) & mask, np.array([records], dtype=np.uint64)])


def coordinator_step(total: np.ndarray, spec: QuantizationSpec, sample_rate: float, lr: float) -> tuple[np.ndarray, int]:
    """(the SGD step's change, the union's record count) from the unmasked modular sum:
    the noisy sum of clipped gradients over the expected union batch, times -lr."""
    records = int(total[-1])
    if records <= 0:
        raise SecureAggregationError(f"the union's record count {records} is impossible")
    gradient_sum = dequantize(total[:-1], 1, spec)  # signed residues back in gradient units
    return -lr * gradient_sum / (sample_rate * records), records

