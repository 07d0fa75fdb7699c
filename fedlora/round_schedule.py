"""What changes from round to round in a site's training: the learning rate, and whether
LoRA trains yet. Both follow from the run config and the round number alone (the same
at every site, data-independent); distributed DP's coordinator step uses the same rate.

**Learning rate** (`train.lr_schedule`). "cosine" decays from `train.lr` in round 1 to
`train.lr * train.lr_final_fraction` in the last round, half a cosine in between:

    lr(r) = lr * (f + (1 - f) * (1 + cos(pi * (r - 1) / (R - 1))) / 2),   r = 1..R

Under DP-SGD a step's noise is proportional to its rate, so small late steps let the
model settle where the large early ones brought it; a constant rate leaves the final
iterate as noisy as the first.

**Head first** (`train.head_rounds`). In rounds 1..k only the classifier head trains and
the LoRA factors stay at the global value (linear probing, then fine-tuning: Kumar et
al. 2022). A random head's gradients are large and point nowhere useful for the
encoder; under per-example clipping they also crowd LoRA's share of the clipped norm.
"""

from __future__ import annotations

import math
from dataclasses import replace

from fedlora.config import Config, TrainSection

# Adapter-key substrings of the LoRA factors: frozen while only the head trains.
LORA_FACTORS = ("lora_A", "lora_B")


def round_lr(train: TrainSection, server_round: int, rounds: int) -> float:
    """The learning rate of round `server_round` (1-based) of `rounds` planned."""
    if train.lr_schedule == "constant" or rounds <= 1:
        return train.lr
    progress = min(max(server_round - 1, 0), rounds - 1) / (rounds - 1)
    f = train.lr_final_fraction
    return train.lr * (f + (1.0 - f) * (1.0 + math.cos(math.pi * progress)) / 2.0)


def with_round_lr(config: Config, server_round: int) -> Config:
    """`config` with train.lr set to this round's rate."""
    lr = round_lr(config.train, server_round, config.federation.rounds)
    return replace(config, train=replace(config.train, lr=lr))


def frozen_in_round(train: TrainSection, server_round: int) -> tuple[str, ...]:
    """The adapter factors a site keeps frozen in this round on top of the strategy's own."""
    return LORA_FACTORS if server_round <= train.head_rounds else ()
