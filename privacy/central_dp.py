"""Central DP at the coordinator (DP-FedAvg with fixed clipping, McMahan et al. 2018).

Each site's update (its adapter minus the global one) is clipped to `clip_norm`;
the coordinator averages the clipped updates without weights and adds Gaussian
noise of std `noise_multiplier * clip_norm / n` to the mean, as Flower's
DifferentialPrivacyServerSideFixedClipping does. The privacy unit is a whole site;
every round is one Gaussian mechanism with sampling rate = sites asked / sites
known, accounted with Opacus's accountant over rounds.
"""

from __future__ import annotations

import os

import torch

from fedlora.adapter_state import Adapter


def update_norm(update: Adapter, reference: Adapter) -> float:
    return float(torch.sqrt(sum(((update[k] - reference[k]).double() ** 2).sum() for k in update)))


def clip_update(update: Adapter, reference: Adapter, clip_norm: float) -> Adapter:
    """`reference + delta * min(1, clip_norm / ||delta||)`, with the norm over all tensors together."""
    norm = update_norm(update, reference)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: reference[k] + (v - reference[k]) * scale for k, v in update.items()}


def add_noise(adapter: Adapter, keys: list[str], std: float, generator: torch.Generator | None = None) -> Adapter:
    """Gaussian noise on the tensors in `keys` (the ones sites train). The generator
    is seeded with 64 bits from os.urandom by default: noise the run seed could predict protects nothing."""
    gen = generator or torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
    out = dict(adapter)
    for k in keys:
        out[k] = adapter[k] + torch.normal(0.0, std, size=adapter[k].shape, generator=gen, dtype=torch.float32).to(adapter[k].dtype)
    return out
