"""Coordinate-wise trimmed mean of the client changes (unweighted; Yin et al. 2018).

The new global adapter is the global one plus the trimmed mean of the clients'
changes (each client's adapter minus what it was sent). Per coordinate: sort the n clients' values, drop k = floor(trim_fraction * n) from
each end, and average the remaining n - 2k (at least one, since trim_fraction < 0.5).
Up to k arbitrary clients cannot move a coordinate outside the honest clients' range.
With fewer than 1 / trim_fraction clients, k = 0 and this is the plain mean.
"""

from __future__ import annotations

import math

import torch

from fedlora.adapter_state import Adapter
from fedlora.config import StrategySection
from fedlora.strategies.base import ClientUpdate, Stateless, stacked_changes


def trimmed_count(n: int, trim_fraction: float) -> int:
    """k cut from each end; the 1e-9 keeps 0.3 * 10 (= 2.9999...) from flooring to 2."""
    return min(math.floor(trim_fraction * n + 1e-9), (n - 1) // 2)


class TrimmedMean(Stateless):
    name = "trimmed-mean"

    def __init__(self, section: StrategySection | None = None):
        self.section = section or StrategySection(name=self.name)

    def aggregate(self, global_adapter: Adapter, updates: list[ClientUpdate]) -> Adapter:
        n = len(updates)
        k = trimmed_count(n, self.section.trim_fraction)
        return {
            key: (global_adapter[key].to(torch.float64)
                  + stacked_changes(updates, global_adapter, key).sort(dim=0).values[k : n - k].mean(dim=0)).to(torch.float32)
            for key in updates[0].adapter
        }
