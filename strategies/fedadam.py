"""FedAdam (Reddi et al. 2021, Algorithm 2), no bias correction as in the paper.

    m <- beta1 * m + (1 - beta1) * delta                (m starts at 0)
    v <- beta2 * v + (1 - beta2) * delta^2              (v starts at tau^2, the paper's v_{-1} >= tau^2)
    x <- x + server_lr * m / (sqrt(v) + tau)
"""

from __future__ import annotations

import torch

from fedlora.adapter_state import Adapter
from fedlora.strategies.server_optimizer import ServerOptimizer


class FedAdam(ServerOptimizer):
    name = "fedadam"
    buffers = ("m", "v")
    default_server_lr = 0.01

    def initial(self, buffer: str) -> float:
        return self.section.tau**2 if buffer == "v" else 0.0

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.section.beta2 * v + (1 - self.section.beta2) * d2

    def direction(self, delta: Adapter) -> Adapter:
        s, m, v = self.section, self.moments["m"], self.moments["v"]
        for key, d in delta.items():
            m[key] = s.beta1 * m[key] + (1 - s.beta1) * d
            v[key] = self.second_moment(v[key], d * d)
        return {key: m[key] / (v[key].sqrt() + s.tau) for key in delta}
