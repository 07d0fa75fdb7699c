"""FedAvg over adapter tensors: each tensor is the num-examples-weighted mean.

For LoRA this averages A and B separately (mean(B)·mean(A) != mean(B·A));
it is the baseline every federated LLM framework uses.
"""

from __future__ import annotations

import torch

from fedlora.adapter_state import Adapter
from fedlora.config import StrategySection
from fedlora.strategies.base import ClientUpdate, Stateless


def weighted_mean64(updates: list[ClientUpdate]) -> Adapter:
    """The num-examples-weighted mean of each tensor, in float64."""
    total = sum(u.num_examples for u in updates)
    keys = updates[0].adapter.keys()
    return {key: sum((u.num_examples / total) * u.adapter[key].to(torch.float64) for u in updates) for key in keys}


def weighted_mean(updates: list[ClientUpdate]) -> Adapter:
    return {key: value.to(torch.float32) for key, value in weighted_mean64(updates).items()}


class FedAvg(Stateless):
    name = "fedavg"

    def __init__(self, section: StrategySection | None = None):
        self.section = section or StrategySection(name=self.name)

    def aggregate(self, global_adapter: Adapter, updates: list[ClientUpdate]) -> Adapter:
        return weighted_mean(updates)
