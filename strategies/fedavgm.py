"""FedAvgM: server momentum on the pseudo-gradient (Hsu et al. 2019).

    v <- momentum * v + delta          (v starts at 0)
    x <- x + server_lr * v

With momentum = 0 and server_lr = 1 this is FedAvg.
"""

from __future__ import annotations

from fedlora.adapter_state import Adapter
from fedlora.strategies.server_optimizer import ServerOptimizer


class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    buffers = ("v",)
    default_server_lr = 1.0

    def direction(self, delta: Adapter) -> Adapter:
        v = self.moments["v"]
        for key, d in delta.items():
            v[key] = self.section.momentum * v[key] + d
        return dict(v)
