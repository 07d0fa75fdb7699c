"""FedAvg over adapter tensors: each tensor is the num-examples-weighted mean.

For LoRA this averages A and B separately (mean(B)·mean(A) != mean(B·A));
it is the baseline every federated LLM framework uses.
"""

from __future__ import annotations

from typing import Any

import torch

from fedlora.adapter_state import Adapter
from strategies.base import ClientUpdate


def weighted_mean(updates: list[ClientUpdate]) -> Adapter:
    total = sum(u.num_examples for u in updates)
    keys = updates[0].adapter.keys()
    return {
        key: sum((u.num_examples / total) * u.adapter[key].to(torch.float64) for u in updates).to(torch.float32)
        for key in keys
    }


class FedAvg:
    name = "fedavg"

    def aggregate(self, global_adapter: Adapter, updates: list[ClientUpdate]) -> Adapter:
        return weighted_mean(updates)

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass
