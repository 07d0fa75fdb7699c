"""FedYogi (Reddi et al. 2021, Algorithm 2): FedAdam with Yogi's additive second moment,

    v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)  (v starts at tau^2)

which changes v by at most (1 - beta2) * delta^2 per round, up or down, so a few
large pseudo-gradients do not inflate it as fast as Adam's. m and the step are FedAdam's.
"""

from __future__ import annotations

import torch

from fedlora.strategies.fedadam import FedAdam


class FedYogi(FedAdam):
    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.section.beta2) * d2 * torch.sign(v - d2)
