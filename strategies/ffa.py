"""FFA-LoRA: A is initialised once by the coordinator (from the seed) and frozen
everywhere; sites train and send only B (and any trainable head such as a
classifier). With A shared, mean(B)·A = mean(B·A): averaging B is exact, bytes up
halve, and under DP only B (and the head) receive noise.
"""

from __future__ import annotations

from fedlora.adapter_state import Adapter
from fedlora.config import StrategySection
from fedlora.strategies.base import ClientUpdate, Stateless
from fedlora.strategies.fedavg import weighted_mean


class FFA(Stateless):
    name = "ffa"
    frozen_factors = ("lora_A",)  # adapter keys containing these stay at the global value

    def __init__(self, section: StrategySection):
        self.section = section

    def aggregate(self, global_adapter: Adapter, updates: list[ClientUpdate]) -> Adapter:
        # Updates carry only the trained keys; A comes from the global adapter unchanged.
        return {**global_adapter, **weighted_mean(updates)}
