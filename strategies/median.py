"""Coordinate-wise median of the client changes (unweighted; Yin et al. 2018).

The new global adapter is the global one plus, per coordinate, the median of the
clients' changes (each client's adapter minus what it was sent; with every site
sent the global adapter this is the median of the adapters). Each coordinate is
the median of the clients' values (for an even count, the mean
of the two middle values, as numpy.median). With n clients, fewer than n/2
arbitrary ones cannot move a coordinate outside the honest clients' range.
num_examples is ignored: a client could inflate it to gain weight.
"""

from __future__ import annotations

import torch

from fedlora.adapter_state import Adapter
from fedlora.config import StrategySection
from fedlora.strategies.base import ClientUpdate, Stateless, stacked_changes


def coordinate_median(values: torch.Tensor) -> torch.Tensor:
    """numpy.median over dim 0 (torch.median would return the lower middle value)."""
    ordered = values.sort(dim=0).values
    n = values.shape[0]
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


class Median(Stateless):
    name = "median"

    def __init__(self, section: StrategySection | None = None):
        self.section = section or StrategySection(name=self.name)

    def aggregate(self, global_adapter: Adapter, updates: list[ClientUpdate]) -> Adapter:
        return {
            key: (global_adapter[key].to(torch.float64) + coordinate_median(stacked_changes(updates, global_adapter, key))).to(torch.float32)
            for key in updates[0].adapter
        }
