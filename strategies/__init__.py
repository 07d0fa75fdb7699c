"""Adapter-aware aggregation strategies, chosen by `strategy.name`."""

from __future__ import annotations

from fedlora.config import StrategySection
from fedlora.strategies.base import ClientUpdate, Strategy, trained_part
from fedlora.strategies.exact import Exact
from fedlora.strategies.fedadam import FedAdam
from fedlora.strategies.fedavg import FedAvg
from fedlora.strategies.fedavgm import FedAvgM
from fedlora.strategies.fedsvd import FedSVD
from fedlora.strategies.fedyogi import FedYogi
from fedlora.strategies.ffa import FFA
from fedlora.strategies.median import Median
from fedlora.strategies.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type] = {cls.name: cls for cls in (FedAvg, FFA, FedSVD, Exact, FedAvgM, FedAdam, FedYogi, Median, TrimmedMean)}


def get_strategy(section: StrategySection) -> Strategy:
    if section.name not in STRATEGIES:
        raise ValueError(f"strategy.name: unknown strategy {section.name!r} (known: {', '.join(sorted(STRATEGIES))})")
    return STRATEGIES[section.name](section)


__all__ = ["ClientUpdate", "Strategy", "STRATEGIES", "get_strategy", "trained_part"]
