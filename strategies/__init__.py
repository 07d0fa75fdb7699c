"""Adapter-aware aggregation strategies, chosen by `strategy.name`."""

from __future__ import annotations

from fedlora.config import StrategySection
from strategies.base import ClientUpdate, Strategy, trained_part
from strategies.exact import Exact
from strategies.fedadam import FedAdam
from strategies.fedavg import FedAvg
from strategies.fedavgm import FedAvgM
from strategies.fedsvd import FedSVD
from strategies.fedyogi import FedYogi
from strategies.ffa import FFA
from strategies.median import Median
from strategies.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type] = {cls.name: cls for cls in (FedAvg, FFA, FedSVD, Exact, FedAvgM, FedAdam, FedYogi, Median, TrimmedMean)}


def get_strategy(section: StrategySection) -> Strategy:
    if section.name not in STRATEGIES:
        raise ValueError(f"strategy.name: unknown strategy {section.name!r} (known: {', '.join(sorted(STRATEGIES))})")
    return STRATEGIES[section.name](section)


__all__ = ["ClientUpdate", "Strategy", "STRATEGIES", "get_strategy", "trained_part"]
