"""The strategy interface: how the coordinator turns client updates into the next global adapter.

A strategy is chosen by `strategy.name` and built from the `[strategy]` config
section; it sees adapters as ``dict[str, Tensor]`` with PEFT's keys. Its state is a
flat ``dict[str, Tensor]`` (scalars as 0-d tensors) that the coordinator saves as a
safetensors file in each checkpoint; ``load_state(state())`` on a fresh instance
must give identical subsequent aggregation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from fedlora.adapter_state import Adapter


@dataclass
class ClientUpdate:
    node_id: int
    adapter: Adapter  # what the site sent back: the tensors it trains
    num_examples: int
    # What the coordinator sent that site this round (the whole adapter, at the site's
    # LoRA rank); None = the global adapter itself. A site's change is adapter - sent.
    sent: Adapter | None = None

    def start(self, global_adapter: Adapter) -> Adapter:
        """The adapter this site started from."""
        return self.sent if self.sent is not None else global_adapter


class Strategy(Protocol):
    name: str
    # Adapter-key substrings that sites keep frozen at the global value and do not
    # send back (ffa: "lora_A"); empty for strategies that aggregate every tensor.
    frozen_factors: tuple[str, ...]

    def aggregate(self, global_adapter: Adapter, updates: list[ClientUpdate]) -> Adapter:
        """The next global adapter from this round's accepted updates (at least one)."""
        ...

    def state(self) -> dict[str, torch.Tensor]:
        """Flat tensors to checkpoint (scalars as 0-d tensors); empty if stateless."""
        ...

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `state()` returned, into a fresh instance with the same config."""
        ...

    def round_metrics(self) -> dict[str, float]:
        """Scalars about the last aggregation, added to that round's metrics row."""
        ...


class StrategyDefaults:
    """What most strategies share: every tensor trained and sent, nothing extra to report."""

    frozen_factors: tuple[str, ...] = ()

    def round_metrics(self) -> dict[str, float]:
        return {}


def trained_part(adapter: Adapter, frozen_factors: tuple[str, ...]) -> Adapter:
    """The tensors sites train and send back under a strategy with these frozen factors."""
    return {k: v for k, v in adapter.items() if not any(f in k for f in frozen_factors)}


class Stateless(StrategyDefaults):
    """For strategies whose output depends on this round's updates only."""

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} is stateless but the checkpoint holds {sorted(state)[:3]}")  # type: ignore[attr-defined]


def stacked_changes(updates: list[ClientUpdate], global_adapter: Adapter, key: str) -> torch.Tensor:
    """The clients' changes (update - what each was sent) for `key`, stacked, in float64."""
    return torch.stack([u.adapter[key].to(torch.float64) - u.start(global_adapter)[key].to(torch.float64) for u in updates])
