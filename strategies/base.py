"""The strategy interface: how the coordinator turns client updates into the next global adapter.

A strategy is chosen by `strategy.name`; its state is plain data (saved in
checkpoints), and it sees adapters as ``dict[str, Tensor]`` with PEFT's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from fedlora.adapter_state import Adapter


@dataclass
class ClientUpdate:
    node_id: int
    adapter: Adapter
    num_examples: int


class Strategy(Protocol):
    name: str

    def aggregate(self, global_adapter: Adapter, updates: list[ClientUpdate]) -> Adapter:
        """The next global adapter from this round's accepted updates (at least one)."""
        ...

    def state(self) -> dict[str, Any]:
        """Plain data to checkpoint (JSON-serialisable); empty if stateless."""
        ...

    def load_state(self, state: dict[str, Any]) -> None: ...
