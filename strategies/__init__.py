"""Adapter-aware aggregation strategies, chosen by `strategy.name`."""

from __future__ import annotations

from strategies.base import ClientUpdate, Strategy
from strategies.fedavg import FedAvg

STRATEGIES: dict[str, type] = {"fedavg": FedAvg}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"strategy.name: unknown strategy {name!r} (known: {', '.join(sorted(STRATEGIES))})")
    return STRATEGIES[name]()


__all__ = ["ClientUpdate", "Strategy", "STRATEGIES", "get_strategy"]
